"""The embedded dataset: deterministic, balanced as configured, traits planted by class."""

import hashlib

import numpy as np
import pytest

from cfaudit.data.synthetic import generate_dataset, sample_traits, skin_colour


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    a = generate_dataset(tmp_path / "a", 12, 0.5, 48, seed=3)
    b = generate_dataset(tmp_path / "b", 12, 0.5, 48, seed=3)
    c = generate_dataset(tmp_path / "c", 12, 0.5, 48, seed=4)
    assert a.equals(b)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("n, frac", [(40, 0.5), (37, 0.3), (10, 0.1)])
def test_class_balance_is_exactly_the_configured_fraction(tmp_path, n, frac):
    df = generate_dataset(tmp_path, n, frac, 32, seed=1)
    assert len(df) == n
    assert df["label"].sum() == round(n * frac)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(df["file"])


def test_images_are_rgb_uint8_of_the_requested_size(tmp_path):
    from PIL import Image

    generate_dataset(tmp_path, 4, 0.5, 40, seed=2)
    for p in tmp_path.glob("*.png"):
        with Image.open(p) as im:
            assert im.mode == "RGB" and im.size == (40, 40)


def test_traits_differ_by_class_but_overlap():
    rng = np.random.default_rng(0)
    ben = [sample_traits(rng, "b", 0) for _ in range(400)]
    mal = [sample_traits(rng, "m", 1) for _ in range(400)]
    for trait in ("asymmetry", "border", "diameter", "n_colours"):
        b = np.array([getattr(t, trait) for t in ben], float)
        m = np.array([getattr(t, trait) for t in mal], float)
        assert m.mean() > b.mean() + 0.1 * b.std()  # planted: malignant higher
        assert m.min() < b.max()  # overlap: no single trait separates the classes
    # nuisances are independent of the class
    for nuisance in ("skin_ita", "hair", "ruler", "ink", "illumination"):
        b = np.array([getattr(t, nuisance) for t in ben], float)
        m = np.array([getattr(t, nuisance) for t in mal], float)
        assert abs(m.mean() - b.mean()) < 0.25 * (b.std() + 1e-9) + 1e-6


def test_skin_colour_darkens_as_ita_falls():
    light, dark = skin_colour(55), skin_colour(-20)
    assert light.sum() > dark.sum() + 100
