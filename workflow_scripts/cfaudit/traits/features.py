"""Per-image dermoscopic features in the spirit of the ABCD rule, and where a counterfactual changed pixels.

Every length is a fraction of the image side and every area a fraction of the image area, so features
are comparable across resolutions (a counterfactual is resized to its anchor's size before comparison).

Shape (from the lesion mask; the outline is the 0.5 iso-line of the mask smoothed with a 0.7 px Gaussian,
traced by marching squares with contourpy, so perimeters are sub-pixel and a digital disc has a
compactness within 4 % of 1):

- ``area``: lesion area / image area. ``diameter``: equivalent diameter 2 sqrt(A / pi) / side.
  ``feret_max``: largest caliper (Feret) diameter / side. ``major_axis`` / ``minor_axis``: full axes of
  the ellipse with the same second moments (4 sqrt(eigenvalue)) / side.
- ``asymmetry_major`` / ``asymmetry_minor``: 1 - IoU of the mask and its mirror image about the major /
  minor principal axis through the centroid (0 = mirror-symmetric); ``asymmetry`` is their mean.
- ``compactness``: perimeter^2 / (4 pi area) (1 for a disc, larger for ragged borders).
  ``solidity``: area / convex-hull area; ``convexity``: convex-hull perimeter / perimeter (both 1 for a
  convex outline, smaller for notched or rippled borders).

Colour (CIELAB of the hair-removed image, read inside the lesion mask eroded by ``margin`` of the side,
away from the blurred edge where lesion and skin colours mix):

- every lesion pixel is assigned to the nearest ABCD colour prototype (light brown, dark brown, black,
  blue-grey, white, red; sRGB values in config ``traits.colours.prototypes``) when its ΔE*76 to it is at
  most ``tolerance``; ``frac_<colour>`` is the share of lesion pixels so assigned; ``n_colours`` counts the
  prototypes with a share >= ``min_fraction``; ``has_blue_grey``, ``has_white``, ``has_red`` are those
  presences (0/1).
- ``colour_sd``: sqrt of the trace of the CIELAB covariance of the lesion pixels (colour variance, in
  ΔE units). ``lesion_lightness``: mean L* of the lesion.
- ``contrast``: ΔE*76 between the mean lesion colour and the mean colour of the surrounding skin.

Surrounding skin = pixels between ``skin_gap`` and ``skin_gap + skin_ring`` (fractions of the side) from
the lesion, minus hair, ink and dark dermoscope corners (all non-lesion pixels if that ring is nearly empty):

- ``skin_ita``: Individual Typology Angle of its median L*, b* (degrees; higher = lighter skin).
- ``skin_redness``: its mean a*.

Nuisances: ``hair``: share of the image covered by the black-hat hair detector's mask; ``ink``: share
covered by violet marker ink (segmentation step 1).

Change (counterfactual vs anchor, on the counterfactual resized to the anchor's size): per-pixel ΔE*76
between the two images; ``change_mean`` is its image mean, ``change_inside_share`` the share of the total
change that falls inside the ANCHOR's lesion mask. If the change were spread uniformly, the share would
equal the anchor's ``area``; the statistics compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from cfaudit.traits.colour import delta_e, ita_degrees, rgb_to_lab
from cfaudit.traits.segmentation import SegmentationResult, SegmentationSettings, segment

COLOUR_NAMES = ("light_brown", "dark_brown", "black", "blue_grey", "white", "red")
# sRGB prototypes of the ABCD colours (defaults of traits.colours.prototypes; values in the spirit of the
# colour boxes of Kasmi & Mokrani 2016 and Seidenari et al. 2003, moved to their centres).
DEFAULT_PROTOTYPES = {
    "light_brown": (165, 110, 75),
    "dark_brown": (95, 60, 40),
    "black": (35, 28, 28),
    "blue_grey": (100, 115, 140),
    "white": (225, 220, 220),
    "red": (190, 65, 65),
}
CONTOUR_SIGMA = 0.7  # px: smoothing of the binary mask before tracing its outline

SHAPE_FEATURES = ["area", "diameter", "feret_max", "major_axis", "minor_axis", "asymmetry", "asymmetry_major",
                  "asymmetry_minor", "compactness", "solidity", "convexity"]
COLOUR_FEATURES = ["n_colours", "has_blue_grey", "has_white", "has_red", "colour_sd", "lesion_lightness",
                   "contrast"] + [f"frac_{c}" for c in COLOUR_NAMES]
SKIN_FEATURES = ["skin_ita", "skin_redness"]
# Things on the image that are not the lesion nor skin, measured outside the lesion: a classifier that relies on
# them relies on a shortcut (Winkler et al., JAMA Dermatol. 2019, doi:10.1001/jamadermatol.2019.1735: skin
# markings raised a CNN's melanoma scores).
# ``ink_lesion`` is the marker-ink colour (violet, a hue no lesion colour has) inside the lesion: where a generator
# paints the colour of a marking rather than a marking on the skin.
ARTEFACT_FEATURES = ["hair", "ink", "ruler", "ink_lesion"]
FEATURES = SHAPE_FEATURES + COLOUR_FEATURES + SKIN_FEATURES + ARTEFACT_FEATURES
CHANGE_FEATURES = ["change_mean", "change_inside_share"]
PAIRED_SKIN = ["skin_ita", "skin_redness"]  # measured on the pair's common skin ring for counterfactuals
# Features that need a usable lesion mask (undefined when segmentation failed); the nuisances do not.
MASK_FEATURES = [f for f in FEATURES if f not in ("hair", "ink", "ruler")]


@dataclass(frozen=True)
class FeatureSettings:
    prototypes: dict = field(default_factory=lambda: dict(DEFAULT_PROTOTYPES))
    tolerance: float = 30.0
    min_fraction: float = 0.05
    margin: float = 0.01
    skin_gap: float = 0.05
    skin_ring: float = 0.1

    @classmethod
    def from_config(cls, colours: dict | None = None, skin: dict | None = None) -> "FeatureSettings":
        colours, skin = dict(colours or {}), dict(skin or {})
        protos = dict(DEFAULT_PROTOTYPES)
        protos.update({k: tuple(v) for k, v in (colours.get("prototypes") or {}).items()})
        unknown = sorted(set(protos) - set(COLOUR_NAMES))
        if unknown:
            raise KeyError(f"traits.colours.prototypes has unknown colours {unknown}; known: {list(COLOUR_NAMES)}")
        return cls(prototypes=protos, tolerance=float(colours.get("tolerance", 30.0)),
                   min_fraction=float(colours.get("min_fraction", 0.05)), margin=float(colours.get("margin", 0.01)),
                   skin_gap=float(skin.get("gap", 0.05)), skin_ring=float(skin.get("ring", 0.1)))

    def prototype_lab(self) -> np.ndarray:
        return rgb_to_lab(np.array([self.prototypes[c] for c in COLOUR_NAMES], float))


# ----------------------------------------------------------------------------------------------- shape
def outline(mask: np.ndarray) -> list[np.ndarray]:
    """Closed sub-pixel outlines (list of (N, 2) arrays of (x, y) points, first point repeated) of a mask."""
    import contourpy

    z = ndi.gaussian_filter(np.pad(mask.astype(float), 2), CONTOUR_SIGMA)
    lines = contourpy.contour_generator(z=z, line_type="Separate").lines(0.5)
    return [ln - 2 for ln in lines if len(ln) >= 4]


def _polygon_area(pts: np.ndarray) -> float:
    x, y = pts[:, 0], pts[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _mirror_iou(mask: np.ndarray, centroid: np.ndarray, axis: np.ndarray) -> float:
    """IoU of the mask with its mirror image about the line through ``centroid`` along ``axis`` (y, x)."""
    h, w = mask.shape
    refl = 2 * np.outer(axis, axis) - np.eye(2)
    yy, xx = np.mgrid[0:h, 0:w]
    pts = np.stack([yy.ravel() - centroid[0], xx.ravel() - centroid[1]])
    src = refl @ pts + centroid[:, None]
    mirrored = ndi.map_coordinates(mask.astype(float), src, order=1, mode="constant", cval=0.0).reshape(h, w) > 0.5
    union = np.logical_or(mask, mirrored).sum()
    return float(np.logical_and(mask, mirrored).sum() / union) if union else 1.0


def shape_features(mask: np.ndarray) -> dict:
    """Area, diameters, principal-axis asymmetry and border irregularity of a boolean mask (see module doc)."""
    mask = np.asarray(mask, bool)
    side = float(min(mask.shape))
    nan = {k: float("nan") for k in SHAPE_FEATURES}
    if mask.sum() < 3:
        return nan
    coords = np.argwhere(mask).astype(float)
    centroid = coords.mean(axis=0)
    cov = np.cov((coords - centroid).T)
    evals, evecs = np.linalg.eigh(cov)  # ascending: [minor, major]
    major_vec, minor_vec = evecs[:, 1], evecs[:, 0]
    asym_major = 1 - _mirror_iou(mask, centroid, major_vec)
    asym_minor = 1 - _mirror_iou(mask, centroid, minor_vec)

    lines = outline(mask)
    perimeter = sum(float(np.linalg.norm(np.diff(ln, axis=0), axis=1).sum()) for ln in lines)
    poly_area = abs(sum(_polygon_area(ln) for ln in lines)) or float(mask.sum())
    pts = np.concatenate(lines) if lines else coords[:, ::-1]
    try:
        hull = ConvexHull(pts)
        hull_pts = pts[hull.vertices]
        hull_area, hull_perimeter = float(hull.volume), float(hull.area)
        d = np.linalg.norm(hull_pts[:, None, :] - hull_pts[None, :, :], axis=-1)
        feret = float(d.max())
    except (QhullError, ValueError):
        hull_area, hull_perimeter, feret = poly_area, perimeter, float(np.ptp(coords, axis=0).max() + 1)
    area_px = float(mask.sum())
    return {
        "area": area_px / mask.size,
        "diameter": 2 * np.sqrt(area_px / np.pi) / side,
        "feret_max": feret / side,
        "major_axis": 4 * np.sqrt(max(evals[1], 0)) / side,
        "minor_axis": 4 * np.sqrt(max(evals[0], 0)) / side,
        "asymmetry": (asym_major + asym_minor) / 2,
        "asymmetry_major": asym_major,
        "asymmetry_minor": asym_minor,
        "compactness": perimeter**2 / (4 * np.pi * poly_area) if poly_area > 0 else float("nan"),
        "solidity": min(1.0, poly_area / hull_area) if hull_area > 0 else float("nan"),
        "convexity": min(1.0, hull_perimeter / perimeter) if perimeter > 0 else float("nan"),
    }


# ---------------------------------------------------------------------------------------------- colour
def colour_fractions(lab_pixels: np.ndarray, settings: FeatureSettings) -> dict:
    """Share of pixels (M, 3 CIELAB) nearest to each prototype within the tolerance."""
    if len(lab_pixels) == 0:
        return {c: float("nan") for c in COLOUR_NAMES}
    d = delta_e(lab_pixels[:, None, :], settings.prototype_lab()[None, :, :])
    nearest = d.argmin(axis=1)
    close = d[np.arange(len(d)), nearest] <= settings.tolerance
    counts = np.bincount(nearest[close], minlength=len(COLOUR_NAMES))
    return {c: float(counts[i] / len(lab_pixels)) for i, c in enumerate(COLOUR_NAMES)}


def colour_features(lab: np.ndarray, mask: np.ndarray, skin: np.ndarray, settings: FeatureSettings) -> dict:
    """Colour counts, presences, variance, lightness and lesion-vs-skin contrast from a CIELAB image."""
    lesion = lab[mask]
    if len(lesion) == 0:
        return {k: float("nan") for k in COLOUR_FEATURES}
    fr = colour_fractions(lesion, settings)
    present = {c: fr[c] >= settings.min_fraction for c in COLOUR_NAMES}
    out = {
        "n_colours": float(sum(present.values())),
        "has_blue_grey": float(present["blue_grey"]),
        "has_white": float(present["white"]),
        "has_red": float(present["red"]),
        "colour_sd": float(np.sqrt(np.trace(np.cov(lesion.T)))) if len(lesion) > 1 else 0.0,
        "lesion_lightness": float(lesion[:, 0].mean()),
        "contrast": float(delta_e(lesion.mean(axis=0), lab[skin].mean(axis=0))) if skin.any() else float("nan"),
    }
    out.update({f"frac_{c}": fr[c] for c in COLOUR_NAMES})
    return out


def lesion_interior(mask: np.ndarray, margin: float) -> np.ndarray:
    """The mask eroded by ``margin`` of the side: colours are read away from the blurred lesion edge
    (where lesion and skin mix); the whole mask when the interior would be tiny."""
    r = margin * min(mask.shape)
    if r < 0.5 or not mask.any():
        return mask
    from cfaudit.traits.segmentation import disc

    inner = ndi.binary_erosion(mask, structure=disc(r))
    return inner if inner.sum() >= max(10, 0.25 * mask.sum()) else mask


# ------------------------------------------------------------------------------------------------ skin
def skin_region(mask: np.ndarray, exclude: np.ndarray, settings: FeatureSettings) -> np.ndarray:
    """Surrounding skin: a ring from ``skin_gap`` to ``skin_gap + skin_ring`` of the side around the mask."""
    side = min(mask.shape)
    if mask.any():
        dist = ndi.distance_transform_edt(~mask)
        ring = (dist > settings.skin_gap * side) & (dist <= (settings.skin_gap + settings.skin_ring) * side)
    else:
        ring = np.ones(mask.shape, bool)
    ring &= ~exclude
    if ring.sum() < max(10, 0.01 * mask.size):
        ring = ~mask & ~exclude
    return ring


def skin_features(lab: np.ndarray, skin: np.ndarray) -> dict:
    """ITA and mean a* of the skin pixels of a CIELAB image."""
    if not skin.any():
        return {"skin_ita": float("nan"), "skin_redness": float("nan")}
    lab = lab[skin]
    return {"skin_ita": float(ita_degrees(np.median(lab[:, 0]), np.median(lab[:, 2]))),
            "skin_redness": float(lab[:, 1].mean())}


# --------------------------------------------------------------------------------------------- the lot
def image_features(rgb: np.ndarray, seg: SegmentationSettings | None = None, feat: FeatureSettings | None = None,
                   result: SegmentationResult | None = None) -> tuple[dict, SegmentationResult]:
    """All per-image features of one uint8 RGB image; returns (features, segmentation result).

    Features that need the lesion mask are computed even when segmentation raised a quality flag (the
    flag travels with them in ``seg_ok`` / ``seg_flags``; the statistics leave such images out by default).
    """
    seg = seg or SegmentationSettings()
    feat = feat or FeatureSettings()
    res = result if result is not None else segment(rgb, seg)
    skin = skin_region(res.mask, res.hair | res.ink | ~res.usable, feat)
    out: dict = {"seg_ok": bool(res.ok), "seg_flags": ";".join(res.flags)}
    out.update(shape_features(res.mask))
    out.update(colour_features(res.lab, lesion_interior(res.mask, feat.margin), skin, feat))
    out.update(skin_features(res.lab, skin))
    out.update(artefact_features(res))
    return out, res


def artefact_features(res: SegmentationResult) -> dict:
    """Hair and marker ink as shares of the image outside the lesion; the number of ruler ticks outside it; the
    share of the lesion in marker-ink colour (nan without a lesion mask)."""
    outside = ~res.mask
    area = max(int(outside.sum()), 1)
    lesion = int(res.mask.sum())
    return {"hair": float((res.hair & outside).sum() / area), "ink": float((res.ink & outside).sum() / area),
            "ruler": float(res.ruler_ticks),
            "ink_lesion": float((res.ink & res.mask).sum() / lesion) if lesion else float("nan")}


def change_features(anchor_rgb: np.ndarray, cf_rgb: np.ndarray, anchor_mask: np.ndarray) -> dict:
    """How much the counterfactual changed and which share of the change lies inside the anchor's lesion."""
    if anchor_rgb.shape != cf_rgb.shape:
        raise ValueError(f"change_features: anchor {anchor_rgb.shape} and counterfactual {cf_rgb.shape} differ in size")
    d = delta_e(rgb_to_lab(anchor_rgb), rgb_to_lab(cf_rgb))
    total = float(d.sum())
    return {
        "change_mean": float(d.mean()),
        "change_inside_share": float(d[anchor_mask].sum() / total) if total > 0 else float("nan"),
    }
