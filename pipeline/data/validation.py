"""Checks on freshly loaded volumes, so that bad input fails with a message naming the file and the fix."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform

from pipeline.errors import InputError

__all__ = ["MAX_VOXELS", "CheckVolumesd", "LoadVolumed", "check_nifti_header", "source_of"]

MAX_VOXELS = 2048**3 // 8  # ~1.07e9 voxels (4 GiB as float32): larger headers are refused before loading


def source_of(img: Any) -> str:
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
            raise InputError(
                f"{src}: expected a 3D volume, got {image.ndim - 1} spatial dimensions "
                f"(shape {tuple(image.shape[1:])}); give a 3D NIfTI volume."
            )
        if image.shape[0] != 1:
            raise InputError(
                f"{src}: has {image.shape[0]} volumes (a 4D series); extract one 3D volume first "
                "(e.g. with fslroi or nibabel's image slicer)."
            )
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
                raise InputError(
                    f"{other_src} ({key}) has shape {tuple(other.shape[1:])} but {src} has "
                    f"{tuple(image.shape[1:])}; resample it onto the image grid."
                )
            if isinstance(other, MetaTensor) and isinstance(image, MetaTensor):
                delta = float(np.abs(np.asarray(other.affine) - np.asarray(image.affine)).max())
                if delta > self.affine_atol:
                    raise InputError(
                        f"{other_src} ({key}) and {src} have different affines (max difference "
                        f"{delta:.4g}); they are not on the same grid, resample one onto the other."
                    )
        return d


def _check_finite(img: torch.Tensor, src: str) -> None:
    bad = int((~torch.isfinite(torch.as_tensor(img))).sum())
    if bad:
        raise InputError(f"{src}: {bad} voxels are NaN or Inf; fix or re-export the file.")


def check_nifti_header(path: str, max_voxels: int = MAX_VOXELS) -> nib.spatialimages.SpatialImage:
    """Read only the header of ``path`` and return the (not yet loaded) image.

    Raises :class:`InputError` for a missing file, a file that is not NIfTI (or is unreadable), and a header
    declaring more than ``max_voxels`` voxels (refused before any memory is allocated for the data)."""
    try:
        img = nib.load(path)
    except FileNotFoundError as err:
        raise InputError(f"{path}: file not found; check the path in the datalist.") from err
    except Exception as err:  # nibabel raises several types for foreign or broken headers
        raise InputError(
            f"{path}: cannot be read as NIfTI ({err}); give a .nii/.nii.gz file, or re-export it."
        ) from err
    shape = tuple(int(s) for s in img.shape)
    if int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise InputError(
            f"{path}: the header declares shape {shape} ({np.prod(shape, dtype=np.int64):.3g} voxels), "
            f"over the limit of {max_voxels:.3g}; the file is corrupt or not a brain volume."
        )
    return img


class LoadVolumed(LoadImaged):
    """MONAI's ``LoadImaged`` with errors that name the file: every path's header is checked first
    (:func:`check_nifti_header`), and a failure while decoding the data (e.g. a truncated ``.nii.gz``) is re-raised
    as :class:`InputError` naming the file."""

    def __call__(self, data, reader=None):
        for key in self.key_iterator(dict(data)):
            if data[key] is not None:
                check_nifti_header(str(data[key]))
        try:
            return super().__call__(data, reader)
        except Exception as err:
            files = ", ".join(str(data[k]) for k in self.key_iterator(dict(data)) if data[k] is not None)
            raise InputError(
                f"cannot load {files} ({err}); the file is truncated or corrupt: re-export or re-download it."
            ) from err
