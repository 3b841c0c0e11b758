"""The evaluation's metrics in MLflow: their names (``<name>/<metric>``, ``<name>/operating_point/<metric>``,
``<name>/<option set>/<metric>/<score>``) and the logging into the run that trained the checkpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.output_dir import EVALUATION_OUTPUTS
from pipeline.scoring import SCORE_NAMES

__all__ = ["log_to_mlflow", "mlflow_metrics"]


def mlflow_metrics(
    name: str, configs: Sequence[str], label_groups: Iterable[str], default_quantile: str, results: dict
) -> dict[str, float]:
    """The metrics logged to MLflow: ``<name>/<metric>``, ``<name>/operating_point/<metric>`` and
    ``<name>/<option set>/<metric>/<score>``."""
    prefix = name
    values = {f"{prefix}/{k}": results[k] for k in ("kl_q95", "kl_q95_per_dim", "active_units")}
    values.update({f"{prefix}/{k}": v for k, v in results["baselines"].items()})
    for config in configs:
        out = results[config]
        keys = ["slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_best"]
        keys += [f"pixel_{m}_{g}" for g in label_groups for m in ("auroc", "auprc")]
        for key in keys:
            values.update({f"{prefix}/{config}/{key}/{score}": value for score, value in out[key].items()})
        for score in SCORE_NAMES:
            values[f"{prefix}/{config}/dice_split/{score}"] = out["dice_split"][score]["dice"]
            values[f"{prefix}/{config}/threshold/{score}"] = out["dice_split"][score]["threshold"]
            for q, entry in out["dice_healthy"][score].items():
                values[f"{prefix}/{config}/dice_healthy_q{q}/{score}"] = entry["dice"]
            synthetic_key = f"synthetic_dice_healthy_q{default_quantile}"
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


def log_to_mlflow(
    metrics: Mapping[str, float],
    name: str,
    checkpoint: Path,
    output_dir: Path,
    tracking_uri: str | None,
    experiment_name: str,
    datalist: Path,
) -> None:
    """Log ``metrics``, the test ``datalist`` (a dataset input, context ``evaluation``) and the evaluation's files
    (artifact folder ``evaluation/<name>``) into the MLflow run that trained ``checkpoint`` (its
    ``mlflow_run.json``), or into a new run ``evaluation`` closed at the end; through a spool that survives a
    tracking outage."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from pipeline.tracking import (
        RUN_INFO_FILENAME,
        SPOOL_DIRNAME,
        SpooledClient,
        experiment_id,
        log_datalist,
        report_pending,
        resolve_tracking_uri,
        store_errors,
        store_lock,
    )

    info_path = checkpoint.parent / RUN_INFO_FILENAME
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    uri = info.get("tracking_uri") or resolve_tracking_uri(tracking_uri, output_dir)
    run_id = info.get("run_id")
    with store_errors(uri):  # a store that cannot be used: one line (the results are already written)
        with store_lock(uri):  # the client creates a new store's schema
            client = SpooledClient(MlflowClient(uri), output_dir / SPOOL_DIRNAME)  # survives an outage
        if run_id is None:
            run_id = client.create_run(
                experiment_id(client, experiment_name),
                run_name="evaluation",
                tags={"evaluated_checkpoint": str(checkpoint)},
            ).info.run_id
    close = info.get("run_id") is None
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in metrics.items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    log_datalist(client, run_id, datalist, "evaluation")
    folder = f"evaluation/{name}"
    for name in EVALUATION_OUTPUTS:
        if (output_dir / name).is_file():
            client.log_artifact(run_id, str(output_dir / name), artifact_path=folder)
    client.log_artifact(run_id, str(checkpoint.parent / "threshold.json"), artifact_path=folder)
    if close:
        client.set_terminated(run_id)
    report_pending(client, f"evaluation {name!r}")
