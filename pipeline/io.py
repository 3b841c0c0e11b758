"""Atomic writers: every output is written under a temporary name in the target folder, then renamed.

A crash or a full disk therefore never leaves a half-written file under the final name, and an earlier
version of the file stays intact until the new one is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib

__all__ = ["atomic_path", "atomic_save_nifti", "atomic_write_json", "atomic_write_text"]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write(path: str | os.PathLike, writer: Callable[[Path], None], suffix: str = "") -> Path:
    with atomic_path(path, suffix) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def atomic_save_nifti(img: nib.Nifti1Image, path: str | os.PathLike) -> Path:
    """Save a NIfTI image atomically (compressed if ``path`` ends with ``.gz``)."""
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    return _write(path, lambda tmp: nib.save(img, tmp), suffix)
