"""The seed's figures, rebuilt from the pipeline's tables (matplotlib, Agg backend, no display needed).

* :func:`pr_figure` / :func:`roc_figure`: PR and ROC curves of one generator's counterfactuals (target label
  as ground truth) with the originals (ground-truth label) for reference (seed Figures 7-10).
* :func:`score_histograms`: the score distribution per target (per label for the originals).
* :func:`loss_figure`: training-loss curves (seed Figure 6; also each training rule's own loss.png).
* :func:`realism_figure`: FID (or the classifier-feature FD where FID is unavailable) per generator (Figure 11).

Each function takes DataFrames with documented columns and writes one PNG; nothing is read from disk here.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cfaudit import metrics as M  # noqa: E402

ORIGINAL_STYLE = {"color": "0.45", "linestyle": "--"}
COLORS = {"original": "0.45", "gan": "tab:blue", "diffusion": "tab:orange", "guided": "tab:green"}


def save_figure(fig, path: str | os.PathLike, dpi: int, **savefig) -> None:
    """Save a figure as PNG atomically, without the matplotlib version stamp (same figure, same bytes), and
    close it."""
    from cfaudit.files import atomic_output

    options = {"bbox_inches": "tight", **savefig}
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None}, **options)
    plt.close(fig)


def _group_arrays(scores: pd.DataFrame, group: str) -> tuple[np.ndarray, np.ndarray]:
    sub = scores[scores["generator"] == group]
    if group == M.ORIGINAL:
        sub = sub.drop_duplicates("image_id")
    return sub["target_label"].to_numpy(int), sub["score"].to_numpy(float)


def pr_curve(y, s) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) of the full sweep with the (R=0, P=1) end point, as precision_recall_curve."""
    sw = M.threshold_sweep(y, s)
    return np.r_[sw["recall"].to_numpy(), 0.0], np.r_[sw["precision"].to_numpy(), 1.0]


def _curve_groups(generator: str):
    """(group, line style, legend label) of the two curves every PR/ROC figure draws: originals, then ``generator``."""
    yield M.ORIGINAL, ORIGINAL_STYLE, "originals (ground truth)"
    yield generator, {"color": COLORS.get(generator, "tab:red")}, f"{generator} counterfactuals (target)"


def _finish(fig, ax, path, dpi: int, legend_loc: str) -> None:
    ax.legend(loc=legend_loc, fontsize=7)
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi)


def pr_figure(scores: pd.DataFrame, generator: str, path, score_space: str, dpi: int = 150) -> dict:
    """PR curve of ``generator`` vs originals; marks each curve's best-F1 point. Returns plotted numbers.

    ``scores``: columns generator, image_id, target_label, score (originals: generator "original").
    """
    fig, ax = plt.subplots(figsize=(5, 4.4))
    info = {}
    for group, style, label in _curve_groups(generator):
        y, s = _group_arrays(scores, group)
        if len(y) == 0 or y.sum() == 0:
            ax.plot([], [], label=f"{group}: no positives", **style)
            continue
        r, p = pr_curve(y, s)
        thr, _ = M.best_f1_threshold(y, s)
        best = M.metrics_at(y, s, thr)
        ax.step(r, p, where="post", label=f"{label}\nbest F1 {best['f1']:.3f} at {thr:.3g}", **style)
        ax.plot([best["recall"]], [best["precision"]], "o", color=style["color"])
        ax.axhline(y.mean(), color=style["color"], lw=0.6, alpha=0.5)
        info[group] = {"best_threshold": thr, "f1": best["f1"], "n": len(y), "prevalence": float(y.mean())}
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02),
           title=f"Precision-recall: {generator} (score: {score_space})")
    _finish(fig, ax, path, dpi, legend_loc="lower left")
    return info


def roc_figure(scores: pd.DataFrame, generator: str, path, score_space: str, dpi: int = 150) -> dict:
    """ROC curve of ``generator`` vs originals, AUROC in the legend (nan when one class only)."""
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(5, 4.4))
    info = {}
    for group, style, label in _curve_groups(generator):
        y, s = _group_arrays(scores, group)
        auc, reason = M.auroc(y, s) if len(y) else (np.nan, "no rows")
        if reason:
            ax.plot([], [], label=f"{label}: {reason}", **style)
        else:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, label=f"{label}\nAUROC {auc:.3f} (n={len(y)})", **style)
        info[group] = {"auroc": auc, "n": int(len(y))}
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02),
           title=f"ROC: {generator} (score: {score_space})")
    _finish(fig, ax, path, dpi, legend_loc="lower right")
    return info


