"""The audited classifier: DeepDerm loading and preprocessing, score spaces, weights placement, the
trained stand-in (beats chance on the embedded data and on real ISIC images)."""

from __future__ import annotations

import copy
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cfaudit import classifiers as C
from cfaudit.classifier_training import TrainSettings, heldout_metrics, train_classifier
from cfaudit.config import load_config
from fixtures.random_weights import DEEPDERM_KEYS, random_deepderm_state, read_key_list

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def documented_keys() -> list[tuple[str, tuple]]:
    return read_key_list(DEEPDERM_KEYS)


@pytest.fixture(scope="module")
def deepderm_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dd") / "deepderm.pth"
    torch.save(random_deepderm_state(), path)
    return path


@pytest.fixture(scope="module")
def deepderm_clf(deepderm_file, tmp_path_factory) -> C.AuditedClassifier:
    spec = C.deepderm_spec(deepderm_file)
    path = C.write_spec(spec, tmp_path_factory.mktemp("spec") / "classifier.json")
    return C.load_classifier(path, "cpu")


# ------------------------------------------------------------------------------------------------ DeepDerm
def test_random_documented_state_dict_loads_strictly(deepderm_file, deepderm_clf):
    keys = documented_keys()
    assert len(keys) == C.DEEPDERM_N_TENSORS
    saved = torch.load(deepderm_file, weights_only=True)
    loaded = deepderm_clf.net.state_dict()
    assert list(loaded) == [k for k, _ in keys]
    for name in ("fc.weight", "AuxLogits.fc.weight", "Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var"):
        assert torch.equal(loaded[name], saved[name]), name
    assert deepderm_clf.input_size == 299 and deepderm_clf.positive_index == 1
    assert deepderm_clf.threshold == pytest.approx(0.687)
    assert deepderm_clf.net.transform_input is True and deepderm_clf.normalization == "imagenet"
    x = torch.rand(2, 3, 256, 256) * 2 - 1  # any size in, (N, 2) logits out (eval: main logits only)
    with torch.no_grad():
        out = deepderm_clf(x)
    assert out.shape == (2, 2) and torch.isfinite(out).all()


def test_wrong_or_truncated_file_fails_clearly(deepderm_file, tmp_path):
    data = deepderm_file.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(C.ClassifierError, match=r"truncated.pth.*truncated or not a PyTorch"):
        C.build_classifier(C.deepderm_spec(truncated))
    text = tmp_path / "page.pth"
    text.write_text("<html>quota exceeded</html>")
    with pytest.raises(C.ClassifierError, match="page.pth"):
        C.build_classifier(C.deepderm_spec(text))
    wrong = tmp_path / "resnet.pth"  # a valid state dict of another architecture
    torch.save(C.build_arch("resnet18", 2).state_dict(), wrong)
    with pytest.raises(C.ClassifierError, match=r"do not match the architecture.*580 tensors expected.*missing"):
        C.build_classifier(C.deepderm_spec(wrong))
    state = torch.load(deepderm_file, weights_only=True)
    state["fc.weight"] = torch.zeros(1000, 2048)  # ImageNet head instead of the 2-class one
    bad_head = tmp_path / "head.pth"
    torch.save(state, bad_head)
    with pytest.raises(C.ClassifierError, match=r"shape mismatches e\.g\. \['fc\.weight"):
        C.build_classifier(C.deepderm_spec(bad_head))
    pickled = tmp_path / "module.pth"  # a whole pickled module is refused by weights_only=True
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(C.ClassifierError, match="weights_only=True"):
        C.build_classifier(C.deepderm_spec(pickled))


def test_changed_weights_after_spec_fail(deepderm_file, tmp_path):
    spec = C.deepderm_spec(deepderm_file)
    spec["sha256"] = "0" * 64
    path = C.write_spec(spec, tmp_path / "classifier.json")
    with pytest.raises(C.ClassifierError, match="changed after the classifier stage"):
        C.load_classifier(path)


