"""Checks on freshly loaded volumes, so that bad input fails with a message naming the file and the fix."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["CheckVolumesd", "InputError", "source_of"]


class InputError(ValueError):
    """Bad input data: the message names the file and says what to do."""


def source_of(img: object) -> str:
    """The file an image was loaded from (``"<in-memory image>"`` otherwise)."""
    if isinstance(img, MetaTensor):
        return str(img.meta.get("filename_or_obj", "<in-memory image>"))
    return "<in-memory image>"


class CheckVolumesd(MapTransform):
    """Validate channel-first 3D volumes right after ``LoadImaged`` + ``EnsureChannelFirstd``.

    For the image key (the first of ``keys``): one channel, three spatial axes, finite values, not constant.
    For every other key present (brain mask, label): finite, and the same grid as the image (spatial shape
    equal, affine equal within ``affine_atol``). Raises :class:`InputError` naming the file(s).
    """

    def __init__(self, keys: KeysCollection, affine_atol: float = 1e-3, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.affine_atol = affine_atol

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image_key = self.keys[0]
        image = d[image_key]
        src = source_of(image)
        if image.ndim != 4:
            raise InputError(f"{src}: expected a 3D volume, got {image.ndim - 1} spatial dimensions "
                             f"(shape {tuple(image.shape[1:])}); give a 3D NIfTI volume.")
        if image.shape[0] != 1:
            raise InputError(f"{src}: has {image.shape[0]} volumes (a 4D series); extract one 3D volume first "
                             "(e.g. with fslroi or nibabel's image slicer).")
        _check_finite(image, src)
        if float(image.max()) == float(image.min()):
            raise InputError(f"{src}: every voxel has the value {float(image.min())}; the image is empty.")
        for key in self.key_iterator(d):
            if key == image_key or d[key] is None:
                continue
            other = d[key]
            other_src = source_of(other)
            _check_finite(other, other_src)
            if tuple(other.shape[1:]) != tuple(image.shape[1:]):
                raise InputError(f"{other_src} ({key}) has shape {tuple(other.shape[1:])} but {src} has "
                                 f"{tuple(image.shape[1:])}; resample it onto the image grid.")
            if isinstance(other, MetaTensor) and isinstance(image, MetaTensor):
                delta = float(np.abs(np.asarray(other.affine) - np.asarray(image.affine)).max())
                if delta > self.affine_atol:
                    raise InputError(f"{other_src} ({key}) and {src} have different affines (max difference "
                                     f"{delta:.4g}); they are not on the same grid, resample one onto the other.")
        return d


def _check_finite(img: torch.Tensor, src: str) -> None:
    bad = int((~torch.isfinite(torch.as_tensor(img))).sum())
    if bad:
        raise InputError(f"{src}: {bad} voxels are NaN or Inf; fix or re-export the file.")
