"""The GAN baseline (cfaudit.gan): published checkpoint layout, sizes, eval-mode batch independence,
training against a classifier (incl. resume after a kill), counterfactual shards, and the real snakemake run."""

from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cfaudit.config import load_config
from cfaudit.counterfactuals import gather
from cfaudit.files import sha256_file
from cfaudit.gan.checkpoint import (
    GANCheckpointError,
    from_published,
    load_generator,
    place_weights,
    published_name,
    read_checkpoint,
    to_published,
)
from cfaudit.gan.generate import counterfactuals, generate_shard, target_bin
from cfaudit.gan.networks import PUBLISHED_ARCH, Discriminator, Generator, GeneratorArch, n_parameters
from cfaudit.gan.training import bce_to_classifier, prob_to_bin, train_gan
from fixtures.random_weights import GENERATOR_KEYS, random_generator_state, read_key_list

REPO = Path(__file__).resolve().parents[1]
TINY = GeneratorArch(base_channels=4, n_blocks=1, n_bins=10)


class TinyClassifier(nn.Module):
    """Stand-in audited classifier (the contract's surface): [-1,1] images at any size -> (N, 2) logits."""

    def __init__(self, input_size=32):
        super().__init__()
        self.input_size, self.positive_index, self.name = input_size, 1, "tiny"
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))

    def forward(self, x):
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True)
        return self.net(x)

    def prob_malignant(self, x):
        return torch.softmax(self(x), 1)[:, 1]


def gan_config(**train):
    cfg = load_config(REPO / "config.yaml", overrides={"gan": {
        "arch": {"base_channels": 4, "n_blocks": 1, "d_base_channels": 4},
        "train": {"epochs": 2, "micro_batch": 8, "accumulation": 2, "n_critic": 1, "probe_size": 16, **train},
        "generate": {"batch_size": 4}}})
    return cfg["gan"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """48 images of the embedded dataset at 32 px and a small classifier trained on them (seconds)."""
    from cfaudit.data.synthetic import generate_dataset

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("embedded")
    table = generate_dataset(root / "images", 48, 0.5, 32, seed=3)
    images = np.stack([np.asarray(Image.open(root / "images" / f)) for f in table["file"]])
    labels = torch.tensor(table["label"].to_numpy())
    torch.manual_seed(0)
    clf = TinyClassifier(32)
    opt = torch.optim.Adam(clf.parameters(), 1e-2)
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    for _ in range(150):
        loss = F.cross_entropy(clf(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    return Namespace(root=root, table=table, images=images, clf=clf)


# ------------------------------------------------------------------------------------------------------------
# Published layout
# ------------------------------------------------------------------------------------------------------------
def test_key_mapping_is_a_bijection_onto_the_published_key_list():
    keys = read_key_list(GENERATOR_KEYS)
    own = Generator(PUBLISHED_ARCH).state_dict()
    mapped = {published_name(k): tuple(v.shape) for k, v in own.items()}
    assert mapped == dict(keys)
    assert n_parameters(Generator(PUBLISHED_ARCH)) + sum(
        math.prod(s) for n, s in keys if "running" in n or "tracked" in n) == 11_493_658  # 11.49 M (derm_audit)


def test_random_checkpoint_in_published_layout_loads_and_generates_299(tmp_path):
    keys = read_key_list(GENERATOR_KEYS)
    state = random_generator_state()
    disc = Discriminator()
    d_opt = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.0, 0.9))
    g_params = [nn.Parameter(torch.zeros(3))]
    g_opt = torch.optim.Adam(g_params, lr=2e-4, betas=(0.0, 0.9))
    for p in list(disc.parameters()) + g_params:
        p.grad = torch.ones_like(p)
    d_opt.step()
    g_opt.step()
    path = tmp_path / "deepderm_isic.pth"
    torch.save({"generator": state, "discriminator": disc.state_dict(), "d_opt": d_opt.state_dict(),
                "g_opt": g_opt.state_dict(), "epoch": 499}, path)
    torch.load(path, weights_only=True)  # the whole file loads without executing pickled code

    gen, info = load_generator(path)
    assert info["epoch"] == 499 and info["layout"] == "published" and info["arch"] == PUBLISHED_ARCH.as_dict()
    assert torch.equal(gen.blocks[3].conv2.weight, state["resblocks.3.layer4.weight"])
    assert torch.equal(gen.up[0].norm.embed_gamma.weight, state["layer7.layer2.embed_gamma.weight"])
    assert torch.equal(gen.stem.norm.batchnorm.running_var, state["layer3.batchnorm.running_var"])
    assert torch.equal(gen.head.conv.bias, state["layer10.bias"])

    x = torch.rand(1, 3, 299, 299) * 2 - 1
    with torch.no_grad():
        out = counterfactuals(gen, x, target_bin(1, 10), batch_size=1, mode="eval")
    assert out.shape == (1, 3, 299, 299)  # 299 in -> 300 after up-sampling -> cropped to 299
    assert out.abs().max() <= 1 and out.std() > 0.01


def test_loader_names_missing_unexpected_and_misshaped_keys(tmp_path):
    state = random_generator_state()
    del state["resblocks.8.layer5.embed_beta.weight"]
    state["resblocks.9.layer1.weight"] = torch.zeros(256, 256, 3, 3)
    state["layer3.embed_gamma.weight"] = torch.zeros(2, 64)
    with pytest.raises(GANCheckpointError) as err:
        from_published(state, PUBLISHED_ARCH, "x.pth")
    msg = str(err.value)
    assert "1 missing: resblocks.8.layer5.embed_beta.weight" in msg
    assert "1 unexpected: resblocks.9.layer1.weight" in msg
    assert "1 mis-shaped: layer3.embed_gamma.weight (file (2, 64), model (10, 64))" in msg
    # a published checkpoint against a smaller architecture fails the same way, naming the shapes
    with pytest.raises(GANCheckpointError, match="mis-shaped"):
        from_published(random_generator_state(), GeneratorArch(64, 9, 2), "x.pth")

    torch.save({"model": {}}, tmp_path / "bad.pth")
    with pytest.raises(GANCheckpointError, match=r"entries \['model'\].*'generator'"):
        read_checkpoint(tmp_path / "bad.pth")
    torch.save({"generator": {}, "extra": Namespace(a=1)}, tmp_path / "pickled.pth")
    with pytest.raises(GANCheckpointError, match="trust_pickle"):
        read_checkpoint(tmp_path / "pickled.pth")
    assert read_checkpoint(tmp_path / "pickled.pth", trust_pickle=True)["extra"].a == 1
    torch.save({"generator": {"layer2.bias": torch.zeros(64)}}, tmp_path / "full.pth")
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "full.pth").read_bytes()[:300])
    with pytest.raises(GANCheckpointError, match="trunc.pth"):
        read_checkpoint(tmp_path / "trunc.pth")


