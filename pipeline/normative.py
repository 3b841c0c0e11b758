"""Normative anomaly maps: how far a map lies from what healthy subjects show at the same place, in units of their
spread (a z-map). The same reconstruction error means little in the ventricles or at the cortex, where healthy
brains differ a lot, and much in white matter, where they hardly differ; a z-map weighs both by the healthy data.

The healthy reference of one map is a coarse grid over the preprocessed volume, :data:`CELLS` x :data:`CELLS`
in-plane cells and :data:`BINS` bins of relative axial position over the brain's extent (0 at its lowest slice, 1
at its highest: the same anatomy falls in the same bin whatever the field of view), holding the mean and standard
deviation of the map over the brain voxels of the healthy validation volumes in each cell. Why coarse: a handful
of healthy subjects give a few hundred voxels per cell (``4 x 4`` pixels x ~6 slices x ~6 subjects at 64 pixels),
enough for a spread within a few per cent, where a per-pixel spread would rest on a few dozen noisy values.
Cells with few brain voxels borrow from the whole brain: a cell's mean is shrunk towards the brain's mean and its
variance towards the brain's pooled within-cell variance, each with the weight of :data:`PRIOR_VOXELS` voxels (a
cell at the brain's edge with a handful of voxels never gets a spread of 0; a cell of a few hundred is moved by a
few per cent at most). The pooled *within-cell* variance, not the whole brain's, is the target: the latter also
holds how much the means differ between cells, which is what the grid is there to take out.

:meth:`NormativeReference.z_map` turns a map volume into a z-map: the grid's means and spreads are interpolated
bilinearly in-plane and linearly along the axial position, then ``(map - mean) / std`` voxel by voxel.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BINS", "CELLS", "PRIOR_VOXELS", "NormativeAccumulator", "NormativeReference", "axial_position"]

CELLS = 16
BINS = 8
PRIOR_VOXELS = 10.0


def axial_position(brainmask: np.ndarray) -> np.ndarray:
    """``(D,)`` relative axial position of every slice of an ``(H, W, D)`` brain mask: 0 at the lowest slice holding
    brain, 1 at the highest, outside that range clipped to 0 or 1 (all 0.5 without any brain)."""
    depth = brainmask.shape[-1]
    holding = np.flatnonzero(np.asarray(brainmask).reshape(-1, depth).any(axis=0))
    if holding.size == 0:
        return np.full(depth, 0.5)
    low, high = holding[0], holding[-1]
    return np.clip((np.arange(depth) - low) / max(high - low, 1), 0.0, 1.0)


def _cell_index(shape: tuple[int, int, int], brainmask: np.ndarray) -> np.ndarray:
    """``(H, W, D)`` flat cell index (``bin * CELLS**2 + row * CELLS + column``) of every voxel."""
    height, width, _ = shape
    rows = np.minimum(np.arange(height) * CELLS // height, CELLS - 1)
    columns = np.minimum(np.arange(width) * CELLS // width, CELLS - 1)
    bins = np.minimum((axial_position(brainmask) * BINS).astype(int), BINS - 1)
    return bins[None, None, :] * CELLS * CELLS + rows[:, None, None] * CELLS + columns[None, :, None]


class NormativeAccumulator:
    """Per-cell sums of one map over the brain voxels of healthy volumes; :meth:`reference` gives the
    :class:`NormativeReference`."""

    def __init__(self) -> None:
        size = BINS * CELLS * CELLS
        self.count, self.total, self.squares = np.zeros(size), np.zeros(size), np.zeros(size)

    @classmethod
    def pooled(cls, parts: Sequence[NormativeAccumulator]) -> NormativeAccumulator:
        """One accumulator holding the sums of all ``parts``."""
        out = cls()
        for part in parts:
            out.count, out.total, out.squares = (
                out.count + part.count,
                out.total + part.total,
                out.squares + part.squares,
            )
        return out

    def add(self, volume: np.ndarray, brainmask: np.ndarray) -> None:
        """Add the brain voxels of one ``(H, W, D)`` map volume (``brainmask`` of the same shape)."""
        brain = np.asarray(brainmask) > 0
        cells = _cell_index(volume.shape, brain)[brain]
        values = np.asarray(volume, dtype=np.float64)[brain]
        size = self.count.size
        self.count += np.bincount(cells, minlength=size)
        self.total += np.bincount(cells, weights=values, minlength=size)
        self.squares += np.bincount(cells, weights=values**2, minlength=size)

    def reference(self) -> NormativeReference:
        """Mean and standard deviation per cell, shrunk towards the whole brain's (the module docstring)."""
        n = self.count.sum()
        if n == 0:
            raise ValueError("a normative reference needs brain voxels of at least one healthy volume.")
        occupied = self.count > 0
        cell_mean = np.where(occupied, self.total / np.maximum(self.count, 1), 0.0)
        cell_variance = np.where(occupied, self.squares / np.maximum(self.count, 1) - cell_mean**2, 0.0)
        within = float((self.count * np.maximum(cell_variance, 0.0)).sum() / n)  # pooled within-cell variance
        if within <= 0:
            raise ValueError("the healthy maps are constant: no spread to measure deviations in.")
        weight = self.count + PRIOR_VOXELS
        mean = (self.count * cell_mean + PRIOR_VOXELS * self.total.sum() / n) / weight
        variance = (self.count * np.maximum(cell_variance, 0.0) + PRIOR_VOXELS * within) / weight
        shape = (BINS, CELLS, CELLS)
        return NormativeReference(mean.reshape(shape), np.sqrt(np.maximum(variance, 1e-12 * within)).reshape(shape))


class NormativeReference:
    """The healthy mean and spread of one map on the coarse grid, ``(BINS, CELLS, CELLS)`` each."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean, self.std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        if self.mean.shape != (BINS, CELLS, CELLS) or self.std.shape != self.mean.shape:
            raise ValueError(
                f"a normative reference is {(BINS, CELLS, CELLS)} means and spreads, got {self.mean.shape}."
            )
        if not (np.isfinite(self.mean).all() and (self.std > 0).all()):
            raise ValueError("a normative reference needs finite means and positive spreads.")

    def to_dict(self) -> dict:
        """Nested lists (JSON)."""
        return {"mean": np.round(self.mean, 8).tolist(), "std": np.round(self.std, 8).tolist()}

    @classmethod
    def from_dict(cls, entry: Mapping) -> NormativeReference:
        return cls(np.asarray(entry["mean"]), np.asarray(entry["std"]))

    def _expand(self, grid: np.ndarray, brainmask: np.ndarray) -> np.ndarray:
        """The ``(BINS, CELLS, CELLS)`` grid interpolated to the ``(H, W, D)`` voxels of ``brainmask``."""
        height, width, _ = brainmask.shape
        planes = F.interpolate(
            torch.from_numpy(grid)[None], size=(height, width), mode="bilinear", align_corners=False
        )[0].numpy()
        where = np.clip(axial_position(brainmask) * BINS - 0.5, 0, BINS - 1)  # bin centres at (b + 0.5) / BINS
        low = np.floor(where).astype(int)
        high = np.minimum(low + 1, BINS - 1)
        weight = (where - low)[None, None, :]
        return (1 - weight) * planes[low].transpose(1, 2, 0) + weight * planes[high].transpose(1, 2, 0)

    def z_map(self, volume: np.ndarray, brainmask: np.ndarray) -> np.ndarray:
        """``(volume - mean) / std`` of an ``(H, W, D)`` map volume, float32."""
        brain = np.asarray(brainmask) > 0
        z = (volume - self._expand(self.mean, brain)) / self._expand(self.std, brain)
        return z.astype(np.float32)
