"""Reading odd files as 8-bit RGB, resizing, packing and quarantining unreadable ones."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cfaudit.data.images import UnreadableImage, load_rgb8, resize_dataset, resize_square
from cfaudit.data.pack import float_to_uint8, load_pack, uint8_to_float


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float64)[None, :].repeat(h, 0)
    return np.stack([x, x[::-1, ::-1], np.full_like(x, 90)], -1).astype(np.uint8)


@pytest.fixture
def odd_files(tmp_path):
    files = {}
    rgb = Image.fromarray(_gradient(60, 40), "RGB")
    files["cmyk"] = tmp_path / "cmyk.jpg"
    rgb.convert("CMYK").save(files["cmyk"], quality=95)
    files["png16"] = tmp_path / "grey16.png"
    Image.fromarray((np.linspace(0, 65535, 60 * 40).reshape(40, 60)).astype(np.uint16)).save(files["png16"])
    files["rgba"] = tmp_path / "rgba.png"
    rgba = np.dstack([_gradient(60, 40), np.full((40, 60), 0, np.uint8)])
    rgba[:, :30, 3] = 255
    Image.fromarray(rgba, "RGBA").save(files["rgba"])
    files["palette"] = tmp_path / "palette.png"
    rgb.convert("P").save(files["palette"])
    files["grey"] = tmp_path / "grey.jpg"
    rgb.convert("L").save(files["grey"])
    # EXIF orientation 6 (rotate 90° clockwise to display): stored 60x40, displayed 40x60
    files["exif"] = tmp_path / "exif.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    rgb.save(files["exif"], exif=exif.tobytes(), quality=95)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=95)
    files["truncated"] = tmp_path / "truncated.jpg"
    files["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    files["not_an_image"] = tmp_path / "notes.jpg"
    files["not_an_image"].write_text("this is not a JPEG")
    return files


def test_odd_modes_become_8bit_rgb(odd_files):
    for key in ("cmyk", "png16", "rgba", "palette", "grey", "exif"):
        img = load_rgb8(odd_files[key])
        assert img.mode == "RGB", key
    assert load_rgb8(odd_files["exif"]).size == (40, 60)  # orientation applied
    assert load_rgb8(odd_files["cmyk"]).size == (60, 40)
    grey16 = np.asarray(load_rgb8(odd_files["png16"]))
    assert grey16[0, 0, 0] == 0 and grey16[-1, -1, 0] == 255  # full 16-bit range mapped to 0..255
    rgba = np.asarray(load_rgb8(odd_files["rgba"], background=(255, 255, 255)))
    assert (rgba[:, 40:] == 255).all()  # transparent half composited onto white
    assert not (rgba[:, :20] == 255).all()


def test_cmyk_round_trip_keeps_colours_close(odd_files):
    got = np.asarray(load_rgb8(odd_files["cmyk"]), dtype=int)
    want = _gradient(60, 40).astype(int)
    assert np.abs(got - want).mean() < 12


@pytest.mark.parametrize("key", ["truncated", "not_an_image"])
def test_unreadable_files_raise(odd_files, key):
    with pytest.raises(UnreadableImage):
        load_rgb8(odd_files[key])


def test_crop_keeps_aspect_and_squash_stretches():
    img = Image.fromarray(_gradient(200, 100), "RGB")
    crop = resize_square(img, 50, "crop")
    squash = resize_square(img, 50, "squash")
    assert crop.size == squash.size == (50, 50)
    # crop shows only the middle half of the width: its left column is mid-grey, squash's is black-ish
    assert np.asarray(crop)[:, 0, 0].mean() > 40
    assert np.asarray(squash)[:, 0, 0].mean() < 10


def test_resize_dataset_packs_good_files_and_quarantines_bad(tmp_path, odd_files):
    gt = pd.DataFrame({"image_id": list(odd_files), "label": [0, 1] * 4, "path": [str(p) for p in odd_files.values()]})
    out = tmp_path / "out"
    index, quarantine = resize_dataset(gt, out / "images", out / "pack.npy", out / "index.csv", out / "q.csv", size=16, workers=2)
    assert set(quarantine["image_id"]) == {"truncated", "not_an_image"}
    assert quarantine["reason"].str.len().gt(0).all()
    pack, idx = load_pack(out / "pack.npy", out / "index.csv")
    assert pack.shape == (6, 16, 16, 3) and pack.dtype == np.uint8
    assert list(idx["image_id"]) == [k for k in odd_files if k not in ("truncated", "not_an_image")]
    png = np.asarray(Image.open(idx["png"][0]))
    assert np.array_equal(png, pack[0])  # the pack holds exactly the pixels of the saved PNGs


def test_real_fullres_isic_images_resize(shared_data, tmp_path):
    labels = pd.read_csv(shared_data / "isic_fullres_sample" / "labels.csv")
    gt = pd.DataFrame({"image_id": labels["isic_id"], "label": labels["label"],
                       "path": [str(shared_data / "isic_fullres_sample" / f) for f in labels["file"]]})
    index, quarantine = resize_dataset(gt, tmp_path / "img", tmp_path / "p.npy", tmp_path / "i.csv", tmp_path / "q.csv",
                                       size=64, mode="crop", workers=2)
    assert quarantine.empty and len(index) == len(labels) == 26
    pack = np.load(tmp_path / "p.npy")
    assert pack.shape == (26, 64, 64, 3)
    assert pack.std() > 10  # real content, not blank frames


def test_pixel_range_round_trip():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    x = uint8_to_float(u8)
    assert x.shape == (3, 3, 5, 7) and float(x.min()) >= -1 and float(x.max()) <= 1
    assert np.array_equal(float_to_uint8(x), u8)
