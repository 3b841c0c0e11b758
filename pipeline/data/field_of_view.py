"""A field of view that cuts the brain in-plane: restore the brain's expected extent before it is framed.

The volume chain (:mod:`pipeline.data.preprocessing`) crops every volume to its brain's bounding box and resizes it
to a square frame, so that every brain fills the frame alike. A scan whose field of view cuts the brain (a frontal
lobe outside the image, common in clinical scans) has a shorter box: its brain is framed larger and shifted, and
the whole brain then differs from the healthy brains the model and its normative reference learnt. Measured on a
healthy IXI T1 validation subject with its frontal 15 % cut off: 12-18 % of its brain segmented as anomalous, against
none uncut (docs/benchmarks.md, "A field of view that cuts the brain").

:class:`CutFieldOfViewPad` finds in-plane faces where the brain touches the edge of its cropped box (brain voxels on
the outermost plane: at least ``min_face_fraction`` of the largest cross-section along that axis), estimates the
missing extent from the other in-plane axis and the healthy anterior-posterior / left-right ratio of brain extents
(:data:`AP_LR_RATIO`) and pads the cut face(s) with background by that much. The brain then keeps the scale and
place in the frame of an uncut one; the padding lies outside the brain mask, so it is never scored. An uncut brain
is left exactly as it was; with both in-plane axes cut nothing is estimated (a warning). Invertible like every MONAI
pad (inference maps its outputs back to the input's grid).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Pad, Padd

__all__ = ["AP_LR_RATIO", "CutFieldOfViewPad", "CutFieldOfViewPadd", "cut_padding"]

logger = logging.getLogger(__name__)

# median anterior-posterior / left-right extent (mm) of the brain masks of the 40 healthy IXI T1 subjects of
# docs/benchmarks.md (5-95 %: 1.17-1.35); healthy data only
AP_LR_RATIO = 1.233
LR, AP = 0, 1  # in-plane axes of an RAS volume (axial slices last)


def _cut_faces(mask: np.ndarray, min_face_fraction: float) -> tuple[dict[int, list[bool]], dict[int, int]]:
    """Per in-plane axis of a cropped ``(X, Y, Z)`` mask: whether its low and high faces cut the brain (brain voxels
    on the outermost plane, at least ``min_face_fraction`` of the largest cross-section), and the brain's extent in
    planes."""
    faces, extents = {}, {}
    for axis in (LR, AP):
        counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
        planes, peak = np.flatnonzero(counts), counts.max(initial=0)
        faces[axis] = [bool(peak > 0 and counts[face] >= min_face_fraction * peak) for face in (0, -1)]
        extents[axis] = int(planes[-1] - planes[0] + 1) if planes.size else 0
    return faces, extents


def cut_padding(
    mask: np.ndarray, spacing: tuple[float, float, float], ratio: float = AP_LR_RATIO, min_face_fraction: float = 0.05
) -> tuple[tuple[int, int], ...]:
    """``((0, 0), (lr_low, lr_high), (ap_low, ap_high), (0, 0))``: the padding of the cut in-plane faces (voxels) of an
    ``(X, Y, Z)`` RAS brain mask cropped to its brain with a margin (as the volume chain crops it: an uncut brain's
    faces then hold no brain); all 0 for an uncut brain or one cut along both axes (the module docstring)."""
    return _padding(*_cut_faces(mask, min_face_fraction), spacing, ratio)


def _padding(
    faces: dict[int, list[bool]], extents: dict[int, int], spacing: tuple[float, float, float], ratio: float
) -> tuple[tuple[int, int], ...]:
    """:func:`cut_padding` from the faces and extents of :func:`_cut_faces`."""
    pad = {LR: (0, 0), AP: (0, 0)}
    cut_axes = [axis for axis in (LR, AP) if any(faces[axis])]
    if len(cut_axes) == 1:
        axis, other = cut_axes[0], AP if cut_axes[0] == LR else LR
        other_mm = extents[other] * spacing[other]
        expected_mm = other_mm * ratio if axis == AP else other_mm / ratio
        missing = math.ceil(expected_mm / spacing[axis]) - extents[axis]
        if missing > 0:
            low, high = faces[axis]
            pad[axis] = (missing // 2, missing - missing // 2) if low and high else (missing * low, missing * high)
    return ((0, 0), pad[LR], pad[AP], (0, 0))


def _name(mask: torch.Tensor) -> str:
    return str(getattr(mask, "meta", {}).get("filename_or_obj", "a volume"))


class CutFieldOfViewPad(Pad):
    """Pad a cropped ``(C, X, Y, Z)`` RAS volume where its brain is cut by the field of view (the module docstring).

    ``pad(img, mask)`` with ``mask`` the volume's ``(1, X, Y, Z)`` brain mask (default: ``img > 0``); spacing from
    the mask's metadata (``pixdim``; 1 mm without it). Returns ``(C, X', Y', Z)``, background 0 in the padding.
    """

    def __init__(self, ratio: float = AP_LR_RATIO, min_face_fraction: float = 0.05) -> None:
        super().__init__()
        self.ratio, self.min_face_fraction = ratio, min_face_fraction

    def widths(self, mask: torch.Tensor) -> tuple[tuple[int, int], ...]:
        """The padding :meth:`__call__` applies for this ``(1, X, Y, Z)`` brain mask; logs a warning for a cut."""
        array = np.asarray(mask[0].detach().cpu()) > 0
        spacing = tuple(float(s) for s in getattr(mask, "pixdim", (1.0, 1.0, 1.0))[:3])
        faces, extents = _cut_faces(array, self.min_face_fraction)
        widths = _padding(faces, extents, spacing, self.ratio)
        if any(any(w) for w in widths):
            logger.warning(
                "%s: the field of view cuts the brain in-plane; padded by %s voxels (left/right, posterior/anterior) "
                "to the extent of a healthy brain, so that it is framed like an uncut one",
                _name(mask),
                [list(w) for w in widths[1:3]],
            )
        elif all(any(f) for f in faces.values()):
            logger.warning(
                "%s: the field of view cuts the brain along both in-plane axes; its extent is not restored",
                _name(mask),
            )
        return widths

    def __call__(self, img: torch.Tensor, mask: torch.Tensor | None = None, to_pad=None, **kwargs) -> torch.Tensor:
        """``img`` padded by :meth:`widths` of ``mask``, or by ``to_pad`` when given (the padding of another key)."""
        to_pad = self.widths(img > 0 if mask is None else mask) if to_pad is None else to_pad
        return super().__call__(img, to_pad=to_pad, **kwargs)


class CutFieldOfViewPadd(Padd):
    """Dictionary twin of :class:`CutFieldOfViewPad`: every key padded alike, by the padding of ``mask_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "brainmask",
        ratio: float = AP_LR_RATIO,
        min_face_fraction: float = 0.05,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, padder=CutFieldOfViewPad(ratio, min_face_fraction), allow_missing_keys=allow_missing_keys
        )
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor], lazy: bool | None = None) -> dict:
        d = dict(data)
        widths = self.padder.widths(d[self.mask_key])
        for key in self.key_iterator(d):
            d[key] = self.padder(d[key], to_pad=widths)
        return d