def test_relative_weights_resolve_in_the_spec_own_run_not_the_current_directory(tmp_path, monkeypatch):
    """A spec read from another run (the ceiling tool's --directory, a test after `make demo`) finds its own run's
    weights even when the current directory holds a file at the same relative path."""
    rel = Path("results/classifier/trained/model.pt")
    for run in ("here", "other"):
        (tmp_path / run / rel).parent.mkdir(parents=True)
        (tmp_path / run / rel).write_bytes(run.encode())
    monkeypatch.chdir(tmp_path / "here")
    spec = {"weights": str(rel)}
    other_spec = tmp_path / "other/results/classifier/classifier.json"
    assert C._resolve_weights(spec, other_spec) == tmp_path / "other" / rel
    assert C._resolve_weights(spec, Path("results/classifier/classifier.json")).read_bytes() == b"here"


def calibrated(net: torch.nn.Module, seed: int = 4) -> torch.nn.Module:
    """A copy whose batch-norm statistics come from real activations, so that the random network's
    output depends on its input (with arbitrary running stats it is almost constant)."""
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net(torch.rand(4, 3, 299, 299, generator=g) * 2 - 1)
    return net.eval()


def test_imagenet_normalisation_with_transform_input_equals_minus_one_one(deepderm_clf):
    """DDI feeds ImageNet-normalised images to Inception-v3 with transform_input=True: the network then
    sees the image scaled to [-1, 1] (DDI-Code ddi_model.py + ddi_dataset.py, github.com/DDI-Dataset/DDI-Code;
    torchvision's Inception3._transform_input). Check it numerically, at the input and at the logits."""
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 3, 299, 299, generator=g)  # ToTensor output in [0, 1]
    mean = torch.tensor(C.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.IMAGENET_STD).view(1, 3, 1, 1)
    seen = deepderm_clf.net._transform_input((pixels - mean) / std)
    assert torch.allclose(seen, pixels * 2 - 1, atol=1e-6)
    net = calibrated(deepderm_clf.net)
    with torch.no_grad():
        net.transform_input = True
        a = net((pixels - mean) / std)
        net.transform_input = False
        b = net(pixels * 2 - 1)
        # the GAN paper's wrapper (transform_input=False on ImageNet-normalised input) sees something else
        d = net((pixels - mean) / std)
        net.transform_input = True
    assert (a[0] - a[1]).abs().max() > 1e-2  # the logits depend on the image
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert (a - d).abs().max() > 1e-2
    # the wrapper: [-1, 1] in, the authors' pipeline inside, same logits
    clf = C.AuditedClassifier(net, deepderm_clf.spec)
    with torch.no_grad():
        c = clf(pixels * 2 - 1)
    assert torch.allclose(a, c, atol=1e-4, rtol=1e-4)


def test_features_are_the_head_input(deepderm_clf):
    x = torch.rand(2, 3, 128, 160) * 2 - 1
    with torch.no_grad():
        f = deepderm_clf.features(x)
        logits = deepderm_clf(x)
    assert f.shape == (2, 2048)
    assert torch.allclose(deepderm_clf.net.fc(f), logits, atol=1e-4)


# ------------------------------------------------------------------------------------------------ interface
def small_classifier(tmp_path, score_space="softmax", threshold=0.5, positive_index=1, input_size=32, resize=None):
    torch.manual_seed(0)
    net = C.build_arch("resnet18", 2)
    w = tmp_path / f"r18_{positive_index}.pt"
    torch.save(net.state_dict(), w)
    spec = C.make_spec("checkpoint", name="r18", arch="resnet18", weights=w, input_size=input_size,
                       resize_size=resize, positive_index=positive_index, score_space=score_space, threshold=threshold)
    return C.load_classifier(C.write_spec(spec, tmp_path / "spec.json"))


def test_score_space_and_threshold(tmp_path):
    logits = torch.tensor([[0.0, 0.7], [0.0, 0.68], [2.0, -1.0]])
    soft = small_classifier(tmp_path, "softmax", 0.687)
    raw = small_classifier(tmp_path, "logit", 0.687)
    assert torch.allclose(soft.score(logits), torch.softmax(logits, 1)[:, 1])
    assert torch.equal(raw.score(logits), logits[:, 1])
    # DDI compares the RAW class-1 logit with 0.687; a softmax probability of 0.668 / 0.664 stays below it
    assert raw.decide(raw.score(logits)).tolist() == [True, False, False]
    assert soft.decide(soft.score(logits)).tolist() == [False, False, False]
    neg = small_classifier(tmp_path, "softmax", 0.5, positive_index=0)
    assert torch.allclose(neg.score(logits), torch.softmax(logits, 1)[:, 0])
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(neg.prob_malignant(x), torch.softmax(neg(x), 1)[:, 0])
    # the ranking (hence AUROC) is the same in both spaces for a 2-class head
    l = torch.randn(50, 2)
    assert torch.equal(torch.argsort(soft.score(l - l[:, :1])), torch.argsort(raw.score(l - l[:, :1])))


