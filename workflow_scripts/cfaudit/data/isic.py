"""ISIC Archive download: the official isic-cli for collections / search / limit, or a committed id list.

Two ways in, one layout out (``<download>/`` + ``manifest.csv``):

``collections`` / ``search`` / ``limit``
    runs the real ``isic image download`` (pinned isic-cli; always ``--no-version-check``, ``--guest``
    unless configured otherwise, stdin from /dev/null, a wall-clock timeout) into a persistent cache
    directory. isic-cli retries single requests itself but silently skips an image whose download
    failed, so afterwards every image listed in its metadata.csv is checked to exist with a non-zero
    size; a failed, crashed, timed-out or incomplete run is repeated with exponential back-off (isic-cli
    skips files already present with the right size, so a repeat only fetches what is missing).

``id_list``
    a CSV of ``isic_id`` (+ optional ``sha256``, ``bytes``) fetched one by one through
    ``GET images/{isic_id}/`` -> ``files.full.url`` with urllib: retries on 429 / 5xx / broken
    connections / short transfers with back-off (``Retry-After`` honoured), resumes (a file already in
    the cache with the right size and checksum is not fetched again; downloads go to ``.part`` files that
    are renamed when complete), verifies the size and the sha256, and writes metadata.csv (flattened like
    isic-cli's), attribution.txt and licenses/*.txt like isic-cli does. A manifest.csv of a finished
    download is itself a valid id list (isic_id, sha256): commit it to freeze a subset.

The cache (``resources/isic/cache`` beside the download) survives failed runs, because Snakemake deletes a
rule's output directory before running it; the finished images are hard-linked (or copied) from there
into the output directory together with metadata.csv, attribution.txt and licenses/.
"""

from __future__ import annotations

import csv
import email.utils
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pandas as pd

from cfaudit.files import sha256_file, write_csv
from cfaudit.weights import RetriesExhausted, RetryPolicy, call_with_retries

log = logging.getLogger("cfaudit.isic")

PROD_API = "https://api.isic-archive.com/api/v2/"
API_SUFFIX = "/api/v2/"
ISIC_ID = re.compile(r"^ISIC_\d{7}$")
LICENCE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_WAIT_S = 900.0
CRASH_MARKER = "unexpected error occurred"
MANIFEST_COLUMNS = ["isic_id", "file", "bytes", "sha256"]


class IsicDownloadError(RuntimeError):
    """The download failed or is incomplete; the message says which id / file and what to do."""


class _Retryable(Exception):
    """A transient failure (HTTP 429/5xx, broken connection, short transfer): try again after a wait."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


@dataclass
class DownloadResult:
    mode: str  # "isic-cli" or "id_list"
    n_images: int
    attempts: int = 1
    command: list[str] = field(default_factory=list)
    fetched: int = 0  # id_list: files actually transferred (the rest were already in the cache)

    def as_dict(self) -> dict:
        return {"mode": self.mode, "n_images": self.n_images, "attempts": self.attempts,
                "command": self.command, "fetched": self.fetched}


# ------------------------------------------------------------------------------------------------ entry
def download_isic(params: dict, download_dir: str | os.PathLike, manifest_path: str | os.PathLike,
                  cache_dir: str | os.PathLike | None = None, sleep=time.sleep) -> DownloadResult:
    """Download per ``params`` (config ``dataset.isic``), publish into ``download_dir``, write the manifest."""
    download_dir = Path(download_dir)
    cache = Path(cache_dir) if cache_dir else download_dir.parent / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if params.get("id_list"):
        result, files = fetch_id_list(params, cache, sleep=sleep)
    else:
        result, files = run_cli_download(params, cache, sleep=sleep)
    publish(cache, files, download_dir)
    manifest = build_manifest(download_dir, files)
    write_csv(manifest, manifest_path)
    log.info("ISIC download complete: %d images in %s (manifest %s; cache %s)",
             len(manifest), download_dir, manifest_path, cache)
    return result


def retry_policy(params: dict) -> RetryPolicy:
    """``dataset.isic.retries`` repeats, waiting backoff_s * 2**attempt (capped at 600 s) between them."""
    return RetryPolicy(int(params.get("retries", 5)), float(params.get("backoff_s", 5.0)), 600.0)


# --------------------------------------------------------------------------------------- isic-cli path
def api_root(api_url: str) -> str | None:
    """None for the public Archive; otherwise the root URL isic-cli's ``--dev`` must point at."""
    url = api_url.strip()
    if url.rstrip("/") + "/" == PROD_API:
        return None
    if not re.match(r"^https?://", url) or not (url.rstrip("/") + "/").endswith(API_SUFFIX):
        raise IsicDownloadError(
            f"config key 'dataset.isic.api_url' is {api_url!r}: it must be an http(s) URL ending in "
            f"'{API_SUFFIX}' (isic-cli appends that path itself), e.g. {PROD_API}"
        )
    return (url.rstrip("/") + "/")[: -len(API_SUFFIX)]


