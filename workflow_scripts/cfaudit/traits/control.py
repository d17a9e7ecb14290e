"""Positive control of the trait analysis: 'counterfactuals' whose trait changes are known exactly.

For an image of the embedded dataset, the generator's per-image random stream is replayed (same seed,
same draws for position, skin texture, outline shape, hair, ruler, ink) while the planted lesion traits
are pushed toward the target class: toward malignant, the lesion grows, becomes more asymmetric and
more ragged and gains blue-grey, red and dark regions; toward benign, the reverse. The result is an
anchor/counterfactual pair that differs only in the planted traits, which the trait analysis must find
with the right sign (and must not find in the nuisances). The pairs follow the counterfactual contract
(cfaudit.counterfactuals) under the generator name ``planted_shift``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cfaudit.counterfactuals import image_path, index_rows, save_png
from cfaudit.data.images import resize_square
from cfaudit.data.synthetic import SUPERSAMPLE, Traits, render, sample_traits

GENERATOR = "planted_shift"
DEFAULT_SHIFT = {"diameter": 0.08, "asymmetry": 0.35, "border": 0.35, "colours": True}


def shift_traits(t: Traits, target: int, shift: dict | None = None) -> Traits:
    """The traits pushed toward ``target`` (1 = malignant, 0 = benign); nuisances unchanged."""
    s = {**DEFAULT_SHIFT, **(shift or {})}
    sign = 1.0 if int(target) == 1 else -1.0
    out = dataclasses.replace(
        t,
        diameter=round(float(np.clip(t.diameter + sign * s["diameter"], 0.12, 0.8)), 4),
        asymmetry=round(float(np.clip(t.asymmetry + sign * s["asymmetry"], 0.0, 1.0)), 4),
        border=round(float(np.clip(t.border + sign * s["border"], 0.0, 1.0)), 4),
        label=int(target),
    )
    if s["colours"]:
        on = int(target) == 1
        out = dataclasses.replace(out, blue_grey=on, red=on, dark=on, n_colours=1 + 3 * int(on))
    return out


def traits_from_row(row) -> Traits:
    """A metadata.csv row (resources/synthetic/metadata.csv) back into a Traits record."""
    names = [f.name for f in dataclasses.fields(Traits)]
    missing = [n for n in names if n not in row]
    if missing:
        raise KeyError(f"synthetic metadata lacks columns {missing}; regenerate it with rule synthetic_dataset")
    vals = {n: row[n] for n in names}
    for b in ("blue_grey", "red", "dark", "ruler", "ink"):
        vals[b] = str(vals[b]).strip().lower() in ("true", "1")
    for i in ("label", "n_colours", "hair"):
        vals[i] = int(vals[i])
    vals["image_id"] = str(vals["image_id"])
    return Traits(**vals)


def image_index(image_id: str) -> int:
    """``SYN_00012`` -> 12 (the per-image stream is ``default_rng([seed, index])``)."""
    try:
        return int(str(image_id).rsplit("_", 1)[1])
    except (IndexError, ValueError) as err:
        raise ValueError(f"{image_id!r} is not an embedded-dataset id (SYN_<number>); the planted-shift "
                         "control needs dataset.source: synthetic") from err


class _Recorder:
    """A numpy Generator stand-in that passes draws through (or replays recorded ones) and records them.

    ``then_base``: once the recorded draws are used up, draw from ``base`` instead of failing."""

    def __init__(self, base: np.random.Generator | None, replay_after: int | None = None, replay=(), then_base=False):
        self.base, self.replay_after, self.replay, self.then_base = base, replay_after, list(replay), then_base
        self.calls: list[tuple[str, object]] = []

    def __getattr__(self, name):
        def draw(*args, **kwargs):
            if self.then_base and not self.replay:
                value = getattr(self.base, name)(*args, **kwargs)
            elif self.replay_after is not None and len(self.calls) >= self.replay_after:
                if not self.replay:
                    raise RuntimeError("planted-shift replay ran out of recorded nuisance draws: the synthetic "
                                       "renderer's draw order changed; update cfaudit.traits.control")
                want, value = self.replay.pop(0)
                if want != name:
                    raise RuntimeError(f"planted-shift replay expected a {want} draw, the renderer asked for {name}")
            else:
                value = getattr(self.base, name)(*args, **kwargs)
            self.calls.append((name, value))
            return value

        return draw


def _stream(t: Traits, seed: int) -> np.random.Generator:
    rng = np.random.default_rng([seed, image_index(t.image_id)])
    sample_traits(rng, t.image_id, t.label)  # advance the stream exactly as generate_dataset did
    return rng


def _lesion_draws(t: Traits, seed: int, synth_size: int) -> int:
    """How many draws the renderer takes before the nuisances (a render without ruler, ink and hair)."""
    rec = _Recorder(_stream(t, seed))
    render(dataclasses.replace(t, hair=0, ruler=False, ink=False), synth_size, rec)
    return len(rec.calls)


def render_shifted(t: Traits, seed: int, synth_size: int, target: int | None, shift: dict | None = None) -> np.ndarray:
    """Re-render image ``t.image_id`` from its own random stream, traits shifted toward ``target``
    (None = unshifted: reproduces the dataset's image byte for byte).

    The lesion takes its draws from the image's stream as the original did (same position, skin texture,
    outline phases); each colour region takes two more draws, so adding or removing one would move every
    later draw. The nuisances (ruler, ink, hair), drawn after the lesion, are therefore REPLAYED from the
    original render, so the pair differs in the planted traits only."""
    if target is None:
        return render(t, synth_size, _stream(t, seed))
    shifted = shift_traits(t, target, shift)
    original = _Recorder(_stream(t, seed))
    render(t, synth_size, original)
    nuisance = original.calls[_lesion_draws(t, seed, synth_size):]
    rec = _Recorder(_stream(t, seed), replay_after=_lesion_draws(shifted, seed, synth_size), replay=nuisance)
    img = render(shifted, synth_size, rec)
    if rec.replay:
        raise RuntimeError("planted-shift replay left nuisance draws unused: the synthetic renderer's draw order "
                           "changed; update cfaudit.traits.control")
    return img


# Draws the renderer takes per nuisance (cfaudit.data.synthetic.render: ruler, then ink, then each hair).
NUISANCE_DRAWS = {"ruler": 1, "ink": 2, "hair": 4}


def _nuisance_segments(t: Traits, calls: list) -> dict:
    """A render's nuisance draws split into the ruler's, the ink's and one list per hair."""
    n_ruler, n_ink = NUISANCE_DRAWS["ruler"] * t.ruler, NUISANCE_DRAWS["ink"] * t.ink
    hairs = calls[n_ruler + n_ink:]
    if len(hairs) != NUISANCE_DRAWS["hair"] * t.hair:
        raise RuntimeError("the synthetic renderer's nuisance draws changed; update cfaudit.traits.control.NUISANCE_DRAWS")
    step = NUISANCE_DRAWS["hair"]
    return {"ruler": calls[:n_ruler], "ink": calls[n_ruler:n_ruler + n_ink],
            "hair": [hairs[i:i + step] for i in range(0, len(hairs), step)]}