def test_config_picks_kind_space_and_threshold(tmp_path, deepderm_file):
    cfg = load_config(REPO / "config.yaml", overrides={"classifier": {"kind": "deepderm", "score_space": "logit"}})
    assert cfg["classifier"]["deepderm"]["threshold"] == pytest.approx(0.687)
    spec = C.spec_from_config(cfg["classifier"], deepderm_file)
    assert (spec["kind"], spec["score_space"], spec["threshold"], spec["input_size"]) == ("deepderm", "logit", 0.687, 299)
    assert "transform_input=True" in spec["preprocessing"]
    out = tmp_path / "classifier.json"
    C.write_checked_spec(cfg["classifier"], deepderm_file, out)
    assert json.loads(out.read_text())["n_tensors"] == 580


def test_checkpoint_kind_with_nested_prefixed_state(tmp_path):
    torch.manual_seed(1)
    net = C.build_arch("mobilenet_v3_small", 3)
    w = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in net.state_dict().items()}}, w)
    cfg = load_config(REPO / "config.yaml", overrides={"classifier": {"kind": "checkpoint", "checkpoint": {
        "arch": "mobilenet_v3_small", "num_classes": 3, "positive_index": 2, "input_size": 48, "resize_size": 56,
        "state_dict_key": "model", "strip_prefix": "module.", "name": "mine"}}})
    spec = C.write_checked_spec(cfg["classifier"], w, tmp_path / "c.json")
    clf = C.load_classifier(tmp_path / "c.json")
    assert (clf.name, clf.num_classes, clf.positive_index, clf.resize_size) == ("mine", 3, 2, 56)
    x = torch.rand(2, 3, 40, 64) * 2 - 1
    with torch.no_grad():
        ref = net.eval()(C.normalize(C.resize_center_crop(x, 56, 48), "imagenet"))
        assert torch.allclose(clf(x), ref, atol=1e-5)
        assert torch.allclose(clf.prob_malignant(x), torch.softmax(ref, 1)[:, 2], atol=1e-6)
    assert spec["state_dict_key"] == "model"
    bad = copy.deepcopy(cfg["classifier"])
    bad["checkpoint"]["state_dict_key"] = "state_dict"
    with pytest.raises(C.ClassifierError, match=r"no entry 'state_dict'.*\['epoch', 'model'\]"):
        C.write_checked_spec(bad, w, tmp_path / "d.json")


def test_preprocessing_matches_torchvision_and_is_differentiable(tmp_path):
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(2, 3, 200, 260) * 2 - 1
    ours = C.resize_center_crop(x, 64, 56)
    ref = TF.center_crop(TF.resize(x, [64], antialias=True), [56, 56])
    assert ours.shape == (2, 3, 56, 56) and torch.allclose(ours, ref, atol=1e-5)
    assert C.resized_shape(256, 256, 299) == (299, 299) and C.resized_shape(300, 400, 299) == (299, 398)
    clf = small_classifier(tmp_path)
    clf.train()  # frozen: batch norm stays in eval mode
    assert not clf.net.training
    x = (torch.rand(2, 3, 96, 80) * 2 - 1).requires_grad_(True)
    clf.prob_malignant(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clf.parameters())


def test_pil_and_torch_resize_agree_closely():
    """Scoring resizes the saved file with PIL (the authors' pipeline); guidance uses the module's torch
    resize. Both are antialiased bilinear: they agree to a fraction of a grey level on a smooth image."""
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    img = np.stack([128 + 100 * np.sin(5 * xx + c) * np.cos(4 * yy) for c in range(3)], -1).astype(np.uint8)
    pil = load_pil_cropped_from_array(img, 299, 299)
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    tor = C.resize_center_crop(t, 299, 299)[0].permute(1, 2, 0).numpy()
    assert pil.shape == (299, 299, 3)
    assert np.abs(pil.astype(float) - tor).mean() < 1.0


