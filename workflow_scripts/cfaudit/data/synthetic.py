"""The embedded dataset: procedural dermoscopy-like images whose class is decided by planted traits.

Each image is skin (tone, texture, vignetting) with one pigmented lesion and optional nuisances (hair,
ruler marks, an ink dot). The class is drawn first; the lesion's traits are then drawn from
class-dependent, overlapping distributions in the spirit of the ABCD rule, so a classifier has to learn
the traits and no single one separates the classes:

- ``asymmetry``  (A): weight of a one-sided (cos theta) distortion of the outline, 0..1
- ``border``     (B): amplitude of high-frequency ripples of the outline, 0..1
- ``blue_grey``, ``red``, ``dark`` (C): presence of blue-grey, red and near-black regions; ``n_colours``
  counts the distinct lesion colours (light brown is always there)
- ``diameter``   (D): lesion diameter as a fraction of the image side

Nuisances (skin tone as ITA, hair, ruler, ink, illumination) are independent of the class. Every value is
written to metadata.csv so that later stages (trait analysis) can check what they recover.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFilter

# Lesion colours (sRGB); light brown is the base of every lesion.
LIGHT_BROWN = np.array([150, 100, 65], float)
DARK = np.array([45, 28, 22], float)
BLUE_GREY = np.array([95, 110, 135], float)
RED = np.array([185, 70, 70], float)


@dataclass
class Traits:
    image_id: str
    label: int
    diameter: float
    asymmetry: float
    border: float
    blue_grey: bool
    red: bool
    dark: bool
    n_colours: int
    skin_ita: float
    hair: int
    ruler: bool
    ink: bool
    illumination: float


def _clipped_normal(rng, mean, sd, lo, hi):
    return float(np.clip(rng.normal(mean, sd), lo, hi))


def sample_traits(rng: np.random.Generator, image_id: str, label: int) -> Traits:
    """Class-dependent trait draws with deliberate overlap between benign (0) and malignant (1)."""
    m = label == 1
    diameter = _clipped_normal(rng, 0.50 if m else 0.38, 0.09, 0.2, 0.75)
    asymmetry = _clipped_normal(rng, 0.62 if m else 0.22, 0.2, 0.0, 1.0)
    border = _clipped_normal(rng, 0.60 if m else 0.22, 0.2, 0.0, 1.0)
    blue_grey = bool(rng.random() < (0.55 if m else 0.10))
    red = bool(rng.random() < (0.45 if m else 0.12))
    dark = bool(rng.random() < (0.60 if m else 0.25))
    return Traits(
        image_id=image_id,
        label=int(label),
        diameter=round(diameter, 4),
        asymmetry=round(asymmetry, 4),
        border=round(border, 4),
        blue_grey=blue_grey,
        red=red,
        dark=dark,
        n_colours=1 + int(blue_grey) + int(red) + int(dark),
        skin_ita=round(float(rng.uniform(-10, 60)), 2),
        hair=int(rng.choice([0, 0, 0, 2, 5, 10])),
        ruler=bool(rng.random() < 0.2),
        ink=bool(rng.random() < 0.15),
        illumination=round(float(rng.uniform(0.85, 1.1)), 3),
    )


def skin_colour(ita_deg: float) -> np.ndarray:
    """sRGB skin colour for an Individual Typology Angle (ITA = atan((L*-50)/b*)), via CIELAB."""
    b_star = 16.0
    lightness = 50 + b_star * math.tan(math.radians(ita_deg))
    a_star = 12.0
    # CIELAB -> XYZ (D65) -> linear sRGB -> sRGB
    fy = (lightness + 16) / 116
    fx, fz = fy + a_star / 500, fy - b_star / 200
    finv = lambda f: f**3 if f**3 > 0.008856 else (f - 16 / 116) / 7.787  # noqa: E731
    xyz = np.array([0.95047 * finv(fx), 1.0 * finv(fy), 1.08883 * finv(fz)])
    m = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
    lin = np.clip(m @ xyz, 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return srgb * 255


def _smooth_noise(rng, n, scale):
    """Low-frequency texture in [-1, 1] from upsampled white noise."""
    small = rng.normal(size=(max(2, n // scale), max(2, n // scale))).astype(np.float32)
    img = Image.fromarray(small).resize((n, n), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32)
    return arr / (np.abs(arr).max() + 1e-6)


def lesion_radius(theta: np.ndarray, t: Traits, rng_params: dict) -> np.ndarray:
    """Outline r(theta) in units of the lesion radius: ellipse x asymmetric bulge x ripples."""
    phi, ecc, phases, amps = rng_params["phi"], rng_params["ecc"], rng_params["phases"], rng_params["amps"]
    ellipse = 1.0 / np.sqrt((np.cos(theta - phi) / (1 + ecc)) ** 2 + (np.sin(theta - phi) / (1 - ecc)) ** 2 + 1e-9)
    bulge = 1.0 + 0.45 * t.asymmetry * np.cos(theta - phi - 0.7)
    ripples = 1.0 + t.border * sum(a * np.cos(k * theta + p) for k, a, p in zip(range(6, 14), amps, phases))
    return ellipse * bulge * ripples


# Images are drawn at SUPERSAMPLE x their size, blurred and downsampled (anti-aliased edges, ticks and hairs).
SUPERSAMPLE = 2


def render(t: Traits, size: int, rng: np.random.Generator, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Draw one image (uint8, size x size x 3) for the given traits."""
    n = size * supersample
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = n / 2 + rng.normal(0, n * 0.04), n / 2 + rng.normal(0, n * 0.04)
    dx, dy = xx - cx, yy - cy
    rr = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)

    # Skin: tone from ITA, texture, vignetting, illumination.
    skin = skin_colour(t.skin_ita)[None, None, :] * (1 + 0.06 * _smooth_noise(rng, n, 16)[..., None])
    vignette = 1 - 0.35 * (np.hypot(xx - n / 2, yy - n / 2) / (n * 0.72)) ** 2
    img = skin * vignette[..., None]

    # Lesion outline and soft mask.
    params = {
        "phi": rng.uniform(0, 2 * np.pi),
        "ecc": rng.uniform(0.0, 0.2),
        "phases": rng.uniform(0, 2 * np.pi, 8),
        "amps": rng.uniform(0.02, 0.09, 8),
    }
    radius = 0.5 * t.diameter * n / 1.1
    edge = lesion_radius(theta, t, params) * radius
    softness = n * (0.012 + 0.02 * rng.random())
    mask = np.clip((edge - rr) / softness + 0.5, 0, 1)

    # Lesion colour: light brown base darkening towards the centre, plus colour regions.
    depth = np.clip(1 - rr / (edge + 1e-6), 0, 1)
    lesion = LIGHT_BROWN[None, None, :] * (1 - 0.35 * depth[..., None]) * (1 + 0.08 * _smooth_noise(rng, n, 8)[..., None])
    for present, colour, spread in ((t.dark, DARK, 0.35), (t.blue_grey, BLUE_GREY, 0.4), (t.red, RED, 0.35)):
        if not present:
            continue
        ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0.0, 0.45) * radius
        bx, by = cx + dist * np.cos(ang), cy + dist * np.sin(ang)
        blob = np.exp(-(((xx - bx) ** 2 + (yy - by) ** 2) / (2 * (spread * radius) ** 2)))
        blob = np.clip(blob * 1.6, 0, 1)[..., None]
        lesion = lesion * (1 - blob) + colour[None, None, :] * blob
    img = img * (1 - mask[..., None]) + lesion * mask[..., None]
    img = np.clip(img * t.illumination, 0, 255).astype(np.uint8)

    pil = Image.fromarray(img, "RGB")
    draw = ImageDraw.Draw(pil)
    if t.ruler:  # ruler ticks along one edge
        y0 = int(n * rng.uniform(0.86, 0.94))
        step = max(3, n // 24)
        for i, x in enumerate(range(int(n * 0.1), int(n * 0.9), step)):
            draw.line([(x, y0), (x, y0 - (n // 20 if i % 5 == 0 else n // 40))], fill=(30, 30, 30), width=max(1, n // 160))
    if t.ink:  # a purple marker dot
        ix, iy, ir = rng.uniform(0.08, 0.25) * n, rng.uniform(0.08, 0.25) * n, n * 0.035
        draw.ellipse([ix - ir, iy - ir, ix + ir, iy + ir], fill=(110, 50, 140))
    for _ in range(t.hair):  # dark curved hairs
        x0, y0 = rng.uniform(0, n, 2)
        ang = rng.uniform(0, 2 * np.pi)
        length, bend = rng.uniform(0.4, 0.9) * n, rng.normal(0, 0.15)
        pts = []
        for s in np.linspace(0, 1, 12):
            a = ang + bend * s * 3
            pts.append((x0 + np.cos(a) * s * length, y0 + np.sin(a) * s * length))
        draw.line(pts, fill=(25, 18, 15), width=max(1, n // 128))
    pil = pil.filter(ImageFilter.GaussianBlur(radius=supersample * 0.4))
    return np.asarray(pil.resize((size, size), Image.LANCZOS))


def generate_dataset(out_dir: str | Path, n_images: int, malignant_fraction: float, size: int, seed: int) -> pd.DataFrame:
    """Write ``SYN_00000.png ...`` to ``out_dir`` and return the per-image table of planted traits.

    Exactly ``round(n_images * malignant_fraction)`` images are malignant (in a seeded random order), so
    the class balance is what the config says. The same seed gives byte-identical images.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_mal = int(round(n_images * malignant_fraction))
    labels = np.array([1] * n_mal + [0] * (n_images - n_mal))
    rng.shuffle(labels)
    rows = []
    for i, label in enumerate(labels):
        image_id = f"SYN_{i:05d}"
        img_rng = np.random.default_rng([seed, i])  # per-image stream: image i does not depend on n_images
        traits = sample_traits(img_rng, image_id, int(label))
        Image.fromarray(render(traits, size, img_rng), "RGB").save(out / f"{image_id}.png")
        row = asdict(traits)
        row.update(file=f"{image_id}.png", diagnosis="synthetic melanoma" if label else "synthetic naevus",
                   licence="CC0-1.0 (generated)")
        rows.append(row)
    return pd.DataFrame(rows)