def test_own_checkpoints_round_trip_through_the_published_layout():
    gen = Generator(TINY)
    state = to_published(gen.state_dict())
    assert "resblocks.0.layer5.batchnorm.running_mean" in state and "layer10.weight" in state
    back = from_published(state, TINY)
    assert all(torch.equal(back[k], v) for k, v in gen.state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# Sizes and eval-mode batch independence
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 37, 299])
def test_output_is_cropped_to_the_input_size(size):
    gen = Generator(TINY).eval()
    with torch.no_grad():
        out = gen(torch.zeros(1, 3, size, size), torch.tensor([9]))
    assert out.shape == (1, 3, size, size)


def test_eval_mode_output_does_not_depend_on_the_batch_but_train_mode_does():
    torch.manual_seed(0)
    gen = Generator(TINY)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad():  # give batch norm non-trivial running statistics
        for _ in range(3):
            gen.train()(x, torch.randint(0, 10, (6,)))
    alone = counterfactuals(gen, x[:1], 0, batch_size=1, mode="eval")
    in_batch = counterfactuals(gen, x, 0, batch_size=6, mode="eval")[:1]
    other_batch = counterfactuals(gen, torch.cat([x[:1], -x[1:]]), 0, batch_size=6, mode="eval")[:1]
    assert torch.allclose(alone, in_batch, atol=1e-5) and torch.allclose(alone, other_batch, atol=1e-5)
    assert gen.training  # the caller's mode is restored
    t_in = counterfactuals(gen, x, 0, batch_size=6, mode="train")[:1]
    t_other = counterfactuals(gen, torch.cat([x[:1], -x[1:]]), 0, batch_size=6, mode="train")[:1]
    assert (t_in - t_other).abs().max() > 1e-3  # the reference script's behaviour, which eval mode avoids


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------
def test_bins_and_classifier_bce():
    p = torch.tensor([0.0, 0.05, 0.1, 0.100001, 0.55, 0.95, 1.0])
    assert prob_to_bin(p, 10).tolist() == [0, 0, 0, 1, 5, 9, 9]
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    p1 = torch.softmax(logits, 1)[:, 1]
    t = torch.tensor([0.95, 0.05])
    assert torch.allclose(bce_to_classifier(t, logits, 1), F.binary_cross_entropy(p1, t))


