"""The diffusion stage: models, schedule, samplers (against diffusers), training/resume, SDEdit, the rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cfaudit.config import validate_config
from cfaudit.diffusion import samplers as S
from cfaudit.diffusion.checkpoint import load_checkpoint, load_generator
from cfaudit.diffusion.schedule import LinearSchedule
from cfaudit.diffusion.sdedit import sdedit
from cfaudit.diffusion.stage import run_training
from cfaudit.diffusion.training import NonFiniteLossError, train_diffusion
from cfaudit.models import NULL_LABEL, build_diffusion_model, model_spec, n_parameters


torch.set_num_threads(1)


def diffusion_cfg(**over) -> dict:
    """The validated ``diffusion:`` section (schema defaults) with overrides."""
    cf = over.pop("counterfactual", {})
    cfg = validate_config({"diffusion": {**over, "counterfactual": cf}})["diffusion"]
    return cfg


TINY_CTX = dict(model="contextunet", n_feat=8)
TINY_UNET = dict(model="unet2d", unet_channels=[8, 8, 8, 16], unet_attention=[False, False, False, True],
                 unet_norm_groups=4, unet_layers_per_block=1)  # attention at 1/8 resolution only (cheap at 256 px)


# ---------------------------------------------------------------- models

@pytest.mark.parametrize("arch", [TINY_CTX, TINY_UNET], ids=["contextunet", "unet2d"])
@pytest.mark.parametrize("size", [64, 256])
def test_forward_backward_shapes(arch, size):
    torch.manual_seed(0)
    model = build_diffusion_model(diffusion_cfg(**arch), size)
    x = torch.randn(2, 3, size, size)
    t = torch.tensor([1, 400])
    y = torch.tensor([1, NULL_LABEL])
    out = model(x, t, y)
    assert out.shape == x.shape and out.dtype == torch.float32
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_contextunet_seed_size_and_labels():
    # the seed's model (github.com/howellx/derm_audit): n_feat 128 at 256 px has 7.57 M parameters
    spec_model = build_diffusion_model(diffusion_cfg(model="contextunet", n_feat=128), 256)
    assert round(n_parameters(spec_model) / 1e6, 2) == 7.57
    up0 = spec_model.up0[0]
    assert up0.kernel_size == (8, 8) and up0.stride == (8, 8)  # the seed's 8x8 bottleneck unpooled by 8
    small = build_diffusion_model(diffusion_cfg(**TINY_CTX), 64)
    assert small.up0[0].kernel_size == (2, 2)  # generalised: 16x16 -> 8x8 -> 16x16 at 64 px
    c = small.class_vector(torch.tensor([0, 1, NULL_LABEL]))
    assert c.tolist() == [[1, 0], [0, 1], [0, 0]]
    with pytest.raises(ValueError, match="bottleneck"):
        build_diffusion_model(diffusion_cfg(model="contextunet", n_feat=8, bottleneck=8), 48)


# ---------------------------------------------------------------- schedule and samplers

def test_schedule_indexing_and_forward_noising_statistics():
    s = LinearSchedule(400, 1e-4, 0.02)
    assert s.betas.shape == (401,) and s.betas[0].item() == pytest.approx(1e-4) and s.betas[400].item() == pytest.approx(0.02)
    assert s.betas[200].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 2)
    assert s.alpha_bar[0].item() == pytest.approx(1 - 1e-4)  # the seed's T+1 convention
    assert torch.allclose(s.alpha_bar[1:], torch.cumprod(1 - s.betas.double(), 0)[1:].float())
    g = torch.Generator().manual_seed(0)
    ts = s.sample_t(20000, g)
    assert ts.min().item() == 1 and ts.max().item() == 400  # training draws 1..T
    assert s.t_start(0.8) == 320

    x0 = torch.full((4000, 3, 8, 8), 0.6)
    for t in (1, 100, 320, 400):
        noise = torch.randn(x0.shape, generator=g)
        xt = s.q_sample(x0, t, noise)
        ab = s.alpha_bar[t].item()
        assert xt.mean().item() == pytest.approx(np.sqrt(ab) * 0.6, abs=5e-3)
        assert xt.std().item() == pytest.approx(np.sqrt(1 - ab), rel=1e-2, abs=2e-3)
    assert s.alpha_bar[400].item() < 0.02  # x_T is nearly pure noise
    # per-sample timesteps broadcast per sample
    tvec = torch.tensor([1, 400])
    xt = s.q_sample(torch.ones(2, 3, 4, 4), tvec, torch.zeros(2, 3, 4, 4))
    assert xt[0].mean().item() == pytest.approx(s.alpha_bar[1].sqrt().item())
    assert xt[1].mean().item() == pytest.approx(s.alpha_bar[400].sqrt().item())


@pytest.mark.parametrize("t", [2, 20, 137, 320, 400])
def test_ancestral_step_equals_diffusers_ddpm(t):
    from diffusers import DDPMScheduler

    s = LinearSchedule(400, 1e-4, 0.02)
    g = torch.Generator().manual_seed(t)
    x_t, eps = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    ref = DDPMScheduler(**s.diffusers_kwargs(), variance_type="fixed_large", clip_sample=False, prediction_type="epsilon")
    # diffusers as shipped (float32): its 1 - alpha_bar_t / alpha_bar_{t-1} cancels badly for small t, so compare
    # there from t = 20 on; below, run the same diffusers step with a float64 alpha_bar table
    if t >= 20:
        want = ref.step(eps, t, x_t, generator=torch.Generator().manual_seed(99)).prev_sample
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(99))
        got = S.ancestral_step(s, x_t, eps, t, z)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    ref.alphas_cumprod = torch.cumprod(1 - torch.tensor(s.diffusers_kwargs()["trained_betas"], dtype=torch.float64), 0)
    want = ref.step(eps.double(), t, x_t.double(), generator=torch.Generator().manual_seed(99)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    got = S.ancestral_step(s, x_t, eps, t, z.float())
    assert torch.allclose(got.double(), want, atol=1e-5), (got.double() - want).abs().max()
    # the DDPM posterior step (Ho et al. 2020, arXiv:2006.11239, Algorithm 2) in float64, independently of both
    b, a, ab = s.betas.double()[t], 1 - s.betas.double()[t], torch.cumprod(1 - s.betas.double(), 0)[t]
    seed = (x_t.double() - b / (1 - ab).sqrt() * eps.double()) / a.sqrt() + b.sqrt() * z
    assert torch.allclose(got.double(), seed, atol=1e-5)
    # diffusers' defaults (posterior variance "fixed_small", x0 clipping) are a different sampler
    other = DDPMScheduler(**s.diffusers_kwargs()).step(eps, t, x_t, generator=torch.Generator().manual_seed(99)).prev_sample
    assert not torch.allclose(other.double(), want, atol=1e-4)


def test_ancestral_last_step_is_noise_free():
    s = LinearSchedule(400, 1e-4, 0.02)
    x, e = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    assert torch.equal(S.ancestral_step(s, x, e, 1, torch.randn(1, 3, 4, 4)), S.ancestral_step(s, x, e, 1, None))
    assert S.AncestralDDPM(s).timesteps(320) == list(range(320, 0, -1))


def test_ddim_step_equals_diffusers_ddim():
    from diffusers import DDIMScheduler

    s = LinearSchedule(399, 1e-4, 0.02)  # 400 entries: 20 inference steps have stride 20
    ref = DDIMScheduler(**s.diffusers_kwargs(), clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    want = ref.step(eps, 200, x_t, eta=0.0).prev_sample
    assert torch.allclose(S.ddim_step(s, x_t, eps, 200, 180), want, atol=1e-5)


class _AffineEps(torch.nn.Module):
    """A deterministic stand-in noise predictor whose output depends on x, t and the label."""

    def forward(self, x, t, y):
        return 0.3 * x + 0.001 * t.float()[:, None, None, None] + 0.2 * (y.float() - 1)[:, None, None, None]


def test_dpmsolver_first_order_equals_ddim_and_guidance_formula():
    s = LinearSchedule(400, 1e-4, 0.02)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 1])
    m = _AffineEps()
    ddim = S.denoise(m, S.DDIM(s, 8), x, y, 320, guidance=2.0)
    dpm1 = S.denoise(m, S.DPMSolver(s, 8, order=1), x, y, 320, guidance=2.0)
    assert S.spaced_timesteps(320, 8) == [320, 280, 240, 200, 160, 120, 80, 40]
    assert torch.allclose(ddim, dpm1, atol=1e-4)
    dpm2 = S.denoise(m, S.DPMSolver(s, 8), x, y, 320, guidance=2.0)
    assert torch.isfinite(dpm2).all() and not torch.allclose(dpm2, dpm1, atol=1e-4)
    t = torch.full((3,), 50)
    eps = S.guided_eps(m, x, 50, y, 10.0)
    want = 11 * m(x, t, y) - 10 * m(x, t, torch.full_like(y, NULL_LABEL))
    assert torch.allclose(eps, want, atol=1e-5)
    assert torch.allclose(S.guided_eps(m, x, 50, y, 0.0), m(x, t, y))


class _Oracle(torch.nn.Module):
    """The exact noise predictor for a data set of one image x*: eps = (x_t - sqrt(ab_t) x*) / sqrt(1 - ab_t)."""

    def __init__(self, xstar, schedule):
        super().__init__()
        self.xstar, self.ab = xstar, schedule.alpha_bar

    def forward(self, x, t, y):
        ab = self.ab[t].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.xstar) / (1 - ab).sqrt()


@pytest.mark.parametrize("sampler,steps,tol", [("ddpm", 0, 0.05), ("ddim", 10, 1e-4), ("dpmsolver", 10, 1e-4)])
def test_sdedit_with_oracle_denoiser_recovers_the_data_image(sampler, steps, tol):
    # the whole chain (forward noising to t0, guidance, sampler steps, last step) must land on x*
    s = LinearSchedule(400, 1e-4, 0.02)
    xstar = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    anchors = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    out = sdedit(_Oracle(xstar, s), s, anchors, [1, 2], strength=1.0, guidance=3.0, sampler=sampler, steps=steps)
    assert out.shape == (2, 2, 3, 16, 16)
    assert (out - xstar).abs().max() < tol


# ---------------------------------------------------------------- training on the embedded data

@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    """48 embedded synthetic images at 32 px as the data stage's pack + split (36 train, 12 eval)."""
    from cfaudit.data.synthetic import generate_dataset

    d = tmp_path_factory.mktemp("diffpack")
    table = generate_dataset(d / "images", 48, 0.5, 32, seed=3)
    ids = [f.removesuffix(".png") for f in table["file"]]
    labels = (table["diagnosis"] == "synthetic melanoma").astype(int).to_numpy()
    imgs = np.stack([np.asarray(Image.open(d / "images" / f).convert("RGB")) for f in table["file"]])
    np.save(d / "pack.npy", imgs)
    pd.DataFrame({"row": range(len(ids)), "image_id": ids, "label": labels,
                  "png": [str(d / "images" / f) for f in table["file"]]}).to_csv(d / "pack_index.csv", index=False)
    split = np.where(np.arange(len(ids)) % 4 == 0, "eval", "train")
    pd.DataFrame({"image_id": ids, "label": labels, "split": split}).to_csv(d / "split.csv", index=False)
    ev = [i for i, s in zip(ids, split) if s == "eval"]
    pd.DataFrame({"image_id": ev, "label": [labels[ids.index(i)] for i in ev]}).to_csv(d / "anchors.csv", index=False)
    return {"pack": d / "pack.npy", "pack_index": d / "pack_index.csv", "split": d / "split.csv", "anchors": d / "anchors.csv"}


