"""Benign / malignant ground truth from ISIC metadata, a user's labels CSV, or the embedded dataset.

Rules (ISIC): ``diagnosis_1`` Malignant -> 1, Benign -> 0; Indeterminate or missing -> excluded and
counted. The legacy ``benign_malignant`` column is used only where ``diagnosis_1`` gives nothing; where
both speak and disagree, the image is excluded as contradictory. An id listed twice with different
labels is excluded as contradictory too. Every exclusion is written out with its reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cfaudit.files import sha256_file

GROUND_TRUTH_COLUMNS = ["image_id", "label", "diagnosis", "source", "licence", "sha256", "path", "group_id"]
GROUP_CANDIDATES = ("lesion_id", "patient_id")  # ISIC 2019/2020 metadata; HAM10000 has lesion_id
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")

_WORDS = {"malignant": 1, "benign": 0, "1": 1, "0": 0, "1.0": 1, "0.0": 0}


class LabelError(ValueError):
    """Labels cannot be read; the message names the file and column and what to do."""


def _norm(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value).strip().lower()


def isic_label(diagnosis_1, benign_malignant=None) -> tuple[int | None, str]:
    """Return ``(label, reason)``: label 0/1, or None with why it is excluded."""
    d1, bm = _norm(diagnosis_1), _norm(benign_malignant)
    primary = {"malignant": 1, "benign": 0}.get(d1)
    legacy = {"malignant": 1, "benign": 0}.get(bm)
    if primary is not None and legacy is not None and primary != legacy:
        return None, f"contradictory: diagnosis_1={diagnosis_1!r} but benign_malignant={benign_malignant!r}"
    if primary is not None:
        return primary, ""
    if d1 == "indeterminate":
        return None, "indeterminate"
    if legacy is not None:
        return legacy, ""
    if bm in ("indeterminate", "indeterminate/benign", "indeterminate/malignant"):
        return None, "indeterminate"
    return None, "missing label" if not d1 and not bm else f"unrecognised label {diagnosis_1 or benign_malignant!r}"


def binary_label(value) -> tuple[int | None, str]:
    """A user's label column: 0/1 (or benign/malignant); anything else is excluded with the reason."""
    v = _norm(value)
    if v in _WORDS:
        return _WORDS[v], ""
    return None, "missing label" if not v else f"unrecognised label {value!r} (expected 0/1 or benign/malignant)"


def _find_image(folder: Path, image_id: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        for cand in (folder / f"{image_id}{suffix}", folder / f"{image_id}{suffix.upper()}"):
            if cand.exists():
                return cand
    return None


def _drop_contradictory_duplicates(rows: list[dict], excluded: list[dict]) -> list[dict]:
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["image_id"], []).append(r)
    kept = []
    for image_id, group in by_id.items():
        if len({r["label"] for r in group}) > 1:
            excluded.append({"image_id": image_id, "reason": "contradictory: listed more than once with different labels"})
        else:
            kept.append(group[0])
    return kept


def group_column_of(metadata: pd.DataFrame, setting: str, metadata_name: str = "metadata") -> str:
    """The metadata column that groups images (config ``split.group_column``); "" when there is none."""
    if setting == "auto":
        return next((c for c in GROUP_CANDIDATES if c in metadata.columns
                     and metadata[c].map(_norm).astype(bool).any()), "")
    if setting and setting not in metadata.columns:
        raise LabelError(f"{metadata_name}: split.group_column is {setting!r} but there is no such column (columns: "
                         f"{list(metadata.columns)}); set split.group_column to one of them, 'auto' or ''")
    return setting


def build_ground_truth(metadata: pd.DataFrame, images_dir: str | os.PathLike, source: str, *,
                       id_column: str, label_column: str | None = None, file_column: str = "",
                       diagnosis_column: str = "diagnosis", licence_column: str = "licence",
                       metadata_name: str = "metadata", group_column: str = "auto") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Return ``(ground_truth, excluded, report)``.

    ``label_column=None`` applies the ISIC rules (diagnosis_1, then benign_malignant); otherwise the
    named column holds 0/1. Images that cannot be found are excluded ("file not found"). ``group_id`` is the
    image's lesion/patient id (:func:`group_column_of`), or the image id itself where there is none.
    """
    group_col = group_column_of(metadata, group_column, metadata_name)
    images_dir = Path(images_dir)
    if id_column not in metadata.columns:
        raise LabelError(f"{metadata_name}: no id column '{id_column}' (columns: {list(metadata.columns)}); "
                         "set dataset.folder.id_column")
    if label_column is not None and label_column not in metadata.columns:
        raise LabelError(f"{metadata_name}: no label column '{label_column}' (columns: {list(metadata.columns)}); "
                         "set dataset.folder.label_column")
    if label_column is None and not {"diagnosis_1", "benign_malignant"} & set(metadata.columns):
        raise LabelError(f"{metadata_name}: neither 'diagnosis_1' nor legacy 'benign_malignant' present; "
                         "cannot tell benign from malignant")
    rows, excluded = [], []
    for rec in metadata.to_dict("records"):
        image_id = str(rec[id_column]).strip()
        if label_column is None:
            label, reason = isic_label(rec.get("diagnosis_1"), rec.get("benign_malignant"))
            diagnosis = next((str(rec[c]) for c in ("diagnosis_3", "diagnosis_2", "diagnosis_1", "diagnosis")
                              if c in rec and _norm(rec[c])), "")
            licence = str(rec.get("copyright_license", "") or "")
        else:
            label, reason = binary_label(rec[label_column])
            diagnosis = str(rec.get(diagnosis_column, "") or "")
            licence = str(rec.get(licence_column, "") or "")
        if label is None:
            excluded.append({"image_id": image_id, "reason": reason})
            continue
        if file_column and _norm(rec.get(file_column)):
            path = images_dir / str(rec[file_column])
            path = path if path.exists() else None
        else:
            path = _find_image(images_dir, image_id)
        if path is None:
            excluded.append({"image_id": image_id, "reason": f"file not found in {images_dir}"})
            continue
        group = str(rec[group_col]).strip() if group_col and _norm(rec.get(group_col)) else ""
        rows.append({"image_id": image_id, "label": label, "diagnosis": diagnosis, "source": source,
                     "licence": licence, "path": str(path), "group_id": group or image_id})
    rows = _drop_contradictory_duplicates(rows, excluded)
    for r in rows:
        r["sha256"] = sha256_file(r["path"])
    gt = pd.DataFrame(rows, columns=GROUND_TRUTH_COLUMNS).sort_values("image_id").reset_index(drop=True)
    ex = pd.DataFrame(excluded, columns=["image_id", "reason"])
    report = {
        "source": source,
        "rows_in_metadata": int(len(metadata)),
        "included": int(len(gt)),
        "benign": int((gt["label"] == 0).sum()),
        "malignant": int((gt["label"] == 1).sum()),
        "excluded": int(len(ex)),
        "excluded_by_reason": {k: int(v) for k, v in ex["reason"].str.split(":").str[0].value_counts().items()},
        "group_column": group_col or None,
        "groups": int(gt["group_id"].nunique()),
        "images_in_largest_group": int(gt["group_id"].value_counts().max()) if len(gt) else 0,
    }
    if gt.empty:
        raise LabelError(f"{metadata_name}: no image has a usable benign/malignant label ({report['excluded_by_reason']}); "
                         "check the label column and the image folder")
    return gt, ex, report
