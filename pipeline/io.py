"""Atomic writers: every output is written under a temporary name in the target folder, then renamed.

A crash or a full disk therefore never leaves a half-written file under the final name, and an earlier
version of the file stays intact until the new one is complete. :func:`file_lock` serialises read-modify-write
updates of one file between processes. ``.nii.gz`` files are compressed on all CPU cores
(:func:`parallel_gzip`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib

__all__ = [
    "WriteError",
    "atomic_path",
    "atomic_save_nifti",
    "atomic_write_json",
    "atomic_write_text",
    "file_lock",
    "file_sha256",
    "make_output_folder",
    "parallel_gzip",
]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class WriteError(OSError):
    """Writing an output failed (disk full, I/O error, ...); the message names the file and says that its previous
    version, if any, is intact."""


def make_output_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` and its parents if missing; one that cannot be created (a file in the way, no permission)
    raises :class:`WriteError` naming it and the fix."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(
            f"cannot create the {what} {folder}: {err.strerror or err}; choose a writable {what}."
        ) from err
    return folder


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed (a failed write
    raises :class:`WriteError`, naming the file).

    ``suffix`` is kept on the temporary name, for writers that infer the format from it (``.nii.gz``).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    except OSError as err:
        raise OSError(f"cannot write {target}: {err.strerror or err}; choose a writable output folder.") from err
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) or "PytorchStreamWriter failed writing" in str(err):  # disk full, I/O error
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            kept = f"the previous {target.name} is intact" if target.exists() else f"no {target.name} was written"
            raise WriteError(
                f"cannot write {target}: {reason}; {kept}. Free disk space or choose another output "
                "folder, then run again (training: --resume True)."
            ) from err
        raise


@contextmanager
def file_lock(path: str | os.PathLike):
    """Hold an exclusive ``fcntl`` lock on ``path`` for the ``with`` block; other processes wait. ``path`` is a lock
    file (created if missing) or an existing folder, which is locked itself, so that nothing is left behind. The
    lock is released when the block ends or the process dies."""
    lock_path = Path(path)
    if lock_path.is_dir():
        descriptor = os.open(lock_path, os.O_RDONLY)
    else:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def atomic_save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Save a NIfTI image atomically (gzip-compressed on all cores if ``path`` ends with ``.gz``)."""
    data = img.to_bytes()
    return _write(path, lambda tmp: tmp.write_bytes(parallel_gzip(data) if str(path).endswith(".gz") else data))


def parallel_gzip(data: bytes, level: int = 1, workers: int | None = None) -> bytes:
    """One standard gzip member of ``data``, its chunks deflated in parallel threads (the technique of ``pigz``).

    Each chunk is raw deflate ending in a byte-aligned sync flush, the last one in the final block, so their
    concatenation is one valid deflate stream that every gzip reader (zlib, Python, nibabel, ITK) decodes.
    ``level`` 1 is nibabel's default for ``.nii.gz``; ``workers`` defaults to the CPUs this process may use.
    """
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    view, step = memoryview(data), max(1 << 20, -(-len(data) // max(workers, 1)))
    chunks = [view[i : i + step] for i in range(0, len(data), step)] or [view]

    def deflate(index: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
        end = zlib.Z_FINISH if index == len(chunks) - 1 else zlib.Z_SYNC_FLUSH
        return compressor.compress(chunks[index]) + compressor.flush(end)

    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:  # zlib releases the GIL
        body = list(pool.map(deflate, range(len(chunks))))
    header = b"\x1f\x8b\x08\x00" + b"\x00\x00\x00\x00" + b"\x04\xff"  # deflate, no name, mtime 0, fastest, OS unknown
    return b"".join([header, *body, struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)])
