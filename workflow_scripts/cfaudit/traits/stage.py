"""The trait stage's steps as plain functions (the entry scripts only unpack Snakemake's job object):
``features_step`` writes features.csv, ``statistics_step`` the tables, ranked.md/.html and the figures."""

from __future__ import annotations

import html
import logging
import re

import pandas as pd

from cfaudit.counterfactuals import INDEX_COLUMNS
from cfaudit.figures import save_figure
from cfaudit.files import atomic_write_text, write_csv
from cfaudit.traits.analysis import ORIGINAL, measure, ranked_markdown, select_originals, settings_from_config, selected_features
from cfaudit.traits.features import FEATURES
from cfaudit.traits.segmentation import SegmentationSettings
from cfaudit.traits.shortcut import artefact_markdown, artefact_table
from cfaudit.traits.statistics import label_statistics, paired_statistics

log = logging.getLogger("cfaudit.traits")


def read_indexes(paths, generators) -> pd.DataFrame:
    """Concatenate the counterfactual indexes; each must hold its own generator's rows only."""
    frames = []
    for path, gen in zip(paths, generators):
        df = pd.read_csv(path)
        missing = [c for c in INDEX_COLUMNS if c not in df]
        if missing:
            raise ValueError(f"{path} lacks the counterfactual-index columns {missing} (cfaudit/counterfactuals.py)")
        others = sorted(set(df["generator"]) - {gen})
        if others:
            raise ValueError(f"{path} should list generator {gen!r} only but also lists {others}")
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=INDEX_COLUMNS)
    return pd.concat(frames, ignore_index=True)


def features_step(anchors_path, pack_index_path, split_path, index_paths, generators, traits_cfg: dict,
                  out_path, workers: int = 1, part: str | None = None) -> pd.DataFrame:
    """Segmentation + features of the anchors, the other originals and the counterfactuals of ``index_paths``.

    ``part`` (rule traits_features, one job each): ``"original"`` measures the anchors and the other originals
    only; a generator's name measures that generator's counterfactuals (each with its anchor's mask, so the
    anchor is segmented again but its row is not written). ``None``: everything in one table."""
    seg, feat = settings_from_config(traits_cfg)
    anchors = pd.read_csv(anchors_path)
    cf = read_indexes(index_paths, generators)
    originals = select_originals(pd.read_csv(pack_index_path), pd.read_csv(split_path), traits_cfg.get("originals", "anchors"))
    if part is not None and part != ORIGINAL:
        originals = None
    log.info("measuring %d anchors, %d further originals, %d counterfactuals (%s) with %d worker(s)", len(anchors),
             0 if originals is None else int((~originals["image_id"].isin(anchors["image_id"])).sum()), len(cf),
             ", ".join(generators) or "none", workers)
    table = measure(anchors, cf, originals, seg, feat, workers=workers)
    if part is not None and part != ORIGINAL:
        table = table[table["role"] == "counterfactual"]
    write_csv(table, out_path)
    ok = table.groupby("role")["seg_ok"].mean().to_dict()
    log.info("usable segmentations by role: %s", {k: f"{v:.0%}" for k, v in ok.items()})
    return table


def gather_features(part_paths, anchors_path, generators) -> pd.DataFrame:
    """features.csv from the per-part tables of rule traits_features, in the order one job would write it: each
    anchor followed by its counterfactuals (generators in ``generators`` order), then the other originals."""
    parts = [pd.read_csv(p, keep_default_na=True) for p in part_paths]
    table = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else parts[0]
    anchor_rank = {a: i for i, a in enumerate(pd.read_csv(anchors_path)["image_id"])}
    generator_rank = {g: i + 1 for i, g in enumerate(generators)}
    is_extra = table["role"] == ORIGINAL
    table = table.assign(
        _a=[len(anchor_rank) if x else anchor_rank[a] for a, x in zip(table["anchor_id"], is_extra)],
        _g=[0 if r != "counterfactual" else generator_rank[g] for r, g in zip(table["role"], table["generator"])])
    return table.sort_values(["_a", "_g"], kind="stable").drop(columns=["_a", "_g"]).reset_index(drop=True)