def _train(tiny_pack, out: Path, cfg: dict, **kw):
    return train_diffusion(pack=tiny_pack["pack"], pack_index=tiny_pack["pack_index"], split=tiny_pack["split"],
                           checkpoint_out=out / "checkpoint.pt", state_path=out / "train_state.pt", cfg=cfg, image_size=32,
                           seed=11, device="cpu", **kw)


def test_training_loss_falls_and_outputs(tiny_pack, tmp_path):
    cfg = diffusion_cfg(model="contextunet", n_feat=16, epochs=8, batch_size=12, lr=3e-3, ema_decay=0.9, flips="both",
                        checkpoint_every=0, log_every=5)
    res = run_training(pack=tiny_pack["pack"], pack_index=tiny_pack["pack_index"], split=tiny_pack["split"],
                       checkpoint_out=tmp_path / "checkpoint.pt", loss_csv=tmp_path / "loss.csv",
                       loss_png=tmp_path / "loss.png", cfg=cfg, image_size=32, seed=5, device="cpu")
    hist = pd.read_csv(tmp_path / "loss.csv")
    assert list(hist["epoch"]) == list(range(1, 9)) and list(hist["step"]) == [3 * e for e in range(1, 9)]
    assert hist["loss"].iloc[-2:].mean() < 0.6 * hist["loss"].iloc[0], hist["loss"].tolist()
    assert hist["lr"].iloc[0] == pytest.approx(3e-3) and hist["lr"].iloc[-1] == pytest.approx(3e-3 / 8)  # linear decay
    assert Image.open(tmp_path / "loss.png").size[0] > 100
    for f in ("loss.csv", "loss.png", "checkpoint.pt"):
        prov = json.loads((tmp_path / f"{f}.prov.json").read_text())
        assert prov["rule"] == "train_diffusion" and prov["config"]["seed"] == 5
    ck = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ck["step"] == 24 and ck["ema"] is not None and ck["spec"] == model_spec(cfg, 32)
    assert not (tmp_path / "train_state.pt").exists() and res["steps"] == 24


