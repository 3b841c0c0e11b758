"""On-disk cache of preprocessed training slices: stored once, read slice by slice, shared between runs.

One entry per (content of the volume's files, preprocessing settings, slice selection): a folder
``<root>/<key[:2]>/<key>/`` holding one ``.npy`` array per key (``image`` float32 ``(n, C, H, W)``, ``brainmask``
and ``label`` uint8) and ``meta.json`` (the selected slice indices, the volume's depth, each array's shape, dtype and
byte size). Hand-written rather than MONAI's ``PersistentDataset`` (which pickles whole volumes and gives them back
whole) or ``LMDBDataset`` (an extra dependency): training reads single slices with ``os.pread``, so the process
maps nothing and its resident memory does not grow with the cohort (the OS page cache holds what is hot).

* **Keys**: SHA-256 of the files' bytes (a changed file misses its entry; a renamed or linked one hits it), of the
  preprocessing settings (``transform.cache_settings`` of :func:`pipeline.data.preprocessing.brain_volume_transform`,
  which carries a version to bump when the chain changes) and of the selection.
* **Concurrent writers** (DDP ranks, ``compare.py`` children, two users): an entry is built under an ``fcntl`` lock
  on ``<key>.lock``, in a temporary folder renamed into place; a second builder waits for the lock and then finds
  the entry.
* **Damage**: an entry whose ``meta.json`` is missing or unreadable, or whose arrays do not have the recorded byte
  size, header and SHA-256 of their data, is rebuilt (a truncated copy, a half-deleted folder, changed bytes, an
  array of other values put in its place), with a warning. The checksums are verified once per entry when a run
  opens it (about 1 s per GB of cache), not at every read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipeline.io import WriteError, file_sha256

__all__ = ["CACHE_FORMAT", "CachedVolume", "SliceCache"]

CACHE_FORMAT = 2  # 2: each array's data SHA-256 in meta.json
_META = "meta.json"
logger = logging.getLogger(__name__)
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


class CachedVolume:
    """The cached slices of one volume; :meth:`read` gives one slice of one key, read from disk.

    Attributes:
        slices: the selected slice indices in the volume, in order.
        depth: the volume's number of slices.
        keys: the stored keys.
    """

    def __init__(self, folder: Path, meta: Mapping) -> None:
        self.folder = folder
        self.slices: list[int] = list(meta["slices"])
        self.depth: int = int(meta["depth"])
        self._arrays = {
            key: (folder / f"{key}.npy", tuple(info["shape"]), np.dtype(info["dtype"]), int(info["offset"]))
            for key, info in meta["arrays"].items()
        }
        self.keys = tuple(self._arrays)

    def read(self, key: str, index: int) -> np.ndarray:
        """Slice ``index`` (of :attr:`slices`) of ``key``: ``(C, H, W)``."""
        return self.read_many(key, [index])[0]

    def read_many(self, key: str, indices: Sequence[int]) -> np.ndarray:
        """Slices ``indices`` of ``key``, in that order: ``(len(indices), C, H, W)``, with the file opened once."""
        path, shape, dtype, offset = self._arrays[key]
        out = np.empty((len(indices), *shape[1:]), dtype=dtype)
        size = out[0].nbytes if len(indices) else 0
        fd = os.open(path, os.O_RDONLY)
        try:
            for row, index in zip(out, indices):
                if os.preadv(fd, [memoryview(row).cast("B")], offset + index * size) != size:
                    raise OSError(f"slice cache entry {path} is shorter than its meta.json says; delete {self.folder}")
        finally:
            os.close(fd)
        return out

    def array(self, key: str) -> np.ndarray:
        """All slices of ``key``: ``(n, C, H, W)`` (loads them; for small sets)."""
        return np.load(self._arrays[key][0])


class SliceCache:
    """Entries of :class:`CachedVolume` under ``root`` for one set of preprocessing ``settings`` (see the module
    docstring)."""

    def __init__(self, root: str | os.PathLike, settings: Mapping) -> None:
        self.root = Path(root)
        self.settings = json.dumps({"format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)

    def key(self, files: Mapping[str, str | os.PathLike]) -> str:
        """The entry key of a volume whose files are ``files`` (key name -> path)."""
        digest = hashlib.sha256(self.settings.encode())
        for name in sorted(files):
            digest.update(f"{name}:{file_sha256(files[name])};".encode())
        return digest.hexdigest()

    def folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    def get(self, key: str) -> CachedVolume | None:
        """The entry ``key`` if it is present and whole, else None."""
        folder = self.folder(key)
        try:
            meta = json.loads((folder / _META).read_text())
            for name, info in meta["arrays"].items():
                path = folder / f"{name}.npy"
                if path.stat().st_size != info["offset"] + info["nbytes"]:
                    return None
                with open(path, "rb") as handle:
                    reader = _HEADER_READERS.get(np.lib.format.read_magic(handle))
                    if reader is None:
                        return None
                    shape, _, dtype = reader(handle)
                    if list(shape) != info["shape"] or str(dtype) != info["dtype"] or handle.tell() != info["offset"]:
                        return None
                    if _data_sha256(handle) != info["sha256"]:
                        logger.warning("slice cache entry %s has changed since it was written; rebuilding it", path)
                        return None
            return CachedVolume(folder, meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def get_or_build(
        self, key: str, build: Callable[[], tuple[dict[str, np.ndarray], list[int], int]]
    ) -> tuple[CachedVolume, bool]:
        """The entry ``key``, built first if it is missing or damaged: ``build()`` returns ``(arrays, slices,
        depth)``. Returns ``(entry, built)``."""
        entry = self.get(key)
        if entry is not None:
            return entry, False
        with self._locked(key):
            entry = self.get(key)  # another writer may have built it while we waited
            if entry is not None:
                return entry, False
            arrays, slices, depth = build()
            try:
                self._write(key, arrays, slices, depth)
            except OSError as err:
                raise self._unwritable(self.folder(key), err) from err
            entry = self.get(key)
            if entry is None:
                raise OSError(
                    f"slice cache entry {self.folder(key)} is unreadable right after writing it; check the "
                    f"disk under {self.root}"
                )
            return entry, True

    def _unwritable(self, path: Path, err: OSError) -> WriteError:
        return WriteError(
            f"cannot write the slice cache at {path}: {err.strerror or err}; free space there, or give "
            "another --cache_dir (--cache_dir None keeps the slices in memory)"
        )

    @contextmanager
    def _locked(self, key: str):
        lock_dir = self.root / key[:2]
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            handle = open(lock_dir / f"{key}.lock", "a")
        except OSError as err:
            raise self._unwritable(lock_dir, err) from err
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _write(self, key: str, arrays: Mapping[str, np.ndarray], slices: list[int], depth: int) -> None:
        final = self.folder(key)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
        try:
            meta = {"format": CACHE_FORMAT, "slices": [int(s) for s in slices], "depth": int(depth), "arrays": {}}
            for name, array in arrays.items():
                array = np.ascontiguousarray(array)
                path = tmp / f"{name}.npy"
                np.save(path, array)
                size = path.stat().st_size
                meta["arrays"][name] = {
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "nbytes": array.nbytes,
                    "offset": size - array.nbytes,
                    "sha256": hashlib.sha256(memoryview(array).cast("B")).hexdigest(),
                }
            (tmp / _META).write_text(json.dumps(meta))
            for path in tmp.iterdir():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            if final.exists():  # damaged (get() refused it): move it aside, then drop it
                stale = Path(tempfile.mkdtemp(prefix=f".{key}.stale.", dir=final.parent))
                os.rename(final, stale / "entry")
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _data_sha256(handle, chunk: int = 1 << 22) -> str:
    """SHA-256 of the rest of an open file (an array's data after its ``.npy`` header)."""
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()
