"""Evaluation of a trained ceVAE on a labelled test datalist: the paper's numbers, and what a user without labels
would get.

:class:`AnomalyEvaluation` scores each test volume (:func:`pipeline.scoring.score_volume`: one forward and one
batched KL-gradient backward per slice batch), derives the pixel maps of every option set (``paper``,
``authors``, ``postprocessed``: :data:`pipeline.scoring.OPTION_SETS`) and keeps brain voxels only as compact
arrays. Then, per option set and score:

* slice level: AUROC/AUPRC of slice scores over the slices training would use (``min_brain_fraction``,
  ``border_slices``; normal: no annotated pixel, anomalous: more than ``min_slice_pixels``);
* pixel level: exact AUROC/AUPRC over brain voxels (:class:`pipeline.metrics.ThresholdCurve`) beside the lesion
  prevalence (the AUPRC of a random score); with ``label_groups`` also per group of label values;
* Dice, each beside the Dice of segmenting the whole brain: ``dice_split`` (threshold chosen on a seeded 20 % of the
  test **subjects**, Dice on the other 80 %, as in the paper), ``dice_healthy`` (at each healthy-data threshold of
  ``threshold.json``: no labels involved) and ``dice_best`` (the best threshold; an upper bound, not a result).
  A threshold whose segmentation covers more than half of the brain is flagged (``covers_over_half_brain``,
  ``warnings``, the log): its Dice is that of a whole-brain mask;
* ``lesion_detection``: the fraction of 3D lesion components that the segmentation touches (``recall``) and the
  segmented components touching no lesion per volume (``fp_per_volume``), at the calibrated threshold (held-out
  subjects) and at the default healthy threshold (all subjects);
* ``ci95``: 95 % bootstrap intervals over subjects of the pixel AUROC/AUPRC and of the Dice;
* posterior collapse: the 0.95-quantile of the per-slice KL (summed, and per latent dimension), active latent units.

Outputs in ``output_dir``: ``metrics.json``, ``per_subject.csv`` (per-subject AUROC, AUPRC and Dice), ``curves.json``
(pixel ROC and PR curves on fixed grids), ``roc_pr.png``, ``panels.png`` (with the segmentation that inference makes
by default). The calibrated thresholds are added to ``threshold.json`` next to the checkpoint under this test set's
name (:mod:`pipeline.thresholds`); the healthy ones are read from there, or computed from the healthy validation
subjects when the file is missing or was made for another checkpoint. Metrics are logged to MLflow as
``<name>/<option set>/<metric>/<score>`` (e.g. ``eval/paper/pixel_auroc/combined``) and ``<name>/<metric>``, files
under the artifact folder ``evaluation/<name>``; ``name`` tells test sets apart.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.data.datalist import load_datalist
from pipeline.data.slices import brain_slice_indices
from pipeline.data.validation import InputError
from pipeline.engines.checkpoint import load_trained
from pipeline.healthy import (
    DEFAULT_OPTION_SET,
    DEFAULT_QUANTILE,
    DEFAULT_SCORE,
    HEALTHY_QUANTILES,
    active_units,
)
from pipeline.io import atomic_path, atomic_write_json, atomic_write_text, file_sha256
from pipeline.losses import CeVAELoss
from pipeline.metrics import (
    ThresholdCurve,
    best_dice_threshold,
    bootstrap_dice,
    bootstrap_pixel_metrics,
    bootstrap_weights,
    dice,
    lesion_detection,
    segmented_fraction_grid,
    slice_labels,
    split_calibration,
)
from pipeline.operating_point import OperatingPoint, evaluate_operating_point, label_free_calibration
from pipeline.scoring import OPTION_SETS, SCORE_NAMES, ScoreOptions, score_volume, segment
from pipeline.thresholds import checkpoint_sha256, quantile_key, read_thresholds, update_thresholds

__all__ = ["AnomalyEvaluation"]

logger = logging.getLogger(__name__)

CURVE_POINTS = 201  # grid of the FPR / recall axis in curves.json
GRID_POINTS, REFINE_POINTS = 48, 24  # Dice threshold search when connected components make Dice non-monotone
HALF_BRAIN = 0.5  # a segmentation covering more of the brain than this is flagged
NO_INTERVAL = [float("nan"), float("nan")]  # ci95 where fewer than two subjects allow no bootstrap over subjects


class _Subject:
    """Compact per-subject results: brain-voxel scores per option set and score, labels, slice terms."""

    def __init__(self, name: str, brain: np.ndarray, label: np.ndarray, classes: np.ndarray | None = None) -> None:
        self.name, self.brain, self.label = name, brain, label
        self.lesion_voxels = label[brain]
        self.classes = classes  # original label values of the brain voxels, for label_groups
        self.voxels: dict[str, dict[str, np.ndarray]] = {}
        self.slice_means: dict[str, dict[str, np.ndarray]] = {}
        self.slice_terms: dict[str, np.ndarray] = {}
        self.scored_slices: list[int] = []  # the slices training would use: slice-level metrics

    def volume(self, config: str, score: str) -> np.ndarray:
        out = np.zeros(self.brain.shape, np.float32)
        out[self.brain] = self.voxels[config][score]
        return out


def _counts(segmentations: Sequence[np.ndarray], subjects: Sequence[_Subject]) -> np.ndarray:
    """``(n_subjects, 3)``: true positives, segmented voxels, lesion voxels of each subject."""
    return np.array(
        [[int((g & s.label).sum()), int(g.sum()), int(s.label.sum())] for g, s in zip(segmentations, subjects)],
        dtype=np.int64,
    ).reshape(-1, 3)


def _pooled_dice(counts: np.ndarray) -> float:
    tp, segmented, lesion = counts.sum(axis=0)
    return 1.0 if segmented + lesion == 0 else 2.0 * tp / (segmented + lesion)


class AnomalyEvaluation:
    """Evaluate ``checkpoint`` on the ``key`` entries of ``datalist`` (see the module docstring).

    Args:
        network: a :class:`~pipeline.networks.CeVAE` of the checkpoint's architecture.
        checkpoint: ``model.pt`` (``{"model", "loss"}``), loaded with ``weights_only=True``.
        datalist: datalist JSON with ``image``, ``label`` and optionally ``brainmask`` entries under ``key``.
        transform: the volume chain used in training.
        output_dir: where outputs go.
        loss: the training loss (:class:`~pipeline.losses.CeVAELoss`, its state loaded from the checkpoint): the
            slice score is its ELBO.
        configs: option sets to report side by side (default: :data:`pipeline.scoring.OPTION_SETS`).
        batch_size: slices per network pass.
        min_slice_pixels: annotated pixels above which a slice counts as anomalous.
        min_brain_fraction, border_slices: the slice selection of training (slice-level metrics use those slices).
        calibration_fraction, seed: the subject split of the Dice threshold (``seed`` also seeds the bootstrap).
        tracking_uri, experiment_name: MLflow destination when the checkpoint's training run is unknown.
        name: the test set's name in MLflow (metric prefix and artifact sub-folder) and in ``threshold.json``.
        label_groups: optional ``{group: [label values]}``; adds ``pixel_auroc_<group>`` / ``pixel_auprc_<group>``.
        healthy_data: healthy validation entries, to compute the healthy thresholds when ``threshold.json`` lacks
            them for this checkpoint (None: such a file is required).
        healthy_quantiles: the quantiles to compute then.
        default_option_set, default_score, default_quantile: the segmentation inference makes by default, reported
            for lesion detection and shown in the panels.
        n_bootstrap: bootstrap resamples of the intervals.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        checkpoint: str | os.PathLike,
        datalist: str | os.PathLike,
        transform: Callable,
        output_dir: str | os.PathLike,
        loss: CeVAELoss,
        device: str | torch.device = "cpu",
        configs: Mapping[str, ScoreOptions] | None = None,
        batch_size: int = 64,
        min_slice_pixels: int = 20,
        min_brain_fraction: float = 0.1,
        border_slices: int = 0,
        calibration_fraction: float = 0.2,
        seed: int = 0,
        key: str = "test",
        n_panels: int = 4,
        tracking_uri: str | None = None,
        experiment_name: str = "cevae",
        name: str = "eval",
        label_groups: Mapping[str, Sequence[int]] | None = None,
        healthy_data: Sequence[dict] | None = None,
        healthy_quantiles: Sequence[float] = HEALTHY_QUANTILES,
        default_option_set: str = DEFAULT_OPTION_SET,
        default_score: str = DEFAULT_SCORE,
        default_quantile: float = DEFAULT_QUANTILE,
        n_bootstrap: int = 1000,
    ) -> None:
        for text in (name, *(label_groups or {})):
            if not text or "/" in text:
                raise ValueError(f"evaluation and label group names must be non-empty without '/', got {text!r}.")
        self.label_groups = {g: [int(v) for v in values] for g, values in (label_groups or {}).items()}
        self.network, self.checkpoint, self.datalist = network, Path(checkpoint), Path(datalist)
        self.transform, self.output_dir, self.device = transform, Path(output_dir), torch.device(device)
        self.loss = loss
        self.configs = dict(configs or OPTION_SETS)
        if default_option_set not in self.configs or default_score not in SCORE_NAMES:
            raise InputError(
                f"the default segmentation {default_option_set}/{default_score} is not among the option "
                f"sets {sorted(self.configs)} and scores {SCORE_NAMES}; fix --default_option_set or "
                "--default_score."
            )
        self.batch_size, self.min_slice_pixels = batch_size, min_slice_pixels
        self.min_brain_fraction, self.border_slices = min_brain_fraction, border_slices
        self.calibration_fraction, self.seed, self.key, self.n_panels = calibration_fraction, seed, key, n_panels
        self.tracking_uri, self.experiment_name, self.name = tracking_uri, experiment_name, name
        self.healthy_data, self.healthy_quantiles = healthy_data, tuple(healthy_quantiles)
        self.default = {
            "option_set": default_option_set,
            "score": default_score,
            "quantile": quantile_key(default_quantile),
        }
        self.n_bootstrap = n_bootstrap

    # ----------------------------------------------------------------------------------------------- scoring
    def load_network(self) -> torch.nn.Module:
        load_trained(self.checkpoint, self.network, self.loss, self.device)
        self.loss.to(self.device).eval()
        return self.network.to(self.device).eval()

    def healthy(self) -> dict:
        """The ``healthy`` section of ``threshold.json`` for this checkpoint and these option sets; computed from
        ``healthy_data`` (and written) when the file lacks it, was made for another checkpoint or other options.
        The option sets then hold their healthy normalisation constants (stored with them, or fitted here)."""
        try:
            content = read_thresholds(self.checkpoint)
        except InputError as err:
            content, reason = {}, str(err)
        else:
            reason = "its option sets differ from this evaluation's"
        stored = {c: ScoreOptions(**o) for c, o in content.get("options", {}).items()}
        if content.get("healthy") and all(
            c in stored and stored[c].unfitted() == o.unfitted() for c, o in self.configs.items()
        ):
            self.configs = {c: stored[c] for c in self.configs}
            return self._with_default(content["healthy"])
        if not self.healthy_data:
            raise InputError(
                f"no usable healthy thresholds for {self.checkpoint} ({reason}); evaluate with the "
                "training datalist (--datalist, its healthy validation subjects give them) or use the "
                "threshold.json written by the training of this checkpoint."
            )
        logger.info(
            "computing healthy thresholds and the operating point of %s on %d healthy validation subjects",
            self.checkpoint,
            len(self.healthy_data),
        )
        healthy, self.configs = label_free_calibration(
            self.network,
            self.loss,
            self.healthy_data,
            self.transform,
            {c: o.unfitted() for c, o in self.configs.items()},
            self.healthy_quantiles,
            self.batch_size,
            self.device,
        )
        options = {c: o.to_dict() for c, o in self.configs.items()}
        return self._with_default(update_thresholds(self.checkpoint, options, healthy=healthy)["healthy"])

    def _with_default(self, healthy: dict) -> dict:
        """``healthy`` if it holds the default quantile, else an :class:`InputError` naming the stored ones."""
        stored = next(iter(healthy["thresholds"].values()))[self.default["score"]]
        if self.default["quantile"] not in stored:
            raise InputError(
                f"the healthy thresholds of {self.checkpoint} hold the quantiles "
                f"{sorted(stored, key=float)}, not {self.default['quantile']}; pass --healthy_quantile "
                "with one of them."
            )
        return healthy

    def score_subject(self, name: str, data: Mapping[str, torch.Tensor]) -> tuple[_Subject, dict]:
        """Score one preprocessed volume; returns the compact results and the per-slice arrays for panels."""
        image = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
        brain = np.asarray(data["brainmask"][0] > 0)
        label = np.asarray(data["label"][0] > 0) & brain
        classes = None
        if self.label_groups:
            if "label_classes" not in data:
                raise ValueError(
                    "label_groups needs the label's classes: build the transform with class_key='label_classes'."
                )
            classes = np.rint(np.asarray(data["label_classes"][0])[brain]).astype(np.int16)
        subject = _Subject(name, brain, label, classes)
        subject.scored_slices = brain_slice_indices(
            torch.as_tensor(brain[None]), self.min_brain_fraction, self.border_slices
        )
        terms, maps = score_volume(
            self.network, image, brain, self.configs, self.loss, self.batch_size, device=self.device
        )
        subject.slice_terms = {k: terms[k].numpy() for k in ("rec", "kl", "neg_elbo", "mu")}
        brain_pixels = np.maximum(brain.sum(axis=(0, 1)), 1)
        for config, volumes in maps.items():
            subject.voxels[config] = {score: volume[brain] for score, volume in volumes.items()}
            subject.slice_means[config] = {
                score: (volume * brain).sum(axis=(0, 1)) / brain_pixels for score, volume in volumes.items()
            }
        return subject, {"image": image[0].permute(2, 0, 1).numpy(), "recon": terms["recon"][:, 0].numpy()}

    # ----------------------------------------------------------------------------------------------- metrics
    def _segment(self, subject: _Subject, config: str, score: str, threshold: float) -> np.ndarray:
        return segment(subject.volume(config, score), subject.brain, threshold, self.configs[config])

    def _counts(self, subjects: Sequence[_Subject], config: str, score: str, threshold: float) -> np.ndarray:
        return _counts([self._segment(s, config, score, threshold) for s in subjects], subjects)

    def _dice_search(self, subjects: list[_Subject], config: str, score: str) -> tuple[float, float]:
        """Best ``(threshold, pooled Dice)`` over ``subjects``: exact over every distinct threshold without component
        removal; with it (Dice is then not monotone in the threshold), over thresholds that segment a geometric grid
        of brain fractions from 1e-5 to 1, refined around the best (steps of about 2 % in the segmented volume)."""
        voxels = np.concatenate([s.voxels[config][score] for s in subjects])
        if self.configs[config].min_component_size <= 1:
            return best_dice_threshold(voxels, np.concatenate([s.lesion_voxels for s in subjects]))

        def best_of(fractions: np.ndarray) -> tuple[float, float, float]:
            thresholds = np.unique(np.quantile(voxels, 1.0 - np.clip(fractions, 0.0, 1.0)))
            results = [(float(t), _pooled_dice(self._counts(subjects, config, score, float(t)))) for t in thresholds]
            threshold, value = max(results, key=lambda r: r[1])
            return threshold, value, float((voxels >= threshold).mean())

        grid = segmented_fraction_grid(GRID_POINTS, smallest=min(1e-5, 1.0 / voxels.size))
        threshold, value, fraction = best_of(grid)
        step = grid[1] / grid[0]
        refined = best_of(np.geomspace(max(fraction / step, grid[0]), min(fraction * step, 1.0), REFINE_POINTS))
        return (threshold, value) if value >= refined[1] else refined[:2]

    def _dice_entry(
        self, subjects: Sequence[_Subject], config: str, score: str, threshold: float, whole_brain: float
    ) -> tuple[dict, np.ndarray]:
        """Pooled Dice at ``threshold`` with its whole-brain baseline and the share of the brain it segments."""
        counts = self._counts(subjects, config, score, threshold)
        brain_voxels = sum(int(s.brain.sum()) for s in subjects)
        fraction = float(counts[:, 1].sum() / max(brain_voxels, 1))
        entry = {
            "threshold": float(threshold),
            "dice": _pooled_dice(counts) if len(subjects) else float("nan"),
            "whole_brain": whole_brain,
            "brain_fraction": fraction,
            "covers_over_half_brain": bool(fraction > HALF_BRAIN),
        }
        return entry, counts

    def _detection(self, subjects: Sequence[_Subject], config: str, score: str, threshold: float) -> dict:
        found = [lesion_detection(self._segment(s, config, score, threshold), s.label) for s in subjects]
        lesions, detected = sum(f["lesions"] for f in found), sum(f["detected"] for f in found)
        false_positives = sum(f["false_positives"] for f in found)
        n = len(subjects)
        return {
            "threshold": float(threshold),
            "subjects": n,
            "lesions": lesions,
            "detected": detected,
            "recall": detected / lesions if lesions else float("nan"),
            "false_positive_components": false_positives,
            "fp_per_volume": false_positives / n if n else float("nan"),
        }

    def metrics(self, subjects: list[_Subject], curves: dict, healthy: dict) -> dict:
        """All metrics, per option set (see the module docstring); ``curves`` from :meth:`curves`, ``healthy`` the
        healthy section of ``threshold.json``."""
        if len(subjects) > 1:
            calibration, reported = split_calibration([s.name for s in subjects], self.calibration_fraction, self.seed)
        else:  # the threshold still comes from the data, but no held-out Dice can be reported
            logger.warning("only one test subject: its Dice threshold is calibrated on it; Dice 20/80 is not reported")
            calibration, reported = [s.name for s in subjects], []
        cal = [s for s in subjects if s.name in calibration]
        rep = [s for s in subjects if s.name in reported]
        slice_y = np.concatenate([slice_labels(s.label, self.min_slice_pixels)[s.scored_slices] for s in subjects])
        keep = slice_y >= 0
        kl = np.concatenate([s.slice_terms["kl"] for s in subjects])
        mu = np.concatenate([s.slice_terms["mu"] for s in subjects])
        lesion_voxels = sum(int(s.label.sum()) for s in subjects)
        baselines = {  # trivial references: a random score's AUPRC, and the Dice of segmenting the whole brain
            "prevalence": lesion_voxels / max(sum(int(s.brain.sum()) for s in subjects), 1),
            "dice_whole_brain_all": _pooled_dice(_counts([s.brain for s in subjects], subjects)),
            "dice_whole_brain_reported": _pooled_dice(_counts([s.brain for s in rep], rep)) if rep else float("nan"),
        }
        # intervals over subjects need two of them at least: one subject's resamples are all the same
        weights = bootstrap_weights(len(subjects), self.n_bootstrap, self.seed) if len(subjects) > 1 else None
        weights_rep = bootstrap_weights(len(rep), self.n_bootstrap, self.seed) if len(rep) > 1 else None
        results: dict = {
            "n_subjects": len(subjects),
            "n_slices": int(kl.size),
            "n_slices_scored": int(slice_y.size),
            "n_slices_normal": int((slice_y == 0).sum()),
            "n_slices_anomalous": int((slice_y == 1).sum()),
            "kl_q95": float(np.quantile(kl, 0.95)),
            "kl_q95_per_dim": float(np.quantile(kl / mu.shape[1], 0.95)),
            "active_units": active_units(mu),
            "calibration_subjects": calibration,
            "checkpoint": str(self.checkpoint),
            "checkpoint_sha256": checkpoint_sha256(self.checkpoint),
            "datalist": str(self.datalist),
            "healthy_quantiles": list(healthy["thresholds"][next(iter(self.configs))]["rec"]),
            "default": {
                **self.default,
                "threshold": healthy["thresholds"][self.default["option_set"]][self.default["score"]][
                    self.default["quantile"]
                ],
            },
            "baselines": baselines,
            "warnings": [],
        }
        for config in self.configs:
            out: dict = {"options": self.configs[config].to_dict(), "prevalence": baselines["prevalence"]}
            slice_scores = {"elbo": np.concatenate([s.slice_terms["neg_elbo"][s.scored_slices] for s in subjects])}
            slice_scores.update(
                {k: np.concatenate([s.slice_means[config][k][s.scored_slices] for s in subjects]) for k in SCORE_NAMES}
            )
            out["slice_auroc"] = {k: _safe(roc_auc_score, slice_y[keep], v[keep]) for k, v in slice_scores.items()}
            out["slice_auprc"] = {
                k: _safe(average_precision_score, slice_y[keep], v[keep]) for k, v in slice_scores.items()
            }
            for key in ("pixel_auroc", "pixel_auprc", "dice_split", "dice_best", "dice_healthy"):
                out[key] = {}
            out["lesion_detection"] = {"calibrated": {}, "healthy": {}}
            out["ci95"] = {key: {} for key in ("pixel_auroc", "pixel_auprc", "dice_split", "dice_healthy")}
            for score in SCORE_NAMES:
                out["pixel_auroc"][score] = curves[config][score]["auroc"]
                out["pixel_auprc"][score] = curves[config][score]["auprc"]
                interval = (
                    bootstrap_pixel_metrics(
                        [s.voxels[config][score] for s in subjects],
                        [s.lesion_voxels for s in subjects],
                        weights,
                        exact={"auroc": out["pixel_auroc"][score], "auprc": out["pixel_auprc"][score]},
                    )
                    if weights is not None
                    else {"auroc": NO_INTERVAL, "auprc": NO_INTERVAL}
                )
                out["ci95"]["pixel_auroc"][score] = interval["auroc"]
                out["ci95"]["pixel_auprc"][score] = interval["auprc"]
                threshold, cal_dice = self._dice_search(cal, config, score)
                split, counts = self._dice_entry(rep, config, score, threshold, baselines["dice_whole_brain_reported"])
                per_subject = {s.name: dice(self._segment(s, config, score, threshold), s.label) for s in rep}
                out["dice_split"][score] = {
                    **split,
                    "calibration_dice": cal_dice,
                    "dice_mean_per_subject": float(np.mean(list(per_subject.values()))) if rep else float("nan"),
                    "per_subject": per_subject,
                }
                out["ci95"]["dice_split"][score] = (
                    bootstrap_dice(counts, weights_rep) if weights_rep is not None else NO_INTERVAL
                )
                out["lesion_detection"]["calibrated"][score] = self._detection(rep, config, score, threshold)
                out["dice_best"][score] = self._dice_search(subjects, config, score)[1]
                out["dice_healthy"][score] = {}
                for q, value in healthy["thresholds"][config][score].items():
                    entry, counts = self._dice_entry(subjects, config, score, value, baselines["dice_whole_brain_all"])
                    out["dice_healthy"][score][q] = entry
                    if q == self.default["quantile"]:
                        out["ci95"]["dice_healthy"][score] = (
                            bootstrap_dice(counts, weights) if weights is not None else NO_INTERVAL
                        )
                        out["lesion_detection"]["healthy"][score] = {
                            "quantile": q,
                            **self._detection(subjects, config, score, value),
                        }
            # beside the real test set's Dice at the healthy threshold: the same choice on synthetic lesions in the
            # healthy validation subjects (written by training; NaN where the thresholds were recomputed here)
            synthetic = healthy.get("synthetic", {})
            same_choice = (
                synthetic.get("quantile") is not None
                and quantile_key(synthetic["quantile"]) == self.default["quantile"]
            )
            out["synthetic_dice_healthy"] = {
                score: synthetic["dice"][config][score] if same_choice else float("nan") for score in SCORE_NAMES
            }
            out.update(self._group_metrics(subjects, config))
            results[config] = out
            results["warnings"] += self._coverage_warnings(config, out)
        results["operating_point"] = self._operating_point(subjects, healthy, baselines["dice_whole_brain_all"])
        paper = results[next(iter(self.configs))]
        for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_split", "dice_best"):
            results[key] = paper[key]  # the paper's plain definitions at the top level
        return results

    def _operating_point(self, subjects: list[_Subject], healthy: dict, whole_brain: float) -> dict | None:
        """Inference's default, the label-free operating point that training chose on synthetic lesions, on this
        test set (None: the thresholds file has none, or its option set is not evaluated here)."""
        stored = healthy.get("synthetic", {}).get("operating_point")
        if stored is None or stored["option_set"] not in self.configs:
            return None
        point = OperatingPoint.from_dict(stored)
        maps = [s.volume(point.option_set, point.score) for s in subjects]
        entry = evaluate_operating_point(
            point, self.configs[point.option_set], maps, [s.brain for s in subjects], [s.label for s in subjects]
        )
        return {**entry, "whole_brain": whole_brain}

    @staticmethod
    def _coverage_warnings(config: str, out: dict) -> list[str]:
        """One line per threshold of ``config`` whose segmentation covers more than half of the brain."""
        found = [(f"dice_split/{score}", entry) for score, entry in out["dice_split"].items()]
        found += [
            (f"dice_healthy/{score}/q{q}", entry)
            for score, per_q in out["dice_healthy"].items()
            for q, entry in per_q.items()
        ]
        lines = [
            f"{config}/{where}: threshold {entry['threshold']:.4g} segments {100 * entry['brain_fraction']:.0f} % "
            f"of the brain (Dice {entry['dice']:.3f}, a whole-brain mask scores {entry['whole_brain']:.3f})"
            for where, entry in found
            if entry["covers_over_half_brain"]
        ]
        for line in lines:
            logger.warning("%s", line)
        return lines

    def _group_metrics(self, subjects: list[_Subject], config: str) -> dict:
        """``pixel_auroc_<group>`` / ``pixel_auprc_<group>`` per score: the group's voxels against unlabelled brain."""
        out: dict = {}
        healthy = ~np.concatenate([s.lesion_voxels for s in subjects]) if self.label_groups else None
        for group, values in self.label_groups.items():
            positive = np.concatenate([np.isin(s.classes, values) for s in subjects])
            keep = positive | healthy
            out[f"pixel_auroc_{group}"], out[f"pixel_auprc_{group}"] = {}, {}
            for score in SCORE_NAMES:
                scores = np.concatenate([s.voxels[config][score] for s in subjects])[keep]
                curve = ThresholdCurve.from_scores(scores, positive[keep])
                out[f"pixel_auroc_{group}"][score] = curve.auroc()
                out[f"pixel_auprc_{group}"][score] = curve.average_precision()
        return out

    # ----------------------------------------------------------------------------------------------- outputs
    def test_set(self) -> str:
        """The test set's identity: SHA-256 of the datalist file and its key."""
        return f"{file_sha256(self.datalist)}#{self.key}"

    def check_name_is_free(self) -> None:
        """Refuse to evaluate a test set under a name that already holds another test set's results for this
        checkpoint (MLflow metrics ``<name>/...`` of its run, ``calibrated.<name>`` of ``threshold.json``): they would
        be overwritten. Re-evaluating the same test set under its name is allowed."""
        try:
            previous = read_thresholds(self.checkpoint).get("calibrated", {}).get(self.name)
        except InputError:  # no threshold.json yet, or one for other weights (replaced on write)
            return
        if previous is None:
            return
        same = (
            previous["test_set"] == self.test_set()
            if "test_set" in previous
            else Path(previous["datalist"]).resolve() == Path(self.datalist).resolve()
        )
        if not same:
            raise InputError(
                f"the evaluation name {self.name!r} already holds the results of the test set "
                f"{previous['datalist']} for {self.checkpoint} (MLflow metrics {self.name}/..., threshold.json "
                f"calibrated.{self.name}); evaluating {self.datalist} under it would overwrite them. Name this "
                "test set with --eval_name NAME."
            )

    def run(self) -> dict:
        """Score every test volume, compute the metrics and write/log all outputs. Returns the metrics."""
        self.check_name_is_free()
        self.load_network()
        healthy = self.healthy()
        entries = load_datalist(self.datalist, self.key, required=("image", "label"))
        subjects, panels = [], []
        for i, entry in enumerate(entries):
            name = entry.get("name") or Path(entry["image"]).name.split(".nii")[0]
            if any(s.name == name for s in subjects):
                name = f"{name}_{i}"
            subject, slices = self.score_subject(name, self.transform(entry))
            subjects.append(subject)
            if len(panels) < self.n_panels and subject.label.any():
                panels.append((subject, slices, int(subject.label.sum(axis=(0, 1)).argmax())))
            logger.info("scored %s (%d/%d)", name, i + 1, len(entries))
        curves = self.curves(subjects)
        results = self.metrics(subjects, curves, healthy)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(results, self.output_dir / "metrics.json")
        self._write_per_subject(subjects, results)
        atomic_write_json(curves, self.output_dir / "curves.json")
        self._plot_curves(curves)
        self._plot_panels(panels, results)
        calibrated = {c: {s: results[c]["dice_split"][s]["threshold"] for s in SCORE_NAMES} for c in self.configs}
        update_thresholds(
            self.checkpoint,
            {c: o.to_dict() for c, o in self.configs.items()},
            calibrated={
                self.name: {
                    "datalist": str(self.datalist),
                    "test_set": self.test_set(),
                    "subjects": results["calibration_subjects"],
                    "thresholds": calibrated,
                }
            },
        )
        self._log_to_mlflow(results)
        return results

    def _write_per_subject(self, subjects: list[_Subject], results: dict) -> None:
        """One row per subject: its lesion load, and per option set and score its own pixel AUROC and AUPRC, its Dice
        at the calibrated threshold (held-out subjects only) and at the default healthy quantile."""
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        q = self.default["quantile"]
        columns = [(c, s) for c in self.configs for s in SCORE_NAMES]
        writer.writerow(
            ["subject", "calibration", "slices", "brain_voxels", "lesion_voxels", "lesions", "mean_neg_elbo"]
            + [f"{m}_{c}_{s}" for c, s in columns for m in ("auroc", "auprc", "dice_split", f"dice_healthy_q{q}")]
        )
        for s in subjects:
            row = [
                s.name,
                s.name in results["calibration_subjects"],
                s.label.shape[-1],
                int(s.brain.sum()),
                int(s.label.sum()),
                lesion_detection(s.label, s.label)["lesions"],
                float(s.slice_terms["neg_elbo"].mean()),
            ]
            for c, k in columns:
                curve = ThresholdCurve.from_scores(s.voxels[c][k], s.lesion_voxels)
                threshold = results[c]["dice_healthy"][k][q]["threshold"]
                row += [
                    curve.auroc(),
                    curve.average_precision(),
                    results[c]["dice_split"][k]["per_subject"].get(s.name, ""),
                    dice(self._segment(s, c, k, threshold), s.label),
                ]
            writer.writerow(row)
        atomic_write_text(buffer.getvalue(), self.output_dir / "per_subject.csv")

    def curves(self, subjects: list[_Subject]) -> dict:
        """Pooled pixel curves (the content of ``curves.json``): ``fpr`` and ``recall`` grids, and per option set and
        score the exact ``auroc`` / ``auprc`` with ``tpr`` and ``precision`` on those grids. One sort per curve and
        one curve in memory at a time; the metrics, the JSON and the figure all use these."""
        grid = np.linspace(0.0, 1.0, CURVE_POINTS)
        labels = np.concatenate([s.lesion_voxels for s in subjects])
        out: dict = {"fpr": grid.tolist(), "recall": grid.tolist()}
        for config in self.configs:
            for score in SCORE_NAMES:
                curve = ThresholdCurve.from_scores(np.concatenate([s.voxels[config][score] for s in subjects]), labels)
                out.setdefault(config, {})[score] = {
                    "auroc": curve.auroc(),
                    "auprc": curve.average_precision(),
                    "tpr": np.round(curve.tpr_at(grid), 5).tolist(),
                    "precision": np.round(curve.precision_at(grid), 5).tolist(),
                }
        return out

    def _plot_curves(self, curves: dict) -> None:
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(len(self.configs), 2, figsize=(10, 4.5 * len(self.configs)), squeeze=False)
        for row, config in enumerate(self.configs):
            for score, entry in curves[config].items():
                axes[row, 0].plot(curves["fpr"], entry["tpr"], label=f"{score} (AUROC {entry['auroc']:.3f})")
                axes[row, 1].plot(curves["recall"], entry["precision"], label=f"{score} (AUPRC {entry['auprc']:.3f})")
            axes[row, 0].set(title=f"pixel ROC, {config}", xlabel="false positive rate", ylabel="true positive rate")
            axes[row, 1].set(title=f"pixel PR, {config}", xlabel="recall", ylabel="precision")
            for ax in axes[row]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(self.output_dir / "roc_pr.png", ".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)

    def _plot_panels(self, panels: list, results: dict) -> None:
        """Input, reconstruction, ground truth, the maps of the option set that inference uses by default and its
        default segmentation (the label-free operating point, or the library default without one; named in the
        figure)."""
        if not panels:
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        point = results.get("operating_point")
        if point is not None:  # what inference does by default: the label-free operating point
            config, score, threshold = point["option_set"], point["score"], point["threshold"]
            options = OperatingPoint.from_dict(point).options(self.configs[config])
            rule = f"{score} >= healthy q{point['quantile']:g},\ncomponents >= {point['min_component_size']} vox"
            heading = (
                "inference's default: the label-free operating point (chosen on synthetic lesions in the healthy "
                f"validation subjects; no labels)\n{config}/{rule.replace(chr(10), ' ')} (threshold {threshold:.4g}): "
                f"Dice {point['dice']:.3f} on this test set, {point['synthetic_dice']:.3f} on the synthetic lesions"
            )
        else:
            config, score, q = (self.default[k] for k in ("option_set", "score", "quantile"))
            threshold, options, rule = results["default"]["threshold"], self.configs[config], f"{score} >= healthy q{q}"
            heading = (
                f"inference's default segmentation: option set {config}, score {score}, threshold {threshold:.4g} "
                f"(healthy quantile {q}, no labels used)"
            )
        columns = [
            "input",
            "reconstruction",
            "ground truth",
            f"{config}: rec",
            f"{config}: kl_grad",
            f"{config}: combined",
            f"segmentation:\n{rule}",
        ]
        fig, axes = plt.subplots(
            len(panels), len(columns), figsize=(2 * len(columns), 2.2 * len(panels) + 0.4), squeeze=False
        )
        for row, (subject, slices, z) in enumerate(panels):
            seg = segment(subject.volume(config, score), subject.brain, threshold, options)[..., z]
            images = [
                slices["image"][z],
                slices["recon"][z],
                subject.label[..., z],
                subject.volume(config, "rec")[..., z],
                subject.volume(config, "kl_grad")[..., z],
                subject.volume(config, "combined")[..., z],
                seg,
            ]
            for col, (title, img) in enumerate(zip(columns, images)):
                ax = axes[row, col]
                ax.imshow(
                    np.asarray(img, np.float32).T, cmap="gray" if col in (0, 1, 2, 6) else "magma", origin="lower"
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
            axes[row, 0].set_ylabel(f"{subject.name}\nslice {z}", fontsize=8)
        fig.suptitle(heading, fontsize=9)
        fig.tight_layout()
        with atomic_path(self.output_dir / "panels.png", ".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)

    def mlflow_metrics(self, results: dict) -> dict[str, float]:
        """The metrics logged to MLflow: ``<name>/<metric>``, ``<name>/operating_point/<metric>`` and
        ``<name>/<option set>/<metric>/<score>``."""
        prefix = self.name
        values = {f"{prefix}/{k}": results[k] for k in ("kl_q95", "kl_q95_per_dim", "active_units")}
        values.update({f"{prefix}/{k}": v for k, v in results["baselines"].items()})
        for config in self.configs:
            out = results[config]
            keys = ["slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_best"]
            keys += [f"pixel_{m}_{g}" for g in self.label_groups for m in ("auroc", "auprc")]
            for key in keys:
                values.update({f"{prefix}/{config}/{key}/{score}": value for score, value in out[key].items()})
            for score in SCORE_NAMES:
                values[f"{prefix}/{config}/dice_split/{score}"] = out["dice_split"][score]["dice"]
                values[f"{prefix}/{config}/threshold/{score}"] = out["dice_split"][score]["threshold"]
                for q, entry in out["dice_healthy"][score].items():
                    values[f"{prefix}/{config}/dice_healthy_q{q}/{score}"] = entry["dice"]
                synthetic_key = f"synthetic_dice_healthy_q{self.default['quantile']}"
                values[f"{prefix}/{config}/{synthetic_key}/{score}"] = out["synthetic_dice_healthy"][score]
                for where, found in out["lesion_detection"].items():
                    values[f"{prefix}/{config}/lesion_recall_{where}/{score}"] = found[score]["recall"]
                    values[f"{prefix}/{config}/lesion_fp_per_volume_{where}/{score}"] = found[score]["fp_per_volume"]
                for key, intervals in out["ci95"].items():
                    lo, hi = intervals[score]
                    values[f"{prefix}/{config}/{key}_ci95_lo/{score}"] = lo
                    values[f"{prefix}/{config}/{key}_ci95_hi/{score}"] = hi
        point = results.get("operating_point")
        for key in ("dice", "synthetic_dice", "recall", "fp_per_volume") if point else ():
            values[f"{prefix}/operating_point/{key}"] = point[key]
        # NaN is logged too (MLflow keeps it): a re-evaluation must not leave an earlier value standing
        return {k: float(v) for k, v in values.items() if not np.isinf(v)}

    def _log_to_mlflow(self, results: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        from pipeline.tracking import (
            RUN_INFO_FILENAME,
            SPOOL_DIRNAME,
            SpooledClient,
            experiment_id,
            report_pending,
            resolve_tracking_uri,
            store_lock,
        )

        info_path = self.checkpoint.parent / RUN_INFO_FILENAME
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        uri = info.get("tracking_uri") or resolve_tracking_uri(self.tracking_uri, self.output_dir)
        run_id = info.get("run_id")
        with store_lock(uri):  # the client creates a new store's schema
            client = SpooledClient(MlflowClient(uri), self.output_dir / SPOOL_DIRNAME)  # survives an outage
        if run_id is None:
            run_id = client.create_run(
                experiment_id(client, self.experiment_name),
                run_name="evaluation",
                tags={"evaluated_checkpoint": str(self.checkpoint)},
            ).info.run_id
        close = info.get("run_id") is None
        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, 0) for key, value in self.mlflow_metrics(results).items()]
        for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        folder = f"evaluation/{self.name}"
        for name in ("metrics.json", "per_subject.csv", "curves.json", "roc_pr.png", "panels.png"):
            if (self.output_dir / name).is_file():
                client.log_artifact(run_id, str(self.output_dir / name), artifact_path=folder)
        client.log_artifact(run_id, str(self.checkpoint.parent / "threshold.json"), artifact_path=folder)
        if close:
            client.set_terminated(run_id)
        report_pending(client, f"evaluation {self.name!r}")


def _safe(metric: Callable, y: np.ndarray, scores: np.ndarray) -> float:
    """A sklearn slice metric, NaN when only one class is present."""
    return float(metric(y, scores)) if 0 < y.sum() < y.size else float("nan")
