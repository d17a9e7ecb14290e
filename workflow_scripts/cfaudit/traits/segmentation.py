"""Classical lesion segmentation for dermoscopy images, with a quality flag where it fails.

Method (every length is a fraction of the image side, so one setting serves 64 px and 1024 px):

1. **Hair removal** (Lee et al. 1997 "DullRazor" in spirit): a morphological black-hat (grey closing with a
   square of half-width ``hair_kernel`` minus the image) of the CIELAB lightness L* marks thin dark
   structures; pixels whose response exceeds ``hair_threshold`` (L* units) form candidate components, and
   those that are line-like (at least ``hair_min_length`` long, bounding-box diagonal, and no wider on
   average, area / length, than the kernel's half-width) are hair: dots and globules of a pigment
   network are not. Hair pixels are replaced, channel by channel, by the grey closing of the image.
   **Ink**: violet marker pen (CIELAB chroma >= ``ink_chroma`` with hue angle between ``ink_hue_min`` and
   ``ink_hue_max`` degrees: purple, not the blue-grey of a lesion at about -90 deg nor skin at positive
   hues) is marked, excluded from lesion and skin, and reported as a nuisance.
   **Ruler**: the marks of a ruler are short thin dark ticks repeated along a straight line parallel to an
   image edge. Along each row (and column) of the black-hat response outside the lesion (half-width
   ``ruler_kernel``), a tick is a peak above ``ruler_threshold`` with prominence ``ruler_prominence`` and width at
   most ``ruler_max_tick`` (a hair crossing the row is one peak; one running along it has no prominent peaks);
   ticks no further apart than ``ruler_max_gap`` form a chain. A ruler is one line on plain skin: the rows
   ``ruler_isolation`` above and below must hold under a third as many peaks in the chain's span and a mean
   response under a third of the ticks' height (a periodic texture, such as a GAN's checkerboard artefact, is as
   strong in every row). The longest such chain of at least ``ruler_min_ticks``
   ticks is the ruler; an image without a ruler rarely has more than four such peaks in a row. The outermost 3 %
   of the image is left out (generators' padding artefacts line it with periodic specks). Rulers at an angle to the image edges
   are not found.
2. **Skin reference**: the median CIELAB colour of a frame of width ``border_band`` around the image,
   ignoring near-black regions connected to the frame (L* < ``dark_lightness``: the dark corners of
   circular dermoscopes), which are excluded from the lesion too.
3. **Shading correction** (``shading``; Cavalcanti & Scharcanski 2010): a quadratic surface in x, y fitted to
   the linear-light luminance of the skin pixels is divided out, so vignetting does not look like lesion.
4. **Colour-distance threshold**: ΔE*76 of every pixel from the skin reference, lightly Gaussian-smoothed
   (sigma ``smoothing``), thresholded at the LOWER of Otsu's threshold (1979) and a skin-noise threshold
   (median + ``skin_k`` x MAD of the skin pixels' distances, at least ``min_delta_e``). A lesion differs
   from skin in lightness and chroma, so the distance also finds light-brown lesions on dark skin where a
   lightness threshold fails; the skin-noise bound keeps Otsu from splitting a vivid blue-grey or red
   region off the rest of a multi-coloured lesion. The skin reference (and shading fit) is re-estimated
   from the pixels outside the first mask and the step repeated once.
5. **Clean-up**: binary opening and closing with discs, hole filling, then the connected component with
   the largest centre-weighted area (Gaussian weight, sigma ``centre_radius``: the lesion of a dermoscopy
   image is centred; stickers and ink at the edge lose), hole filling.
6. **Quality flags** (``SegmentationResult.flags``): ``empty``, ``small`` / ``large`` (area fraction outside
   [``min_area``, ``max_area``]), ``border`` (more than ``max_border_touch`` of the image frame in the mask:
   the lesion is cut off or skin was taken as lesion), ``low_contrast`` (ΔE between lesion and skin below
   ``min_contrast``), ``off_centre`` (the mask's centroid lies more than ``centre_radius`` from the centre). ``ok`` is True when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks

from cfaudit.traits.colour import delta_e, linear_to_lab, rgb_to_lab, srgb_to_linear


@dataclass(frozen=True)
class SegmentationSettings:
    hair_kernel: float = 0.02
    hair_threshold: float = 10.0
    hair_min_length: float = 0.08
    smoothing: float = 0.006
    border_band: float = 0.06
    dark_lightness: float = 12.0
    opening: float = 0.012
    closing: float = 0.02
    centre_radius: float = 0.25
    min_area: float = 0.004
    max_area: float = 0.85
    max_border_touch: float = 0.35
    min_contrast: float = 6.0
    shading: bool = True
    skin_k: float = 4.0
    min_delta_e: float = 6.0
    ink_chroma: float = 25.0
    ink_hue_min: float = -70.0
    ink_hue_max: float = -20.0
    ruler_kernel: float = 0.025
    ruler_threshold: float = 3.0
    ruler_prominence: float = 2.5
    ruler_max_tick: float = 0.06
    ruler_max_gap: float = 0.12
    ruler_isolation: float = 0.08
    ruler_min_ticks: int = 6

    @classmethod
    def from_config(cls, cfg: dict | None) -> "SegmentationSettings":
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise KeyError(f"traits.segmentation has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**cfg)


@dataclass
class SegmentationResult:
    mask: np.ndarray  # bool (H, W): the lesion
    hair: np.ndarray  # bool (H, W): detected hair pixels
    ink: np.ndarray  # bool (H, W): violet marker ink
    cleaned: np.ndarray  # uint8 (H, W, 3): the image with hair replaced
    lab: np.ndarray  # float (H, W, 3): CIELAB of ``cleaned`` (no shading correction)
    usable: np.ndarray  # bool (H, W): not a dark dermoscope corner
    skin_lab: np.ndarray  # (3,) CIELAB skin reference
    threshold: float  # Otsu threshold on the ΔE map
    flags: list[str] = field(default_factory=list)
    ruler: np.ndarray | None = None  # bool (H, W): the ticks of a ruler outside the lesion
    ruler_ticks: int = 0  # how many ticks the ruler has (0: no ruler found)

    @property
    def ok(self) -> bool:
        return not self.flags


def disc(radius: float) -> np.ndarray:
    """Boolean disc footprint of the given radius in pixels (at least 3 x 3)."""
    r = max(1, int(round(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return (xx**2 + yy**2) <= r**2 + 0.5


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of a 1-D sample; its midpoint if constant."""
    v = np.asarray(values, float).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("otsu_threshold: no finite values")
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def square(radius: float) -> tuple[int, int]:
    """Size of the square structuring element of half-width ``radius`` (separable, so fast)."""
    k = 2 * max(1, int(round(radius))) + 1
    return (k, k)


