"""Anomaly scores of the ceVAE, one place for all of them.

Slice score: the negative ELBO ``rec(x, g(mu(x))) + KL(q(z|x) || N(0, I))`` per slice, with the same per-sample
terms as the training loss (:mod:`pipeline.losses`); the reconstruction is decoded from the encoder mean, so the
score is deterministic.

Pixel scores (:func:`pixel_scores`), for a batch of slices ``(B, 1, H, W)``:

* ``rec``: reconstruction error ``|x - g(mu(x))|`` (or ``max(x - g(mu(x)), 0)`` with ``positive_residuals``);
* ``kl_grad``: ``|dKL/dx|``, every slice's own gradient from **one** batched backward pass (the KL of a slice
  depends only on that slice, so the gradient of the summed KL is the per-slice gradient);
* ``combined``: ``rec * kl_grad``, the paper's Eq. 2;
* ``intensity``: the normalised input itself, the thresholding baseline.

Every option of :class:`ScoreOptions` is off in :data:`PAPER` (the paper's plain definitions); the bundle's
evaluation reports a post-processed variant beside it. Volume-level options (brain-mask multiplication with
erosion, 3D median filter) apply in :func:`postprocess_volume`; the removal of small connected components acts on
thresholded segmentations (:mod:`pipeline.metrics`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.networks.layers import gaussian_1d, separable_filtering
from scipy import ndimage

from pipeline.losses import kl_divergence, reconstruction_error

__all__ = [
    "PAPER",
    "SCORE_NAMES",
    "ScoreOptions",
    "elbo_terms",
    "equalize_in_brain",
    "kl_gradient",
    "pixel_scores",
    "postprocess_volume",
    "raw_scores",
    "score_maps",
]

SCORE_NAMES = ("rec", "kl_grad", "combined", "intensity")


@dataclass(frozen=True)
class ScoreOptions:
    """Scoring knobs, each documented and off by default.

    Args:
        positive_residuals: ``rec = max(x - recon, 0)`` (lesions brighter than expected only) instead of ``|x - recon|``.
        grad_sigma: Gaussian smoothing (sigma in pixels) of the KL-gradient map (0 = off); the authors' code uses 3.
        grad_kernel: side of the smoothing kernel in pixels (the authors' code: 7).
        normalize_slices: min-max normalise the KL-gradient map of each slice to [0, 1] (per slice, so a score
            never depends on the other slices of a batch, unlike the batch-global normalisation of public code).
        brain_mask: multiply every map by the brain mask.
        mask_erosion: erode the brain mask by this many voxels first (suppresses the brain-border rim).
        median_size: size of a 3D median filter applied to each map volume (0 = off; 5 in Baur et al.).
        min_component_size: in segmentations, remove 3D connected components smaller than this (0 = off).
        equalize_intensity: histogram-equalise the ``intensity`` baseline inside each volume's brain (its values
            become their brain-voxel quantiles), the usual strong thresholding baseline.
    """

    positive_residuals: bool = False
    grad_sigma: float = 0.0
    grad_kernel: int = 7
    normalize_slices: bool = False
    brain_mask: bool = False
    mask_erosion: int = 0
    median_size: int = 0
    min_component_size: int = 0
    equalize_intensity: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


PAPER = ScoreOptions()


def _encoder_decoder(network: torch.nn.Module) -> torch.nn.Module:
    """The CeVAE inside an optional DDP/DataParallel wrapper."""
    return getattr(network, "module", network)


def elbo_terms(network: torch.nn.Module, x: torch.Tensor, reconstruction: str = "l2", sigma: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """Per-slice terms for a batch ``x`` ``(B, C, H, W)``.

    Returns ``recon`` ``(B, C, H, W)`` (decoded mean), ``mu`` ``(B, Z)`` and ``rec``, ``kl``, ``neg_elbo`` ``(B,)``.
    """
    net = _encoder_decoder(network)
    mu, logvar = net.encode(x)
    recon = net.decode(mu)
    rec = reconstruction_error(x, recon, reconstruction, sigma)
    kl = kl_divergence(mu, logvar)
    return {"recon": recon, "mu": mu, "rec": rec, "kl": kl, "neg_elbo": rec + kl}


def kl_gradient(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|dKL(q(z|x_b) || N(0, I)) / dx_b|`` for every slice ``b`` of ``x`` ``(B, C, H, W)``, in one backward pass."""
    net = _encoder_decoder(network)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        mu, logvar = net.encode(x)
        (grad,) = torch.autograd.grad(kl_divergence(mu, logvar).sum(), x)
    return grad.abs()


def pixel_scores(network: torch.nn.Module, x: torch.Tensor, options: ScoreOptions = PAPER,
                 reconstruction: str = "l2") -> dict[str, torch.Tensor]:
    """Slice terms (see :func:`elbo_terms`) and the pixel maps ``rec``, ``kl_grad``, ``combined``, ``intensity``
    (each ``(B, C, H, W)``) of a batch of slices, with the slice-level options of ``options`` applied."""
    raw = raw_scores(network, x, reconstruction)
    return {**raw, **score_maps(raw, x, options)}


def raw_scores(network: torch.nn.Module, x: torch.Tensor, reconstruction: str = "l2") -> dict[str, torch.Tensor]:
    """What every score is made of: :func:`elbo_terms` plus the raw ``kl_grad`` map. One forward, one backward."""
    with torch.no_grad():
        terms = elbo_terms(network, x, reconstruction)
    return {**terms, "kl_grad": kl_gradient(network, x)}


def score_maps(raw: dict[str, torch.Tensor], x: torch.Tensor, options: ScoreOptions) -> dict[str, torch.Tensor]:
    """The pixel maps of one option set from :func:`raw_scores` (cheap: no network pass)."""
    residual = x - raw["recon"]
    rec = residual.clamp_min(0) if options.positive_residuals else residual.abs()
    grad = raw["kl_grad"]
    if options.grad_sigma > 0:
        radius = (options.grad_kernel - 1) / 2
        kernel = gaussian_1d(torch.tensor(options.grad_sigma), truncated=radius / options.grad_sigma,
                             approx="sampled", normalize=True).to(grad)
        grad = separable_filtering(grad, [kernel, kernel], mode="zeros")
    if options.normalize_slices:
        lo = grad.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = grad.flatten(1).amax(1).view(-1, 1, 1, 1)
        grad = (grad - lo) / (hi - lo).clamp_min(1e-12)
    return {"rec": rec, "kl_grad": grad, "combined": rec * grad, "intensity": x.detach()}


def postprocess_volume(volume: np.ndarray, brainmask: np.ndarray, options: ScoreOptions) -> np.ndarray:
    """Volume-level options on one ``(H, W, D)`` score map: brain mask (eroded) and 3D median filter."""
    out = volume
    if options.median_size > 1:
        out = ndimage.median_filter(out, size=options.median_size)
    if options.brain_mask:
        mask = brainmask > 0
        if options.mask_erosion > 0:
            mask = ndimage.binary_erosion(mask, iterations=options.mask_erosion)
        out = out * mask
    return out


def equalize_in_brain(volume: np.ndarray, brainmask: np.ndarray) -> np.ndarray:
    """Histogram equalisation inside the brain: each brain voxel becomes its quantile (0-1) among the brain voxels;
    ties share their mean rank, the background is 0."""
    from scipy.stats import rankdata

    brain = brainmask > 0
    out = np.zeros_like(volume, dtype=np.float32)
    if brain.any():
        out[brain] = rankdata(volume[brain]) / brain.sum()
    return out