def score_histograms(scores: pd.DataFrame, generators: list[str], path, threshold: float, score_space: str,
                     bins: int = 30, dpi: int = 150) -> None:
    """One panel per group (originals, then each generator), scores split by target (label), fixed threshold
    as a vertical line. Common bin edges across panels."""
    groups = [M.ORIGINAL] + list(generators)
    allscores = scores["score"].to_numpy(float)
    lo, hi = (float(np.nanmin(allscores)), float(np.nanmax(allscores))) if len(allscores) else (0.0, 1.0)
    if score_space == "softmax":
        lo, hi = min(lo, 0.0), max(hi, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    fig, axes = plt.subplots(len(groups), 1, figsize=(6, 1.9 * len(groups)), sharex=True, squeeze=False)
    for ax, group in zip(axes[:, 0], groups):
        y, s = _group_arrays(scores, group)
        what = "label" if group == M.ORIGINAL else "target"
        for lab, color, name in ((0, "tab:blue", "benign"), (1, "tab:red", "malignant")):
            ax.hist(s[y == lab], bins=edges, alpha=0.55, color=color, label=f"{what} {name} (n={int((y == lab).sum())})")
        ax.axvline(threshold, color="k", lw=1, ls=":", label=f"fixed threshold {threshold:g}")
        ax.set_ylabel("count")
        ax.set_title("originals" if group == M.ORIGINAL else f"{group} counterfactuals", fontsize=9)
        ax.legend(fontsize=7, loc="upper center")
    axes[-1, 0].set_xlabel(f"classifier score ({score_space})")
    fig.tight_layout()
    save_figure(fig, path, dpi)


BOOKKEEPING = ("step", "steps", "lr", "images", "seconds", "time", "per_s", "probe", "epoch", "iter", "batch")


def is_loss_column(name: str) -> bool:
    """Loss terms vs bookkeeping (step counters, learning rate, timings, classifier probes)."""
    n = name.lower()
    if "loss" in n:
        return True
    return not any(n == b or n.endswith(f"_{b}") or n.startswith(f"{b}_") or n.endswith(b) for b in BOOKKEEPING)


def read_loss_csv(path: str | os.PathLike | None) -> tuple[pd.DataFrame | None, str]:
    """A model's loss.csv read defensively: ``(frame of 'epoch' + numeric loss-term columns, reason when
    unusable)``. Accepts step/iteration instead of epoch (else the row number); drops non-numeric and
    bookkeeping columns (steps, lr, timings, probes: :func:`is_loss_column`)."""
    if path is None or not Path(path).is_file():
        return None, "no loss.csv in this run (e.g. pretrained weights)"
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        return None, f"unreadable loss.csv ({type(err).__name__})"
    if df.empty:
        return None, "empty loss.csv"
    x = next((c for c in ("epoch", "step", "iteration", "iter") if c in df.columns), None)
    if x is None:
        df = df.reset_index().rename(columns={"index": "epoch"})
        x = "epoch"
    num = df.apply(pd.to_numeric, errors="coerce")
    cols = [c for c in num.columns if c != x and not str(c).startswith("Unnamed") and num[c].notna().any()
            and is_loss_column(str(c))]
    if not cols:
        return None, "no numeric loss columns"
    out = num[[x] + cols].rename(columns={x: "epoch"}).dropna(subset=["epoch"])
    return out, ""


def loss_figure(losses: dict[str, tuple[pd.DataFrame | None, str]], path, dpi: int = 150, *, title: str = "",
                panel_title: str = "{name} training loss", ylabel: str = "loss (mean per epoch)",
                log_y: bool | None = None) -> None:
    """The package's one loss plot: one panel per entry, every column but ``epoch`` against epoch (totals, the
    columns named ``*loss*``, bold; log y when all values are positive, unless ``log_y`` says otherwise).

    ``losses``: ``{name: (frame with an 'epoch' column, reason)}``, e.g. from :func:`read_loss_csv` (rule
    loss_figure: one panel per model), or the panels of one training run (the diffusion model's MSE, the GAN's
    adversarial / generator / probe groups); a ``None`` frame gets a panel saying ``reason``. ``panel_title`` is
    formatted with the entry's name; ``title`` is the figure's.
    """
    names = list(losses) or ["(none)"]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.8), squeeze=False)
    if title:
        fig.suptitle(title)
    for ax, name in zip(axes[0], names):
        df, reason = losses.get(name, (None, "no generator of this run trains a model"))
        if df is None:
            ax.text(0.5, 0.5, f"{name}:\n{reason}", ha="center", va="center", transform=ax.transAxes, wrap=True)
            ax.set_axis_off()
            continue
        cols = [c for c in df.columns if c != "epoch"]
        per_epoch = df.groupby("epoch", as_index=False)[cols].mean()
        for c in cols:
            total = "loss" in c.lower()
            ax.plot(per_epoch["epoch"], per_epoch[c], marker="o" if len(per_epoch) < 30 else None, ms=3,
                    lw=2.0 if total else 1.0, alpha=1.0 if total else 0.8, label=c)
        vals = per_epoch[cols].to_numpy(float)
        if np.all(vals[np.isfinite(vals)] > 0) if log_y is None else log_y:
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=ylabel, title=panel_title.format(name=name))
        ax.legend(fontsize=7, ncol=2 if len(cols) > 6 else 1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi)


def realism_figure(table: pd.DataFrame, path, dpi: int = 150, reason: str = "") -> None:
    """Bar chart of the Fréchet distance per image set and KID (± std over subsets) beside it.

    ``table``: fid.csv rows (set, metric, value, std, n_real, implementation). The metric names in the
    table label the axes, so a classifier-feature FD is never shown as FID.
    """
    fd = table[table["metric"].isin(["FID", "classifier-feature FD", "oracle-feature FD"])]
    kd = table[table["metric"].isin(["KID", "classifier-feature KID", "oracle-feature KID"])]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, part in ((axes[0], fd), (axes[1], kd)):
        if part.empty:
            ax.set_axis_off()
            continue
        metric = part["metric"].iloc[0]
        colors = [COLORS.get(s, "0.6") for s in part["set"]]
        err = part["std"].to_numpy(float)
        ax.bar(part["set"], part["value"], color=colors, yerr=None if np.isnan(err).all() else err, capsize=4)
        for i, v in enumerate(part["value"]):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric}\nvs real non-anchor eval images (N={int(part['n_real'].iloc[0])})", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, labelrotation=30)  # long set names must not run into each other
        plt.setp(ax.get_xticklabels(), ha="right", rotation_mode="anchor")
    metric = str(fd["metric"].iloc[0]) if len(fd) else ""
    title = ("Realism: FID / KID (pytorch-fid Inception)" if metric == "FID"
             else f"Realism: {metric} / KID (NOT FID)")
    if reason:
        title += "\n" + reason[:160] + ("…" if len(reason) > 160 else "")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi)