class _Kill(Exception):
    pass


def test_resume_after_kill_continues_from_same_step_and_state(tiny_pack, tmp_path):
    cfg = diffusion_cfg(model="contextunet", n_feat=8, epochs=3, batch_size=8, lr=1e-3, ema_decay=0.95, flips="both",
                        label_dropout=0.3, checkpoint_every=4, log_every=3)
    full = _train(tiny_pack, tmp_path / "full", cfg)  # uninterrupted: 5 steps per epoch, 15 steps
    assert full["steps"] == 15

    def kill_at_7(step):  # the state at step 4 is on disk; steps 5..7 are lost with the "kill"
        if step == 7:
            raise _Kill

    out = tmp_path / "killed"
    with pytest.raises(_Kill):
        _train(tiny_pack, out, cfg, on_step=kill_at_7)
    state = load_checkpoint(out / "train_state.pt")
    assert state["step"] == 4 and not (out / "checkpoint.pt").exists()
    resumed = _train(tiny_pack, out, cfg)
    assert resumed["resumed_from"] == 4 and resumed["steps"] == 15

    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.allclose(a[part][k].float(), b[part][k].float(), atol=1e-6), (part, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.allclose(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], atol=1e-9) for i in sa)
    assert torch.equal(a["rng"]["train"], b["rng"]["train"])
    pd.testing.assert_frame_equal(full["history"].drop(columns="seconds"), resumed["history"].drop(columns="seconds"))

    # a state written for other settings is not resumed
    with pytest.raises(_Kill):
        _train(tiny_pack, out, cfg, on_step=kill_at_7)
    other = _train(tiny_pack, out, {**cfg, "lr": 5e-4, "epochs": 1})
    assert other["resumed_from"] == 0