def blackhat(gray: np.ndarray, radius: float) -> np.ndarray:
    """Morphological black-hat: grey closing with a square minus the image (>= 0; thin dark lines light up)."""
    closed = ndi.grey_closing(gray, size=square(radius))
    return closed - gray


def detect_hair(lightness: np.ndarray, settings: SegmentationSettings) -> np.ndarray:
    """Hair mask: black-hat of L* above threshold, keeping only line-like components (module docstring)."""
    n = min(lightness.shape)
    radius = max(1.5, settings.hair_kernel * n)
    hair = blackhat(lightness, radius) > settings.hair_threshold
    if hair.any():
        lab, count = ndi.label(hair, structure=np.ones((3, 3)))
        sizes = ndi.sum(hair, lab, index=np.arange(1, count + 1))
        keep = np.zeros(count + 1, bool)
        for i, sl in enumerate(ndi.find_objects(lab), start=1):
            length = float(np.hypot(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start))
            keep[i] = length >= settings.hair_min_length * n and sizes[i - 1] / length <= radius
        hair = keep[lab]
    return hair


def detect_ink(lab: np.ndarray, settings: SegmentationSettings) -> np.ndarray:
    """Violet marker ink: chroma >= ``ink_chroma`` and hue angle in [``ink_hue_min``, ``ink_hue_max``] degrees."""
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    hue = np.degrees(np.arctan2(lab[..., 2], lab[..., 1]))
    return (chroma >= settings.ink_chroma) & (hue >= settings.ink_hue_min) & (hue <= settings.ink_hue_max)


def _ticks(profile: np.ndarray, settings: SegmentationSettings, n: int) -> tuple[np.ndarray, dict]:
    """Candidate ruler ticks along one row's black-hat ``profile``: peaks above ``ruler_threshold`` with
    prominence ``ruler_prominence`` and width (at half prominence) at most ``ruler_max_tick``."""
    return find_peaks(profile, height=settings.ruler_threshold, prominence=settings.ruler_prominence,
                      width=(None, settings.ruler_max_tick * n))


def _longest_chain(peaks: np.ndarray, max_gap: float) -> slice:
    """The longest run of consecutive ``peaks`` no more than ``max_gap`` apart, as a slice of ``peaks``."""
    if len(peaks) == 0:
        return slice(0, 0)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(peaks) > max_gap) + 1])
    stops = np.concatenate([starts[1:], [len(peaks)]])
    best = int(np.argmax(stops - starts))
    return slice(int(starts[best]), int(stops[best]))


