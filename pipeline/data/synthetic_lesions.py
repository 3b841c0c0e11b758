"""Synthetic lesions inserted into healthy preprocessed volumes: what a label-free operating point can be chosen on.

No lesion label of any data set is used here, and no test set's lesions are copied. Each lesion is a **smooth blob**
in the brain: an ellipsoid of random size, elongation and orientation whose surface is bent by low-frequency noise,
with a soft edge. Its weight ``w`` (1 inside, falling to 0 over the edge, exactly 0 outside) blends one of four
changes into the volume:

* ``"hyper"`` / ``"hypo"``: the intensity raised / lowered by ``contrast`` times the brain's intensity spread (its
  standard deviation), clipped to the brain's intensity range;
* ``"foreign"``: foreign patch interpolation (Tan et al. 2020, "Detecting outliers with foreign patch
  interpolation"): the voxels of **another healthy volume** at the same relative position, so the lesion has
  plausible tissue in the wrong place;
* ``"texture"``: smooth zero-mean noise of ``contrast`` times the brain spread: the local structure changes while the
  mean intensity stays, which intensity thresholding cannot see.

The returned mask is the blob's support inside the brain: every voxel the transform changed lies in it, and nothing
outside it changes (tested). Sizes are in voxels of the preprocessed grid (64x64 in-plane by default).
:class:`SyntheticLesion` works on arrays, :class:`SyntheticLesiond` on the dictionaries of
:func:`pipeline.data.preprocessing.brain_volume_transform`; both draw from ``self.R`` (``set_random_state``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from scipy import ndimage

__all__ = ["LESION_KINDS", "SyntheticLesion", "SyntheticLesiond"]

LESION_KINDS = ("hyper", "hypo", "foreign", "texture")


class SyntheticLesion(Randomizable, Transform):
    """Insert one synthetic lesion into a ``(C, H, W, D)`` volume inside its ``(1, H, W, D)`` brain mask.

    Args:
        kinds: the kinds to draw from, uniformly (see the module docstring).
        radius: inclusive range of the ellipsoid's largest semi-axis, in voxels.
        contrast: inclusive range of the intensity change (``hyper``/``hypo``/``texture``) in units of the brain's
            intensity standard deviation; ``foreign`` ignores it.
        edge: width of the soft edge, as a fraction of the radius.

    ``transform(image, brainmask, foreign=None)`` returns ``(image with the lesion, lesion mask (1, H, W, D) uint8,
    kind)``; ``foreign`` (a volume on the same in-plane grid) is needed for the ``foreign`` kind.
    """

    def __init__(
        self,
        kinds: Sequence[str] = LESION_KINDS,
        radius: tuple[float, float] = (2.0, 10.0),
        contrast: tuple[float, float] = (1.0, 3.0),
        edge: float = 0.3,
    ) -> None:
        unknown = sorted(set(kinds) - set(LESION_KINDS))
        if not kinds or unknown:
            raise ValueError(f"kinds must be among {LESION_KINDS}, got {list(kinds)}.")
        if not 0 < radius[0] <= radius[1] or not 0 < contrast[0] <= contrast[1] or not 0 < edge < 1:
            raise ValueError(
                f"need radius and contrast ranges with 0 < lo <= hi and 0 < edge < 1, got {radius}, {contrast}, {edge}."
            )
        self.kinds, self.radius, self.contrast, self.edge = tuple(kinds), radius, contrast, edge

    def blob(self, shape: tuple[int, int, int], brain: np.ndarray) -> np.ndarray:
        """The soft weight ``(H, W, D)`` in [0, 1] of one blob centred on a random brain voxel, 0 outside the
        brain."""
        centre = np.argwhere(brain)[self.R.randint(int(brain.sum()))]
        radii = self.R.uniform(*self.radius) * self.R.uniform(0.5, 1.0, size=3)
        radii[self.R.randint(3)] = radii.max()  # the largest semi-axis is the drawn radius
        rotation, _ = np.linalg.qr(self.R.normal(size=(3, 3)))
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1) - centre
        local = grid @ rotation
        r = np.sqrt(((local / radii) ** 2).sum(axis=-1))  # 1 on the ellipsoid's surface
        bend = ndimage.gaussian_filter(self.R.normal(size=shape), sigma=max(radii.max() / 2, 1.0))
        r = r * (1 + 0.25 * bend / max(float(np.abs(bend).max()), 1e-12))
        weight = np.clip((1 + self.edge - r) / self.edge, 0.0, 1.0)
        return weight * brain

    def __call__(
        self, image: torch.Tensor | np.ndarray, brainmask: torch.Tensor | np.ndarray, foreign=None
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        volume = torch.as_tensor(image, dtype=torch.float32).clone()
        brain = np.asarray(brainmask)[0] > 0
        if not brain.any():
            raise ValueError("the brain mask is empty: nowhere to put a lesion.")
        kind = self.kinds[self.R.randint(len(self.kinds))]
        if kind == "foreign" and foreign is None:
            raise ValueError("a 'foreign' lesion needs another healthy volume (foreign=...).")
        weight = torch.from_numpy(self.blob(brain.shape, brain)).float()
        inside = volume[:, torch.from_numpy(brain)]
        lo, hi, spread = float(inside.min()), float(inside.max()), float(inside.std())
        change = self.R.uniform(*self.contrast) * spread
        if kind in ("hyper", "hypo"):
            target = (volume + change if kind == "hyper" else volume - change).clamp(lo, hi)
        elif kind == "texture":  # smooth noise whose weighted mean over the lesion is 0: its mean intensity stays
            noise = ndimage.gaussian_filter(self.R.normal(size=brain.shape), sigma=1.0)
            w = weight.double().numpy()
            noise -= (w * noise).sum() / w.sum()
            noise /= max(float(np.sqrt((w * noise**2).sum() / w.sum())), 1e-12)
            target = volume + change * torch.from_numpy(noise).float()
        else:
            target = _same_position(torch.as_tensor(foreign, dtype=torch.float32), volume.shape)
        lesioned = (1 - weight) * volume + weight * target  # exactly the volume where w = 0, the target where 1
        return lesioned, (weight > 0).to(torch.uint8)[None], kind


def _same_position(foreign: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``foreign`` ``(C, H, W, D')`` resampled along its slice axis to ``D`` slices (the same relative axial
    position), nearest slice; the in-plane grids must match."""
    if foreign.shape[:3] != shape[:3]:
        raise ValueError(f"the foreign volume's grid {tuple(foreign.shape[:3])} differs from {tuple(shape[:3])}.")
    index = torch.linspace(0, foreign.shape[-1] - 1, shape[-1]).round().long()
    return foreign[..., index]


class SyntheticLesiond(Randomizable, MapTransform):
    """Dictionary twin of :class:`SyntheticLesion`: ``image`` gets the lesion, ``label_key`` its mask (uint8
    ``(1, H, W, D)``), ``kind_key`` its kind; ``foreign_key`` (optional) holds another healthy subject's image."""

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: str = "brainmask",
        label_key: str = "label",
        kind_key: str = "lesion_kind",
        foreign_key: str | None = "foreign",
        **kwargs,
    ) -> None:
        super().__init__(keys)
        self.mask_key, self.label_key, self.kind_key, self.foreign_key = mask_key, label_key, kind_key, foreign_key
        self.lesion = SyntheticLesion(**kwargs)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.lesion.set_random_state(state=self.R)
        return self

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        foreign = d.get(self.foreign_key) if self.foreign_key else None
        for key in self.key_iterator(d):
            d[key], d[self.label_key], d[self.kind_key] = self.lesion(d[key], d[self.mask_key], foreign)
        return d
