"""Anomaly scores of the ceVAE, one place for all of them.

Slice score: the negative ELBO ``rec(x, g(mu(x))) + KL(q(z|x) || N(0, I))`` per slice, with the same per-sample
terms as the training loss (:mod:`pipeline.losses`); the reconstruction is decoded from the encoder mean, so the
score is deterministic.

Pixel scores (:func:`raw_scores` then :func:`score_maps`; whole volumes: :func:`score_volume`), for a batch of
slices ``(B, 1, H, W)``:

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

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.networks.layers import gaussian_1d, separable_filtering
from scipy import ndimage

from pipeline.data.slices import volume_to_slices
from pipeline.data.transforms import equalize_in_brain
from pipeline.losses import kl_divergence, reconstruction_error
from pipeline.metrics import remove_small_components

__all__ = [
    "PAPER",
    "SCORE_NAMES",
    "ScoreOptions",
    "elbo_terms",
    "kl_gradient",
    "postprocess_volume",
    "raw_scores",
    "score_maps",
    "score_volume",
    "segment",
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


def _slice_terms(net: torch.nn.Module, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, reconstruction: str,
                 sigma: float, kl_weight: float) -> dict[str, torch.Tensor]:
    recon = net.decode(mu)
    rec = reconstruction_error(x, recon, reconstruction, sigma)
    kl = kl_divergence(mu, logvar)
    return {"recon": recon, "mu": mu, "rec": rec, "kl": kl, "neg_elbo": rec + kl_weight * kl}


def elbo_terms(network: torch.nn.Module, x: torch.Tensor, reconstruction: str = "l2", sigma: float = 1.0,
               kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-slice terms for a batch ``x`` ``(B, C, H, W)``.

    Returns ``recon`` ``(B, C, H, W)`` (decoded mean), ``mu`` ``(B, Z)`` and ``rec``, ``kl``, ``neg_elbo`` ``(B,)``;
    ``neg_elbo = rec + kl_weight * kl`` is the VAE term of the training loss (``kl_weight`` as in training).
    """
    net = _encoder_decoder(network)
    mu, logvar = net.encode(x)
    return _slice_terms(net, x, mu, logvar, reconstruction, sigma, kl_weight)


def _encode_with_kl_gradient(net: torch.nn.Module, x: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mu, logvar, |dKL/dx|)`` from one encoder pass and one batched backward pass (the KL of a slice depends
    only on that slice, so the gradient of the summed KL is every slice's own gradient)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        mu, logvar = net.encode(x)
        (grad,) = torch.autograd.grad(kl_divergence(mu, logvar).sum(), x)
    return mu.detach(), logvar.detach(), grad.abs()


def kl_gradient(network: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``|dKL(q(z|x_b) || N(0, I)) / dx_b|`` for every slice ``b`` of ``x`` ``(B, C, H, W)``, in one backward pass."""
    return _encode_with_kl_gradient(_encoder_decoder(network), x)[2]


def raw_scores(network: torch.nn.Module, x: torch.Tensor, reconstruction: str = "l2", kl_weight: float = 1.0
               ) -> dict[str, torch.Tensor]:
    """What every score is made of: :func:`elbo_terms` plus the raw ``kl_grad`` map, from one encoder pass, one
    backward pass and one decoder pass."""
    net = _encoder_decoder(network)
    mu, logvar, grad = _encode_with_kl_gradient(net, x)
    with torch.no_grad():
        terms = _slice_terms(net, x, mu, logvar, reconstruction, 1.0, kl_weight)
    return {**terms, "kl_grad": grad}


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


def score_volume(network: torch.nn.Module, image: torch.Tensor, brainmask: np.ndarray,
                 configs: Mapping[str, ScoreOptions], reconstruction: str = "l2", batch_size: int = 64,
                 scores: Sequence[str] = SCORE_NAMES, device: str | torch.device = "cpu", kl_weight: float = 1.0
                 ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, np.ndarray]]]:
    """Score a whole preprocessed volume, slice batch by slice batch.

    Args:
        image: ``(1, H, W, D)`` volume (axial slices last).
        brainmask: ``(H, W, D)`` boolean brain mask.
        configs: option sets to derive maps for (the network passes are shared by all of them).
        scores: the maps to keep, among :data:`SCORE_NAMES`.
        kl_weight: the KL weight of training (slice score ``neg_elbo = rec + kl_weight * kl``).

    Returns:
        ``(terms, maps)``: per-slice ``recon`` ``(D, 1, H, W)``, ``mu``, ``rec``, ``kl``, ``neg_elbo`` on the CPU, and
        ``maps[config][score]``, ``(H, W, D)`` float32 volumes with every volume-level option of ``config`` applied.
    """
    slices = volume_to_slices(image)
    chunks: dict[str, list[torch.Tensor]] = {}
    parts: dict[str, dict[str, list[torch.Tensor]]] = {c: {s: [] for s in scores} for c in configs}
    for start in range(0, slices.shape[0], batch_size):
        x = slices[start:start + batch_size].to(device)
        raw = raw_scores(network, x, reconstruction, kl_weight)
        for key in ("recon", "mu", "rec", "kl", "neg_elbo"):
            chunks.setdefault(key, []).append(raw[key].cpu())
        for config, options in configs.items():
            derived = score_maps(raw, x, options)
            for score in scores:
                parts[config][score].append(derived[score].cpu()[:, 0])
    maps: dict[str, dict[str, np.ndarray]] = {}
    for config, options in configs.items():
        maps[config] = {}
        for score in scores:
            volume = torch.cat(parts[config][score]).permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, D)
            if score == "intensity" and options.equalize_intensity:
                volume = equalize_in_brain(volume, brainmask)
            maps[config][score] = postprocess_volume(volume, brainmask, options)
    return {k: torch.cat(v) for k, v in chunks.items()}, maps


def segment(volume: np.ndarray, brainmask: np.ndarray, threshold: float, options: ScoreOptions) -> np.ndarray:
    """The segmentation of one score volume: ``score >= threshold`` inside the brain, small components removed."""
    return remove_small_components((volume >= threshold) & (brainmask > 0), options.min_component_size)
