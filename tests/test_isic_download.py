"""ISIC download: the real isic-cli and the id-list path against a loopback server imitating the ISIC API."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY_CONFIG, write_config  # noqa: E402
from isic_server import IsicTestServer, make_images  # noqa: E402

from cfaudit.data.isic import (  # noqa: E402
    IsicDownloadError,
    api_root,
    attributions,
    cli_command,
    download_isic,
    extract_metadata,
    retry_after,
)

N_IMAGES = 12
COLLECTIONS = {1: list(range(0, 9)), 2: list(range(9, 12))}


@pytest.fixture
def server():
    srv = IsicTestServer(make_images(N_IMAGES, COLLECTIONS), page_size=2).start()
    try:
        yield srv
    finally:
        srv.stop()


def params(srv: IsicTestServer, **kw) -> dict:
    p = {"api_url": srv.api_url, "collections": [1], "search": "", "limit": 5, "id_list": "", "retries": 2,
         "timeout_s": 10, "backoff_s": 0.01, "command_timeout_s": 120, "guest": True, "workers": 4}
    p.update(kw)
    return p


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served(srv: IsicTestServer) -> dict:
    return {im.isic_id: im for im in srv.images}


def check_layout(srv: IsicTestServer, download: Path, manifest_path: Path, ids: list[str]) -> pd.DataFrame:
    """The published layout: images, metadata.csv, attribution.txt, licenses/*.txt and the manifest."""
    images = served(srv)
    manifest = pd.read_csv(manifest_path, dtype={"sha256": str})
    assert list(manifest.columns) == ["isic_id", "file", "bytes", "sha256"]
    assert list(manifest["isic_id"]) == sorted(ids)
    for row in manifest.itertuples():
        f = download / row.file
        assert f.read_bytes() == images[row.isic_id].data
        assert row.bytes == len(images[row.isic_id].data) and row.sha256 == sha(images[row.isic_id].data)
        with Image.open(f) as im:
            im.verify()
    meta = pd.read_csv(download / "metadata.csv", dtype=str, keep_default_na=False)
    assert sorted(meta["isic_id"]) == sorted(ids)
    assert list(meta.columns[:3]) == ["isic_id", "attribution", "copyright_license"]
    assert "diagnosis_1" in meta.columns
    lines = [ln for ln in (download / "attribution.txt").read_text().split("\n\n") if ln]
    assert sorted(lines) == sorted(set(meta["attribution"]))
    assert sorted(p.stem for p in (download / "licenses").glob("*.txt")) == sorted(set(meta["copyright_license"]))
    assert not list(download.glob("*.part")) and not list(download.glob(".isic-partial*"))
    return meta


# ------------------------------------------------------------------------------------- the real isic-cli
def test_cli_collections_limit(tmp_path, server):
    server.faults["/api/v2/images/search/"] = [(503, {"Retry-After": "0"})]  # isic-cli's own retry
    p = params(server, collections=[1], limit=5)
    result = download_isic(p, tmp_path / "download", tmp_path / "manifest.csv")

    assert result.mode == "isic-cli" and result.n_images == 5 and result.attempts == 1
    assert result.command[:5] == [sys.executable, "-m", "cfaudit.data.isic_cli_runner", "--api-root", server.root]
    assert {"--no-version-check", "--guest"} <= set(result.command)
    ids = sorted(f.stem for f in (tmp_path / "download").glob("ISIC_*.jpg"))
    assert len(ids) == 5 and all(int(i[-2:]) in COLLECTIONS[1] for i in ids)
    meta = check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", ids)
    assert set(meta["diagnosis_1"]) <= {"Benign", "Malignant", "Indeterminate", ""}
    # endpoints isic-cli used: collection check, count, absolute `next` paging, files, licence texts
    assert server.count("/api/v2/collections/1/") == 1
    assert any("cursor=" in q for _, path, q in server.requests if path == "/api/v2/images/search/")
    assert server.count("/files/") == 5
    assert server.count("/api/v2/zip-download/license-file/") == len(set(meta["copyright_license"]))
    assert server.count("/api/v2/images/search/size/") == 0  # only asked when limit is 0

    # the manifest is itself a reproducible id list: every file is already cached, none fetched again
    before = server.count("/files/")
    again = download_isic(params(server, id_list=str(tmp_path / "manifest.csv")), tmp_path / "d2", tmp_path / "m2.csv")
    assert again.mode == "id_list" and again.fetched == 0 and server.count("/files/") == before
    assert pd.read_csv(tmp_path / "m2.csv").equals(pd.read_csv(tmp_path / "manifest.csv"))


def test_cli_search_all_matches(tmp_path, server):
    p = params(server, collections=[1, 2], search='diagnosis_1:"Malignant"', limit=0)
    result = download_isic(p, tmp_path / "download", tmp_path / "manifest.csv")
    want = sorted(i for i, im in served(server).items() if im.clinical.get("diagnosis_1") == "Malignant")
    assert result.n_images == len(want) > 2
    meta = check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", want)
    assert set(meta["diagnosis_1"]) == {"Malignant"}
    assert server.count("/api/v2/images/search/size/") == 1  # limit 0: isic-cli checks the total size


def test_cli_missing_image_is_retried_and_resumes(tmp_path, server):
    # isic-cli swallows a failed image download (it still lists the image in metadata.csv): the check
    # after the run notices, the whole command is repeated, and only the missing file is fetched again
    server.faults["/files/ISIC_9000002.jpg"] = [404]
    slept = []
    result = download_isic(params(server, limit=4), tmp_path / "download", tmp_path / "manifest.csv", sleep=slept.append)
    assert result.attempts == 2 and result.n_images == 4
    assert slept == [pytest.approx(0.01)]
    fetched = server.file_requests()
    assert fetched.count("ISIC_9000002") == 2
    assert all(fetched.count(i) == 1 for i in set(fetched) - {"ISIC_9000002"})
    check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", sorted(set(fetched)))


def test_cli_interrupted_download_resumes_from_cache(tmp_path, server):
    cache = tmp_path / "cache"
    cache.mkdir()
    images = served(server)
    for i in ("ISIC_9000000", "ISIC_9000001"):  # a previous, interrupted run got these two
        (cache / f"{i}.jpg").write_bytes(images[i].data)
    (cache / "ISIC_9000002.jpg").write_bytes(images["ISIC_9000002"].data[:100])  # wrong size: fetched again
    (cache / ".isic-partial.12345.abc").write_bytes(b"junk")  # left by a killed isic-cli
    download_isic(params(server, limit=4), tmp_path / "download", tmp_path / "manifest.csv", cache_dir=cache)
    assert sorted(server.file_requests()) == ["ISIC_9000002", "ISIC_9000003"]
    assert not list(cache.glob(".isic-partial*"))
    check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", [f"ISIC_900000{i}" for i in range(4)])


def test_cli_run_past_its_time_limit_is_stopped_and_retried(tmp_path, server, caplog):
    server.faults["/files/ISIC_9000001.jpg"] = [("delay", 5)]  # the first run stalls on this file
    result = download_isic(params(server, limit=3, retries=3, command_timeout_s=3), tmp_path / "download",
                           tmp_path / "manifest.csv")
    assert result.attempts >= 2  # (a third only if this machine is too loaded to start isic-cli in 3 s)
    assert "did not finish within dataset.isic.command_timeout_s = 3 s" in caplog.text
    log = (tmp_path / "cache" / "isic-cli.log").read_text()
    assert "Successfully downloaded 3 images" in log
    check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", [f"ISIC_900000{i}" for i in range(3)])


def test_cli_gives_up_with_a_clear_error(tmp_path, server):
    server.faults["/files/ISIC_9000001.jpg"] = [404] * 10
    with pytest.raises(IsicDownloadError, match=r"after 2 attempts.*missing or empty.*ISIC_9000001"):
        download_isic(params(server, limit=3, retries=1), tmp_path / "download", tmp_path / "manifest.csv")
    assert not (tmp_path / "manifest.csv").exists() and not (tmp_path / "download").exists()


def test_cli_unknown_collection_is_not_retried(tmp_path, server):
    with pytest.raises(IsicDownloadError, match=r"Collection 99 does not exist"):
        download_isic(params(server, collections=[99]), tmp_path / "download", tmp_path / "manifest.csv")
    assert server.count("/api/v2/collections/99/") == 1


def test_command_and_config_errors(tmp_path):
    base = {"api_url": "https://api.isic-archive.com/api/v2/", "collections": [70], "search": "", "limit": 10}
    cmd = cli_command(base, tmp_path)
    assert Path(cmd[0]).name == "isic" and cmd[1:3] == ["--no-version-check", "--guest"]
    assert cmd[-3:] == ["--limit", "10", str(tmp_path)] and "--collections" in cmd and "70" in cmd
    assert api_root("http://127.0.0.1:8000/api/v2") == "http://127.0.0.1:8000"
    with pytest.raises(IsicDownloadError, match="dataset.isic.api_url"):
        api_root("https://mirror.example.org/isic/")
    with pytest.raises(IsicDownloadError, match="entire ISIC Archive"):
        cli_command({**base, "collections": [], "limit": 0}, tmp_path)
    assert retry_after("0") == 0 and retry_after("7") == 7 and retry_after(None) is None
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # a date in the past: no wait


# ----------------------------------------------------------------------------------------- the id list
def write_ids(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_id_list_retries_and_metadata(tmp_path, server):
    images = served(server)
    ids = ["ISIC_9000001", "ISIC_9000002", "ISIC_9000003", "ISIC_9000011"]
    id_list = write_ids(tmp_path / "ids.csv", [
        {"isic_id": i, "sha256": sha(images[i].data) if n % 2 == 0 else ""} for n, i in enumerate(ids)])
    server.faults["/api/v2/images/ISIC_9000001/"] = [503]                      # then success
    server.faults["/files/ISIC_9000002.jpg"] = [(429, {"Retry-After": "0"})]   # Retry-After honoured
    server.faults["/files/ISIC_9000003.jpg"] = ["truncate"]                    # short transfer
    slept = []
    result = download_isic(params(server, id_list=str(id_list)), tmp_path / "download", tmp_path / "manifest.csv",
                           sleep=slept.append)
    assert result.mode == "id_list" and result.n_images == 4 and result.fetched == 4
    assert server.count("/api/v2/images/ISIC_9000001/") == 2
    assert server.file_requests().count("ISIC_9000002") == 2 and server.file_requests().count("ISIC_9000003") == 2
    assert sorted(slept) == [0.0, pytest.approx(0.01), pytest.approx(0.01)]
    meta = check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", ids)
    assert list(meta["isic_id"]) == ids  # id-list order

    # flattened exactly like isic-cli's own _extract_metadata / get_attributions
    from isic_cli.cli.utils import _extract_metadata, get_attributions

    records = [server.record(images[i]) for i in ids]
    headers, rows = _extract_metadata(records)
    assert list(meta.columns) == headers == extract_metadata(records)[0]
    assert meta.loc[meta.isic_id == "ISIC_9000011", "diagnosis_1"].item() == ""  # absent in that record
    assert (tmp_path / "download" / "attribution.txt").read_text() == "\n\n".join(get_attributions(rows))
    assert attributions(rows) == get_attributions(rows)
    assert not list((tmp_path / "cache").glob("*.part"))


def test_id_list_resumes_and_fetches_only_missing(tmp_path, server):
    images = served(server)
    ids = [f"ISIC_900000{i}" for i in range(5)]
    id_list = write_ids(tmp_path / "ids.csv", [{"isic_id": i, "sha256": sha(images[i].data)} for i in ids])
    cache = tmp_path / "cache"
    cache.mkdir()
    for i in ids[:2]:
        (cache / f"{i}.jpg").write_bytes(images[i].data)                              # complete, verified
    (cache / "ISIC_9000002.jpg.part").write_bytes(images["ISIC_9000002"].data[:50])   # interrupted transfer
    corrupt = bytearray(images["ISIC_9000003"].data)
    corrupt[-5] ^= 0xFF
    (cache / "ISIC_9000003.jpg").write_bytes(bytes(corrupt))                          # right size, wrong sha256
    p = params(server, id_list=str(id_list))
    result = download_isic(p, tmp_path / "download", tmp_path / "manifest.csv", cache_dir=cache)
    assert sorted(server.file_requests()) == ["ISIC_9000002", "ISIC_9000003", "ISIC_9000004"]
    assert result.fetched == 3
    check_layout(server, tmp_path / "download", tmp_path / "manifest.csv", ids)
    # a second run transfers nothing
    download_isic(p, tmp_path / "download", tmp_path / "manifest.csv", cache_dir=cache)
    assert len(server.file_requests()) == 3


def test_id_list_sha256_mismatch_names_the_id(tmp_path, server):
    images = served(server)
    id_list = write_ids(tmp_path / "ids.csv", [
        {"isic_id": "ISIC_9000000", "sha256": sha(images["ISIC_9000000"].data)},
        {"isic_id": "ISIC_9000001", "sha256": "0" * 64}])
    with pytest.raises(IsicDownloadError, match=r"ISIC_9000001: sha256 mismatch.*id list expects 0{64}"):
        download_isic(params(server, id_list=str(id_list)), tmp_path / "download", tmp_path / "manifest.csv")
    assert server.file_requests().count("ISIC_9000001") == 1  # a checksum mismatch is not retried
    assert not (tmp_path / "cache" / "ISIC_9000001.jpg").exists()
    assert not list((tmp_path / "cache").glob("*.part")) and not (tmp_path / "manifest.csv").exists()
    assert (tmp_path / "cache" / "ISIC_9000000.jpg").exists()  # the good one is kept for the rerun


@pytest.mark.parametrize("rows, message", [
    ([{"isic_id": "ISIC_123"}], r"line 2: 'ISIC_123' is not an ISIC id"),
    ([{"id": "ISIC_9000000"}], r"needs an 'isic_id' column"),
    ([{"isic_id": "ISIC_9000000"}, {"isic_id": "ISIC_9000000"}], r"ISIC_9000000 more than once"),
    ([{"isic_id": "ISIC_9000000", "sha256": "abc"}], r"sha256 'abc' is not 64 hex digits"),
    ([{"isic_id": "ISIC_1234567"}], r"ISIC_1234567: image record: HTTP 404.*check the id list"),
])
def test_id_list_errors(tmp_path, server, rows, message):
    id_list = write_ids(tmp_path / "ids.csv", rows)
    with pytest.raises(IsicDownloadError, match=message):
        download_isic(params(server, id_list=str(id_list)), tmp_path / "download", tmp_path / "manifest.csv")


def test_id_list_gives_up_after_retries(tmp_path, server):
    id_list = write_ids(tmp_path / "ids.csv", [{"isic_id": "ISIC_9000000"}])
    server.faults["/files/ISIC_9000000.jpg"] = [502] * 5
    with pytest.raises(IsicDownloadError, match=r"ISIC_9000000: file: gave up after 3 attempts \(last: HTTP 502\)"):
        download_isic(params(server, id_list=str(id_list)), tmp_path / "download", tmp_path / "manifest.csv")


# ------------------------------------------------------------------------------------ the real pipeline
@pytest.mark.slow
def test_snakemake_data_stage_from_isic(tmp_path, server, run_snakemake):
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["dataset"] = {"source": "isic", "isic": params(server, collections=[1, 2], limit=0)}
    cfg["split"] = {"eval_fraction": 0.3, "max_anchors": 4}
    configfile = write_config(tmp_path / "config.yaml", cfg)
    run_snakemake(tmp_path, configfile, ["results/data/anchors.csv"])

    manifest = pd.read_csv(tmp_path / "resources/isic/manifest.csv")
    assert len(manifest) == N_IMAGES
    assert (tmp_path / "resources/isic/manifest.csv.prov.json").exists()
    gt = pd.read_csv(tmp_path / "results/data/ground_truth.csv")
    images = served(server)
    want = {i: int(im.clinical["diagnosis_1"] == "Malignant") for i, im in images.items()
            if im.clinical.get("diagnosis_1") in ("Benign", "Malignant")}
    assert dict(zip(gt["image_id"], gt["label"])) == want
    excluded = pd.read_csv(tmp_path / "results/data/excluded_labels.csv")
    assert set(excluded["image_id"]) == set(images) - set(want)  # Indeterminate + the record without diagnosis_1
    assert len(pd.read_csv(tmp_path / "results/data/pack_index.csv")) == len(want)
    assert "isic_download" in (tmp_path / "logs/data/isic_download.log").read_text()
