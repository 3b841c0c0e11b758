"""What a trained model does on healthy validation subjects, with no labels anywhere.

* :func:`healthy_thresholds` of the :func:`healthy_brain_maps`: for every option set and score, quantiles of the
  anomaly maps over the brain voxels of healthy validation volumes: segmentation thresholds with a known
  false-positive rate on healthy tissue (the protocol of Baur et al. 2021, MedIA 69:101952; Behrendt et al. report
  Dice at healthy false-positive rates of 1/5/10 %). The 0.99 quantile (1 % of healthy brain voxels above it before
  post-processing) is the default of inference: the strictest of those rates, so that a healthy scan gets few false
  positives, yet low enough that a lesion a hundredth of the brain's size can still be found.
* :func:`fit_grad_normalization`: the healthy constants of option sets that normalise the KL gradient by healthy data
  (``grad_normalization="healthy"``): the median over the healthy validation volumes of each volume's minimum and
  maximum, i.e. what the authors' per-volume min-max does to a typical healthy scan, now fixed for every scan.
* :func:`fit_normative`: the healthy means and spreads of the maps of option sets with ``normative=True``, per
  cell of a coarse grid over the volume (:mod:`pipeline.normative`), from the same healthy validation volumes.
* :func:`mean_brain_check`: is the decoder more than a mean brain? The reconstruction error of the model on healthy
  validation slices against the error of the mean training slice at the same relative axial position, and the
  active latent units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.slices import BrainSliceDataset, centre_slice
from pipeline.losses import kl_divergence
from pipeline.normative import NormativeAccumulator
from pipeline.scoring import SCORE_NAMES, ScoreOptions, brain_voxels
from pipeline.thresholds import quantile_key

__all__ = [
    "ACTIVE_UNIT_VARIANCE",
    "HEALTHY_QUANTILES",
    "active_units",
    "fit_grad_normalization",
    "fit_normative",
    "healthy_brain_maps",
    "healthy_thresholds",
    "mean_brain_check",
]

HEALTHY_QUANTILES = (0.95, 0.98, 0.99, 0.995, 0.999)
ACTIVE_UNIT_VARIANCE = 0.01  # a latent unit is active if Var_x[mu_d(x)] exceeds this (Burda et al. 2016)


def active_units(mu: torch.Tensor | np.ndarray) -> int:
    """Latent units whose posterior mean varies over the data: ``Var_x[mu_d] > 0.01``; ``mu`` is ``(N, Z)``."""
    return int((torch.as_tensor(mu).double().var(dim=0) > ACTIVE_UNIT_VARIANCE).sum())


def _image_and_brain(data: Mapping) -> tuple[torch.Tensor, np.ndarray]:
    """The ``(1, H, W, D)`` image tensor and the ``(H, W, D)`` boolean brain mask of a preprocessed volume."""
    image = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
    return image, np.asarray(data["brainmask"][0] > 0)


def fit_grad_normalization(
    model: AnomalyMap, volumes: Sequence[Mapping], option_sets: Mapping[str, ScoreOptions]
) -> dict[str, ScoreOptions]:
    """``option_sets`` with the healthy constants filled in where ``grad_normalization="healthy"`` (``grad_low``,
    ``grad_high``: medians over the preprocessed healthy ``volumes`` of each volume's minimum and maximum of the raw
    ``|dKL/dx|``); the others as they are. The network passes run only if an option set needs them."""
    if not any(o.grad_normalization == "healthy" for o in option_sets.values()):
        return dict(option_sets)
    lows, highs = [], []
    for data in volumes:
        slices, k = model.network_input(_image_and_brain(data)[0]), model.context_slices
        step = model.batch_size
        grads = [
            centre_slice(model.kl_gradient(slices[i : i + step].to(model.device)), k)
            for i in range(0, len(slices), step)
        ]
        lows.append(float(min(g.min() for g in grads)))
        highs.append(float(max(g.max() for g in grads)))
    low, high = float(np.median(lows)), float(np.median(highs))
    return {
        name: replace(options, grad_low=low, grad_high=high) if options.grad_normalization == "healthy" else options
        for name, options in option_sets.items()
    }


def fit_normative(
    model: AnomalyMap, volumes: Sequence[Mapping], option_sets: Mapping[str, ScoreOptions]
) -> tuple[dict[str, ScoreOptions], list[dict[str, ScoreOptions]] | None]:
    """``option_sets`` with the normative reference filled in where ``normative=True``: for each model score, the
    healthy mean and spread per grid cell (:class:`pipeline.normative.NormativeAccumulator`) of the map that the
    z-map is taken of (the option set's map before any volume-level option), over the brain voxels of the healthy
    ``volumes``. Call it after :func:`fit_grad_normalization`: the maps use its constants.

    Returns ``(fitted, held_out)``: ``held_out[i]`` are the option sets with the reference fitted on every volume but
    the ``i``-th (leave one out), to score volume ``i`` with where its thresholds or synthetic lesions are measured: a
    volume's z-map against a reference that contains it would be smaller than a new subject's, its quantiles too low
    and its synthetic lesions too easy. ``held_out`` is None when no option set is normative (no network pass then);
    with one volume the full reference stands in for the held-out one."""
    wanted = {name: options for name, options in option_sets.items() if options.normative}
    if not wanted:
        return dict(option_sets), None
    bases = {name: replace(o, normative=False, median_size=0, brain_mask=False) for name, o in wanted.items()}
    scores = [s for s in SCORE_NAMES if s != "intensity"]
    parts = []  # per volume: {(option set, score): its sums}
    for data in volumes:
        image, brain = _image_and_brain(data)
        _, maps = model(image, brain, bases, scores=scores)
        sums = {(name, score): NormativeAccumulator() for name in wanted for score in scores}
        for (name, score), accumulator in sums.items():
            accumulator.add(maps[name][score], brain)
        parts.append(sums)

    def fitted_on(chosen: list[dict]) -> dict[str, ScoreOptions]:
        out = dict(option_sets)
        for name, options in wanted.items():
            pooled = {s: NormativeAccumulator.pooled([p[name, s] for p in chosen]) for s in scores}
            out[name] = replace(options, normative_reference={s: a.reference().to_dict() for s, a in pooled.items()})
        return out

    fitted = fitted_on(parts)
    if len(parts) == 1:
        return fitted, [fitted]
    return fitted, [fitted_on(parts[:i] + parts[i + 1 :]) for i in range(len(parts))]


def healthy_brain_maps(
    model: AnomalyMap,
    volumes: Sequence[Mapping],
    option_sets: Mapping[str, ScoreOptions],
    held_out: Sequence[Mapping[str, ScoreOptions]] | None = None,
) -> list[dict[str, dict[str, np.ndarray]]]:
    """Per healthy volume (preprocessed by the training's volume chain: ``image``, ``brainmask``), its maps
    ``[option set][score]`` over its brain voxels, scored by ``model``
    (:class:`~pipeline.anomaly_map.AnomalyMap`); volume ``i`` with ``held_out[i]`` if given (:func:`fit_normative`),
    else with ``option_sets``. The healthy thresholds and the synthetic lesions' unchanged slices both use them."""
    out = []
    for i, data in enumerate(volumes):
        image, brain = _image_and_brain(data)
        _, maps = model(image, brain, option_sets if held_out is None else held_out[i])
        out.append(brain_voxels(maps, brain))
    return out


def healthy_thresholds(
    brain_maps: Sequence[Mapping[str, Mapping[str, np.ndarray]]], quantiles: Sequence[float] = HEALTHY_QUANTILES
) -> dict:
    """Quantiles of every option set's and score's maps over the brain voxels of the healthy volumes
    (:func:`healthy_brain_maps`), the voxels of all volumes pooled, every voxel counting once. Returns ``quantiles``,
    ``n_voxels`` and ``thresholds[option set][score][q]`` of the ``healthy`` section of ``threshold.json``."""
    if not brain_maps:
        raise ValueError("healthy thresholds need at least one healthy validation subject.")
    thresholds: dict = {}
    n_voxels = 0
    for config, per_score in brain_maps[0].items():
        thresholds[config] = {}
        for score in per_score:
            voxels = np.concatenate([maps[config][score] for maps in brain_maps])
            n_voxels = voxels.size
            values = np.quantile(voxels, list(quantiles))
            thresholds[config][score] = {quantile_key(q): float(v) for q, v in zip(quantiles, values)}
    return {
        "quantiles": [float(q) for q in quantiles],
        "n_voxels": int(n_voxels),
        "thresholds": thresholds,
    }


@torch.no_grad()  # measures only: no autograd graph over the validation set (it kept every batch's alive)
def mean_brain_check(
    network: torch.nn.Module,
    train: BrainSliceDataset,
    validation: BrainSliceDataset,
    n_bins: int = 20,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict:
    """Reconstruction error on healthy validation slices: the model against a mean brain.

    The mean brain at a slice is the mean of the training slices in the same bin of relative axial position
    (``n_bins`` bins over the brain's extent, :attr:`BrainSliceDataset.position`). Squared errors are averaged over
    the brain pixels of the validation slices (their ``brainmask`` if the data set keeps it, else the nonzero pixels).

    Returns ``rec_mse`` (the model's reconstruction from the posterior mean), ``mean_brain_mse``, their ratio
    ``rec_vs_mean_brain`` (1: the decoder is no better than a mean brain), ``active_units`` (of ``z_dim``),
    ``kl_per_dim`` (mean KL per slice and latent dimension) and ``n_slices``.
    """
    net = getattr(network, "module", network)
    k = getattr(net, "context_slices", 0)  # 2.5D input: errors of the middle slice, the one that is scored
    train_bins = (train.position * n_bins).long().clamp(max=n_bins - 1)
    counts = torch.bincount(train_bins, minlength=n_bins).double()
    sums = torch.zeros((n_bins, *centre_slice(train.read("image", 0)[None], k)[0].shape), dtype=torch.float64)
    for batch in _index_batches(len(train), batch_size):  # streamed: the training set need not fit in memory
        images = centre_slice(torch.stack([train.read("image", i) for i in batch]), k)
        sums.index_add_(0, train_bins[batch], images.double())
    overall = sums.sum(dim=0, keepdim=True) / counts.sum()
    counts = counts.view(-1, *([1] * (sums.ndim - 1)))
    mean_brain = torch.where(counts > 0, sums / counts.clamp_min(1), overall).float()
    val_bins = (validation.position * n_bins).long().clamp(max=n_bins - 1)
    squared = {"rec": 0.0, "mean_brain": 0.0}
    mus, kl_total, n_pixels = [], 0.0, 0
    for batch in _index_batches(len(validation), batch_size):
        slab = torch.stack([validation.read("image", i) for i in batch]).to(device)
        x = centre_slice(slab, k)
        brain = (
            torch.stack([validation.read("brainmask", i) for i in batch]).to(device)
            if "brainmask" in validation.keys
            else (x != 0).float()
        )
        mu, logvar = net.encode(slab)
        recon = centre_slice(net.decode(mu), k)
        squared["rec"] += float(((x - recon) ** 2 * brain).sum())
        squared["mean_brain"] += float(((x - mean_brain[val_bins[batch]].to(device)) ** 2 * brain).sum())
        n_pixels += int(brain.sum())
        kl_total += float(kl_divergence(mu, logvar).sum())
        mus.append(mu.cpu())
    mu = torch.cat(mus)
    rec_mse, mean_mse = squared["rec"] / max(n_pixels, 1), squared["mean_brain"] / max(n_pixels, 1)
    return {
        "rec_mse": rec_mse,
        "mean_brain_mse": mean_mse,
        "rec_vs_mean_brain": rec_mse / max(mean_mse, 1e-12),
        "active_units": active_units(mu),
        "z_dim": int(mu.shape[1]),
        "kl_per_dim": kl_total / (mu.shape[0] * mu.shape[1]),
        "n_slices": int(mu.shape[0]),
        "position_bins": n_bins,
    }


def _index_batches(n: int, batch_size: int) -> list[torch.Tensor]:
    return [torch.arange(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
