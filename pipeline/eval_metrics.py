"""The ``eval_metrics`` of an exported bundle's ``metadata.json``: the figures of the weights it ships, read from
that checkpoint's own records, never carried over from another model.

* From the checkpoint's ``threshold.json`` (training's label-free calibration on the healthy validation subjects):
  ``healthy_validation_mse_vs_mean_brain`` (the model's reconstruction error over a mean brain's) and
  ``healthy_validation_synthetic_lesion_dice_operating_point`` (the operating point's Dice on synthetic lesions).
* From each evaluation given (``run evaluating``'s ``metrics.json``, which names the SHA-256 of the weights it scored:
  one of other weights is refused), prefixed by its name ``N``: the operating point's Dice, lesion recall and
  false-positive components per volume, the whole-brain mask's and the intensity baseline's Dice beside it (at the
  healthy 0.99 quantile, in the operating point's option set), the pixel AUROC and AUPRC of the operating point's
  map (and the AUROC of tumour core against healthy tissue where the evaluation had label groups), and the slice
  AUROC of the ELBO. Rounded to 3 decimals.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pipeline.errors import InputError, read_json
from pipeline.output_dir import METRICS_FILENAME
from pipeline.thresholds import checkpoint_sha256, read_thresholds, threshold_path

__all__ = ["eval_metrics"]

BASELINE_QUANTILE = "0.99"  # the healthy quantile of the intensity baseline reported beside the operating point


def _healthy(checkpoint: Path, sha256: str) -> dict[str, float]:
    if not threshold_path(checkpoint).is_file():
        return {}
    healthy = read_thresholds(checkpoint, sha256).get("healthy") or {}
    figures = {"healthy_validation_mse_vs_mean_brain": (healthy.get("validation") or {}).get("rec_vs_mean_brain")}
    point = (healthy.get("synthetic") or {}).get("operating_point") or {}
    figures["healthy_validation_synthetic_lesion_dice_operating_point"] = point.get("synthetic_dice")
    return {key: value for key, value in figures.items() if value is not None}


def _evaluation(name: str, metrics_file: Path, sha256: str) -> dict[str, float]:
    fix = f"evaluate {sha256[:12]}... into it again (run evaluating) or leave it out of the export"
    if not metrics_file.is_file():
        raise InputError(
            f"{metrics_file} does not exist; name an evaluation's --eval_output_dir or its {METRICS_FILENAME}."
        )
    metrics = read_json(metrics_file, fix, what="the evaluation's metrics")
    scored = metrics.get("checkpoint_sha256") if isinstance(metrics, dict) else None
    if scored != sha256:
        raise InputError(
            f"{metrics_file} is the evaluation of other weights (SHA-256 {str(scored)[:12]}..., the checkpoint's is "
            f"{sha256[:12]}...); {fix}."
        )
    try:
        return {f"{name}_{key}": value for key, value in _figures(metrics).items() if value is not None}
    except (KeyError, TypeError) as err:
        raise InputError(f"{metrics_file} lacks {err} (an evaluation of an earlier version?); {fix}.") from err


def _figures(metrics: Mapping) -> dict[str, float | None]:
    point = metrics["operating_point"]
    option_set, score = point["option_set"], point["score"]
    measured = metrics[option_set]
    return {
        "dice_operating_point": point["dice"],
        "lesion_recall_operating_point": point["recall"],
        "false_positive_components_per_volume_operating_point": point["fp_per_volume"],
        "dice_whole_brain_mask": metrics["baselines"]["dice_whole_brain_all"],
        "dice_intensity_healthy_q099": measured["dice_healthy"]["intensity"][BASELINE_QUANTILE]["dice"],
        f"pixel_auroc_{option_set}_{score}": measured["pixel_auroc"][score],
        f"pixel_auprc_{option_set}_{score}": measured["pixel_auprc"][score],
        f"pixel_auroc_{option_set}_{score}_core": (measured.get("pixel_auroc_core") or {}).get(score),
        "slice_auroc_elbo": metrics["slice_auroc"]["elbo"],
    }


def eval_metrics(
    checkpoint: str | os.PathLike, evaluations: Mapping[str, str | os.PathLike] | None = None
) -> dict[str, float]:
    """The ``eval_metrics`` of ``checkpoint`` (the module docstring): its healthy figures, and for every
    ``{name: evaluation}`` (an evaluation's output folder or its ``metrics.json``) that evaluation's, each checked to
    be of these weights (:class:`~pipeline.errors.InputError` otherwise)."""
    checkpoint = Path(checkpoint)
    sha256 = checkpoint_sha256(checkpoint)
    figures = _healthy(checkpoint, sha256)
    for name, where in (evaluations or {}).items():
        path = Path(where)
        figures.update(_evaluation(name, path / METRICS_FILENAME if path.is_dir() else path, sha256))
    return {key: round(float(value), 3) for key, value in figures.items()}
