"""Axial 2D slices of preprocessed volumes: selection for training, order-preserving views for evaluation.

Volumes are ``(C, H, W, D)`` with the axial (slice) axis last, as produced by
:func:`pipeline.data.preprocessing.brain_volume_transform`; slices are ``(D, C, H, W)`` batches.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.data.slice_cache import CachedVolume, SliceCache

__all__ = [
    "BrainSliceDataset",
    "InMemoryVolume",
    "SliceSelection",
    "VolumeSlices",
    "brain_slice_indices",
    "centre_slice",
    "slices_to_volume",
    "volume_to_slices",
    "with_context",
]

logger = logging.getLogger(__name__)


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """``(C, H, W, D)`` volume -> ``(D, C, H, W)`` batch of axial slices, in slice order."""
    return torch.as_tensor(volume).permute(3, 0, 1, 2).contiguous()


def slices_to_volume(slices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`volume_to_slices`: ``(D, C, H, W)`` -> ``(C, H, W, D)``."""
    return torch.as_tensor(slices).permute(1, 2, 3, 0).contiguous()


def with_context(slices: torch.Tensor, context_slices: int) -> torch.Tensor:
    """2.5D input: ``(D, C, H, W)`` slices -> ``(D, C * (1 + 2k), H, W)``, each slice with its ``k`` neighbours
    on either side as extra channels, in axial order (slice ``d - k`` first, ``d`` in the middle). Beyond the volume
    the neighbours are 0, the preprocessed background. ``k = 0`` returns ``slices`` as they are."""
    if context_slices == 0:
        return slices
    depth = slices.shape[0]
    padded = torch.nn.functional.pad(slices, (0, 0, 0, 0, 0, 0, context_slices, context_slices))
    return torch.cat([padded[i : i + depth] for i in range(2 * context_slices + 1)], dim=1)


def centre_slice(batch: torch.Tensor, context_slices: int) -> torch.Tensor:
    """The middle slice of :func:`with_context`'s channels: ``(B, C * (1 + 2k), H, W)`` -> ``(B, C, H, W)``."""
    if context_slices == 0:
        return batch
    channels = batch.shape[1] // (2 * context_slices + 1)
    return batch[:, context_slices * channels : (context_slices + 1) * channels]


def brain_slice_indices(brainmask: torch.Tensor, min_brain_fraction: float = 0.1, border_slices: int = 0) -> list[int]:
    """Indices of the axial slices used for training.

    Args:
        brainmask: ``(1, H, W, D)`` 0/1 brain mask.
        min_brain_fraction: keep slices whose brain covers at least this fraction of the ``H x W`` slice.
        border_slices: drop this many slices at each end of the brain's axial extent first (the reference code
            skips ~20 border slices of 1 mm data, where anatomy is atypical).
    """
    area = torch.as_tensor(brainmask)[0].flatten(0, 1).float().mean(dim=0)
    brain = torch.nonzero(area > 0).flatten()
    if brain.numel() == 0:
        return []
    first, last = int(brain[0]) + border_slices, int(brain[-1]) - border_slices
    return [i for i in range(first, last + 1) if float(area[i]) >= min_brain_fraction]


@dataclass(frozen=True)
class SliceSelection:
    """Which axial slices of a volume training uses (:func:`brain_slice_indices`), as one object: evaluation's
    slice-level metrics use the same slices."""

    min_brain_fraction: float = 0.1
    border_slices: int = 0

    def indices(self, brainmask: torch.Tensor) -> list[int]:
        """:func:`brain_slice_indices` of a ``(1, H, W, D)`` brain mask."""
        return brain_slice_indices(brainmask, self.min_brain_fraction, self.border_slices)


class InMemoryVolume:
    """The selected slices of one volume, held in memory (the :class:`~pipeline.data.slice_cache.CachedVolume`
    interface without a cache)."""

    def __init__(self, arrays: dict[str, np.ndarray], slices: list[int], depth: int) -> None:
        self.arrays, self.slices, self.depth = arrays, slices, depth
        self.keys = tuple(arrays)

    def read(self, key: str, index: int) -> np.ndarray:
        return self.arrays[key][index]

    def read_many(self, key: str, indices: Sequence[int]) -> np.ndarray:
        return self.arrays[key][list(indices)]

    def array(self, key: str) -> np.ndarray:
        return self.arrays[key]