def isic_executable() -> str:
    """The ``isic`` console script of the running environment (next to sys.executable), else on PATH."""
    here = Path(sys.executable).parent / "isic"
    if here.exists():
        return str(here)
    found = shutil.which("isic")
    if not found:
        raise IsicDownloadError(
            "the isic-cli command 'isic' is not installed in this environment "
            f"(looked next to {sys.executable} and on PATH): install the pinned requirements "
            "(`make demo` / `pip install -r requirements.lock`)"
        )
    return found


def cli_arguments(params: dict, outdir: Path) -> list[str]:
    """isic-cli arguments (after the program name) for ``image download`` per config."""
    search = (params.get("search") or "").strip()
    collections = [int(c) for c in params.get("collections") or []]
    limit = int(params.get("limit", 0))
    if not search and not collections and limit == 0:
        raise IsicDownloadError(
            "dataset.isic has no collections, no search and limit 0: that would download the entire ISIC "
            "Archive. Set dataset.isic.collections (e.g. [70]), a search query, a limit, or an id_list."
        )
    args = ["--no-version-check"]
    if params.get("guest", True):
        args.append("--guest")
    args += ["image", "download"]
    if search:
        args += ["--search", search]
    if collections:
        args += ["--collections", ",".join(str(c) for c in collections)]
    args += ["--limit", str(limit), str(outdir)]
    return args


def cli_command(params: dict, outdir: Path) -> list[str]:
    """The full command: the ``isic`` script for the public Archive, the runner wrapper for any other API."""
    args = cli_arguments(params, outdir)
    root = api_root(params.get("api_url", PROD_API))
    if root is None:
        return [isic_executable(), *args]
    return [sys.executable, "-m", "cfaudit.data.isic_cli_runner", "--api-root", root, "--", *args]


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ISIC_DEV", "ISIC_SANDBOX")}
    package_parent = str(Path(__file__).resolve().parents[2])  # so `-m cfaudit...` works without install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_once(cmd: list[str], timeout: float, log_file: Path, progress_s: float = 60.0) -> tuple[int | None, str]:
    """Run ``cmd`` with stdin from /dev/null; returns (exit status or None on timeout, output).

    isic-cli shows no progress when its output is not a terminal, so the number of images in the
    download directory is logged every ``progress_s`` seconds instead.
    """
    outdir = Path(cmd[-1])
    deadline = time.monotonic() + timeout
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=_cli_env())
        rc: int | None = None
        while rc is None:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.terminate()  # isic-cli's SIGTERM handler removes its partial files
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            try:
                rc = proc.wait(timeout=min(left, progress_s))
            except subprocess.TimeoutExpired:
                log.info("isic-cli running: %d images in %s so far", len(list(outdir.glob("ISIC_*"))), outdir)
    return rc, log_file.read_text(errors="replace")


def _clear_cli_outputs(cache: Path) -> None:
    """Remove what isic-cli writes last (and leftovers of killed runs) so a stale copy is never trusted."""
    for name in ("metadata.csv", "attribution.txt"):
        (cache / name).unlink(missing_ok=True)
    shutil.rmtree(cache / "licenses", ignore_errors=True)
    for p in cache.glob(".isic-partial.*"):
        p.unlink(missing_ok=True)