def test_short_training_on_embedded_data_lowers_the_classifier_consistency_loss(embedded, tmp_path):
    cfg = gan_config(epochs=3, micro_batch=8, accumulation=1, lr=1e-3)
    res = train_gan(embedded.images, embedded.clf, cfg, seed=3, work_dir=tmp_path / "train")
    h = res.history
    assert list(h["epoch"]) == [0, 1, 2, 3] and h["g_steps"].iloc[-1] == 3 * (48 // 8)
    # eval-mode BCE between the bin centre and the classifier on G(x, bin 0 / bin 9), before vs after
    # (over 10 seeds of this setting the final value was 0.07-0.57 of the untrained generator's)
    assert h["probe_cls"].iloc[-1] < 0.6 * h["probe_cls"].iloc[0]
    assert h["g_cls_target"].iloc[-1] < 0.5 * h["g_cls_target"].iloc[1]  # the training-loss term itself
    assert h[["d_loss", "g_rec", "g_cycle"]].iloc[1:].notna().all().all()
    ckpt = res.checkpoint
    assert set(ckpt) >= {"generator", "discriminator", "d_opt", "g_opt", "epoch"} and ckpt["epoch"] == 2
    assert ckpt["cfaudit"]["arch"] == {"base_channels": 4, "n_blocks": 1, "n_bins": 10}


def test_resume_after_a_kill_gives_the_uninterrupted_result(embedded, tmp_path):
    cfg = gan_config(epochs=2)
    straight = train_gan(embedded.images, embedded.clf, cfg, seed=5, work_dir=tmp_path / "a")

    class Killed(Exception):
        pass

    def kill_after_first(epoch, _row):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_gan(embedded.images, embedded.clf, cfg, seed=5, work_dir=tmp_path / "b", on_epoch_end=kill_after_first)
    resumed = train_gan(embedded.images, embedded.clf, cfg, seed=5, work_dir=tmp_path / "b")
    assert resumed.resumed_from == 1 and resumed.epochs_run == 1
    for k, v in straight.generator.state_dict().items():
        assert torch.equal(v, resumed.generator.state_dict()[k]), k
    cols = ["d_loss", "g_loss", "probe_cls"]
    assert np.allclose(straight.history[cols].to_numpy(), resumed.history[cols].to_numpy(), equal_nan=True)
    # other settings do not resume from a foreign checkpoint
    other = train_gan(embedded.images, embedded.clf, gan_config(epochs=1, lr=1e-4), seed=5, work_dir=tmp_path / "b")
    assert other.resumed_from is None


# ------------------------------------------------------------------------------------------------------------
# Counterfactual shards and weights placement
# ------------------------------------------------------------------------------------------------------------
def test_shards_write_both_targets_at_the_classifier_input_size(embedded, tmp_path):
    cfg = gan_config(epochs=1)
    res = train_gan(embedded.images, embedded.clf, cfg, seed=2, work_dir=tmp_path / "train")
    ckpt = tmp_path / "generator.pt"
    torch.save(res.checkpoint, ckpt)
    ids = embedded.table["image_id"]
    np.save(tmp_path / "pack.npy", embedded.images)
    pd.DataFrame({"row": range(len(ids)), "image_id": ids, "label": embedded.table["label"],
                  "png": [f"x/{i}.png" for i in ids]}).to_csv(tmp_path / "pack_index.csv", index=False)
    anchors = embedded.table[["image_id", "label"]].iloc[[3, 1, 4, 7, 9]]
    anchors.to_csv(tmp_path / "anchors.csv", index=False)
    (tmp_path / "classifier.json").write_text(json.dumps({"name": "tiny", "input_size": 40}))

    paths = []
    for shard in range(2):
        out = tmp_path / "cf" / f"shard_{shard}"
        df = generate_shard(ckpt, tmp_path / "classifier.json", tmp_path / "pack.npy", tmp_path / "pack_index.csv",
                            tmp_path / "anchors.csv", shard, 2, out, cfg)
        assert list(df["anchor_id"].unique()) == list(anchors["image_id"].iloc[shard::2])
        paths.append(out / "index.csv")
    index = gather(paths, tmp_path / "cf" / "index.csv", anchors)
    assert len(index) == 10 and set(index["target_label"]) == {0, 1}
    for row in index.itertuples():
        assert Image.open(row.path).size == (40, 40)
        s = json.loads(row.settings)
        assert s["generator_mode"] == "eval" and s["bin"] == (9 if row.target_label else 0)
        assert s["checkpoint_sha256"] == sha256_file(ckpt)


def test_place_weights_verifies_sha256(tmp_path):
    src = tmp_path / "deepderm_isic.pth"
    src.write_bytes(b"weights")
    good = sha256_file(src)
    dest = tmp_path / "resources" / "gan.pth"
    with pytest.raises(GANCheckpointError, match=good):  # empty sha256: refuse, print the digest to pin
        place_weights(dest, "", local_path=str(src))
    with pytest.raises(GANCheckpointError, match="wrong or corrupted"):
        place_weights(dest, "0" * 64, local_path=str(src))
    assert not dest.exists() and not list(dest.parent.glob(".*part"))
    assert place_weights(dest, good, local_path=str(src)).read_bytes() == b"weights"
    dest.unlink()
    place_weights(dest, good, url=src.as_uri())  # file:// stands in for the Zenodo URL offline
    assert sha256_file(dest) == good
    with pytest.raises(GANCheckpointError, match="failed after 2 attempts"):
        place_weights(dest, good, url=(tmp_path / "missing.pth").as_uri(), retries=1, sleep=lambda s: None)


# ------------------------------------------------------------------------------------------------------------
# The real pipeline
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_snakemake_yields_both_targets_for_every_eval_anchor(all_stages_run, tmp_path, run_snakemake):
    """The session's run of every stage (tests/conftest.py), then in a copy of it the published layout placed."""
    import shutil

    import yaml
    from conftest import scheduled_jobs, write_config

    work = all_stages_run
    target = ["results/counterfactuals/gan/index.csv"]
    anchors = pd.read_csv(work / "results/data/anchors.csv")
    split = pd.read_csv(work / "results/data/split.csv")
    assert set(anchors["image_id"]) <= set(split.loc[split["split"] == "eval", "image_id"])
    index = pd.read_csv(work / "results/counterfactuals/gan/index.csv")
    assert set(zip(index["anchor_id"], index["target_label"])) == {(a, t) for a in anchors["image_id"] for t in (0, 1)}
    assert sorted(index["shard"].unique()) == [0, 1]
    for p in index["path"]:
        assert Image.open(work / p).size == (32, 32)
    assert {json.loads(s)["generator_mode"] for s in index["settings"]} == {"eval"}
    loss = pd.read_csv(work / "results/gan/loss.csv")
    assert list(loss["epoch"]) == [0, 1]
    assert (work / "results/gan/loss.png").stat().st_size > 0
    assert json.loads((work / "results/gan/loss.csv.prov.json").read_text())["rule"] == "train_gan"
    assert scheduled_jobs(run_snakemake(work, work / "tiny.yaml", target, ["-n"])) == {}

    # gan.source pretrained: a (random) checkpoint in the published layout, placed from a local path
    shutil.copytree(work, tmp_path / "run", symlinks=True)
    tmp_path = tmp_path / "run"
    tiny_config = yaml.safe_load((work / "tiny.yaml").read_text())
    ckpt = tmp_path / "deepderm_isic.pth"
    torch.save({"generator": random_generator_state(), "discriminator": {}, "d_opt": {},
                "g_opt": {}, "epoch": 499}, ckpt)
    tiny_config["gan"] = {"source": "pretrained", "pretrained": {"local_path": str(ckpt), "sha256": sha256_file(ckpt)}}
    cfg2 = write_config(tmp_path / "pretrained.yaml", tiny_config)
    run_snakemake(tmp_path, cfg2, target)
    index = pd.read_csv(tmp_path / "results/counterfactuals/gan/index.csv")
    assert len(index) == 2 * len(anchors)
    s = json.loads(index["settings"].iloc[0])
    assert s["checkpoint_layout"] == "published" and s["checkpoint_epoch"] == 499 and s["source"] == "pretrained"
    assert Image.open(tmp_path / index["path"].iloc[0]).size == (32, 32)