def test_ddp_two_gloo_processes_equal_one_process(tiny_pack, tmp_path):
    """torchrun + DistributedDataParallel on the CPU (gloo): 2 ranks with the same global batch reach the weights
    of one process, up to summation order; batch 7 of 36 images leaves a last batch of 1, so rank 1 runs the
    zero-weight stand-in there. A GroupNorm model: BatchNorm would need SyncBatchNorm, which needs GPUs."""
    from cfaudit.diffusion.distributed import launch_training

    cfg = diffusion_cfg(**TINY_UNET, epochs=2, batch_size=7, lr=2e-3, ema_decay=0.9, flips="both", label_dropout=0.3,
                        checkpoint_every=0, log_every=2)
    one = _train(tiny_pack, tmp_path / "one", cfg)
    two = launch_training(2, device="cpu", threads=2, pack=tiny_pack["pack"], pack_index=tiny_pack["pack_index"],
                          split=tiny_pack["split"], checkpoint_out=tmp_path / "two" / "checkpoint.pt",
                          state_path=tmp_path / "two" / "train_state.pt", cfg=cfg, image_size=32, seed=11)
    assert one["steps"] == two["steps"] == 12 and two["world_size"] == 2 and one["world_size"] == 1
    a, b = load_checkpoint(tmp_path / "one" / "checkpoint.pt"), load_checkpoint(tmp_path / "two" / "checkpoint.pt")
    moved = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    assert moved < 1e-4, moved
    start = model_from_spec_seeded(a["spec"], 11)
    assert any(float((start[k] - a["model"][k]).abs().max()) > 1e-3 for k in start)  # training did move the weights
    pd.testing.assert_series_equal(one["history"]["loss"], two["history"]["loss"], rtol=1e-4)


def model_from_spec_seeded(spec, seed):
    from cfaudit.models import model_from_spec

    torch.manual_seed(seed)
    return {k: v.float() for k, v in model_from_spec(spec).state_dict().items()}


