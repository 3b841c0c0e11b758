"""Anomaly scores of the ceVAE, one place for all of them.

Slice score: the negative ELBO ``rec(x, g(mu(x))) + kl_weight * KL(q(z|x) || N(0, I))`` per slice, computed by the
training loss object itself (:meth:`pipeline.losses.CeVAELoss.terms`: the same likelihood, trained sigma and KL
weight), so it is the training objective's ELBO term by construction; the reconstruction is decoded from the
encoder mean, so the score is deterministic.

Pixel scores (:func:`raw_scores` then :func:`score_maps`; whole volumes: :func:`score_volume`), for a batch of
slices ``(B, 1, H, W)``:

* ``rec``: reconstruction error ``|x - g(mu(x))|`` (or ``max(x - g(mu(x)), 0)`` with ``positive_residuals``);
* ``kl_grad``: ``|dKL/dx|``, every slice's own gradient from **one** batched backward pass (the KL of a slice
  depends only on that slice, so the gradient of the summed KL is the per-slice gradient);
* ``combined``: ``rec * kl_grad``, the paper's Eq. 2;
* ``intensity``: the normalised input itself, the thresholding baseline.

With ``inpaint_tile`` (:class:`ScoreOptions`) an option set's ``rec`` measures ``x`` against :func:`inpainted`, each
pixel reconstructed from its context with its own tile hidden, instead of against ``g(mu(x))``; with
``posterior_samples`` against the mean of several reconstructions from the posterior, in units of their predictive
spread (:func:`pipeline.posterior.posterior_moments`).

Three option sets (:data:`OPTION_SETS`) are reported side by side by the bundle's evaluation and thresholded by
inference:

* :data:`PAPER`: the paper's plain definitions, every option off;
* :data:`AUTHORS`: what the authors' public code does to the KL gradient (``MIC-DKFZ/vae-anomaly-experiments``,
  ``MIC-DKFZ/mood``): min-max normalised, then smoothed with a 7x7 Gaussian of sigma 3. Their code normalises over
  each **batch** of slices, so a slice's score depends on which slices share its batch; here the normalisation
  runs over each **volume** (the batch when a batch holds one volume), which is deterministic;
* :data:`POSTPROCESSED`: :data:`AUTHORS` with the KL gradient normalised by constants of the **healthy** validation
  volumes instead of the scored volume's own minimum and maximum (a healthy-data threshold then means the same on
  every scan; the test volume's own maximum would scale the map of a scan with a large lesion down), plus the
  post-processing of Baur et al. 2021 (maps multiplied by the brain mask eroded by 1 voxel, 3D median filter 5,
  connected components under 7 voxels removed from segmentations), which none of the authors' codes apply.

Volume-level options (brain-mask multiplication with erosion, 3D median filter) apply in :func:`postprocess_volume`;
the removal of small connected components acts on thresholded segmentations (:func:`segment`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.layers import gaussian_1d, separable_filtering
from scipy import ndimage

from pipeline.data.slices import centre_slice, volume_to_slices, with_context
from pipeline.data.transforms import equalize_in_brain
from pipeline.inpainting import inpainted
from pipeline.losses import CeVAELoss, kl_divergence
from pipeline.median import median_filter
from pipeline.metrics import remove_small_components
from pipeline.normative import NormativeReference
from pipeline.posterior import posterior_moments
from pipeline.score_options import (
    AUTHORS,
    GRAD_NORMALIZATIONS,
    NORMATIVE,
    OPTION_SETS,
    PAPER,
    POSTPROCESSED,
    ScoreOptions,
)

__all__ = [
    "AUTHORS",
    "GRAD_NORMALIZATIONS",
    "NORMATIVE",
    "OPTION_SETS",
    "PAPER",
    "POSTPROCESSED",
    "SCORE_NAMES",
    "ScoreOptions",
    "Unchanged",
    "brain_voxels",
    "elbo_terms",
    "kl_gradient",
    "on_volume",
    "postprocess_volume",
    "raw_scores",
    "score_maps",
    "score_volume",
    "segment",
]

SCORE_NAMES = ("rec", "kl_grad", "combined", "intensity")


def _encoder_decoder(network: torch.nn.Module) -> torch.nn.Module:
    """The CeVAE inside an optional DDP/DataParallel wrapper."""
    return getattr(network, "module", network)


def elbo_terms(network: torch.nn.Module, x: torch.Tensor, loss: CeVAELoss) -> dict[str, torch.Tensor]:
    """Per-slice terms for a batch ``x`` ``(B, C, H, W)``: ``recon`` ``(B, C, H, W)`` (decoded mean), ``mu``
    ``(B, Z)`` and ``rec``, ``kl``, ``neg_elbo`` ``(B,)`` from ``loss.terms``, the VAE term of the training
    objective (same likelihood, same KL weight)."""
    net = _encoder_decoder(network)
    mu, logvar = net.encode(x)
    recon = net.decode(mu)
    return {"recon": recon, "mu": mu, **loss.terms(x, recon, mu, logvar)}


def _encode_with_kl_gradient(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def raw_scores(
    network: torch.nn.Module,
    x: torch.Tensor,
    loss: CeVAELoss,
    inpaint_tiles: Sequence[int] = (),
    posterior_samples: Sequence[int] = (),
) -> dict[str, torch.Tensor]:
    """What every score is made of: the :func:`elbo_terms` plus the raw ``kl_grad`` map, from one encoder pass,
    one backward pass and one decoder pass; for each tile side in ``inpaint_tiles`` the :func:`inpainted` image
    ``inpainted_<side>``; for each ``K`` in ``posterior_samples`` the :func:`posterior_moments` of ``K``
    reconstructions, ``posterior_mean_<K>`` and ``posterior_spread_<K>``, under the loss's trained likelihood."""
    net = _encoder_decoder(network)
    mu, logvar, grad = _encode_with_kl_gradient(net, x)
    with torch.no_grad():
        recon = net.decode(mu)
        terms = loss.terms(x, recon, mu, logvar)
        extra = {f"inpainted_{tile}": inpainted(net, x, tile) for tile in inpaint_tiles}
        for samples in posterior_samples:
            extra[f"posterior_mean_{samples}"], extra[f"posterior_spread_{samples}"] = posterior_moments(
                net, mu, logvar, samples, _likelihood_sigma(loss)
            )
    return {"recon": recon, "mu": mu, **terms, "kl_grad": grad, **extra}