def load_pil_cropped_from_array(img, resize, crop):
    import tempfile

    from PIL import Image

    from cfaudit.scoring import load_pil_cropped

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "a.png"
        Image.fromarray(img).save(p)
        return load_pil_cropped(p, resize, crop)


# ------------------------------------------------------------------------------------------------ placing
def test_place_weights_local_and_url(tmp_path):
    src = tmp_path / "src.pth"
    torch.save({"w": torch.arange(10.0)}, src)
    good = C.sha256_file(src)
    dest = tmp_path / "resources" / "weights" / "deepderm.pth"
    assert C.place_weights(dest, local_path=str(src), sha256=good) == dest
    assert C.sha256_file(dest) == good
    dest.unlink()
    with pytest.raises(C.ClassifierError, match=rf"sha256 mismatch.*expected {'a' * 64}.*got {good}"):
        C.place_weights(dest, local_path=str(src), sha256="a" * 64)
    assert not dest.exists()
    with pytest.raises(C.ClassifierError, match=rf"classifier.deepderm.sha256 is empty.*sha256 is {good}"):
        C.place_weights(dest, local_path=str(src), sha256="")
    with pytest.raises(C.ClassifierError, match="local_path .* does not exist and classifier.deepderm.url is empty"):
        C.place_weights(dest, local_path=str(tmp_path / "nope.pth"), url="", sha256=good)
    # download (file:// needs no network), then an unreachable server with no retries
    C.place_weights(dest, url=src.resolve().as_uri(), sha256=good)
    assert C.sha256_file(dest) == good
    dest.unlink()
    with pytest.raises(C.ClassifierError, match=r"could not download .* after 1 attempt"):
        C.place_weights(dest, url="http://127.0.0.1:9/deepderm.pth", sha256=good, retries=0, timeout_s=5)
    # an unverified download is kept and reused once the hash is set
    with pytest.raises(C.ClassifierError, match="sha256 is empty"):
        C.place_weights(dest, url=src.resolve().as_uri(), sha256="")
    assert dest.with_name("deepderm.pth.unverified").exists()
    C.place_weights(dest, url="http://127.0.0.1:9/never-contacted", sha256=good, retries=0)
    assert C.sha256_file(dest) == good and not dest.with_name("deepderm.pth.unverified").exists()


def test_download_refuses_html_page(tmp_path):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>Google Drive can't scan this file for viruses</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/deepderm.pth"
        with pytest.raises(C.ClassifierError, match="returned an HTML page.*set local_path"):
            C.place_weights(tmp_path / "w.pth", url=url, sha256="b" * 64, retries=0)
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------------ trained
def _auroc_p_value(auroc: float, n_pos: int, n_neg: int) -> float:
    """One-sided p-value of AUROC > 0.5 (normal approximation of the Mann-Whitney U under H0)."""
    from scipy.stats import norm

    sd = np.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))
    return float(norm.sf((auroc - 0.5) / sd))


def test_stand_in_beats_chance_on_embedded_data(tmp_path):
    from PIL import Image

    from cfaudit.data.synthetic import generate_dataset

    meta = generate_dataset(tmp_path / "syn", n_images=200, malignant_fraction=0.5, size=32, seed=11)
    imgs = np.stack([np.asarray(Image.open(tmp_path / "syn" / f).convert("RGB")) for f in meta["file"]])
    y = meta["label"].to_numpy()
    order = np.random.default_rng(0).permutation(len(y))
    tr, ev = order[:140], order[140:]
    s = TrainSettings(arch="resnet18", input_size=32, epochs=8, batch_size=16, lr=1e-3)
    net, hist, m = train_classifier(imgs[tr], y[tr], s, seed=5, device="cpu", eval_images=imgs[ev], eval_labels=y[ev])
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    # measured 0.867 on 60 held-out images; chance is 0.5 (p-value of the Mann-Whitney U under H0)
    assert m["auroc"] > 0.75 and _auroc_p_value(m["auroc"], int(y[ev].sum()), int((1 - y[ev]).sum())) < 0.01, m


