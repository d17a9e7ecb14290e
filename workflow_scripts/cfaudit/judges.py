"""Independent judges of counterfactuals: pure functions over scores and pixels.

A generator that was optimised against the audited classifier cannot be judged by that classifier alone (its
flip rate then holds by construction). The judges here use only things no generator optimised against:

* **Oracle flips** — classifiers trained on the train split that differ from the audited one in architecture
  and seed (rule ``train_oracle``), never an input of a generator rule. An oracle flip counts on anchors the
  oracle itself classifies correctly; since that depends only on the anchor, every generator is judged on the
  same anchors per oracle, and differences between generators are paired by anchor.
* **Survival** — the share of the audited classifier's flips that stay flips after JPEG (quality 75), a Gaussian
  blur (sigma 0.5 px) or a 1-pixel shift: adversarial perturbations tend not to survive them (Kurakin et al.
  2017, arXiv:1607.02533; Guo et al. 2018, arXiv:1711.00117).
* **Out-of-gamut change** — the share of changed pixels whose CIELAB lightness or chroma lies outside the
  0.5–99.5 % range of real images' pixels.
* **High-frequency energy of the change** — the share of the change's spectral energy above ``cutoff``
  cycles/pixel, relative to the same share of the anchor's own content (about 1 for natural-looking edits,
  several times more for pixel noise).

Intervals: Wilson score intervals for rates (Wilson 1927, JASA 22:209), percentile bootstrap over anchors for
means and paired differences (:func:`cfaudit.metrics.bootstrap`).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from cfaudit.data.pack import round_to_uint8
from cfaudit.metrics import Interval, bootstrap, wilson_interval

DIRECTIONS = {"b2m": (0, 1), "m2b": (1, 0)}  # name: (anchor label, target label)
ARROWS = {"b2m": "b→m", "m2b": "m→b"}  # how a direction is printed
TRANSFORMS = ("jpeg75", "blur0.5", "shift1")


# ----------------------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------------------
def rate_row(flags, level: float = 0.95) -> dict:
    """estimate / ci_low / ci_high / n of a 0/1 array (nan entries dropped), Wilson interval."""
    f = np.asarray(flags, dtype=float)
    f = f[np.isfinite(f)]
    k, n = int(f.sum()), len(f)
    lo, hi = wilson_interval(k, n, level)
    return {"estimate": k / n if n else math.nan, "ci_low": lo, "ci_high": hi, "n": n, "interval": "Wilson"}


def bootstrap_row(iv: Interval, n: int) -> dict:
    """A judges-table row of one :func:`cfaudit.metrics.bootstrap` interval over ``n`` units."""
    return {"estimate": iv.estimate, "ci_low": iv.low, "ci_high": iv.high, "n": n, "interval": "bootstrap"}


def mean_row(values, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Mean of the finite values with a percentile-bootstrap interval over them (units = anchors)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return bootstrap_row(Interval(math.nan, math.nan, math.nan, resamples, 0), 0)
    iv = bootstrap(lambda idx: {"m": float(v[idx].mean())}, len(v), resamples, seed, level)["m"]
    return bootstrap_row(iv, len(v))


def paired_difference(a, b, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Mean of ``a - b`` over the units where both are finite, with a percentile-bootstrap interval over units.

    ``a`` and ``b`` are per-anchor values of two generators on the same anchors (same order).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: shapes differ {a.shape} vs {b.shape}")
    return mean_row(a - b, resamples, seed, level)


# ----------------------------------------------------------------------------------------------------------
# Flips, audited and oracle, per anchor
# ----------------------------------------------------------------------------------------------------------
def flip_indicators(before: np.ndarray, after: np.ndarray, targets: np.ndarray, threshold: float) -> np.ndarray:
    """Per pair: 1/0 where the judge puts the anchor on its own side (``score > threshold`` iff malignant) and the
    counterfactual on the target side / does not; nan where it gets the anchor wrong or has no counterfactual score."""
    eligible = ((before > threshold) == (targets == 0)) & np.isfinite(after)
    on_target = np.where(targets == 1, after > threshold, after <= threshold)
    return np.where(eligible, on_target.astype(float), np.nan)


def per_anchor_flips(scores: pd.DataFrame, generator: str, threshold: float) -> pd.DataFrame:
    """One row per (anchor, direction) with a counterfactual of ``generator`` toward the other class.

    ``scores``: a scores table (cfaudit/scoring.py contract) with ``anchor_id``. Columns: anchor_id, direction,
    eligible (the classifier gets the anchor right: ``score > threshold`` iff malignant), flipped (the
    counterfactual is on the target side; nan where not eligible), delta (score change toward the target).
    """
    from cfaudit.metrics import anchor_table

    at = anchor_table(scores, generator)
    rows = []
    for name, (src, tgt) in DIRECTIONS.items():
        sub = at[at["anchor_label"] == src]
        cf = sub["cf_score_to_malignant" if tgt == 1 else "cf_score_to_benign"].to_numpy(float)
        s0 = sub["anchor_score"].to_numpy(float)
        flipped = flip_indicators(s0, cf, np.full(len(sub), tgt), threshold)
        eligible = np.isfinite(flipped)
        sign = 1.0 if tgt == 1 else -1.0
        rows.append(pd.DataFrame({"anchor_id": sub["anchor_id"].to_numpy(), "direction": name,
                                  "eligible": eligible, "flipped": flipped,
                                  "delta": np.where(eligible, sign * (cf - s0), np.nan)}))
    return pd.concat(rows, ignore_index=True)


def oracle_consensus(per_oracle: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (anchor, direction): the mean over oracles of their flip indicators and score changes (each oracle
    counts only where it got the anchor right; nan where no oracle did)."""
    frames = [df.assign(oracle=name) for name, df in per_oracle.items()]
    both = pd.concat(frames, ignore_index=True)
    agg = both.groupby(["anchor_id", "direction"], sort=True).agg(flipped=("flipped", "mean"), delta=("delta", "mean"))
    return agg.reset_index()


