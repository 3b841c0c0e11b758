"""The volume chain: skull-stripped brain volume on disk -> normalised volume of square axial slices.

Output of :func:`brain_volume_transform` for a data dict ``{"image": path, "brainmask": path?, "label": path?}``:

* ``image``: ``(1, S, S, D)`` float32, RAS. Brain voxels are normalised at the input's own resolution
  (:class:`~pipeline.data.transforms.BrainIntensityNormalize`) and everything outside the brain mask set to 0
  **before** any interpolation, so a skull (images that are not skull-stripped, given with a brain mask) or a
  negative background (z-scored files) never bleeds into the brain rim. Then cropped to the brain bounding box
  (+ ``margin``; where the field of view cuts the brain in-plane, padded to a healthy brain's extent:
  :mod:`pipeline.data.field_of_view`), padded to a square in-plane and resized in-plane to ``S = image_size``
  (Gaussian anti-aliasing first, as in skimage; the slice axis, last and axial, keeps its voxels), and masked
  again with the resized mask: background exactly 0. A whole-head image with its brain mask and its skull-stripped
  twin give the same output.
* ``brainmask``: ``(1, S, S, D)`` float32 0/1: the given mask (``> 0``, so label maps work) or, without one, the
  image foreground (:class:`~pipeline.data.transforms.ForegroundMask`).
* ``label``: ``(1, S, S, D)`` float32 0/1 (``label > 0``), through the same spatial chain with nearest-neighbour
  interpolation.
* ``class_key`` (optional, e.g. ``label_classes``): the label's original values (e.g. BraTS's 0-4 tumour classes)
  through the same spatial chain, not binarised, for metrics per lesion class.

Every spatial step is a MONAI invertible transform, so outputs can be mapped back to the input's geometry.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    CopyItemsd,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    MaskIntensityd,
    Orientationd,
    Resized,
    Spacingd,
)

from pipeline.data.field_of_view import CutFieldOfViewPadd
from pipeline.data.transforms import AntiAliasd, Binarized, BrainIntensityNormalized, ForegroundMaskd, SquarePadd
from pipeline.data.validation import CheckVolumesd, LoadVolumed

__all__ = ["PREPROCESSING_VERSION", "brain_volume_transform"]

PREPROCESSING_VERSION = 3  # bump whenever the chain below changes what it outputs: cached slices are then rebuilt


def brain_volume_transform(
    image_size: int = 64,
    pixdim: Sequence[float] | None = None,
    margin: int = 2,
    normalization: str = "percentile",
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    background: float | str = "corner",
    image_key: str = "image",
    mask_key: str = "brainmask",
    label_key: str = "label",
    class_key: str | None = None,
    load: bool = True,
) -> Compose:
    """Build the volume chain (see the module docstring).

    Args:
        image_size: in-plane output side ``S`` (64 as in the paper; 128, 192, 256 work too).
        pixdim: optional target spacing in mm (e.g. ``(1, 1, 1)``) applied after reorientation.
        margin: voxels kept around the brain bounding box before padding.
        normalization: ``"percentile"`` (clip to the brain's percentiles, scale to [0, 1]), ``"zscore"`` or
            ``"equalize"`` (:class:`~pipeline.data.transforms.BrainIntensityNormalize`).
        lower_percentile, upper_percentile: the percentiles for ``"percentile"``.
        background: background value used to derive a mask when none is given, or ``"corner"``.
        class_key: if given, a copy of the label under this key keeps its original values (see above).
        load: False if the dict already holds channel-first tensors (skips loading).
    """
    keys = [image_key, mask_key, label_key] + ([class_key] if class_key else [])
    spatial_modes = ("trilinear",) + ("nearest-exact",) * (len(keys) - 1)  # torch "nearest" shifts by half a voxel
    steps = []
    if load:
        steps += [
            LoadVolumed(keys, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
        ]
    steps += [
        CheckVolumesd(keys),
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
    ]
    if pixdim is not None:
        steps.append(
            Spacingd(
                keys, pixdim=tuple(pixdim), mode=("bilinear",) + ("nearest",) * (len(keys) - 1), allow_missing_keys=True
            )
        )
    if class_key:
        steps.append(CopyItemsd(label_key, names=class_key, allow_missing_keys=True))
    steps += [
        ForegroundMaskd(image_key, mask_key=mask_key, background=background),
        Binarized(label_key, allow_missing_keys=True),
        # normalised at native resolution, background exactly 0: skull or a negative background cannot bleed into
        # brain-rim voxels through the interpolation below
        BrainIntensityNormalized(
            image_key, mask_key=mask_key, mode=normalization, lower=lower_percentile, upper=upper_percentile
        ),
        CropForegroundd(keys, source_key=mask_key, margin=margin, allow_smaller=True, allow_missing_keys=True),
        CutFieldOfViewPadd(keys, mask_key=mask_key, allow_missing_keys=True),  # a cut brain framed as an uncut one
        SquarePadd(keys, allow_missing_keys=True),
        AntiAliasd(image_key, spatial_size=(image_size, image_size, -1)),  # = MONAI's anti-aliasing, faster
        Resized(keys, spatial_size=(image_size, image_size, -1), mode=spatial_modes, allow_missing_keys=True),
        Binarized([mask_key, label_key], threshold=0.5, allow_missing_keys=True),
        MaskIntensityd(image_key, mask_key=mask_key),  # re-mask on the resized grid: background exactly 0 again
        EnsureTyped(keys, dtype="float32", allow_missing_keys=True),
    ]
    chain = Compose(steps)
    # what makes its output what it is: the key of the slice cache (pipeline.data.slice_cache)
    chain.cache_settings = {
        "chain": "brain_volume",
        "version": PREPROCESSING_VERSION,
        "image_size": image_size,
        "pixdim": list(pixdim) if pixdim is not None else None,
        "margin": margin,
        "normalization": normalization,
        "percentiles": [lower_percentile, upper_percentile],
        "background": background,
        "keys": keys,
        "load": load,
    }
    return chain