class VolumeSlices(torch.utils.data.Dataset):
    """Item ``i``: the training slices of ``data[i]``, preprocessed by ``transform`` and picked by
    :func:`brain_slice_indices`; from ``cache`` (preprocessed and stored first where missing) or, without one (or
    for an entry that is not made of files), in memory with only ``keys``. Run through a ``DataLoader`` so that
    ``num_workers`` processes share the first pass."""

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        selection: SliceSelection,
        keys: Sequence[str],
        mask_key: str,
        cache: SliceCache | None,
        context_slices: int = 0,
    ) -> None:
        self.data, self.transform, self.selection, self.cache = list(data), transform, selection, cache
        self.keys, self.mask_key, self.context_slices = tuple(keys), mask_key, context_slices

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[CachedVolume | InMemoryVolume, bool] | list[BaseException]:
        """``(volume, preprocessed)``: ``preprocessed`` is False where the cache already held the volume. An error is
        returned, not raised, as the list of its chain of causes (:func:`_raise_chain` raises it again): a
        ``DataLoader`` worker would re-raise it in a multi-line message of its own, and the causes (the
        ``InputError`` under MONAI's "applying transform" wrapper) do not survive the trip between processes, while
        bad input must stop the run with its own one line. The full traceback is kept as a note."""
        try:
            return self._volume(index)
        except Exception as err:  # noqa: BLE001 - handed to the main process, which raises it
            err.add_note(traceback.format_exc())
            chain: list[BaseException] = [err]
            while (chain[-1].__cause__ or chain[-1].__context__) is not None:
                chain.append(chain[-1].__cause__ or chain[-1].__context__)
            return chain

    def _volume(self, index: int) -> tuple[CachedVolume | InMemoryVolume, bool]:
        entry = self.data[index]
        stored = [k for k in dict.fromkeys(("image", self.mask_key, "label", *self.keys)) if entry.get(k) is not None]
        if self.cache is None or not all(isinstance(entry[k], (str, os.PathLike)) for k in stored):
            return InMemoryVolume(*self.preprocess(entry, self.keys)), True
        return self.cache.get_or_build(
            self.cache.key({k: entry[k] for k in stored}), lambda: self.preprocess(entry, stored)
        )

    def preprocess(self, entry: dict, keys: Sequence[str]) -> tuple[dict[str, np.ndarray], list[int], int]:
        """``(arrays, slices, depth)`` of one datalist entry: ``image`` float32, masks and labels uint8 0/1."""
        item = self.transform(dict(entry))
        picked = self.selection.indices(item[self.mask_key])
        arrays = {}
        for key in keys:
            if item.get(key) is not None:
                value = item[key].as_tensor() if hasattr(item[key], "as_tensor") else torch.as_tensor(item[key])
                slices = volume_to_slices(value)
                chosen = (with_context(slices, self.context_slices) if key == "image" else slices)[picked]
                arrays[key] = (chosen.float() if key == "image" else (chosen > 0).to(torch.uint8)).numpy()
        return arrays, picked, int(item[self.mask_key].shape[-1])


