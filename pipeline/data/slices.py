"""Axial 2D slices of preprocessed volumes: selection for training, order-preserving views for evaluation.

Volumes are ``(C, H, W, D)`` with the axial (slice) axis last, as produced by
:func:`pipeline.data.preprocessing.brain_volume_transform`; slices are ``(D, C, H, W)`` batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import Dataset, PersistentDataset
from tqdm.auto import tqdm

__all__ = ["BrainSliceDataset", "brain_slice_indices", "slices_to_volume", "volume_to_slices"]


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """``(C, H, W, D)`` volume -> ``(D, C, H, W)`` batch of axial slices, in slice order."""
    return torch.as_tensor(volume).permute(3, 0, 1, 2).contiguous()


def slices_to_volume(slices: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`volume_to_slices`: ``(D, C, H, W)`` -> ``(C, H, W, D)``."""
    return torch.as_tensor(slices).permute(1, 2, 3, 0).contiguous()


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


class BrainSliceDataset(torch.utils.data.Dataset):
    """Training/validation slices of a list of volumes, preprocessed once and kept as contiguous tensors.

    Each volume of ``data`` goes through ``transform`` once (in ``num_workers`` processes); the slices picked
    by :func:`brain_slice_indices` are stacked into ``self.tensors[key]`` of shape ``(N, 1, H, W)`` for every key
    present (``image`` float32; ``brainmask``/``label`` bool). ``self.subject`` and ``self.slice`` give each
    slice's volume index and slice index, ``self.position`` its relative axial position in its (brain-cropped)
    volume, 0 at the first slice and 1 at the last. Items are dicts of ``(1, H, W)`` tensors plus
    ``subject``/``slice``.

    Args:
        data: datalist entries (``image`` and optionally ``brainmask``, ``label``).
        transform: the volume chain, e.g. :func:`pipeline.data.preprocessing.brain_volume_transform`.
        min_brain_fraction, border_slices: see :func:`brain_slice_indices`.
        keys: keys to keep.
        num_workers: processes for preprocessing.
        cache_dir: if given, preprocessed volumes are also cached on disk there (MONAI ``PersistentDataset``), so
            later runs on the same data skip NIfTI decoding and resampling.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        min_brain_fraction: float = 0.1,
        border_slices: int = 0,
        keys: Sequence[str] = ("image", "brainmask", "label"),
        mask_key: str = "brainmask",
        num_workers: int = 0,
        progress: bool = True,
        cache_dir: str | None = None,
    ) -> None:
        if len(data) == 0:
            raise ValueError("BrainSliceDataset got an empty data list; check the datalist and its key.")
        volumes = (Dataset(list(data), transform) if cache_dir is None
                   else PersistentDataset(list(data), transform, cache_dir=cache_dir))
        loader = torch.utils.data.DataLoader(volumes, batch_size=None, num_workers=num_workers,
                                             collate_fn=_unchanged)
        parts: dict[str, list[torch.Tensor]] = {}
        subject, slice_index, position = [], [], []
        for i, item in enumerate(tqdm(loader, total=len(data), desc="preprocessing", disable=not progress)):
            picked = brain_slice_indices(item[mask_key], min_brain_fraction, border_slices)
            for key in keys:
                if item.get(key) is not None:
                    vol = volume_to_slices(item[key].as_tensor() if hasattr(item[key], "as_tensor") else item[key])
                    parts.setdefault(key, []).append(vol[picked] if key == "image" else vol[picked] > 0)
            subject += [i] * len(picked)
            slice_index += picked
            depth = item[mask_key].shape[-1]
            position += [s / max(depth - 1, 1) for s in picked]
        if not subject:
            raise ValueError("no slice passed the selection (min_brain_fraction / border_slices too strict?).")
        uneven = [key for key, chunks in parts.items() if len(chunks) != len(data)]
        if uneven:
            raise ValueError(f"keys {uneven} are present for only some datalist entries; give them for all or none.")
        self.tensors = {key: torch.cat(chunks) for key, chunks in parts.items()}
        self.subject = torch.tensor(subject)
        self.slice = torch.tensor(slice_index)
        self.position = torch.tensor(position)

    def __len__(self) -> int:
        return len(self.subject)

    def __getitem__(self, index: int) -> dict:
        item = {key: (t[index] if t.dtype != torch.bool else t[index].float()) for key, t in self.tensors.items()}
        item["subject"] = self.subject[index]
        item["slice"] = self.slice[index]
        return item


def _unchanged(item: dict) -> dict:
    """Collate function of the preprocessing loader: volumes are passed through as they are."""
    return item
