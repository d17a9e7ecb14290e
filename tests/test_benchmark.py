"""The performance benchmark command: every figure produced and appended, the per-rule table, the memory probe."""

from __future__ import annotations

import os
import re

import pytest

from cfaudit import benchmark as B

FIGURES = ["peak", "train_seed_fp32", "train_seed_fast", "train_seed_best", "train_unet64m", "data_path", "cf_fast",
           "cf_seed_ddpm320", "score", "fid_features"]


def test_quick_benchmark_prints_every_figure_and_appends(tmp_path, capsys):
    results = tmp_path / "BENCHMARKS.md"
    out = B.main(["--quick", "--device", "cpu", "--threads", "1", "--results", str(results), "--json", str(tmp_path / "b.json")])
    figs = {r["figure"]: r for r in out["figures"]}
    assert list(figs) == FIGURES
    assert all(r["value"] > 0 for r in figs.values())
    # MFU = img/s x 3 x forward FLOPs / measured peak
    seed = figs["train_seed_fp32"]
    assert seed["mfu"] == pytest.approx(seed["value"] * 3 * seed["flops_fwd_per_img"] / figs["peak"]["flop_per_s"], rel=0.01)
    assert figs["train_seed_best"]["value"] == figs["train_seed_fast"]["value"] and "eager loop at batch 2" in figs["train_seed_best"]["note"]
    assert 0 < figs["data_path"]["value"] < 100
    printed = capsys.readouterr().out
    for f in FIGURES:
        assert re.search(rf"^\s*{f}: ", printed, re.M), f
    md = results.read_text()
    assert md.startswith("# Benchmark results") and md.count("| train_seed_best |") == 1
    assert "CPU" in md and "torch" in md and re.search(r"## \d{4}-\d\d-\d\dT", md)
    B.main(["--quick", "--device", "cpu", "--skip-train", "--skip-cf", "--skip-score", "--results", str(results)])
    assert results.read_text().count("## ") == 2  # appended, not overwritten
    assert "target" not in figs["cf_fast"]  # the GPU targets are not claimed for a CPU smoke run


def test_forward_flops_of_a_convolution_match_the_formula():
    import torch

    class Net(torch.nn.Module):  # the generators' call signature (x, t, y)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.fc = torch.nn.Linear(5, 7)

        def forward(self, x, t, y):
            return self.conv(x).sum() + self.fc(torch.ones(4, 5)).sum()

    n = B.forward_flops(Net(), torch.zeros(2, 3, 10, 12), None, None)
    assert n == 2 * (2 * 3 * 8 * 9 * 10 * 12) + 2 * 4 * 5 * 7  # multiply-adds x 2, bias adds not counted


def test_rule_table_sums_shards_and_reads_snakemake_tsv(tmp_path):
    head = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
    for name, s, rss, cpu in [("train_gan", 100.0, 900.5, 190.0), ("guided_counterfactuals_0", 10.0, 500.0, 12.0),
                              ("guided_counterfactuals_1", 12.5, 700.0, 14.0), ("score", 5.0, "-", 4.0)]:
        (tmp_path / f"{name}.tsv").write_text(head + f"{s}\t0:00:01\t{rss}\t1\t1\t1\t0\t0\t50\t{cpu}\n")
    t = B.rule_table(tmp_path).set_index("rule")
    assert list(t.index) == ["train_gan", "guided_counterfactuals", "score"]
    assert t.loc["guided_counterfactuals", "jobs"] == 2 and t.loc["guided_counterfactuals", "wall_s"] == 22.5
    assert t.loc["guided_counterfactuals", "cpu_s"] == 26.0 and t.loc["guided_counterfactuals", "max_rss_mb"] == 700.0
    assert t.loc["score", "max_rss_mb"] == 0
    with pytest.raises(FileNotFoundError, match="no benchmark"):
        B.rule_table(tmp_path / "empty")


def test_tree_rss_counts_children(tmp_path):
    import subprocess
    import sys
    import time

    own = B.tree_rss_mb(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(30)"])
    try:
        deadline = time.time() + 20
        while time.time() < deadline and B.tree_rss_mb(os.getpid()) < own + 150:
            time.sleep(0.2)
        assert B.tree_rss_mb(os.getpid()) >= own + 150  # the child's 200 MB are counted in the parent's tree
        assert B.tree_rss_mb(child.pid) >= 150
    finally:
        child.kill()
        child.wait()
