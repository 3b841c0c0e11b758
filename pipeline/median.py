"""The 3D median filter of the score maps, computed only where it is kept.

Score maps are median-filtered and then multiplied by the (eroded) brain mask (:func:`pipeline.scoring.
postprocess_volume`), so the filter's output is needed inside the mask only: about a third of a cropped demo volume,
a tenth of a BraTS-sized one. ``scipy.ndimage.median_filter`` has no mask argument and computes every voxel, so it is
replaced here (hand-written for that reason): each kept voxel's window is gathered from the volume padded as scipy
pads it (``mode="reflect"``, numpy's ``"symmetric"``), and its median is the window's element of rank ``size**3 //
2`` (scipy's rank for every size), found by ``np.partition``, in chunks on all of torch's threads (numpy releases the
GIL). The result is scipy's, voxel for voxel, inside the mask (tests/test_metrics_scoring.py compares them); 0
outside. Its speed-up over scipy's filter of the whole map is ``speedup_masked_median`` of ``scripts/benchmark.py``
(docs/performance.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

__all__ = ["median_filter"]

CHUNK = 4096  # windows per partition call: 4096 x 125 values fit in a core's cache; 16x more ran 5x slower


def median_filter(volume: np.ndarray, size: int, mask: np.ndarray | None = None) -> np.ndarray:
    """``scipy.ndimage.median_filter(volume, size=size)`` at the voxels of ``mask`` (every voxel without one), 0
    elsewhere.

    Args:
        volume: ``(H, W, D)`` map.
        size: edge of the cubic window (``size**3`` voxels, centred as scipy centres it for even sizes).
        mask: ``(H, W, D)`` boolean array, or None.

    Returns:
        ``(H, W, D)`` array of ``volume``'s dtype.
    """
    reach = size // 2
    padded = np.pad(volume, reach, mode="symmetric")
    where = np.nonzero(np.ones(volume.shape, bool) if mask is None else mask)
    flat_out = np.ravel_multi_index(where, volume.shape)
    corners = np.ravel_multi_index(where, padded.shape)  # a window's first voxel: the voxel itself, shifted by reach
    window = np.ravel_multi_index(np.indices((size,) * 3).reshape(3, -1), padded.shape)
    values, rank = padded.ravel(), window.size // 2
    out = np.zeros(volume.size, volume.dtype)

    def chunk(start: int) -> None:
        stop = start + CHUNK
        windows = values[corners[start:stop, None] + window[None]]
        out[flat_out[start:stop]] = np.partition(windows, rank, axis=1)[:, rank]

    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        list(pool.map(chunk, range(0, corners.size, CHUNK)))
    return out.reshape(volume.shape)
