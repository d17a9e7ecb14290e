"""The seed's panels (its Figure 4): anchor | benign counterfactual | malignant counterfactual with the
classifier's scores in a title bar, one PNG per anchor, plus one contact sheet per generator.

File names follow the seed: ``combined_{index:05d}_{label}_{p_orig:.3f}_{p_benign:.3f}_{p_malignant:.3f}.png``
where index = the anchor's row in results/data/anchors.csv, label = its ground truth and the p's are the
``score`` column of results/scores/scores.csv (the configured score space).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from cfaudit.names import ORIGINAL

BG = (255, 255, 255)
FG = (20, 20, 20)


def panel_name(index: int, label: int, p_orig: float, p_benign: float, p_malignant: float) -> str:
    return f"combined_{index:05d}_{int(label)}_{p_orig:.3f}_{p_benign:.3f}_{p_malignant:.3f}.png"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def panel_table(scores: pd.DataFrame, anchors: pd.DataFrame, generator: str) -> pd.DataFrame:
    """One row per anchor: index, anchor_id, label, paths and scores of original / benign CF / malignant CF."""
    orig = scores[scores["generator"] == ORIGINAL].drop_duplicates("image_id").set_index("image_id")
    cf = scores[scores["generator"] == generator]
    rows, missing = [], []
    for index, a in enumerate(anchors.itertuples(index=False)):
        ben = cf[(cf["image_id"] == a.image_id) & (cf["target_label"] == 0)]
        mal = cf[(cf["image_id"] == a.image_id) & (cf["target_label"] == 1)]
        if a.image_id not in orig.index or ben.empty or mal.empty:
            missing.append(a.image_id)
            continue
        o = orig.loc[a.image_id]
        rows.append({"index": index, "anchor_id": a.image_id, "label": int(a.label),
                     "orig_path": o["path"], "benign_path": ben.iloc[0]["path"], "malignant_path": mal.iloc[0]["path"],
                     "p_orig": float(o["score"]), "p_benign": float(ben.iloc[0]["score"]),
                     "p_malignant": float(mal.iloc[0]["score"])})
    if missing:
        raise ValueError(f"{len(missing)} anchors lack an original or a counterfactual score for generator "
                         f"'{generator}' in the scores table (e.g. {missing[:3]}); rerun rule score")
    return pd.DataFrame(rows)


def _tile(path, size: int) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)


def make_panel(row, tile: int, generator: str, classifier: str, space: str) -> Image.Image:
    """anchor | benign CF | malignant CF, a title bar with the scores and a caption under each tile."""
    pad, title_h, cap_h = max(4, tile // 32), max(28, tile // 6), max(16, tile // 12)
    w = 3 * tile + 4 * pad
    h = title_h + tile + cap_h + 2 * pad
    canvas = Image.new("RGB", (w, h), BG)
    draw = ImageDraw.Draw(canvas)
    f_title, f_cap = _font(max(11, title_h // 3)), _font(max(10, cap_h * 2 // 3))
    title = (f"{row['anchor_id']} (label {row['label']})  {classifier} [{space}]: original {row['p_orig']:.3f} | "
             f"benign CF {row['p_benign']:.3f} | malignant CF {row['p_malignant']:.3f}")
    draw.text((pad, pad), title, fill=FG, font=f_title)
    draw.text((pad, pad + title_h // 2), f"generator: {generator}", fill=FG, font=f_cap)
    for k, (key, cap) in enumerate((("orig_path", "anchor"), ("benign_path", "benign CF"), ("malignant_path", "malignant CF"))):
        x = pad + k * (tile + pad)
        canvas.paste(_tile(row[key], tile), (x, title_h + pad))
        p = row[{"orig_path": "p_orig", "benign_path": "p_benign", "malignant_path": "p_malignant"}[key]]
        draw.text((x, title_h + pad + tile + 2), f"{cap}: {p:.3f}", fill=FG, font=f_cap)
    return canvas


def contact_sheet(table: pd.DataFrame, tile: int, generator: str, classifier: str, space: str) -> Image.Image:
    """Rows = anchors; columns = anchor | benign CF | malignant CF; each tile labelled with its score."""
    pad, head = 2, max(24, tile // 3)
    lab_w = max(60, tile)
    w = lab_w + 3 * (tile + pad) + pad
    h = head + len(table) * (tile + pad) + pad
    canvas = Image.new("RGB", (w, h), BG)
    draw = ImageDraw.Draw(canvas)
    f = _font(max(9, tile // 9))
    draw.text((pad, 2), f"{generator} counterfactuals scored by {classifier} [{space}]", fill=FG, font=_font(max(11, head // 2)))
    for k, cap in enumerate(("anchor", "benign CF", "malignant CF")):
        draw.text((lab_w + k * (tile + pad) + pad, head - max(10, tile // 8)), cap, fill=FG, font=f)
    for r, row in enumerate(table.itertuples(index=False)):
        y = head + r * (tile + pad)
        draw.text((pad, y + 2), f"{row.index:05d}\nlabel {row.label}", fill=FG, font=f)
        for k, (path, p) in enumerate(((row.orig_path, row.p_orig), (row.benign_path, row.p_benign),
                                       (row.malignant_path, row.p_malignant))):
            x = lab_w + k * (tile + pad) + pad
            canvas.paste(_tile(path, tile), (x, y))
            draw.rectangle((x, y + tile - max(12, tile // 7), x + tile // 2 + 8, y + tile), fill=(0, 0, 0))
            draw.text((x + 2, y + tile - max(12, tile // 7)), f"{p:.3f}", fill=(255, 255, 255), font=f)
    return canvas


def run_panels(score_paths: list, anchors_path, generator: str, out_dir, sheet_path, settings: dict, log=None) -> pd.DataFrame:
    """Rule panels: every anchor's panel into ``out_dir`` + the contact sheet (with a provenance sidecar);
    ``score_paths``: score tables holding the originals' and ``generator``'s rows."""
    from cfaudit.files import atomic_output
    from cfaudit.provenance import now, write_provenance

    started = now()
    score_paths = [score_paths] if isinstance(score_paths, (str, os.PathLike)) else list(score_paths)
    scores = pd.concat([pd.read_csv(p) for p in score_paths], ignore_index=True)
    anchors = pd.read_csv(anchors_path)
    table = panel_table(scores, anchors, generator)
    sub = scores[scores["generator"] == generator]
    classifier = str(sub["classifier"].iloc[0]) if len(sub) else "?"
    space = str(sub["score_space"].iloc[0]) if len(sub) else "?"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for _, row in table.iterrows():
        name = panel_name(row["index"], row["label"], row["p_orig"], row["p_benign"], row["p_malignant"])
        make_panel(row, settings["tile_size"], generator, classifier, space).save(out_dir / name)
        names.append(name)
    table = table.assign(panel=names)
    table.to_csv(out_dir / "panels.csv", index=False)
    n = settings.get("sheet_max_anchors")
    shown = table if n is None else table.head(n)
    with atomic_output(sheet_path) as tmp:
        contact_sheet(shown, settings["sheet_tile_size"], generator, classifier, space).save(tmp, format="PNG")
    write_provenance(sheet_path, [*score_paths, anchors_path], {"classifier.panels": settings, "generator": generator},
                     rule="panels", started=started, extra={"n_anchors_shown": len(shown), "n_panels": len(table)})
    if log:
        log.info("%s: %d panels in %s, contact sheet %s (%d anchors)", generator, len(table), out_dir, sheet_path, len(shown))
    return table