def test_stand_in_beats_chance_on_isic2017(shared_data):
    """Real dermoscopy (melanoma vs naevus + seborrhoeic keratosis), from scratch at 32 px: 1,000 images of
    the dataset's own train split, 3 epochs, scored on its 745 validation + test images. The signal is weak
    at this size (measured AUROC 0.595 / 0.627 / 0.583 for seeds 0 / 1 / 2), so the test asks for
    significance: p < 0.01 needs AUROC > 0.562 here. The full pipeline at 64 px is in .notes/classifier.md."""
    import pandas as pd
    from PIL import Image

    root = shared_data / "isic2017_256"
    labels = pd.read_csv(root / "labels.csv")
    train = labels[labels["split"] == "train"].sample(n=1000, random_state=0)
    held = labels[labels["split"] != "train"]

    def load(df):
        return np.stack([np.asarray(Image.open(root / f).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS))
                         for f in df["file"]])

    s = TrainSettings(arch="resnet18", input_size=32, epochs=3, batch_size=32, lr=2e-3)
    _, _, m = train_classifier(load(train), train["label"].to_numpy(), s, seed=0, device="cpu",
                               eval_images=load(held), eval_labels=held["label"].to_numpy())
    n_pos = int(held["label"].sum())
    assert m["n_eval"] == len(held) and _auroc_p_value(m["auroc"], n_pos, len(held) - n_pos) < 0.01, m


def test_heldout_metrics_one_class_is_nan():
    m = heldout_metrics(np.array([1, 1, 1]), np.array([0.2, 0.7, 0.9]))
    assert np.isnan(m["auroc"]) and m["n_eval_malignant"] == 3


def test_adversarial_views_stay_in_the_l2_ball_raise_the_loss_and_leave_the_model_as_it_was():
    """classifier_training.adversarial_views (the robust model of guided.cone): each image moves by at most eps
    (L2 over the image, [0, 1] units = half the [-1, 1] distance) toward the wrong class, the batch's loss rises,
    the attack leaves the batch-norm running statistics and the training mode as they were, and it is the same
    twice (no random start)."""
    from torchvision.models import resnet18

    from cfaudit.classifier_training import Preprocessed, adversarial_views

    torch.manual_seed(0)
    model = Preprocessed(resnet18(num_classes=2), 32, "minus_one_one")
    model.train()
    with torch.no_grad():  # a few batches so the running statistics are not the initial ones
        for _ in range(3):
            model(torch.rand(8, 3, 32, 32) * 2 - 1)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    s = TrainSettings(adversarial_epsilon=0.5, adversarial_steps=4)
    adv = adversarial_views(model, x, y, s)
    assert model.training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    dist = ((adv - x) / 2).flatten(1).norm(dim=1)
    assert (dist <= 0.5 + 1e-4).all() and (dist > 0.1).all()
    assert adv.min() >= -1 and adv.max() <= 1
    model.eval()
    with torch.no_grad():
        ce = [torch.nn.functional.cross_entropy(model(v), y, reduction="none") for v in (x, adv)]
    assert (ce[1] > ce[0]).all()
    model.train()
    assert torch.equal(adversarial_views(model, x, y, s), adv)


def test_robustness_record_is_the_clean_auroc_then_falls_under_attack():
    """cfaudit.robust.robustness_record: the radius-0 entry is the plain held-out AUROC (checked with sklearn on the
    classifier's own scores), the attack at radius epsilon cannot help a standard model, and one class gives no AUROC."""
    from sklearn.metrics import roc_auc_score
    from torch import nn

    from cfaudit.robust import robustness_record

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = {"kind": "checkpoint", "name": "tiny", "arch": "tiny", "num_classes": 2, "positive_index": 1, "input_size": 16,
            "resize_size": 16, "normalization": "minus_one_one", "score_space": "softmax", "threshold": 0.5, "sha256": "t"}
    clf = C.AuditedClassifier(net, spec).eval()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(20, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 10)
    rec = robustness_record(clf, images, labels, epsilon=0.5, steps=5, batch_size=8)
    from cfaudit.data.pack import uint8_to_float

    with torch.no_grad():
        clean = roc_auc_score(labels, clf.prob_malignant(uint8_to_float(torch.as_tensor(images))).numpy())
    assert list(rec["auroc"]) == ["0", "0.5"] and rec["auroc"]["0"] == round(clean, 4)
    assert rec["auroc"]["0.5"] <= rec["auroc"]["0"] and rec["n_eval"] == 20
    assert robustness_record(clf, images[:4], np.zeros(4), epsilon=0.5)["auroc"] == {}