def _isolated(lines: np.ndarray, peaks_by_row: list, row: int, span: tuple[int, int], chain: int, height: float,
              offset: int) -> bool:
    """A ruler is one line of ticks on plain skin. In the four rows from ``offset`` on, above and below (every phase
    of a pattern repeating every 2, 3 or 4 rows), the chain's span must hold under a third as many tick-like peaks,
    and its mean black-hat response must stay under a third of the ticks' mean height. A periodic texture (a GAN's
    checkerboard artefact, a weak diffusion model's noise) is as strong in such rows and fails this."""
    for other in [row + sign * (offset + k) for sign in (-1, 1) for k in range(4)]:
        if not 0 <= other < len(lines):
            continue
        p = peaks_by_row[other]
        if 3 * int(((p >= span[0]) & (p <= span[1])).sum()) >= chain:
            return False
        if 3 * float(lines[other, span[0]:span[1] + 1].mean()) >= height:
            return False
    return True


def detect_ruler(lightness: np.ndarray, exclude: np.ndarray, settings: SegmentationSettings) -> tuple[np.ndarray, int]:
    """Ruler ticks outside ``exclude`` (module docstring, step 1): (bool mask of the ticks, number of ticks)."""
    n = min(lightness.shape)
    # the outermost rows and columns are left out: padding artefacts of generators line them with periodic specks
    ignore = exclude | border_frame(lightness.shape, max(2, int(round(0.03 * n))))
    response = np.where(ignore, 0.0, blackhat(lightness, max(1.5, settings.ruler_kernel * n)))
    offset = max(2, int(round(settings.ruler_isolation * n)))
    best_ticks, best_mask = 0, np.zeros(lightness.shape, bool)
    for axis in (0, 1):
        lines = response if axis == 0 else response.T
        found = [_ticks(line, settings, n) for line in lines]
        peaks_by_row = [peaks for peaks, _ in found]
        for row, (peaks, props) in enumerate(found):
            keep = _longest_chain(peaks, settings.ruler_max_gap * n)
            chain = peaks[keep]
            if len(chain) <= best_ticks or not _isolated(lines, peaks_by_row, row, (chain[0], chain[-1]), len(chain),
                                                         float(props["peak_heights"][keep].mean()), offset):
                continue
            best_ticks = len(chain)
            mask = np.zeros(lines.shape, bool)
            for a, b in zip(props["left_ips"][keep], props["right_ips"][keep]):
                mask[row, int(np.floor(a)):int(np.ceil(b)) + 1] = True
            best_mask = mask if axis == 0 else mask.T
    if best_ticks < settings.ruler_min_ticks:
        return np.zeros(lightness.shape, bool), 0
    return best_mask & ~exclude, best_ticks


def remove_hair(rgb: np.ndarray, hair: np.ndarray, settings: SegmentationSettings) -> np.ndarray:
    """Replace hair pixels (dilated by one pixel) with the per-channel grey closing of the image."""
    if not hair.any():
        return rgb.copy()
    n = min(rgb.shape[:2])
    size = square(max(1.5, settings.hair_kernel * n))
    closed = np.stack([ndi.grey_closing(rgb[..., c], size=size) for c in range(3)], axis=-1)
    where = ndi.binary_dilation(hair, structure=np.ones((3, 3)))
    out = rgb.copy()
    out[where] = closed[where]
    return out


def border_frame(shape, width_px: int) -> np.ndarray:
    f = np.zeros(shape[:2], bool)
    w = max(1, width_px)
    f[:w, :] = f[-w:, :] = f[:, :w] = f[:, -w:] = True
    return f


def dark_corners(lightness: np.ndarray, dark_lightness: float) -> np.ndarray:
    """Near-black regions (L* < ``dark_lightness``) connected to the image frame: the dark corners of a
    circular dermoscope field. A black lesion centre does not touch the frame and is kept."""
    dark = lightness < dark_lightness
    if not dark.any():
        return dark
    lab, count = ndi.label(dark)
    edge_labels = np.unique(lab[border_frame(lab.shape, 1)])
    return np.isin(lab, edge_labels[edge_labels > 0])


def _central_component(mask: np.ndarray, centre_sigma_px: float) -> np.ndarray:
    """The connected component with the largest centre-weighted area (Gaussian weight of the distance to
    the image centre, sigma ``centre_sigma_px``): large central blobs win over specks and over
    off-centre objects (calibration stickers, ink) that touch the frame."""
    lab, count = ndi.label(mask)
    if count == 0:
        return mask
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w]
    weight = np.exp(-(np.hypot(yy - (h - 1) / 2, xx - (w - 1) / 2) ** 2) / (2 * centre_sigma_px**2))
    scores = ndi.sum(weight, lab, index=np.arange(1, count + 1))
    return lab == int(np.argmax(scores)) + 1


