"""The grey scale that brain images are drawn with in the figures (training's reconstructions, evaluation's
panels): one window from the brain's own intensities, whatever their normalisation."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike

__all__ = ["display_window"]


def display_window(images: ArrayLike, masks: ArrayLike | None = None, percent: float = 0.5) -> tuple[float, float]:
    """Grey-scale window ``(low, high)`` for ``images`` (any shape; an array, or a tensor on the CPU): the
    ``percent`` and ``100 - percent`` percentiles of their brain pixels (``masks > 0``, same shape; all pixels
    without masks, or where the masks are empty). From the data, because the intensities' range depends on the
    normalisation: ``percentile`` gives [0, 1], ``zscore`` about -3..3 with the background at the brain's mean (0),
    so a fixed [0, 1] window drew a z-scored brain's darker half black."""
    images = torch.as_tensor(np.asarray(images, np.float32))
    values = images.flatten() if masks is None else images[torch.as_tensor(np.asarray(masks)) > 0]
    if values.numel() == 0:
        values = images.flatten()
    low, high = torch.quantile(values.cpu(), torch.tensor([percent / 100, 1 - percent / 100])).tolist()
    return (low, high) if high > low else (low, low + 1.0)