def _likelihood_sigma(loss: CeVAELoss) -> torch.Tensor:
    if loss.reconstruction != "gaussian":
        raise ValueError(
            f"posterior_samples needs the Gaussian likelihood's sigma; this model was trained with the "
            f"{loss.reconstruction!r} reconstruction loss: score it without posterior_samples."
        )
    return loss.scoring_sigma()


IMAGE_KEYS = ("kl_grad", "inpainted_", "posterior_")  # raw images that the maps are made of, not returned as terms


def _min_max(values: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    lo, hi = values.amin(dim=dims, keepdim=True), values.amax(dim=dims, keepdim=True)
    return (values - lo) / (hi - lo).clamp_min(1e-12)


def score_maps(raw: dict[str, torch.Tensor], x: torch.Tensor, options: ScoreOptions) -> dict[str, torch.Tensor]:
    """The pixel maps of one option set from :func:`raw_scores` of the slices ``x`` ``(B, 1, H, W)`` (cheap: no
    network pass). ``grad_normalization="volume"`` normalises over all ``B`` slices: give it a whole volume."""
    if options.inpaint_tile:
        residual = x - raw[f"inpainted_{options.inpaint_tile}"]
    elif options.posterior_samples:
        residual = x - raw[f"posterior_mean_{options.posterior_samples}"]
    else:
        residual = x - raw["recon"]
    rec = residual.clamp_min(0) if options.positive_residuals else residual.abs()
    if options.posterior_samples:
        rec = rec / raw[f"posterior_spread_{options.posterior_samples}"]
    grad = raw["kl_grad"]
    if options.grad_normalization == "healthy":
        if not options.grad_fitted:
            raise ValueError(
                "grad_normalization 'healthy' needs grad_low/grad_high from the healthy validation volumes "
                "(pipeline.healthy.fit_grad_normalization; training stores them in threshold.json)."
            )
        grad = (grad - options.grad_low) / (options.grad_high - options.grad_low)
    elif options.grad_normalization != "none":
        grad = _min_max(grad, (1, 2, 3) if options.grad_normalization == "slice" else (0, 1, 2, 3))
    if options.grad_sigma > 0:
        radius = (options.grad_kernel - 1) / 2
        kernel = gaussian_1d(
            torch.tensor(options.grad_sigma), truncated=radius / options.grad_sigma, approx="sampled", normalize=True
        ).to(grad)
        grad = separable_filtering(grad, [kernel, kernel], mode="zeros")
    return {"rec": rec, "kl_grad": grad, "combined": rec * grad, "intensity": x.detach()}


def postprocess_volume(volume: np.ndarray, brainmask: np.ndarray, options: ScoreOptions) -> np.ndarray:
    """Volume-level options on one ``(H, W, D)`` score map: the 3D median filter of the whole map (the brain's rim is
    filtered with its true neighbours), multiplied by the brain mask (eroded). The filter is computed only where the
    mask keeps it (:func:`pipeline.median.median_filter`); the result is that of filtering first, then masking."""
    mask = None
    if options.brain_mask:
        mask = brainmask > 0
        if options.mask_erosion > 0:
            mask = ndimage.binary_erosion(mask, iterations=options.mask_erosion)
    if options.median_size > 1:
        return median_filter(volume, options.median_size, mask)
    return volume if mask is None else volume * mask


@dataclass(frozen=True)
class Unchanged:
    """The maps of a volume that the scored volume equals outside its axial slices ``start:stop`` (the healthy volume
    a synthetic lesion was put into): :func:`score_volume` then runs the volume-level options (median filter, eroded
    brain mask: the costly part) on those slices and the filters' reach only, and takes the rest from ``maps``. The
    result is the same as without it (:func:`_postprocess`) wherever ``maps`` are the volume's own maps (it may hold
    them inside the brain only: segmentations see nothing else)."""

    maps: Mapping[str, Mapping[str, np.ndarray]]
    start: int
    stop: int


def _postprocess(
    volume: np.ndarray,
    brainmask: np.ndarray,
    options: ScoreOptions,
    score: str,
    unchanged: Unchanged | None,
    config: str,
) -> np.ndarray:
    """:func:`postprocess_volume`, on the changed slab only where ``unchanged`` allows it. Exact: a slice's output
    depends on the map and mask within ``reach`` slices of it (median radius plus erosion), so outputs more than
    ``reach`` slices from the changed ones are those of ``unchanged``, and those within are computed on a slab that
    holds every slice they depend on (at the volume's ends the slab ends where the volume does, as the full filter
    sees it). Maps scaled by the whole volume (``grad_normalization="volume"``, an equalised intensity) and option sets
    without a median filter are computed whole."""
    reach = (options.median_size // 2 if options.median_size > 1 else 0) + (
        options.mask_erosion if options.brain_mask else 0
    )
    whole_volume = options.grad_normalization == "volume" and score in ("kl_grad", "combined")
    if unchanged is None or reach == 0 or whole_volume or (score == "intensity" and options.equalize_intensity):
        return postprocess_volume(volume, brainmask, options)
    depth = volume.shape[-1]
    keep = max(0, unchanged.start - reach), min(depth, unchanged.stop + reach)
    out = np.array(unchanged.maps[config][score], copy=True)
    if keep[0] >= keep[1]:
        return out
    slab = max(0, keep[0] - reach), min(depth, keep[1] + reach)
    filtered = postprocess_volume(volume[..., slab[0] : slab[1]], brainmask[..., slab[0] : slab[1]], options)
    out[..., keep[0] : keep[1]] = filtered[..., keep[0] - slab[0] : keep[1] - slab[0]]
    return out


def score_volume(
    raw_of: Callable[[torch.Tensor, Sequence[int], Sequence[int]], dict[str, torch.Tensor]],
    image: torch.Tensor,
    brainmask: np.ndarray,
    configs: Mapping[str, ScoreOptions],
    batch_size: int = 64,
    scores: Sequence[str] = SCORE_NAMES,
    device: str | torch.device = "cpu",
    unchanged: Unchanged | None = None,
    context_slices: int = 0,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, np.ndarray]]]:
    """Score a whole preprocessed volume: network passes slice batch by slice batch, then the maps of every option
    set from the whole volume's raw scores.

    Args:
        raw_of: ``raw_of(slices, inpaint_tiles, posterior_samples)``, the :func:`raw_scores` of a batch of slices
            ``(B, 1 + 2k, H, W)`` (one model's, with its trained loss, whose ``neg_elbo`` is the slice score:
            :meth:`pipeline.anomaly_map.AnomalyMap.raw_scores`; or an ensemble's).
        image: ``(1, H, W, D)`` volume (axial slices last).
        brainmask: ``(H, W, D)`` boolean brain mask.
        configs: option sets to derive maps for (the network passes are shared by all of them).
        scores: the maps to keep, among :data:`SCORE_NAMES`.
        unchanged: the maps of a volume this one equals outside some slices (:class:`Unchanged`; same results, less
            filtering).
        context_slices: the network's 2.5D input, ``k`` neighbours on either side
            (:func:`pipeline.data.slices.with_context`); the maps are those of the middle slice.

    Returns:
        ``(terms, maps)``: per-slice ``recon`` ``(D, 1, H, W)``, ``mu``, ``rec``, ``kl``, ``neg_elbo`` on the CPU, and
        ``maps[config][score]``, ``(H, W, D)`` float32 volumes with every volume-level option of ``config`` applied
        (option sets that post-process the intensity alike share its array: read the maps, do not modify them).
    """
    slices = volume_to_slices(image)
    network_input = with_context(slices, context_slices)
    tiles = sorted({o.inpaint_tile for o in configs.values() if o.inpaint_tile})
    samples = sorted({o.posterior_samples for o in configs.values() if o.posterior_samples})
    chunks: dict[str, list[torch.Tensor]] = {}
    for start in range(0, slices.shape[0], batch_size):
        raw = raw_of(network_input[start : start + batch_size].to(device), tiles, samples)
        for key, value in raw.items():
            chunks.setdefault(key, []).append(value.cpu())
    # the images (recon, kl_grad, inpainted_*, posterior_*) of the middle slice; mu and the per-slice terms as they are
    raw = {
        key: centre_slice(torch.cat(parts), context_slices) if parts[0].ndim == 4 else torch.cat(parts)
        for key, parts in chunks.items()
    }
    maps: dict[str, dict[str, np.ndarray]] = {}
    intensity: dict[tuple, np.ndarray] = {}  # the intensity baseline, once per way of post-processing it
    for config, options in configs.items():
        derived = score_maps(raw, slices, options)
        maps[config] = {}
        for score in scores:
            shared = _intensity_key(options) if score == "intensity" else None
            if shared in intensity:
                maps[config][score] = intensity[shared]
                continue
            volume = derived[score][:, 0].permute(1, 2, 0).numpy().astype(np.float32)  # (H, W, D)
            if score == "intensity" and options.equalize_intensity:
                volume = equalize_in_brain(volume, brainmask)
            elif score != "intensity" and options.normative:
                volume = _normative_reference(options, score).z_map(volume, brainmask)
            maps[config][score] = _postprocess(volume, brainmask, options, score, unchanged, config)
            if shared is not None:
                intensity[shared] = maps[config][score]
    return {k: v for k, v in raw.items() if not k.startswith(IMAGE_KEYS)}, maps