# ----------------------------------------------------------------------------------------------------------
# Pixel diagnostics
# ----------------------------------------------------------------------------------------------------------
def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    """Round trip of a uint8 RGB image through PIL's JPEG encoder (4:2:0 chroma, as cameras and the web)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def blur(image: np.ndarray, sigma: float = 0.5) -> np.ndarray:
    """Gaussian blur of each channel (sigma in pixels, reflected borders), rounded back to uint8."""
    out = gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="reflect", truncate=4.0)
    return round_to_uint8(out)


def shift(image: np.ndarray, pixels: int = 1) -> np.ndarray:
    """Shift right and down by ``pixels``, replicating the first rows/columns (no wrap-around)."""
    h, w = image.shape[:2]
    idx_y = np.clip(np.arange(h) - pixels, 0, h - 1)
    idx_x = np.clip(np.arange(w) - pixels, 0, w - 1)
    return image[idx_y][:, idx_x]


def transform(image: np.ndarray, name: str) -> np.ndarray:
    """One of :data:`TRANSFORMS` applied to a uint8 (H, W, 3) image."""
    if name == "jpeg75":
        return jpeg(image, 75)
    if name == "blur0.5":
        return blur(image, 0.5)
    if name == "shift1":
        return shift(image, 1)
    raise ValueError(f"unknown transform {name!r}; one of {TRANSFORMS}")


def lightness_chroma(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CIELAB L* and chroma C*ab = hypot(a*, b*) of uint8 RGB pixels (..., 3)."""
    from cfaudit.traits.colour import rgb_to_lab

    lab = rgb_to_lab(images)
    return lab[..., 0], np.hypot(lab[..., 1], lab[..., 2])


def gamut_range(real_images: np.ndarray, low: float = 0.5, high: float = 99.5) -> dict:
    """The ``low``–``high`` percentile range of L* and C* over every pixel of the real images (N, H, W, 3)."""
    if len(real_images) == 0:
        raise ValueError("gamut_range needs at least one real image")
    light, chroma = lightness_chroma(real_images)
    lo_l, hi_l = np.percentile(light, [low, high])
    lo_c, hi_c = np.percentile(chroma, [low, high])
    return {"L_low": float(lo_l), "L_high": float(hi_l), "C_low": float(lo_c), "C_high": float(hi_c),
            "percentiles": [low, high], "n_images": int(len(real_images))}


def changed_pixels(anchor: np.ndarray, cf: np.ndarray, tolerance: int) -> np.ndarray:
    """(H, W) bool: the largest channel difference exceeds ``tolerance`` 8-bit levels."""
    return np.abs(anchor.astype(np.int16) - cf.astype(np.int16)).max(axis=-1) > tolerance


def out_of_gamut_share(anchor: np.ndarray, cf: np.ndarray, gamut: dict, tolerance: int) -> tuple[float, int]:
    """(share of changed pixels whose L* or C* is outside the real range, number of changed pixels); 0 if none."""
    changed = changed_pixels(anchor, cf, tolerance)
    n = int(changed.sum())
    if n == 0:
        return 0.0, 0
    light, chroma = lightness_chroma(cf[changed])
    out = (light < gamut["L_low"]) | (light > gamut["L_high"]) | (chroma < gamut["C_low"]) | (chroma > gamut["C_high"])
    return float(out.mean()), n


