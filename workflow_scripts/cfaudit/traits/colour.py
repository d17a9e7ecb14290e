"""Colour science used by the trait analysis: sRGB <-> CIELAB (D65), ΔE*76 and the ITA skin-tone angle.

The formulas are the CIE ones (IEC 61966-2-1 sRGB transfer curve, D65 white, CIE 1976 L*a*b*), written
out in numpy so the stage needs no image-processing dependency beyond numpy and scipy.
"""

from __future__ import annotations

import numpy as np

# sRGB (linear) -> XYZ, D65 (IEC 61966-2-1)
_RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                     [0.2126729, 0.7151522, 0.0721750],
                     [0.0193339, 0.1191920, 0.9503041]])
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_EPS = (6 / 29) ** 3


def rgb_to_lab(rgb) -> np.ndarray:
    """uint8 (or 0..255 float) sRGB array (..., 3) -> CIELAB (..., 3) float64 (L* 0..100)."""
    return linear_to_lab(srgb_to_linear(rgb))


_LUT = None


def srgb_to_linear(rgb) -> np.ndarray:
    """sRGB 0..255 (uint8 via a lookup table, or float) -> linear light 0..1."""
    global _LUT
    arr = np.asarray(rgb)
    if arr.dtype == np.uint8:
        if _LUT is None:
            c = np.arange(256) / 255.0
            _LUT = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return _LUT[arr]
    c = arr.astype(np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(lin) -> np.ndarray:
    """Linear light 0..1 -> sRGB 0..255 float."""
    lin = np.clip(np.asarray(lin, np.float64), 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055) * 255


def linear_to_lab(lin) -> np.ndarray:
    """Linear-light sRGB (..., 3) -> CIELAB (..., 3)."""
    xyz = np.asarray(lin, np.float64) @ _RGB2XYZ.T / WHITE_D65
    f = np.where(xyz > _EPS, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def lab_to_rgb(lab) -> np.ndarray:
    """CIELAB (..., 3) -> sRGB 0..255 float (clipped to the gamut)."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * WHITE_D65
    lin = np.clip(xyz @ _XYZ2RGB.T, 0, 1)
    srgb = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055)
    return srgb * 255


def delta_e(lab1, lab2) -> np.ndarray:
    """CIE 1976 colour difference ΔE*ab (Euclidean distance in CIELAB)."""
    return np.linalg.norm(np.asarray(lab1, float) - np.asarray(lab2, float), axis=-1)


def ita_degrees(lightness, b_star) -> np.ndarray:
    """Individual Typology Angle ITA = arctan((L* - 50) / b*) in degrees (Chardon et al. 1991).

    Written with arctan2 so b* <= 0 gives a finite angle (the usual formula assumes b* > 0, as for skin).
    """
    return np.degrees(np.arctan2(np.asarray(lightness, float) - 50.0, np.asarray(b_star, float)))
