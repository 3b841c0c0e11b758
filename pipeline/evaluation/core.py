"""The evaluation of a trained ceVAE on a labelled test datalist (:class:`AnomalyEvaluation`; the package
docstring says what it computes and writes)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.anomaly_map import AnomalyMap
from pipeline.calibration import LabelFreeCalibration
from pipeline.data.datalist import load_datalist, subject_name
from pipeline.data.slices import SliceSelection
from pipeline.errors import InputError
from pipeline.evaluation.figures import plot_curves, plot_panels
from pipeline.evaluation.mlflow_report import log_to_mlflow, mlflow_metrics
from pipeline.evaluation.option_set_metrics import TestSplit, coverage_warnings, option_set_metrics
from pipeline.evaluation.report import pixel_curves, write_per_subject
from pipeline.evaluation.segmentation import detection_of, dice_entry_of, segment_subject
from pipeline.evaluation.settings import DefaultSegmentation, LabelledSet, Reporting
from pipeline.evaluation.subjects import ScoredSubject, pooled_dice, segmentation_counts
from pipeline.healthy import active_units
from pipeline.io import atomic_write_json
from pipeline.metrics import bootstrap_weights, slice_labels, split_calibration
from pipeline.operating_point import OperatingPoint
from pipeline.output_dir import METRICS_FILENAME
from pipeline.scoring import SCORE_NAMES, brain_voxels
from pipeline.tracking import tracking_off

__all__ = ["AnomalyEvaluation"]

logger = logging.getLogger(__name__)


class AnomalyEvaluation:
    """Evaluate ``checkpoint`` on a labelled test set (see the package docstring).

    Args:
        model: the :class:`~pipeline.anomaly_map.AnomalyMap` of the checkpoint's architecture, with the option sets
            to report side by side.
        checkpoint: ``model.pt`` (``{"model", "loss"}``), loaded with ``weights_only=True``.
        labelled: the test data (:class:`~pipeline.evaluation.settings.LabelledSet`).
        transform: the volume chain used in training.
        output_dir: where outputs go.
        slices: the slice selection of training (:class:`~pipeline.data.slices.SliceSelection`): slice-level metrics
            use those slices.
        reporting: the threshold split, bootstrap and panels (:class:`~pipeline.evaluation.settings.Reporting`).
        default: the segmentation inference makes by default
            (:class:`~pipeline.evaluation.settings.DefaultSegmentation`).
        tracking_uri, experiment_name: MLflow destination when the checkpoint's training run is unknown
            (``tracking_uri`` ``"none"``: nothing is logged to MLflow).
        healthy_data: healthy validation entries, to compute the healthy thresholds when ``threshold.json`` lacks
            them for this checkpoint (None: such a file is required).
        calibration: how they are computed then (:class:`~pipeline.calibration.LabelFreeCalibration`: the healthy
            quantiles, the synthetic lesions).
    """

    def __init__(
        self,
        model: AnomalyMap,
        checkpoint: str | os.PathLike,
        labelled: LabelledSet,
        transform: Callable,
        output_dir: str | os.PathLike,
        slices: SliceSelection | None = None,
        reporting: Reporting | None = None,
        default: DefaultSegmentation | None = None,
        tracking_uri: str | None = None,
        experiment_name: str = "cevae",
        healthy_data: Sequence[dict] | None = None,
        calibration: LabelFreeCalibration | None = None,
    ) -> None:
        self.model, self.checkpoint, self.labelled = model, Path(checkpoint), labelled
        self.transform, self.output_dir = transform, Path(output_dir)
        self.configs = dict(model.option_sets)
        default = DefaultSegmentation() if default is None else default
        if default.option_set not in self.configs or default.score not in SCORE_NAMES:
            raise InputError(
                f"the default segmentation {default.option_set}/{default.score} is not among the option "
                f"sets {sorted(self.configs)} and scores {SCORE_NAMES}; fix --option_set or --score."
            )
        self.default = default.to_dict()
        self.slices = SliceSelection() if slices is None else slices
        self.reporting = Reporting() if reporting is None else reporting
        self.tracking_uri, self.experiment_name = tracking_uri, experiment_name
        self.healthy_data = healthy_data
        self.calibration = LabelFreeCalibration() if calibration is None else calibration

    # ----------------------------------------------------------------------------------------------- scoring
    def healthy(self) -> dict:
        """The ``healthy`` reference of the loaded model for these option sets; computed from ``healthy_data`` (and
        written into ``threshold.json``) when the model has none for these weights or has it for other options. The
        option sets then hold their healthy normalisation constants (stored with them, or fitted here)."""
        model, requested = self.model, self.configs
        stored = model.option_sets
        if model.healthy and all(c in stored and stored[c].unfitted() == o.unfitted() for c, o in requested.items()):
            self.configs = {c: stored[c] for c in requested}
            return self._with_default(model.healthy)
        if not self.healthy_data:
            reason = (
                "its option sets differ from this evaluation's"
                if model.healthy
                else model.unread_reference or "its threshold.json has no healthy section"
            )
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
        model.option_sets = dict(requested)
        healthy, fitted = self.calibration(model, self.healthy_data, self.transform)
        model.record(fitted, healthy=healthy)
        self.configs = {c: model.option_sets[c] for c in requested}
        return self._with_default(model.healthy)

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

    def score_subject(self, name: str, data: Mapping[str, torch.Tensor]) -> tuple[ScoredSubject, dict]:
        """Score one preprocessed volume; returns the compact results and the per-slice arrays for panels."""
        image = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
        brain = np.asarray(data["brainmask"][0] > 0)
        label = np.asarray(data["label"][0] > 0) & brain
        classes = None
        if self.labelled.label_groups:
            if "label_classes" not in data:
                raise ValueError(
                    "label_groups needs the label's classes: build the transform with class_key='label_classes'."
                )
            classes = np.rint(np.asarray(data["label_classes"][0])[brain]).astype(np.int16)
        subject = ScoredSubject(name, brain, label, classes)
        subject.scored_slices = self.slices.indices(torch.as_tensor(brain[None]))
        terms, maps = self.model(image, brain, self.configs)
        subject.slice_terms = {k: terms[k].numpy() for k in ("rec", "kl", "neg_elbo", "mu")}
        brain_pixels = np.maximum(brain.sum(axis=(0, 1)), 1)
        subject.voxels = brain_voxels(maps, brain)
        for config, volumes in maps.items():
            subject.slice_means[config] = {
                score: (volume * brain).sum(axis=(0, 1)) / brain_pixels for score, volume in volumes.items()
            }
        return subject, {"image": image[0].permute(2, 0, 1).numpy(), "recon": terms["recon"][:, 0].numpy()}

    # ----------------------------------------------------------------------------------------------- metrics
    def metrics(self, subjects: list[ScoredSubject], curves: dict, healthy: dict) -> dict:
        """All metrics, per option set (see the module docstring); ``curves`` from :meth:`curves`, ``healthy`` the
        healthy section of ``threshold.json``."""
        report = self.reporting
        if len(subjects) > 1:
            calibration, reported = split_calibration(
                [s.name for s in subjects], report.calibration_fraction, report.seed
            )
        else:  # the threshold still comes from the data, but no held-out Dice can be reported
            logger.warning("only one test subject: its Dice threshold is calibrated on it; Dice 20/80 is not reported")
            calibration, reported = [s.name for s in subjects], []
        cal = [s for s in subjects if s.name in calibration]
        rep = [s for s in subjects if s.name in reported]
        slice_y = np.concatenate(
            [slice_labels(s.label, self.labelled.min_slice_pixels)[s.scored_slices] for s in subjects]
        )
        kl = np.concatenate([s.slice_terms["kl"] for s in subjects])
        mu = np.concatenate([s.slice_terms["mu"] for s in subjects])
        lesion_voxels = sum(int(s.label.sum()) for s in subjects)
        baselines = {  # trivial references: a random score's AUPRC, and the Dice of segmenting the whole brain
            "prevalence": lesion_voxels / max(sum(int(s.brain.sum()) for s in subjects), 1),
            "dice_whole_brain_all": pooled_dice(segmentation_counts([s.brain for s in subjects], subjects)),
            "dice_whole_brain_reported": (
                pooled_dice(segmentation_counts([s.brain for s in rep], rep)) if rep else float("nan")
            ),
        }
        # intervals over subjects need two of them at least: one subject's resamples are all the same
        split = TestSplit(
            subjects=subjects,
            calibration=cal,
            reported=rep,
            weights=bootstrap_weights(len(subjects), report.n_bootstrap, report.seed) if len(subjects) > 1 else None,
            weights_rep=bootstrap_weights(len(rep), report.n_bootstrap, report.seed) if len(rep) > 1 else None,
            slice_y=slice_y,
            baselines=baselines,
            default_quantile=self.default["quantile"],
            label_groups=self.labelled.label_groups,
        )
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
            "checkpoint_sha256": self.model.checkpoint_sha256,
            "datalist": str(self.labelled.datalist),
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
        workers = max(1, min(torch.get_num_threads(), len(self.configs)))
        with ThreadPoolExecutor(workers) as pool:  # option sets side by side (option_set_metrics' docstring)
            computed = pool.map(
                lambda c: option_set_metrics(split, c, self.configs[c], curves, healthy), list(self.configs)
            )
            for config, out in zip(self.configs, computed):
                results[config] = out
                results["warnings"] += coverage_warnings(config, out)
        results["operating_point"] = self._operating_point(subjects, healthy, baselines["dice_whole_brain_all"])
        paper = results[next(iter(self.configs))]
        for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_split", "dice_best"):
            results[key] = paper[key]  # the paper's plain definitions at the top level
        return results

    def _operating_point(self, subjects: list[ScoredSubject], healthy: dict, whole_brain: float) -> dict | None:
        """Inference's default, the label-free operating point that training chose on synthetic lesions, on this
        test set (None: the thresholds file has none, or its option set is not evaluated here)."""
        stored = healthy.get("synthetic", {}).get("operating_point")
        if stored is None or stored["option_set"] not in self.configs:
            return None
        point = OperatingPoint.from_dict(stored)
        options = point.options(self.configs[point.option_set])
        found = [segment_subject(s, point.option_set, point.score, point.threshold, options) for s in subjects]
        dice_entry = dice_entry_of(segmentation_counts(found, subjects), subjects, point.threshold, whole_brain)
        return {**point.to_dict(), **dice_entry, **detection_of(found, subjects, point.threshold)}

    # ----------------------------------------------------------------------------------------------- outputs
    def check_name_is_free(self) -> None:
        """Refuse to evaluate a test set under a name that already holds another test set's results for this
        checkpoint (MLflow metrics ``<name>/...`` of its run, ``calibrated.<name>`` of ``threshold.json``): they would
        be overwritten. Re-evaluating the same test set under its name is allowed. Needs the loaded model (its
        reference holds no calibration when ``threshold.json`` is missing or was made for other weights)."""
        name, datalist = self.labelled.name, self.labelled.datalist
        previous = self.model.reference.get("calibrated", {}).get(name)
        if previous is None:
            return
        same = (
            previous["test_set"] == self.labelled.identity()
            if "test_set" in previous
            else Path(previous["datalist"]).resolve() == datalist.resolve()
        )
        if not same:
            raise InputError(
                f"the evaluation name {name!r} already holds the results of the test set "
                f"{previous['datalist']} for {self.checkpoint} (MLflow metrics {name}/..., threshold.json "
                f"calibrated.{name}); evaluating {datalist} under it would overwrite them. Name this "
                "test set with --eval_name NAME."
            )

    def run(self) -> dict:
        """Score every test volume, compute the metrics and write/log all outputs. Returns the metrics."""
        self.model.load(self.checkpoint, reference="optional")
        self.check_name_is_free()
        healthy = self.healthy()
        entries = load_datalist(self.labelled.datalist, self.labelled.key, required=("image", "label"))
        subjects, panels = [], []
        for i, entry in enumerate(entries):
            name = subject_name(entry)
            if any(s.name == name for s in subjects):  # file names without subject ids can repeat
                name = f"{name}_{i}"
            subject, slices = self.score_subject(name, self.transform(entry))
            subjects.append(subject)
            if len(panels) < self.reporting.n_panels and subject.label.any():
                panels.append((subject, slices, int(subject.label.sum(axis=(0, 1)).argmax())))
            logger.info("scored %s (%d/%d)", name, i + 1, len(entries))
        curves = pixel_curves(subjects, self.configs)
        results = self.metrics(subjects, curves, healthy)
        calibrated = {c: {s: results[c]["dice_split"][s]["threshold"] for s in SCORE_NAMES} for c in self.configs}
        test_set = {"datalist": str(self.labelled.datalist), "test_set": self.labelled.identity()}
        entry = {**test_set, "subjects": results["calibration_subjects"], "thresholds": calibrated}
        self.model.record(self.configs, calibrated={self.labelled.name: entry})  # refuses if model.pt changed meanwhile
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(results, self.output_dir / METRICS_FILENAME)
        write_per_subject(
            subjects, results, self.configs, self.default["quantile"], self.output_dir / "per_subject.csv"
        )
        atomic_write_json(curves, self.output_dir / "curves.json")
        plot_curves(curves, list(self.configs), self.output_dir / "roc_pr.png")
        plot_panels(panels, results, self.configs, self.default, self.output_dir / "panels.png")
        name = self.labelled.name
        metrics = mlflow_metrics(
            name, list(self.configs), self.labelled.label_groups, self.default["quantile"], results
        )
        if not tracking_off(self.tracking_uri):
            log_to_mlflow(
                metrics,
                name,
                self.checkpoint,
                self.output_dir,
                self.tracking_uri,
                self.experiment_name,
                Path(self.labelled.datalist),
            )
        return results