def render_with_nuisances(t: Traits, seed: int, synth_size: int, *, ruler: bool, ink: bool, hair: int,
                          ink_at_lesion_centre: bool = False) -> np.ndarray:
    """Re-render image ``t.image_id`` with the given ruler, ink and hair count and nothing else changed.

    The lesion and skin replay the image's own stream; a nuisance the image had keeps its position (the first
    ``hair`` of its hairs are kept); one it lacked is drawn from the image's cue stream
    ``default_rng([seed, index, 1])``. With the image's own nuisances this reproduces it byte for byte.
    ``ink_at_lesion_centre``: the ink dot (same colour and size) sits on the lesion's centre instead of the skin,
    to tell a classifier that reacts to a marking on the skin from one that reacts to the colour anywhere."""
    lesion_n = _lesion_draws(t, seed, synth_size)
    original = _Recorder(_stream(t, seed))
    render(t, synth_size, original)
    lesion, have = original.calls[:lesion_n], _nuisance_segments(t, original.calls[lesion_n:])
    everything = dataclasses.replace(t, ruler=True, ink=True, hair=max(hair, t.hair))
    extra = _Recorder(np.random.default_rng([seed, image_index(t.image_id), 1]), replay_after=0, replay=lesion,
                      then_base=True)
    render(everything, synth_size, extra)
    fresh = _nuisance_segments(everything, extra.calls[lesion_n:])
    hairs = (have["hair"] + fresh["hair"][len(have["hair"]):])[:hair]
    ink_draws = _lesion_centre_draws(lesion, synth_size) if ink_at_lesion_centre else (have["ink"] or fresh["ink"])
    script = (lesion + (have["ruler"] or fresh["ruler"]) * ruler + ink_draws * ink
              + [draw for strand in hairs for draw in strand])
    rec = _Recorder(None, replay_after=0, replay=script)
    img = render(dataclasses.replace(t, ruler=bool(ruler), ink=bool(ink), hair=int(hair)), synth_size, rec)
    if rec.replay:
        raise RuntimeError("nuisance replay left draws unused: update cfaudit.traits.control")
    return img