def statistics_step(features_path, outputs: dict, *, seed: int, generators, statistics: dict, figures: dict,
                    segmentation: dict, cue: str = "none", cue_effect_path=None) -> dict:
    """outputs: paired, labels, artefacts, ranked, html, differences, originals, segmentation, examples (list, in
    the order of ``generators``). ``cue``: the planted shortcut (dataset.synthetic.shortcut.cue) with its
    cue-effect table (rule shortcut_cue_effect). Returns the tables and figure paths."""
    features = pd.read_csv(features_path, keep_default_na=True)
    features["seg_flags"] = features["seg_flags"].fillna("")
    cfg = {"statistics": statistics}
    names = selected_features(cfg)
    st = {"seed": seed, "resamples": statistics["bootstrap"], "ci_level": statistics["ci_level"],
          "alpha": statistics["alpha"], "require_segmentation": statistics["require_segmentation"]}
    paired = paired_statistics(features, by_anchor_label=statistics["by_anchor_label"], feature_names=names, **st)
    labels = label_statistics(features, feature_names=[f for f in names if f in FEATURES], **st)
    write_csv(paired, outputs["paired"])
    write_csv(labels, outputs["labels"])
    artefacts = artefact_table(paired, labels, cue, features)
    write_csv(artefacts, outputs["artefacts"])
    effect = pd.read_csv(cue_effect_path) if cue_effect_path else None
    md = ranked_markdown(paired, labels, statistics["alpha"], features,
                         extra=artefact_markdown(paired, artefacts, cue, effect))
    atomic_write_text(outputs["ranked"], md)
    atomic_write_text(outputs["html"], markdown_to_html(md, "Trait analysis"))
    for g in paired["generator"].unique() if len(paired) else []:
        for t in (1, 0):
            sig = paired[(paired.generator == g) & (paired.target_label == t) & (paired.stratum == "all") & paired.significant]
            log.info("%s -> %s: %d significant features: %s", g, "malignant" if t else "benign", len(sig),
                     ", ".join(f"{f}{'+' if d > 0 else '-'}" for f, d in zip(sig.feature, sig.mean_diff)))

    from cfaudit.traits import figures as figs

    seg = SegmentationSettings.from_config(segmentation)
    k, req, dpi = figures["top_features"], statistics["require_segmentation"], figures["dpi"]
    made = {
        "differences": figs.differences_figure(features, paired, k, req, seed),
        "originals": figs.originals_figure(features, labels, k, req),
        "segmentation": figs.segmentation_figure(features, figures["qc_images"], seg, seed),
    }
    for key, fig in made.items():
        save_figure(fig, outputs[key], dpi, bbox_inches=None)
    for g, path in zip(generators, outputs["examples"]):
        save_figure(figs.examples_figure(features, paired, g, k, figures["examples"], req, seg), path, dpi,
                    bbox_inches=None)
    return {"paired": paired, "labels": labels, "features": features}


def _inline(text: str) -> str:
    """Bold, code and escaped stars (``**\\***`` is a bold star) of one markdown line, as HTML."""
    t = html.escape(text, quote=False).replace("\\*", "&#42;")  # an escaped star is text, not emphasis
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)


def markdown_to_html(md: str, title: str) -> str:
    """The ranked.md subset (headings, pipe tables, paragraphs, bold, code) as a standalone HTML page."""
    out, table = [], []

    def flush():
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r.replace("|", "").strip()) <= set("-: ")]
            out.append("<table>")
            out.append("<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in rows[0]) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append("</table>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        m = re.match(r"^(#{1,4}) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{_inline(m.group(2))}</h{n}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;font-size:13px;margin:1em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}th{background:#eee}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
