"""The metrics of one option set over scored test subjects (:func:`option_set_metrics`): a pure function of the
subjects and a :class:`TestSplit`, so that :class:`~pipeline.evaluation.core.AnomalyEvaluation` computes the option
sets side by side in threads (the work is numpy, scipy and scikit-learn, which release the GIL: the connected
components of the Dice searches dominate)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.evaluation.segmentation import detection_of, dice_entry_of, dice_search, segment_subject
from pipeline.evaluation.subjects import ScoredSubject, segmentation_counts
from pipeline.metrics import ThresholdCurve, bootstrap_dice, bootstrap_pixel_metrics, dice
from pipeline.scoring import SCORE_NAMES, ScoreOptions
from pipeline.thresholds import quantile_key

__all__ = ["NO_INTERVAL", "TestSplit", "coverage_warnings", "option_set_metrics"]

logger = logging.getLogger(__name__)

NO_INTERVAL = [float("nan"), float("nan")]  # ci95 where fewer than two subjects allow no bootstrap over subjects


@dataclass(frozen=True)
class TestSplit:
    """The scored test subjects and what every option set's metrics share.

    ``calibration``/``reported``: the subjects whose pooled Dice picks the ``dice_split`` threshold / that report its
    Dice; ``weights``/``weights_rep``: bootstrap weights over all / the reported subjects (None: fewer than two);
    ``slice_y``: per scored slice 0 (normal), 1 (anomalous) or -1 (excluded); ``baselines``: ``prevalence``,
    ``dice_whole_brain_all``, ``dice_whole_brain_reported``; ``default_quantile``: the quantile key of inference's
    default threshold; ``label_groups``: ``{group: [label values]}``."""

    subjects: Sequence[ScoredSubject]
    calibration: Sequence[ScoredSubject]
    reported: Sequence[ScoredSubject]
    weights: np.ndarray | None
    weights_rep: np.ndarray | None
    slice_y: np.ndarray
    baselines: Mapping[str, float]
    default_quantile: str
    label_groups: Mapping[str, Sequence[int]]


def _safe(metric, y: np.ndarray, scores: np.ndarray) -> float:
    """A sklearn slice metric, NaN when only one class is present."""
    return float(metric(y, scores)) if 0 < y.sum() < y.size else float("nan")


def _slice_metrics(split: TestSplit, config: str) -> dict:
    subjects, keep = split.subjects, split.slice_y >= 0
    scores = {"elbo": np.concatenate([s.slice_terms["neg_elbo"][s.scored_slices] for s in subjects])}
    scores.update(
        {k: np.concatenate([s.slice_means[config][k][s.scored_slices] for s in subjects]) for k in SCORE_NAMES}
    )
    y = split.slice_y[keep]
    return {
        "slice_auroc": {k: _safe(roc_auc_score, y, v[keep]) for k, v in scores.items()},
        "slice_auprc": {k: _safe(average_precision_score, y, v[keep]) for k, v in scores.items()},
    }


def _score_metrics(
    split: TestSplit, config: str, score: str, options: ScoreOptions, curve: Mapping, thresholds: Mapping
) -> dict:
    """Every metric of one map ``config``/``score`` (keys as in :func:`option_set_metrics`'s result)."""
    subjects, cal, rep = split.subjects, split.calibration, split.reported
    out: dict = {"pixel_auroc": curve["auroc"], "pixel_auprc": curve["auprc"]}
    interval = (
        bootstrap_pixel_metrics(
            [s.voxels[config][score] for s in subjects],
            [s.lesion_voxels for s in subjects],
            split.weights,
            exact={"auroc": curve["auroc"], "auprc": curve["auprc"]},
        )
        if split.weights is not None
        else {"auroc": NO_INTERVAL, "auprc": NO_INTERVAL}
    )
    out["ci95"] = {"pixel_auroc": interval["auroc"], "pixel_auprc": interval["auprc"]}
    threshold, cal_dice = dice_search(cal, config, score, options)
    found = [segment_subject(s, config, score, threshold, options) for s in rep]  # segmented once
    counts = segmentation_counts(found, rep)
    per_subject = {s.name: dice(f, s.label) for f, s in zip(found, rep)}
    out["dice_split"] = {
        **dice_entry_of(counts, rep, threshold, split.baselines["dice_whole_brain_reported"]),
        "calibration_dice": cal_dice,
        "dice_mean_per_subject": float(np.mean(list(per_subject.values()))) if rep else float("nan"),
        "per_subject": per_subject,
    }
    out["ci95"]["dice_split"] = (
        bootstrap_dice(counts, split.weights_rep) if split.weights_rep is not None else NO_INTERVAL
    )
    out["calibrated_detection"] = detection_of(found, rep, threshold)
    out["dice_best"] = dice_search(subjects, config, score, options)[1]
    out["dice_healthy"] = {}
    for q, value in thresholds.items():
        found = [segment_subject(s, config, score, value, options) for s in subjects]
        counts = segmentation_counts(found, subjects)
        out["dice_healthy"][q] = dice_entry_of(counts, subjects, value, split.baselines["dice_whole_brain_all"])
        if q == split.default_quantile:
            out["ci95"]["dice_healthy"] = (
                bootstrap_dice(counts, split.weights) if split.weights is not None else NO_INTERVAL
            )
            out["healthy_detection"] = {"quantile": q, **detection_of(found, subjects, value)}
    return out


def _group_metrics(split: TestSplit, config: str) -> dict:
    """``pixel_auroc_<group>`` / ``pixel_auprc_<group>`` per score: the group's voxels against unlabelled brain."""
    out: dict = {}
    subjects = split.subjects
    healthy = ~np.concatenate([s.lesion_voxels for s in subjects]) if split.label_groups else None
    for group, values in split.label_groups.items():
        positive = np.concatenate([np.isin(s.classes, values) for s in subjects])
        keep = positive | healthy
        out[f"pixel_auroc_{group}"], out[f"pixel_auprc_{group}"] = {}, {}
        for score in SCORE_NAMES:
            scores = np.concatenate([s.voxels[config][score] for s in subjects])[keep]
            curve = ThresholdCurve.from_scores(scores, positive[keep])
            out[f"pixel_auroc_{group}"][score] = curve.auroc()
            out[f"pixel_auprc_{group}"][score] = curve.average_precision()
    return out


def option_set_metrics(split: TestSplit, config: str, options: ScoreOptions, curves: Mapping, healthy: Mapping) -> dict:
    """The metrics of option set ``config`` (:mod:`pipeline.evaluation`'s docstring lists them): ``curves`` of
    :func:`~pipeline.evaluation.report.pixel_curves`, ``healthy`` the healthy section of ``threshold.json``."""
    out: dict = {
        "options": options.summary(),
        "prevalence": split.baselines["prevalence"],
        **_slice_metrics(split, config),
    }
    for key in ("pixel_auroc", "pixel_auprc", "dice_split", "dice_best", "dice_healthy"):
        out[key] = {}
    out["lesion_detection"] = {"calibrated": {}, "healthy": {}}
    out["ci95"] = {key: {} for key in ("pixel_auroc", "pixel_auprc", "dice_split", "dice_healthy")}
    for score in SCORE_NAMES:
        found = _score_metrics(
            split, config, score, options, curves[config][score], healthy["thresholds"][config][score]
        )
        for key in ("pixel_auroc", "pixel_auprc", "dice_split", "dice_best", "dice_healthy"):
            out[key][score] = found[key]
        for key, interval in found["ci95"].items():
            out["ci95"][key][score] = interval
        out["lesion_detection"]["calibrated"][score] = found["calibrated_detection"]
        if "healthy_detection" in found:
            out["lesion_detection"]["healthy"][score] = found["healthy_detection"]
    # beside the real test set's Dice at the healthy threshold: the same choice on synthetic lesions in the healthy
    # validation subjects (written by training; NaN where the thresholds were recomputed here)
    synthetic = healthy.get("synthetic", {})
    same_choice = (
        synthetic.get("quantile") is not None and quantile_key(synthetic["quantile"]) == split.default_quantile
    )
    out["synthetic_dice_healthy"] = {
        score: synthetic["dice"][config][score] if same_choice else float("nan") for score in SCORE_NAMES
    }
    out.update(_group_metrics(split, config))
    return out


def coverage_warnings(config: str, out: Mapping) -> list[str]:
    """One line per threshold of ``config`` whose segmentation covers more than half of the brain, also logged."""
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
