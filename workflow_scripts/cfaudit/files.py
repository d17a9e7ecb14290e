"""File helpers: checksums and writes that never leave a half-written output behind."""

from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pandas as pd


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def atomic_path(path: str | os.PathLike):
    """A temporary sibling of ``path``; ``os.replace`` it onto ``path`` once complete.

    mkstemp creates files readable by the owner only; the usual umask-based mode is restored so that
    results are readable by a lab group as any other file would be.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


@contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary sibling of ``path`` to write; it replaces ``path`` only if the block completes.

    The one way this package writes a file: a killed or failing job leaves no truncated output for Snakemake
    to trust, and no temporary file behind.
    """
    tmp = atomic_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write a CSV atomically."""
    with atomic_output(path) as tmp:
        df.to_csv(tmp, index=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    atomic_bytes(path, text.encode("utf-8"))


def atomic_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes atomically."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_torch(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically and byte-reproducibly: serialised in memory (the archive's inner folder is then
    always ``archive/``, not the random name of a temporary file), then written to a temporary sibling and renamed,
    so a kill never leaves a truncated checkpoint and the same weights give the same sha256."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_bytes(path, buffer.getvalue())