class BrainSliceDataset(torch.utils.data.Dataset):
    """Training/validation slices of a list of volumes, preprocessed once.

    Each volume of ``data`` goes through ``transform`` once (in ``num_workers`` processes, with a progress bar and
    its ETA); the slices picked by :func:`brain_slice_indices` are kept per volume, on disk in a
    :class:`~pipeline.data.slice_cache.SliceCache` under ``cache_dir`` (read one slice at a time: memory does not
    grow with the number of subjects; later runs on the same files and settings skip the preprocessing) or, without
    ``cache_dir``, in memory. ``self.subject`` and ``self.slice`` give each slice's volume index and slice index,
    ``self.position`` its relative axial position in its (brain-cropped) volume, 0 at the first slice and 1 at the
    last. Items are dicts of ``(1, H, W)`` float tensors for every key present (``image``; ``brainmask``/``label``
    as 0/1) plus ``subject``/``slice``; with ``context_slices`` k the ``image`` is ``(1 + 2k, H, W)``, the slice
    between its neighbours (:func:`with_context`: the 2.5D input).

    Args:
        data: datalist entries (``image`` and optionally ``brainmask``, ``label``).
        transform: the volume chain, e.g. :func:`pipeline.data.preprocessing.brain_volume_transform`; with
            ``cache_dir`` it must carry ``cache_settings`` (what makes its output what it is).
        selection: which slices of each volume (:class:`SliceSelection`; default: brain in >= 10 % of a slice).
        keys: keys to keep.
        num_workers: processes for the preprocessing pass.
        cache_dir: the slice cache's folder (None: in memory).
        context_slices: neighbours on either side stacked as the image's extra channels (0: 2D slices).
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        selection: SliceSelection | None = None,
        keys: Sequence[str] = ("image", "brainmask", "label"),
        mask_key: str = "brainmask",
        num_workers: int = 0,
        progress: bool = True,
        cache_dir: str | os.PathLike | None = None,
        context_slices: int = 0,
    ) -> None:
        if len(data) == 0:
            raise ValueError("BrainSliceDataset got an empty data list; check the datalist and its key.")
        selection = SliceSelection() if selection is None else selection
        cache = None
        if cache_dir is not None:
            settings = getattr(transform, "cache_settings", None)
            if settings is None:
                raise ValueError(
                    "cache_dir needs a transform with cache_settings (brain_volume_transform has them); "
                    "pass cache_dir=None for another transform."
                )
            cache = SliceCache(
                cache_dir,
                {
                    "transform": settings,
                    "min_brain_fraction": selection.min_brain_fraction,
                    "border_slices": selection.border_slices,
                    "mask_key": mask_key,
                    # only where set: the entries of 2D runs keep their keys
                    **({"context_slices": context_slices} if context_slices else {}),
                },
            )
        passes = VolumeSlices(data, transform, selection, keys, mask_key, cache, context_slices)
        # its own generator: the loader draws a seed for its workers, which must not shift training's random stream
        loader = torch.utils.data.DataLoader(
            passes,
            batch_size=None,
            num_workers=min(num_workers, len(data) - 1),
            collate_fn=_unchanged,
            generator=torch.Generator(),
        )
        self.volumes: list[CachedVolume | InMemoryVolume] = []
        subject, local, slice_index, position, preprocessed = [], [], [], [], 0  # one array per volume
        # an iterator, not the loader: tqdm.auto's asyncio class calls iter() on what it gets and then iterates it
        # again, which on a DataLoader starts a second set of worker processes that preprocess everything twice
        batches = tqdm(iter(loader), total=len(data), desc="preprocessing", disable=not progress)
        for i, item in enumerate(batches):
            if isinstance(item, list):
                _raise_chain(item)
            volume, built = item
            self.volumes.append(volume)
            preprocessed += built
            picked = np.asarray(volume.slices, dtype=np.int64)
            subject.append(np.full(len(picked), i, dtype=np.int64))
            local.append(np.arange(len(picked), dtype=np.int64))
            slice_index.append(picked)
            position.append((picked / max(volume.depth - 1, 1)).astype(np.float32))
        if not sum(len(p) for p in slice_index):
            raise ValueError("no slice passed the selection (min_brain_fraction / border_slices too strict?).")
        present = [tuple(k for k in keys if k in volume.keys) for volume in self.volumes]
        if len(set(present)) > 1:
            uneven = sorted(set().union(*present) - set.intersection(*map(set, present)))
            raise ValueError(f"keys {uneven} are present for only some datalist entries; give them for all or none.")
        self.keys = present[0]
        if cache is not None:
            logger.info(
                "slice cache %s: %d of %d volumes preprocessed, %d found",
                cache.root,
                preprocessed,
                len(data),
                len(data) - preprocessed,
            )
        index = [torch.from_numpy(np.concatenate(parts)) for parts in (subject, local, slice_index, position)]
        self.subject, self.local, self.slice, self.position = index
        first = self.volumes[int(self.subject[0])]
        self.slice_shapes = {key: first.read(key, int(self.local[0])).shape for key in self.keys}

    def __len__(self) -> int:
        return len(self.subject)

    def read(self, key: str, index: int) -> torch.Tensor:
        """Slice ``index`` of ``key``: ``(1, H, W)`` float32 (``image``: ``(1 + 2k, H, W)``)."""
        array = self.volumes[int(self.subject[index])].read(key, int(self.local[index]))
        return torch.tensor(array, dtype=torch.float32)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """The items of ``indices`` (a ``DataLoader`` asks for a batch at once): each volume's slices of a key are
        read together, with its file opened once (docs/performance.md: the training data path)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        subjects = self.subject[index]
        arrays = {key: np.empty((len(indices), *self.slice_shapes[key]), dtype=np.float32) for key in self.keys}
        for subject in torch.unique(subjects).tolist():
            rows = torch.nonzero(subjects == subject).flatten().numpy()
            local = self.local[index[rows]].tolist()
            for key, out in arrays.items():
                out[rows] = self.volumes[subject].read_many(key, local)
        tensors = {key: torch.from_numpy(out) for key, out in arrays.items()}
        slices = self.slice[index]
        return [
            {**{key: tensor[i] for key, tensor in tensors.items()}, "subject": subjects[i], "slice": slices[i]}
            for i in range(len(indices))
        ]

    def stacked(self, key: str) -> torch.Tensor:
        """Every slice of ``key``, ``(N, 1, H, W)`` float32 in memory (for small sets: benchmarks, tests)."""
        return torch.from_numpy(np.concatenate([volume.array(key) for volume in self.volumes])).float()


def _raise_chain(chain: list[BaseException]) -> None:
    """Raise ``chain[0]`` with ``chain[1:]`` linked again as its causes (they are lost between processes)."""
    for outer, inner in zip(chain, chain[1:]):
        outer.__cause__ = inner
    raise chain[0]


def _unchanged(item: dict) -> dict:
    """Collate function of the preprocessing loader: volumes are passed through as they are."""
    return item