def correct_shading(lin: np.ndarray, skin: np.ndarray, max_points: int = 20000) -> np.ndarray:
    """Divide out a smooth illumination field: a quadratic surface in x, y fitted by least squares to the
    linear-light luminance of the ``skin`` pixels (Cavalcanti & Scharcanski 2010; Glaister et al. 2013).
    ``lin``: linear-light RGB (H, W, 3) in 0..1. Returns linear RGB whose skin has uniform brightness."""
    h, w = lin.shape[:2]
    lum = lin @ np.array([0.2126, 0.7152, 0.0722])
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = (xx - w / 2) / w, (yy - h / 2) / h
    design = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)
    idx = np.flatnonzero(skin.ravel())
    if idx.size < 12:
        return lin
    if idx.size > max_points:  # a regular subsample: the fit of 6 coefficients needs few points
        idx = idx[:: idx.size // max_points + 1]
    coef, *_ = np.linalg.lstsq(design.reshape(-1, 6)[idx], lum.ravel()[idx], rcond=None)
    field = design @ coef
    field = np.clip(field / max(float(lum.ravel()[idx].mean()), 1e-6), 0.2, 5.0)
    return np.clip(lin / field[..., None], 0, 1)


def segment(rgb: np.ndarray, settings: SegmentationSettings | None = None) -> SegmentationResult:
    """Segment the lesion of one uint8 RGB image (H, W, 3); see the module docstring for the method."""
    s = settings or SegmentationSettings()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"segment: expected a uint8 (H, W, 3) RGB image, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    n = min(h, w)
    lab0 = rgb_to_lab(rgb)
    hair = detect_hair(lab0[..., 0], s)
    cleaned = remove_hair(rgb, hair, s)
    lin = srgb_to_linear(cleaned)
    lab_clean = linear_to_lab(lin) if hair.any() else lab0
    ink = detect_ink(lab0, s)
    usable = ~dark_corners(lab_clean[..., 0], s.dark_lightness) & ~ndi.binary_dilation(ink, iterations=1)

    frame = border_frame((h, w), int(round(s.border_band * n))) & usable
    if frame.sum() < 10:
        frame = usable if usable.sum() >= 10 else np.ones((h, w), bool)
    sigma = s.smoothing * n
    skin_px = frame
    lab = lab_clean
    mask = np.zeros((h, w), bool)
    thr = 0.0
    for _ in range(2):
        if s.shading:
            lab = linear_to_lab(correct_shading(lin, skin_px))
        skin = np.median(lab[skin_px], axis=0)
        dist = delta_e(lab, skin)
        if sigma > 0.3:
            dist = ndi.gaussian_filter(dist, sigma)
        thr = otsu_threshold(dist[usable] if usable.any() else dist)
        d_skin = dist[skin_px]
        mad = 1.4826 * np.median(np.abs(d_skin - np.median(d_skin)))
        thr = min(thr, max(s.min_delta_e, float(np.median(d_skin) + s.skin_k * mad)))
        mask = (dist > thr) & usable
        outside = ~ndi.binary_dilation(mask, iterations=max(1, int(0.02 * n))) & usable
        if outside.sum() < 10:
            break
        skin_px = outside

    mask = ndi.binary_opening(mask, structure=disc(s.opening * n))
    mask = ndi.binary_closing(mask, structure=disc(s.closing * n), border_value=0)
    mask = ndi.binary_fill_holes(mask)
    mask = _central_component(mask, s.centre_radius * n)
    mask = ndi.binary_fill_holes(mask)

    flags = []
    area = mask.mean()
    if not mask.any():
        flags.append("empty")
    else:
        if area < s.min_area:
            flags.append("small")
        if area > s.max_area:
            flags.append("large")
        edge = border_frame((h, w), 1)
        if mask[edge].mean() > s.max_border_touch:
            flags.append("border")
        cy, cx = np.argwhere(mask).mean(axis=0)
        if np.hypot(cy - (h - 1) / 2, cx - (w - 1) / 2) > s.centre_radius * n:
            flags.append("off_centre")
        ring = ~mask & usable
        if ring.any() and delta_e(lab_clean[mask].mean(axis=0), lab_clean[ring].mean(axis=0)) < s.min_contrast:
            flags.append("low_contrast")
    ruler, ruler_ticks = detect_ruler(lab0[..., 0], mask, s)
    return SegmentationResult(mask=mask, hair=hair, ink=ink, cleaned=cleaned, lab=lab_clean, usable=usable, skin_lab=skin,
                              threshold=thr, flags=flags, ruler=ruler, ruler_ticks=ruler_ticks)
