"""Placing weight files: a local copy or a download, sha256-verified, with one retry policy.

The audited classifier (rule place_classifier_weights), the published GAN generator (place_gan_weights) and
pytorch-fid's Inception (place_fid_weights) all fetch their files here; the ISIC id-list client
(:mod:`cfaudit.data.isic`) retries its requests with the same :class:`RetryPolicy` and
:func:`call_with_retries`. :func:`state_dict_mismatch` says which keys and shapes of a weights file do not fit
a model (the classifier's and the GAN generator's strict loads).

A download is a plain urllib GET (``http(s)://`` or ``file://``, so tests and air-gapped users can point at a
local copy) written to a temporary sibling and renamed. Network errors, HTTP 408 / 429 and 5xx are retried
with exponential back-off; other HTTP errors are final (retrying a 404 cannot help). An HTML answer (a login,
quota or virus-scan confirmation page, as Google Drive sends) is refused at once: no weights file is HTML.
``torch.hub.download_url_to_file`` is not used because it checks only a hash prefix, cannot refuse such pages
and does not retry.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cfaudit.files import atomic_output, atomic_path, sha256_file

log = logging.getLogger("cfaudit.weights")

RETRY_HTTP = (408, 429)  # plus every 5xx
URL_SCHEMES = ("http", "https", "file")


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` repeats after the first attempt; the wait after failed attempt k (0-based) is
    ``backoff_s * 2**k``, capped at ``max_wait_s``."""

    retries: int = 4
    backoff_s: float = 2.0
    max_wait_s: float = 60.0

    def wait(self, attempt: int) -> float:
        return min(self.backoff_s * 2 ** attempt, self.max_wait_s)


class RetriesExhausted(Exception):
    """Every attempt failed with a transient error; ``attempts`` and the ``last`` problem say how."""

    def __init__(self, attempts: int, last: str):
        super().__init__(f"failed after {attempts} attempt{'s' if attempts != 1 else ''} ({last})")
        self.attempts = attempts
        self.last = last


def call_with_retries(fn: Callable, policy: RetryPolicy, transient: Callable, *, sleep=time.sleep,
                      on_retry: Callable | None = None):
    """``fn()`` until it returns, at most ``policy.retries + 1`` times.

    ``transient(err)`` classifies an exception: None re-raises it (it may also raise its own error), else
    ``(problem, wait)`` retries after ``wait`` seconds (None = the policy's back-off). ``on_retry(attempt,
    problem, wait)`` is called before each wait. Raises :class:`RetriesExhausted` after the last attempt.
    """
    for attempt in range(policy.retries + 1):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 (transient() decides; anything else is re-raised as is)
            verdict = transient(err)
            if verdict is None:
                raise
            problem, wait = verdict
        if attempt == policy.retries:
            raise RetriesExhausted(attempt + 1, problem)
        wait = policy.wait(attempt) if wait is None else wait
        if on_retry:
            on_retry(attempt, problem, wait)
        sleep(wait)


class NotAWeightsFile(Exception):
    """The server answered an HTML page instead of the file."""


def network_problem(err: Exception) -> tuple[str, None] | None:
    """``transient`` for urllib GETs: broken connections, timeouts, HTTP 408 / 429 / 5xx; None for the rest."""
    if isinstance(err, urllib.error.HTTPError):
        return (f"HTTP {err.code}", None) if err.code in RETRY_HTTP or err.code >= 500 else None
    if isinstance(err, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                        ssl.SSLError, OSError)):
        return f"{type(err).__name__}: {err}", None
    return None