def high_frequency_share(x: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of the (per-channel, DC-free) spectral energy of ``x`` (H, W, C float) above ``cutoff`` cycles/pixel."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=(0, 1), keepdims=True)
    power = (np.abs(np.fft.fft2(x, axes=(0, 1))) ** 2).sum(axis=-1)
    fy = np.fft.fftfreq(x.shape[0])[:, None]
    fx = np.fft.fftfreq(x.shape[1])[None, :]
    radius = np.hypot(fy, fx)
    total = power[radius > 0].sum()
    return float(power[radius > cutoff].sum() / total) if total > 0 else math.nan


def high_frequency_ratio(anchor: np.ndarray, cf: np.ndarray, cutoff: float = 0.25) -> float:
    """High-frequency share of the change ``cf - anchor`` divided by that of the anchor itself (nan: no change)."""
    delta = cf.astype(np.float64) - anchor.astype(np.float64)
    if not np.any(delta):
        return math.nan
    return high_frequency_share(delta, cutoff) / max(high_frequency_share(anchor, cutoff), 1e-12)


# ----------------------------------------------------------------------------------------------------------
# The verdict
# ----------------------------------------------------------------------------------------------------------
CONTROLS = {"pgd": "control: PGD on the audited classifier (adversarial by construction)",
            "guided_noclf": "control: the guided sampler without the classifier gradient (the prior alone)"}


def verdict(generator: str, vs_pgd: dict | None, survival: float, out_of_gamut: float, real_out_of_gamut: float,
            oracle_flip: float) -> str:
    """One line that follows from the numbers (no tuning knob): transfer beyond PGD decides 'semantic' vs
    'adversarial'; fragile flips or off-gamut colours qualify it.

    ``vs_pgd``: paired difference (this generator - PGD) in mean oracle flip rate, {estimate, ci_low, ci_high};
    ``survival``: mean share of audited flips that survive the transforms; ``out_of_gamut``: its mean share of
    changed pixels outside the real gamut; ``real_out_of_gamut``: the same for real images (by construction
    about 1 %); ``oracle_flip``: mean oracle flip rate.
    """
    if generator in CONTROLS:
        return CONTROLS[generator]
    notes = []
    if vs_pgd is None or not np.isfinite(vs_pgd.get("ci_low", math.nan)):
        head = f"undecided: no PGD control to compare with (oracle flips {oracle_flip:.2f})"
    elif vs_pgd["ci_low"] > 0:
        head = f"semantic: transfers to the oracles beyond PGD (+{vs_pgd['estimate']:.2f} oracle flip rate)"
    elif vs_pgd["ci_high"] < 0:
        head = f"adversarial: transfers less than PGD ({vs_pgd['estimate']:+.2f} oracle flip rate)"
    else:
        head = f"adversarial: transfers no better than PGD ({vs_pgd['estimate']:+.2f}, interval includes 0)"
    if np.isfinite(survival) and survival < 0.5:
        notes.append(f"fragile flips (survival {survival:.2f})")
    if np.isfinite(out_of_gamut) and out_of_gamut > max(0.05, 3 * real_out_of_gamut):
        notes.append(f"off-gamut colours ({out_of_gamut:.1%} of changed pixels)")
    return head + ("; " + "; ".join(notes) if notes else "")


# ----------------------------------------------------------------------------------------------------------
# Table 1's oracle rows
# ----------------------------------------------------------------------------------------------------------
def oracle_table1_rows(scores: pd.DataFrame, threshold: float, oracle_tabs: dict, oracle_thr: dict, generators,
                       boot: dict, seed: int) -> pd.DataFrame:
    """Rows in Table 1's long format (cfaudit.metrics.TABLE_COLUMNS) per generator: each oracle's flip rate per
    direction (Wilson), the mean over oracles and its score change toward the target (bootstrap), and the transfer
    ratio (mean oracle flip rate / audited flip rate)."""
    from cfaudit.metrics import TABLE_COLUMNS

    level, res = boot["level"], boot["resamples"]
    out = []

    def add(gen, metric, r, rule, note=""):
        out.append({"group": gen, "ground_truth": "target label", "metric": metric, "estimate": r["estimate"],
                    "ci_low": r["ci_low"], "ci_high": r["ci_high"], "ci_level": level,
                    "resamples": res if r.get("interval") == "bootstrap" else 0,
                    "resamples_valid": res if r.get("interval") == "bootstrap" else 0, "n_units": r["n"],
                    "n_images": r["n"], "rule": rule, "note": note})

    for pos, gen in enumerate(generators):
        audited = per_anchor_flips(scores, gen, threshold)
        per_oracle = {n: per_anchor_flips(t, gen, oracle_thr[n]) for n, t in oracle_tabs.items()}
        if not per_oracle:
            continue
        cons = oracle_consensus(per_oracle)
        for k, (direction, arrow) in enumerate(ARROWS.items()):
            for name, df in per_oracle.items():
                add(gen, f"oracle flip rate {arrow} [{name}]", rate_row(df.loc[df["direction"] == direction, "flipped"],
                                                                          level), "oracle score > its threshold; Wilson")
            c = cons[cons["direction"] == direction]
            mean = mean_row(c["flipped"], res, seed + 20 * pos + k, level)
            add(gen, f"oracle flip rate {arrow} (mean of oracles)", mean, "per-anchor mean over oracles; bootstrap")
            add(gen, f"oracle score change toward target {arrow} (mean)",
                mean_row(c["delta"], res, seed + 20 * pos + 10 + k, level), "bootstrap over anchors")
            aud = rate_row(audited.loc[audited["direction"] == direction, "flipped"], level)
            ratio = mean["estimate"] / aud["estimate"] if aud["estimate"] else math.nan
            add(gen, f"transfer ratio {arrow} (oracle / audited flips)",
                {"estimate": ratio, "ci_low": math.nan, "ci_high": math.nan, "n": aud["n"]}, "ratio of estimates")
    return pd.DataFrame(out, columns=TABLE_COLUMNS)
