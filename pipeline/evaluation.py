"""Evaluation of a trained ceVAE on a labelled test datalist: every number of the paper's Fig. 2 and text.

:class:`AnomalyEvaluation` scores each test volume slice-batch by slice-batch (one forward and one batched
KL-gradient backward per batch, :func:`pipeline.scoring.raw_scores`), derives the pixel maps of every option set
(the paper's plain definitions and a post-processed variant), stacks them back into 3D volumes in the evaluation
geometry and keeps brain voxels only as compact arrays. Then:

* slice level: AUROC/AUPRC of slice scores (normal: no annotated pixel; anomalous: > ``min_slice_pixels``);
* pixel level: exact AUROC/AUPRC over brain voxels (:class:`pipeline.metrics.ThresholdCurve`); with
  ``label_groups`` (e.g. BraTS ``{"core": [1, 3, 4], "oedema": [2]}``) also per group of label values, each group's
  voxels against the unlabelled brain voxels (needs the transform's ``class_key="label_classes"``);
* Dice: threshold chosen on a seeded 20 % of the test **subjects**, Dice reported on the other 80 % (pooled and
  mean per subject); best possible Dice on all subjects;
* posterior collapse: 0.95 quantile of the per-slice KL, active latent units (``Var_x[mu_d] > 0.01``).

Outputs in ``output_dir``: ``metrics.json``, ``per_subject.csv``, ``curves.json`` (pixel ROC and PR curves on fixed
grids), ``roc_pr.png``, ``panels.png``; the thresholds go to ``threshold.json`` next to the checkpoint. Metrics are
logged to MLflow as ``<name>/<option set>/<metric>/<score>`` (e.g. ``eval/paper/pixel_auroc/combined``) and
``<name>/kl_q95``, files under the artifact folder ``evaluation/<name>``; ``name`` tells test sets apart.
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
from pipeline.io import atomic_path, atomic_write_json, atomic_write_text
from pipeline.metrics import ThresholdCurve, best_dice_threshold, dice, slice_labels, split_calibration
from pipeline.scoring import PAPER, SCORE_NAMES, ScoreOptions, score_volume, segment

__all__ = ["AnomalyEvaluation", "POSTPROCESSED"]

logger = logging.getLogger(__name__)

POSTPROCESSED = ScoreOptions(grad_sigma=3.0, grad_kernel=7, normalize_slices=True, brain_mask=True, mask_erosion=1,
                             median_size=5, min_component_size=7)
ACTIVE_UNIT_VARIANCE = 0.01
CURVE_POINTS = 201  # grid of the FPR / recall axis in curves.json
N_THRESHOLD_CANDIDATES = 64  # threshold grid when connected components make Dice non-monotone


class _Subject:
    """Compact per-subject results: brain-voxel scores per option set and score, labels, slice terms."""

    def __init__(self, name: str, brain: np.ndarray, label: np.ndarray, classes: np.ndarray | None = None) -> None:
        self.name, self.brain, self.label = name, brain, label
        self.classes = classes  # original label values of the brain voxels, for label_groups
        self.voxels: dict[str, dict[str, np.ndarray]] = {}
        self.slice_means: dict[str, dict[str, np.ndarray]] = {}
        self.slice_terms: dict[str, np.ndarray] = {}

    def volume(self, config: str, score: str) -> np.ndarray:
        out = np.zeros(self.brain.shape, np.float32)
        out[self.brain] = self.voxels[config][score]
        return out


class AnomalyEvaluation:
    """Evaluate ``checkpoint`` on the ``key`` entries of ``datalist`` (see the module docstring).

    Args:
        network: a :class:`~pipeline.networks.CeVAE` of the checkpoint's architecture.
        checkpoint: ``model.pt`` (``{"model": state_dict}``), loaded with ``weights_only=True``.
        datalist: datalist JSON with ``image``, ``label`` and optionally ``brainmask`` entries under ``key``.
        transform: the volume chain used in training.
        output_dir: where outputs go.
        configs: option sets to report side by side (default: ``paper`` and ``postprocessed``).
        reconstruction, kl_weight: the reconstruction term and KL weight of the ELBO, as in training.
        batch_size: slices per network pass.
        min_slice_pixels: annotated pixels above which a slice counts as anomalous.
        calibration_fraction, seed: the subject split of the Dice threshold.
        tracking_uri, experiment_name: MLflow destination when the checkpoint's training run is unknown.
        name: the test set's name in MLflow (metric prefix and artifact sub-folder).
        label_groups: optional ``{group: [label values]}``; adds ``pixel_auroc_<group>`` / ``pixel_auprc_<group>``.
    """

    def __init__(self, network: torch.nn.Module, checkpoint: str | os.PathLike, datalist: str | os.PathLike,
                 transform: Callable, output_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 configs: Mapping[str, ScoreOptions] | None = None, reconstruction: str = "l2", kl_weight: float = 1.0,
                 batch_size: int = 64, min_slice_pixels: int = 20, calibration_fraction: float = 0.2,
                 seed: int = 0, key: str = "test", n_panels: int = 4, tracking_uri: str | None = None,
                 experiment_name: str = "cevae", name: str = "eval",
                 label_groups: Mapping[str, Sequence[int]] | None = None) -> None:
        for text in (name, *(label_groups or {})):
            if not text or "/" in text:
                raise ValueError(f"evaluation and label group names must be non-empty without '/', got {text!r}.")
        self.label_groups = {g: [int(v) for v in values] for g, values in (label_groups or {}).items()}
        self.network, self.checkpoint, self.datalist = network, Path(checkpoint), Path(datalist)
        self.transform, self.output_dir, self.device = transform, Path(output_dir), torch.device(device)
        self.configs = dict(configs or {"paper": PAPER, "postprocessed": POSTPROCESSED})
        self.reconstruction, self.kl_weight = reconstruction, kl_weight
        self.batch_size, self.min_slice_pixels = batch_size, min_slice_pixels
        self.calibration_fraction, self.seed, self.key, self.n_panels = calibration_fraction, seed, key, n_panels
        self.tracking_uri, self.experiment_name, self.name = tracking_uri, experiment_name, name

    # ----------------------------------------------------------------------------------------------- scoring
    def load_network(self) -> torch.nn.Module:
        if not self.checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} does not exist; train first or pass --ckpt_path.")
        state = torch.load(self.checkpoint, map_location=self.device, weights_only=True)
        self.network.load_state_dict(state.get("model", state))
        return self.network.to(self.device).eval()

    def score_subject(self, name: str, data: Mapping[str, torch.Tensor]) -> tuple[_Subject, dict]:
        """Score one preprocessed volume; returns the compact results and the per-slice arrays for panels."""
        image = data["image"].as_tensor() if hasattr(data["image"], "as_tensor") else data["image"]
        brain = np.asarray(data["brainmask"][0] > 0)
        label = np.asarray(data["label"][0] > 0) & brain
        classes = None
        if self.label_groups:
            if "label_classes" not in data:
                raise ValueError("label_groups needs the label's classes: build the transform with "
                                 "class_key='label_classes'.")
            classes = np.rint(np.asarray(data["label_classes"][0])[brain]).astype(np.int16)
        subject = _Subject(name, brain, label, classes)
        terms, maps = score_volume(self.network, image, brain, self.configs, self.reconstruction, self.batch_size,
                                   device=self.device, kl_weight=self.kl_weight)
        subject.slice_terms = {k: terms[k].numpy() for k in ("rec", "kl", "neg_elbo", "mu")}
        brain_pixels = np.maximum(brain.sum(axis=(0, 1)), 1)
        for config, volumes in maps.items():
            subject.voxels[config] = {score: volume[brain] for score, volume in volumes.items()}
            subject.slice_means[config] = {score: (volume * brain).sum(axis=(0, 1)) / brain_pixels
                                           for score, volume in volumes.items()}
        return subject, {"image": image[0].permute(2, 0, 1).numpy(), "recon": terms["recon"][:, 0].numpy()}

    # ----------------------------------------------------------------------------------------------- metrics
    def _dice_search(self, subjects: list[_Subject], config: str, score: str) -> tuple[float, float]:
        """Best ``(threshold, pooled Dice)`` over ``subjects``: exact without component removal, else a grid."""
        voxels = np.concatenate([s.voxels[config][score] for s in subjects])
        labels = np.concatenate([s.label[s.brain] for s in subjects])
        min_size = self.configs[config].min_component_size
        if min_size <= 1:
            return best_dice_threshold(voxels, labels)
        candidates = np.unique(np.quantile(voxels, np.linspace(0.5, 1.0, N_THRESHOLD_CANDIDATES)))
        results = [(float(t), self._pooled_dice(subjects, config, score, float(t))) for t in candidates]
        return max(results, key=lambda r: r[1])

    def _segment(self, subject: _Subject, config: str, score: str, threshold: float) -> np.ndarray:
        return segment(subject.volume(config, score), subject.brain, threshold, self.configs[config])

    def _pooled_dice(self, subjects: list[_Subject], config: str, score: str, threshold: float) -> float:
        segs = [self._segment(s, config, score, threshold) for s in subjects]
        tp = sum(int((g & s.label).sum()) for g, s in zip(segs, subjects))
        total = sum(int(g.sum() + s.label.sum()) for g, s in zip(segs, subjects))
        return 1.0 if total == 0 else 2.0 * tp / total

    def metrics(self, subjects: list[_Subject], curves: dict) -> dict:
        """All metrics, per option set (see the module docstring); ``curves`` from :meth:`curves`."""
        if len(subjects) > 1:
            calibration, reported = split_calibration([s.name for s in subjects], self.calibration_fraction, self.seed)
        else:  # the threshold still comes from the data, but no held-out Dice can be reported
            logger.warning("only one test subject: its Dice threshold is calibrated on it; Dice 20/80 is not reported")
            calibration, reported = [s.name for s in subjects], []
        cal = [s for s in subjects if s.name in calibration]
        rep = [s for s in subjects if s.name in reported]
        slice_y = np.concatenate([slice_labels(s.label, self.min_slice_pixels) for s in subjects])
        keep = slice_y >= 0
        kl = np.concatenate([s.slice_terms["kl"] for s in subjects])
        mu = np.concatenate([s.slice_terms["mu"] for s in subjects])
        results: dict = {
            "n_subjects": len(subjects),
            "n_slices": int(kl.size),
            "n_slices_normal": int((slice_y == 0).sum()),
            "n_slices_anomalous": int((slice_y == 1).sum()),
            "kl_q95": float(np.quantile(kl, 0.95)),
            "active_units": int((mu.var(axis=0) > ACTIVE_UNIT_VARIANCE).sum()),
            "calibration_subjects": calibration,
            "checkpoint": str(self.checkpoint),
            "datalist": str(self.datalist),
        }
        for config in self.configs:
            out: dict = {"options": self.configs[config].to_dict()}
            slice_scores = {"elbo": np.concatenate([s.slice_terms["neg_elbo"] for s in subjects])}
            slice_scores.update({k: np.concatenate([s.slice_means[config][k] for s in subjects]) for k in SCORE_NAMES})
            out["slice_auroc"] = {k: _safe(roc_auc_score, slice_y[keep], v[keep]) for k, v in slice_scores.items()}
            out["slice_auprc"] = {k: _safe(average_precision_score, slice_y[keep], v[keep])
                                  for k, v in slice_scores.items()}
            out["pixel_auroc"], out["pixel_auprc"], out["dice_split"], out["dice_best"] = {}, {}, {}, {}
            for score in SCORE_NAMES:
                out["pixel_auroc"][score] = curves[config][score]["auroc"]
                out["pixel_auprc"][score] = curves[config][score]["auprc"]
                threshold, cal_dice = self._dice_search(cal, config, score)
                per_subject = {s.name: dice(self._segment(s, config, score, threshold), s.label) for s in rep}
                out["dice_split"][score] = {
                    "threshold": threshold,
                    "calibration_dice": cal_dice,
                    "dice": self._pooled_dice(rep, config, score, threshold) if rep else float("nan"),
                    "dice_mean_per_subject": float(np.mean(list(per_subject.values()))) if rep else float("nan"),
                    "per_subject": per_subject,
                }
                out["dice_best"][score] = self._dice_search(subjects, config, score)[1]
            out.update(self._group_metrics(subjects, config))
            results[config] = out
        paper = results[next(iter(self.configs))]
        for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_split", "dice_best"):
            results[key] = paper[key]  # the paper's plain definitions at the top level
        return results

    def _group_metrics(self, subjects: list[_Subject], config: str) -> dict:
        """``pixel_auroc_<group>`` / ``pixel_auprc_<group>`` per score: the group's voxels against unlabelled brain."""
        out: dict = {}
        healthy = ~np.concatenate([s.label[s.brain] for s in subjects]) if self.label_groups else None
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
    def run(self) -> dict:
        """Score every test volume, compute the metrics and write/log all outputs. Returns the metrics."""
        self.load_network()
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
        results = self.metrics(subjects, curves)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(results, self.output_dir / "metrics.json")
        self._write_per_subject(subjects, results)
        atomic_write_json(curves, self.output_dir / "curves.json")
        self._plot_curves(curves)
        self._plot_panels(panels, results)
        thresholds = {c: {s: results[c]["dice_split"][s]["threshold"] for s in SCORE_NAMES} for c in self.configs}
        # inference's default: the combined score under the option set that calibrated best (calibration subjects only)
        best = max(self.configs, key=lambda c: results[c]["dice_split"]["combined"]["calibration_dice"])
        atomic_write_json({"default": {"postprocessing": best, "score": "combined",
                                       "threshold": results[best]["dice_split"]["combined"]["threshold"]},
                           "thresholds": thresholds, "options": {c: o.to_dict() for c, o in self.configs.items()}},
                          self.checkpoint.parent / "threshold.json")
        self._log_to_mlflow(results)
        return results

    def _write_per_subject(self, subjects: list[_Subject], results: dict) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        configs = list(self.configs)
        writer.writerow(["subject", "calibration", "slices", "lesion_voxels", "mean_neg_elbo"]
                        + [f"dice_{c}_{s}" for c in configs for s in SCORE_NAMES])
        for s in subjects:
            row = [s.name, s.name in results["calibration_subjects"], s.label.shape[-1], int(s.label.sum()),
                   float(s.slice_terms["neg_elbo"].mean())]
            row += [results[c]["dice_split"][k]["per_subject"].get(s.name, "") for c in configs for k in SCORE_NAMES]
            writer.writerow(row)
        atomic_write_text(buffer.getvalue(), self.output_dir / "per_subject.csv")

    def curves(self, subjects: list[_Subject]) -> dict:
        """Pooled pixel curves (the content of ``curves.json``): ``fpr`` and ``recall`` grids, and per option set and
        score the exact ``auroc`` / ``auprc`` with ``tpr`` and ``precision`` on those grids. One sort per curve and
        one curve in memory at a time; the metrics, the JSON and the figure all use these."""
        grid = np.linspace(0.0, 1.0, CURVE_POINTS)
        labels = np.concatenate([s.label[s.brain] for s in subjects])
        out: dict = {"fpr": grid.tolist(), "recall": grid.tolist()}
        for config in self.configs:
            for score in SCORE_NAMES:
                curve = ThresholdCurve.from_scores(np.concatenate([s.voxels[config][score] for s in subjects]), labels)
                out.setdefault(config, {})[score] = {
                    "auroc": curve.auroc(), "auprc": curve.average_precision(),
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
        if not panels:
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        config = next(iter(self.configs))
        threshold = results[config]["dice_split"]["combined"]["threshold"]
        columns = ["input", "reconstruction", "ground truth", "rec", "kl_grad", "combined", "segmentation"]
        fig, axes = plt.subplots(len(panels), len(columns), figsize=(2 * len(columns), 2.1 * len(panels)),
                                 squeeze=False)
        for row, (subject, slices, z) in enumerate(panels):
            seg = self._segment(subject, config, "combined", threshold)[..., z]
            images = [slices["image"][z], slices["recon"][z], subject.label[..., z],
                      subject.volume(config, "rec")[..., z], subject.volume(config, "kl_grad")[..., z],
                      subject.volume(config, "combined")[..., z], seg]
            for col, (title, img) in enumerate(zip(columns, images)):
                ax = axes[row, col]
                ax.imshow(np.asarray(img, np.float32).T, cmap="gray" if col < 3 or col == 6 else "magma", origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=9)
            axes[row, 0].set_ylabel(f"{subject.name}\nslice {z}", fontsize=8)
        fig.tight_layout()
        with atomic_path(self.output_dir / "panels.png", ".png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)

    def _log_to_mlflow(self, results: dict) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        from pipeline.tracking import RUN_INFO_FILENAME, experiment_id, resolve_tracking_uri, store_lock

        info_path = self.checkpoint.parent / RUN_INFO_FILENAME
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        uri = info.get("tracking_uri") or resolve_tracking_uri(self.tracking_uri, self.output_dir)
        run_id = info.get("run_id")
        with store_lock(uri):  # the client creates a new store's schema
            client = MlflowClient(uri)
        if run_id is None:
            run_id = client.create_run(experiment_id(client, self.experiment_name), run_name="evaluation",
                                       tags={"evaluated_checkpoint": str(self.checkpoint)}).info.run_id
        close = info.get("run_id") is None
        values = {f"{self.name}/kl_q95": results["kl_q95"], f"{self.name}/active_units": results["active_units"]}
        for config in self.configs:
            keys = ["slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_best"]
            keys += [f"pixel_{m}_{g}" for g in self.label_groups for m in ("auroc", "auprc")]
            for key in keys:
                values.update({f"{self.name}/{config}/{key}/{score}": value
                               for score, value in results[config][key].items()})
            for score, entry in results[config]["dice_split"].items():
                values[f"{self.name}/{config}/dice_split/{score}"] = entry["dice"]
                values[f"{self.name}/{config}/threshold/{score}"] = entry["threshold"]
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in values.items()
                                          if np.isfinite(value)])  # one request, also to a remote server
        folder = f"evaluation/{self.name}"
        for name in ("metrics.json", "per_subject.csv", "curves.json", "roc_pr.png", "panels.png"):
            if (self.output_dir / name).is_file():
                client.log_artifact(run_id, str(self.output_dir / name), artifact_path=folder)
        client.log_artifact(run_id, str(self.checkpoint.parent / "threshold.json"), artifact_path=folder)
        if close:
            client.set_terminated(run_id)


def _safe(metric: Callable, y: np.ndarray, scores: np.ndarray) -> float:
    """A sklearn slice metric, NaN when only one class is present."""
    return float(metric(y, scores)) if 0 < y.sum() < y.size else float("nan")