def _find_file(cache: Path, isic_id: str) -> Path | None:
    for p in sorted(cache.glob(f"{isic_id}.*")):
        if p.is_file() and not p.name.endswith(".part"):
            return p
    return None


def read_metadata(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise _Retryable(f"isic-cli wrote no {path.name} in {path.parent}")
    meta = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "isic_id" not in meta.columns:
        raise IsicDownloadError(f"{path} has no 'isic_id' column (columns: {list(meta.columns)})")
    return meta


def verify_cli_download(cache: Path) -> dict[str, Path]:
    """Every image listed in metadata.csv exists with a non-zero size; returns isic_id -> file."""
    meta = read_metadata(cache / "metadata.csv")
    if meta.empty:
        raise IsicDownloadError(
            "the ISIC query matched no images (isic-cli wrote an empty metadata.csv): check "
            "dataset.isic.collections and dataset.isic.search"
        )
    files, missing = {}, []
    for isic_id in meta["isic_id"]:
        f = _find_file(cache, isic_id)
        if f is None or f.stat().st_size == 0:
            missing.append(isic_id)
        else:
            files[isic_id] = f
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise _Retryable(f"{len(missing)} of {len(meta)} images listed in metadata.csv are missing or empty in "
                         f"{cache}: {shown}")
    return files


def _cli_attempt(cmd: list[str], cache: Path, timeout: float, state: dict) -> dict[str, Path]:
    """One run of isic-cli and the check of its result; raises _Retryable with the problem (kept in ``state``
    with the run's output) when a repeat may help, IsicDownloadError when it cannot."""
    state["attempts"] += 1
    _clear_cli_outputs(cache)
    log.info("attempt %d/%d: %s", state["attempts"], state["retries"] + 1, " ".join(cmd))
    rc, output = _run_once(cmd, timeout, cache / "isic-cli.log")
    state["output"] = output
    for line in output.splitlines():
        if line.strip():
            log.info("isic-cli: %s", line.rstrip())
    for p in cache.glob(".isic-partial.*"):  # left by a killed run
        p.unlink(missing_ok=True)
    if rc == 2:  # click usage error (bad query, unknown collection): repeating cannot help
        raise IsicDownloadError(
            f"isic-cli rejected the request (exit status 2). Check dataset.isic.collections / search. "
            f"Its output:\n{_tail(output)}"
        )
    if rc is None:
        raise _Retryable(f"isic-cli did not finish within dataset.isic.command_timeout_s = {timeout:g} s")
    if rc != 0:
        raise _Retryable(f"isic-cli exited with status {rc}")
    if CRASH_MARKER in output:
        raise _Retryable("isic-cli reported an unexpected error")
    return verify_cli_download(cache)


def run_cli_download(params: dict, cache: Path, sleep=time.sleep) -> tuple[DownloadResult, dict[str, Path]]:
    """Run isic-cli (retrying the whole command with back-off, :func:`retry_policy`) until the download is complete."""
    cmd = cli_command(params, cache)
    policy = retry_policy(params)
    timeout = float(params.get("command_timeout_s", 86400))
    state = {"attempts": 0, "retries": policy.retries, "output": ""}

    def retrying(_attempt, problem, wait):
        log.warning("%s; retrying in %.1f s (isic-cli skips the files it already has)", problem, wait)

    try:
        files = call_with_retries(lambda: _cli_attempt(cmd, cache, timeout, state), policy,
                                  lambda err: (str(err), None) if isinstance(err, _Retryable) else None,
                                  sleep=sleep, on_retry=retrying)
    except RetriesExhausted as err:
        raise IsicDownloadError(
            f"ISIC download failed after {err.attempts} attempts: {err.last}. Output of the last attempt:\n"
            f"{_tail(state['output'])}\nRerun to resume (files already in {cache} are kept), raise dataset.isic.retries, "
            "or check the network / the ISIC Archive status."
        ) from None
    return DownloadResult("isic-cli", len(files), state["attempts"], cmd), files


def _tail(text: str, n: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------- id-list path
def read_id_list(path: str | os.PathLike) -> pd.DataFrame:
    """The committed id list: ``isic_id`` plus optional ``sha256`` and ``bytes`` columns (others ignored)."""
    path = Path(path)
    if not path.exists():
        raise IsicDownloadError(f"dataset.isic.id_list file {path} does not exist (relative paths are "
                                "resolved from the working directory)")
    ids = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "isic_id" not in ids.columns:
        raise IsicDownloadError(f"{path} needs an 'isic_id' column (found {list(ids.columns)}); optional "
                                "columns: sha256, bytes")
    for col in ("sha256", "bytes"):
        if col not in ids.columns:
            ids[col] = ""
    ids = ids[["isic_id", "sha256", "bytes"]].apply(lambda c: c.str.strip())
    for i, row in enumerate(ids.itertuples(index=False), start=2):
        if not ISIC_ID.match(row.isic_id):
            raise IsicDownloadError(f"{path} line {i}: {row.isic_id!r} is not an ISIC id (ISIC_ + 7 digits)")
        if row.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", row.sha256):
            raise IsicDownloadError(f"{path} line {i} ({row.isic_id}): sha256 {row.sha256!r} is not 64 hex digits")
        if row.bytes and not row.bytes.isdigit():
            raise IsicDownloadError(f"{path} line {i} ({row.isic_id}): bytes {row.bytes!r} is not an integer")
    dup = ids["isic_id"][ids["isic_id"].duplicated()].unique()
    if len(dup):
        raise IsicDownloadError(f"{path} lists {', '.join(dup[:10])} more than once; keep one row per id")
    if ids.empty:
        raise IsicDownloadError(f"{path} lists no ids")
    ids["sha256"] = ids["sha256"].str.lower()
    return ids.reset_index(drop=True)


class ApiClient:
    """urllib GETs with retries on 429 / 5xx / connection errors / short transfers (Retry-After honoured)."""

    def __init__(self, params: dict, sleep=time.sleep):
        self.api_url = params.get("api_url", PROD_API).rstrip("/") + "/"
        self.retries = int(params.get("retries", 5))
        self.timeout = float(params.get("timeout_s", 60))
        self.params = params
        self.sleep = sleep
        from cfaudit import __version__

        self.user_agent = f"cfaudit/{__version__} (ISIC id list)"

    def _with_retries(self, what: str, fn):
        """``fn()`` under the download's :func:`retry_policy`; a ``Retry-After`` header sets the wait."""
        def transient(err):
            if isinstance(err, urllib.error.HTTPError):
                if err.code not in RETRY_STATUS:
                    hint = " (not public or not in the Archive? check the id list)" if err.code in (401, 403, 404) else ""
                    raise IsicDownloadError(f"{what}: HTTP {err.code} {err.reason}{hint}") from None
                return f"HTTP {err.code}", retry_after(err.headers.get("Retry-After"))
            if isinstance(err, _Retryable):
                return str(err), err.wait
            if isinstance(err, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                                ssl.SSLError)):
                return f"{type(err).__name__}: {err}", None
            return None

        def retrying(attempt, problem, wait):
            log.warning("%s: %s; retry %d/%d in %.1f s", what, problem, attempt + 1, self.retries, wait)

        try:
            return call_with_retries(fn, retry_policy(self.params), transient, sleep=self.sleep, on_retry=retrying)
        except RetriesExhausted as err:
            raise IsicDownloadError(
                f"{what}: gave up after {err.attempts} attempts (last: {err.last}); rerun to resume, "
                "or raise dataset.isic.retries"
            ) from None

    def _open(self, url: str, accept: str):
        req = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": self.user_agent})
        return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 (http(s) URL from config/API)

    def get_json(self, path: str, what: str) -> dict:
        def go():
            with self._open(self.api_url + path, "application/json") as resp:
                body = resp.read()
            try:
                return json.loads(body.decode("utf-8"))
            except ValueError:
                raise IsicDownloadError(f"{what}: {self.api_url + path} did not answer JSON "
                                        f"(starts {body[:80]!r}); is dataset.isic.api_url right?") from None
        return self._with_retries(what, go)

    def get_text(self, path: str, what: str) -> str:
        def go():
            with self._open(self.api_url + path, "text/plain, */*") as resp:
                return resp.read().decode("utf-8")
        return self._with_retries(what, go)

    def download(self, url: str, dest: Path, what: str, expected_size: int | None) -> tuple[str, Path]:
        """Fetch ``url`` into ``dest.part``; returns (sha256, the .part path). Short transfers are retried."""
        part = dest.with_name(dest.name + ".part")

        def go():
            h, n = hashlib.sha256(), 0
            # no API headers: real file URLs are pre-signed S3 links that carry their own credentials
            req = urllib.request.Request(url, headers={"User-Agent": self.user_agent})
            with urllib.request.urlopen(req, timeout=self.timeout) as resp, open(part, "wb") as out:  # noqa: S310
                length = resp.headers.get("Content-Length")
                while block := resp.read(1 << 20):
                    out.write(block)
                    h.update(block)
                    n += len(block)
            if length is not None and n != int(length):
                raise _Retryable(f"short transfer: {n} of {length} bytes")
            if expected_size is not None and n != expected_size:
                raise _Retryable(f"received {n} bytes but the image record says {expected_size}")
            return h.hexdigest()

        try:
            digest = self._with_retries(what, go)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return digest, part


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent/unreadable."""
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    if value.isdigit():
        return min(float(value), MAX_WAIT_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_WAIT_S)


def _file_ok(path: Path, size: int | None, sha256: str) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    if size is not None and path.stat().st_size != size:
        return False
    if sha256:
        return sha256_file(path) == sha256
    return size is not None  # without a size or a checksum there is nothing to trust: fetch again


def _fetch_one(client: ApiClient, cache: Path, isic_id: str, sha256: str, listed_bytes: str) -> tuple[dict, Path, bool]:
    """One id: its record, and its file in the cache (fetched only if absent or wrong). Returns (record, file, fetched)."""
    record = client.get_json(f"images/{isic_id}/", f"{isic_id}: image record")
    if not isinstance(record, dict) or record.get("isic_id") != isic_id:
        got = record.get("isic_id") if isinstance(record, dict) else type(record).__name__
        raise IsicDownloadError(f"{isic_id}: the API answered a record for {got!r} instead")
    try:
        full = record["files"]["full"]
        url = full["url"]
    except (KeyError, TypeError):
        raise IsicDownloadError(f"{isic_id}: the image record has no files.full.url (keys: {sorted(record)})") from None
    size = full.get("size")
    size = int(size) if size not in (None, "") else None
    if listed_bytes and size is not None and int(listed_bytes) != size:
        raise IsicDownloadError(f"{isic_id}: the id list says {listed_bytes} bytes but the Archive's record says "
                                f"{size}: the image was replaced upstream, or the id list is wrong")
    size = size if size is not None else (int(listed_bytes) if listed_bytes else None)
    ext = PurePosixPath(urlsplit(url).path).suffix.lstrip(".") or "jpg"  # as isic-cli names files
    dest = cache / f"{isic_id}.{ext}"
    if _file_ok(dest, size, sha256):
        log.info("%s: already in the cache, verified; not fetched again", isic_id)
        return record, dest, False
    digest, part = client.download(url, dest, f"{isic_id}: file", size)
    if sha256 and digest != sha256:
        part.unlink(missing_ok=True)
        raise IsicDownloadError(
            f"{isic_id}: sha256 mismatch: downloaded {digest}, id list expects {sha256}. The Archive's file "
            "changed or the id list is wrong; fix or drop that row of dataset.isic.id_list"
        )
    os.replace(part, dest)
    log.info("%s: fetched %s (%d bytes)", isic_id, dest.name, dest.stat().st_size)
    return record, dest, True


def fetch_id_list(params: dict, cache: Path, sleep=time.sleep) -> tuple[DownloadResult, dict[str, Path]]:
    """Fetch every id of ``params['id_list']`` into ``cache``; write metadata.csv, attribution, licences."""
    ids = read_id_list(params["id_list"])
    client = ApiClient(params, sleep=sleep)
    _clear_cli_outputs(cache)
    log.info("fetching %d ISIC ids from %s (%s)", len(ids), client.api_url, params["id_list"])
    workers = max(1, int(params.get("workers", 8)))
    rows = list(ids.itertuples(index=False))

    def task(row):
        try:
            return _fetch_one(client, cache, row.isic_id, row.sha256, row.bytes), None
        except IsicDownloadError as err:
            return None, err
        except Exception as err:  # noqa: BLE001 (reported with the id, together with the other failures)
            return None, IsicDownloadError(f"{row.isic_id}: {type(err).__name__}: {err}")

    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(task, rows))
    errors = [str(err) for _, err in outcomes if err is not None]
    if errors:
        raise IsicDownloadError(f"{len(errors)} of {len(rows)} ids failed:\n" + "\n".join(errors[:20]) +
                                f"\nVerified files stay in {cache}; a rerun fetches only what is missing.")
    records = [o[0] for o, _ in outcomes]
    files = {r.isic_id: o[1] for r, (o, _) in zip(rows, outcomes)}
    fetched = sum(o[2] for o, _ in outcomes)
    headers, flat = extract_metadata(records)
    with open(cache / "metadata.csv", "w", newline="", encoding="utf8") as fh:
        writer = csv.DictWriter(fh, headers)
        writer.writeheader()
        writer.writerows(flat)
    (cache / "attribution.txt").write_text("\n\n".join(attributions(flat)), encoding="utf8")
    (cache / "licenses").mkdir(exist_ok=True)
    for licence in sorted({r["copyright_license"] for r in flat if r.get("copyright_license")}):
        if not LICENCE_NAME.match(licence):
            raise IsicDownloadError(f"unexpected copyright_license value {licence!r} in the image records")
        text = client.get_text(f"zip-download/license-file/{licence}/", f"licence {licence}")
        (cache / "licenses" / f"{licence}.txt").write_text(text, encoding="utf8")
    log.info("id list: %d images (%d fetched, %d already in the cache)", len(files), fetched, len(files) - fetched)
    return DownloadResult("id_list", len(files), 1, [], fetched), files


def extract_metadata(records: list[dict]) -> tuple[list[str], list[dict]]:
    """Flatten image records as isic-cli's ``_extract_metadata`` does: isic_id, attribution,
    copyright_license, then the union of the acquisition and clinical fields, sorted (missing -> blank)."""
    base = ["isic_id", "attribution", "copyright_license"]
    fields: set[str] = set()
    rows = []
    for rec in records:
        meta = rec.get("metadata") or {}
        acquisition, clinical = meta.get("acquisition") or {}, meta.get("clinical") or {}
        fields |= set(acquisition) | set(clinical)
        rows.append({"isic_id": rec.get("isic_id"), "attribution": rec.get("attribution"),
                     "copyright_license": rec.get("copyright_license"), **acquisition, **clinical})
    return base + sorted(fields - set(base)), rows


def attributions(rows: list[dict]) -> list[str]:
    """Attribution lines ordered like isic-cli's: most images first, then by name; Anonymous last."""
    counts = Counter(r.get("attribution") or "Anonymous" for r in rows)
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [name for name, _ in sorted(ordered, key=lambda kv: kv[0] == "Anonymous")]


# -------------------------------------------------------------------------------------- publish/manifest
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def publish(cache: Path, files: dict[str, Path], download_dir: Path) -> None:
    """Assemble ``download_dir``: the listed images (hard links into the cache), metadata.csv,
    attribution.txt and licenses/ — built beside it and renamed into place."""
    staging = download_dir.with_name(download_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in files.values():
        _link_or_copy(f, staging / f.name)
    for name in ("metadata.csv", "attribution.txt"):
        if (cache / name).exists():
            shutil.copy2(cache / name, staging / name)
    if (cache / "licenses").is_dir():
        shutil.copytree(cache / "licenses", staging / "licenses")
    if download_dir.exists():
        shutil.rmtree(download_dir)
    os.replace(staging, download_dir)


def build_manifest(download_dir: Path, files: dict[str, Path]) -> pd.DataFrame:
    """isic_id, file (relative to the download directory), bytes, sha256 — sorted by isic_id."""
    rows = []
    for isic_id in sorted(files):
        f = download_dir / files[isic_id].name
        rows.append({"isic_id": isic_id, "file": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