def _intensity_key(options: ScoreOptions) -> tuple:
    """What the intensity baseline's map depends on: the input itself, equalised or not, then the volume-level
    options. Option sets that agree on these (``postprocessed`` and ``normative``) share one map (the same array:
    its median filter is the costly part of scoring)."""
    return options.equalize_intensity, options.median_size, options.brain_mask, options.mask_erosion


def _normative_reference(options: ScoreOptions, score: str) -> NormativeReference:
    if options.normative_reference is None:
        raise ValueError(
            "normative maps need the healthy means and spreads of the healthy validation volumes "
            "(pipeline.healthy.fit_normative; training stores them in threshold.json)."
        )
    return NormativeReference.from_dict(options.normative_reference[score])


def brain_voxels(maps: Mapping[str, Mapping[str, np.ndarray]], brain: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """``maps[option set][score]`` (``(H, W, D)`` volumes) kept over the ``brain`` voxels only (1D arrays): what
    evaluation and calibration keep of a scored volume."""
    return {config: {score: volume[brain] for score, volume in per.items()} for config, per in maps.items()}


def on_volume(values: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The ``(H, W, D)`` volume of a map kept over the ``brain`` voxels (:func:`brain_voxels`); 0 outside the brain,
    which no segmentation sees."""
    out = np.zeros(brain.shape, dtype=values.dtype)
    out[brain] = values
    return out


def segment(volume: np.ndarray, brainmask: np.ndarray, threshold: float, options: ScoreOptions) -> np.ndarray:
    """The segmentation of one score volume: ``score >= threshold`` inside the brain, small components removed."""
    return remove_small_components((volume >= threshold) & (brainmask > 0), options.min_component_size)