def _get(url: str, dest: Path, timeout_s: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "cfaudit"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp, open(dest, "wb") as fh:  # noqa: S310 (URL from config)
        if "text/html" in (resp.headers.get("Content-Type", "") if hasattr(resp, "headers") else ""):
            raise NotAWeightsFile(url)
        shutil.copyfileobj(resp, fh, 1 << 20)


def download(url: str, dest: str | os.PathLike, *, policy: RetryPolicy = RetryPolicy(), timeout_s: float = 120.0,
             sleep=time.sleep, logger: logging.Logger | None = None) -> Path:
    """GET ``url`` into ``dest`` (atomically), retrying per ``policy``.

    Raises :class:`RetriesExhausted`, :class:`NotAWeightsFile`, ``urllib.error.HTTPError`` (a final HTTP
    status) or ``ValueError`` (not an http(s):// or file:// URL).
    """
    logger = logger or log
    if urllib.parse.urlparse(url).scheme not in URL_SCHEMES:
        raise ValueError(f"{url!r} is not an http(s):// or file:// URL")
    dest = Path(dest)

    def retrying(attempt, problem, wait):
        logger.warning("download attempt %d of %s failed (%s); retrying in %.0f s", attempt + 1, url, problem, wait)

    with atomic_output(dest) as tmp:
        call_with_retries(lambda: _get(url, tmp, timeout_s), policy, network_problem, sleep=sleep, on_retry=retrying)
    return dest


def download_error(url: str, err: Exception, what: str) -> str:
    """The message for a failed :func:`download` of ``what``'s weights (``what`` = its config section)."""
    if isinstance(err, NotAWeightsFile):
        return (f"{url} returned an HTML page, not a weights file (a login, quota or confirmation page). "
                f"Download the file in a browser and set local_path to it ({what}.local_path).")
    if isinstance(err, ValueError):
        return f"{what}.url {url!r} is not an http(s):// or file:// URL"
    detail = str(err) if isinstance(err, RetriesExhausted) else f"failed after 1 attempt (final: {err})"
    return (f"could not download {what} weights from {url}: {detail}. Check the URL and the network, or download "
            f"the file yourself and set {what}.local_path.")


def _source(dest: Path, unverified: Path, local_path: str, url: str, what: str, hint: str, error) -> tuple[str, Path | None]:
    """Where the file comes from: (description, a file to copy) or (description, None) for a download."""
    if local_path and Path(local_path).is_file():
        return f"local file {local_path}", Path(local_path)
    if url and unverified.is_file():
        return f"earlier download of {url} ({unverified})", unverified
    if url:
        return f"download {url}", None
    raise error(
        f"no weights to place at {dest}: {what}.local_path "
        f"{'(' + repr(local_path) + ') does not exist' if local_path else 'is empty'} and {what}.url is empty. "
        f"Set one of them in config.yaml.{' ' + hint if hint else ''}"
    )


def place_verified(dest: str | os.PathLike, *, sha256: str, local_path: str = "", url: str = "", what: str,
                   error: type[Exception] = RuntimeError, policy: RetryPolicy = RetryPolicy(),
                   timeout_s: float = 120.0, sleep=time.sleep, logger: logging.Logger | None = None,
                   hint: str = "") -> Path:
    """Put a weights file at ``dest`` from ``local_path`` (preferred when it exists) or ``url``; its sha256 must
    equal ``sha256``. Errors are raised as ``error`` with a message naming ``what`` (the config section).

    Nothing is placed on a mismatch. With an empty ``sha256`` nothing is placed either: the error prints the
    file's hash, to check with the publisher and paste into config, and a download is kept as
    ``<dest>.unverified`` to be reused (not fetched again) once the hash is set.
    """
    logger = logger or log
    dest = Path(dest)
    unverified = dest.with_name(dest.name + ".unverified")
    source, copy_from = _source(dest, unverified, local_path, url, what, hint, error)
    tmp = atomic_path(dest)
    try:
        if copy_from is not None:
            shutil.copyfile(copy_from, tmp)
        else:
            logger.info("downloading %s -> %s", url, dest)
            try:
                download(url, tmp, policy=policy, timeout_s=timeout_s, sleep=sleep, logger=logger)
            except (RetriesExhausted, NotAWeightsFile, ValueError, urllib.error.HTTPError) as err:
                raise error(download_error(url, err, what)) from None
        got = sha256_file(tmp)
        if not sha256:
            if copy_from is None:
                os.replace(tmp, unverified)
            raise error(
                f"{what}.sha256 is empty, so the weights from {source} were not placed. Their sha256 is {got} "
                f"({(copy_from or unverified).stat().st_size} bytes). Check it against the publisher, then set "
                f"{what}.sha256: {got}"
            )
        if got.lower() != sha256.lower():
            if copy_from == unverified:
                unverified.unlink()  # a bad earlier download must not be reused
            raise error(
                f"sha256 mismatch for the weights from {source}: expected {sha256} ({what}.sha256), got {got}: the "
                f"file is wrong or corrupted (or truncated). Nothing was placed at {dest}; fix {what}.local_path / "
                f"{what}.url or the hash."
            )
        os.replace(tmp, dest)
        unverified.unlink(missing_ok=True)
        logger.info("placed %s (sha256 %s, %d bytes) from %s", dest, got, dest.stat().st_size, source)
        return dest
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------
# Loading: what does not match
# ------------------------------------------------------------------------------------------------------------
def _shape(value) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") else ("not a tensor: " + type(value).__name__,)


@dataclass
class StateDictMismatch:
    """Keys a model expects but a file lacks, keys it has but the model does not, and keys of the wrong shape."""

    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, tuple, tuple]]  # (key, shape in the file, shape in the model)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def describe(self, limit: int = 8) -> str:
        """``1 missing: a; 2 unexpected: b, c; 1 mis-shaped: d (file (2,), model (3,))``, ``limit`` names each."""
        shaped = [f"{k} (file {f}, model {m})" for k, f, m in self.misshaped]
        parts = []
        for label, items in (("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", shaped)):
            if items:
                more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
        return "; ".join(parts)


def state_dict_mismatch(expected: dict, state: dict) -> StateDictMismatch:
    """Compare a file's ``state`` with ``expected`` (key -> a tensor or a shape, e.g. ``model.state_dict()``),
    so that a failed strict load can say which keys and shapes differ, not only that they do."""
    want = {k: tuple(v) if isinstance(v, (tuple, list)) else _shape(v) for k, v in expected.items()}
    return StateDictMismatch(
        missing=[k for k in want if k not in state],
        unexpected=[k for k in state if k not in want],
        misshaped=[(k, _shape(state[k]), s) for k, s in want.items() if k in state and _shape(state[k]) != s],
    )