def test_non_finite_loss_stops_with_clear_message(tiny_pack, tmp_path, monkeypatch):
    import cfaudit.diffusion.training as T

    real = T.model_from_spec

    class Broken(torch.nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.inner = real(spec)

        def forward(self, x, t, y):
            return self.inner(x, t, y) * float("nan")

    monkeypatch.setattr(T, "model_from_spec", Broken)
    cfg = diffusion_cfg(**TINY_CTX, epochs=2, batch_size=8, checkpoint_every=2, log_every=100)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan between steps 1 and 2.*diffusion\.lr"):
        _train(tiny_pack, tmp_path, cfg)
    assert not (tmp_path / "train_state.pt").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_sdedit_pairs_targets_and_ignores_batch_composition(tiny_pack, tmp_path):
    cfg = diffusion_cfg(**TINY_CTX, T=60, epochs=1, batch_size=12, ema_decay=0.5, checkpoint_every=0)
    _train(tiny_pack, tmp_path, cfg)
    model, schedule, meta = load_generator(tmp_path / "checkpoint.pt", "cpu", use_ema=True)
    assert meta["step"] == 3 and schedule.T == 60
    x0 = torch.rand(3, 3, 32, 32) * 2 - 1
    kw = dict(strength=0.5, guidance=4.0, sampler="ddpm", steps=0)
    both = sdedit(model, schedule, x0, [10, 11, 12], **kw)
    alone = sdedit(model, schedule, x0[1:2], [11], **kw)
    assert both.shape == (2, 3, 3, 32, 32)
    assert torch.allclose(both[:, 1], alone[:, 0], atol=1e-5)  # anchor 1's images do not depend on its batch
    # paired noise: the two targets differ only through the label (exactly 0 if both got the same label)
    assert (both[0] - both[1]).abs().max() > 1e-6
    again = sdedit(model, schedule, x0, [10, 11, 12], **{**kw, "sampler": "dpmsolver", "steps": 4})
    assert torch.isfinite(again).all()
    _train(tiny_pack, tmp_path / "noema", {**cfg, "ema_decay": 0.0})
    with pytest.raises(ValueError, match="use_ema"):
        load_generator(tmp_path / "noema" / "checkpoint.pt", "cpu", use_ema=True)


def test_benchmark_command_prints_throughput(capsys, repo_root):
    from cfaudit.benchmark import diffusion as bench

    out = bench.main(["--base-config", str(repo_root / "config.yaml"), "--image-size", "32", "--n-feat", "8",
                      "--batch-size", "4", "--train-steps", "1", "--warmup", "1", "--cf-batch-size", "2", "--steps", "2",
                      "--device", "cpu"])
    text = capsys.readouterr().out
    assert re.search(r"training: [\d.]+ images/s \(batch 4", text)
    assert re.search(r"counterfactuals: [\d.]+ anchors/s", text)
    assert "M parameters" in text and "precision fp32" in text and "CPU" in text
    assert out["train_images_per_s"] > 0 and out["cf_anchors_per_s"] > 0


# ---------------------------------------------------------------- the rules, end to end

@pytest.mark.slow
def test_snakemake_counterfactuals(all_stages_run):
    """The session's run of every stage (tests/conftest.py): both targets of every anchor from two shards, 8-bit
    RGB at image_size, the sampler settings recorded. What a guidance change reruns: docs/reproducibility.md's table,
    tests/test_rerun.py."""
    work = all_stages_run
    anchors = pd.read_csv(work / "results/data/anchors.csv")
    index = pd.read_csv(work / "results/counterfactuals/diffusion/index.csv")
    assert len(anchors) == 6 and len(index) == 12
    assert set(zip(index["anchor_id"], index["target_label"])) == {(a, t) for a in anchors["image_id"] for t in (0, 1)}
    assert set(index["shard"]) == {0, 1} and set(index["generator"]) == {"diffusion"}
    for p in index["path"]:
        img = Image.open(work / p)
        assert img.mode == "RGB" and img.size == (32, 32)
    settings = json.loads(index["settings"].iloc[0])
    assert settings["guidance"] == 10.0 and settings["t_start"] == 16 and settings["sampler"] == "dpmsolver"
    assert len(pd.read_csv(work / "results/diffusion/loss.csv")) == 1
    assert (work / "results/counterfactuals/diffusion/index.csv.prov.json").exists()