def _lesion_centre_draws(lesion: list, synth_size: int) -> list:
    """The ink dot's two draws (its centre as a fraction of the side) that put it on the lesion's centre: the
    renderer's first two draws are the centre's offsets from the middle, in supersampled pixels."""
    (kind_x, dx), (kind_y, dy) = lesion[:2]
    if (kind_x, kind_y) != ("normal", "normal"):
        raise RuntimeError("the synthetic renderer no longer draws the lesion centre first; update cfaudit.traits.control")
    n = synth_size * SUPERSAMPLE
    return [("uniform", 0.5 + dx / n), ("uniform", 0.5 + dy / n)]


def planted_shift_counterfactuals(anchors: pd.DataFrame, metadata: pd.DataFrame, out_dir, *, seed: int,
                                  synth_size: int, image_size: int, resize_mode: str = "crop",
                                  resample: str = "lanczos", shift: dict | None = None) -> pd.DataFrame:
    """Write both planted-shift counterfactuals of every anchor to ``out_dir``; return the index rows."""
    meta = metadata.set_index("image_id", drop=False)
    missing = sorted(set(anchors["image_id"]) - set(meta.index))
    if missing:
        raise KeyError(f"{len(missing)} anchors are not in the synthetic metadata, e.g. {missing[:3]}")
    rows = []
    settings = {"seed": seed, "synth_size": synth_size, "image_size": image_size, "shift": {**DEFAULT_SHIFT, **(shift or {})}}
    for target in (0, 1):
        for a in anchors.itertuples(index=False):
            t = traits_from_row(meta.loc[a.image_id])
            img = Image.fromarray(render_shifted(t, seed, synth_size, target, shift), "RGB")
            save_png(np.asarray(resize_square(img, image_size, resize_mode, resample)), image_path(out_dir, a.image_id, target))
        rows += index_rows(anchors["image_id"], anchors["label"], target, GENERATOR, Path(out_dir), 0, settings)
    return pd.DataFrame(rows)


# Measured features that track the planted traits, with the sign of their change toward MALIGNANT
# (toward benign the sign flips): size, asymmetry, border ripples (compactness up, convexity down), colours.
PLANTED_EFFECTS = {"diameter": 1, "asymmetry": 1, "compactness": 1, "convexity": -1, "n_colours": 1}


def control_verdict(paired: pd.DataFrame, generator: str = GENERATOR, stratum: str = "all") -> pd.DataFrame:
    """Per direction and planted feature: expected sign, observed mean difference, Holm p, and whether the
    analysis recovered it (significant with the expected sign)."""
    rows = []
    for target in (1, 0):
        for feature, sign in PLANTED_EFFECTS.items():
            r = paired[(paired["generator"] == generator) & (paired["target_label"] == target)
                       & (paired["stratum"] == stratum) & (paired["feature"] == feature)]
            expected = sign if target == 1 else -sign
            if not len(r):
                rows.append({"target_label": target, "feature": feature, "expected_sign": expected,
                             "mean_diff": np.nan, "p_holm": np.nan, "sign_ok": False, "recovered": False})
                continue
            r = r.iloc[0]
            sign_ok = bool(np.sign(r["mean_diff"]) == expected)
            rows.append({"target_label": target, "feature": feature, "expected_sign": expected,
                         "mean_diff": float(r["mean_diff"]), "p_holm": float(r["p_holm"]), "sign_ok": sign_ok,
                         "recovered": sign_ok and bool(r["significant"])})
    return pd.DataFrame(rows)
