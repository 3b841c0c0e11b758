"""End-to-end evaluation through the bundle: a briefly trained model, every output, real labelled scans."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from bundle_helpers import run_bundle
from conftest import input_error
from mlflow import MlflowClient

from pipeline.data.datalist import write_datalist
from pipeline.data.preparers import prepare_entries
from pipeline.scoring import SCORE_NAMES

EVAL_FILES = ("train.json", "evaluate.json")
# measured with this fixture (seed 0, CPU): pixel AUROC of `rec` 0.782 (paper scoring), 0.840 post-processed;
# the bound leaves a margin for platform differences
MIN_REC_AUROC = 0.65


def test_metrics_json_has_every_key(evaluated_run):
    _, metrics = evaluated_run
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_best"):
        assert set(SCORE_NAMES) <= set(metrics[key]), key
    assert set(metrics["dice_split"]) == set(SCORE_NAMES)
    assert {"threshold", "dice", "dice_mean_per_subject", "calibration_dice"} <= set(metrics["dice_split"]["combined"])
    for key in ("kl_q95", "active_units", "n_subjects", "n_slices", "checkpoint", "datalist"):
        assert key in metrics
    assert metrics["n_subjects"] == 4 and len(metrics["calibration_subjects"]) == 1
    assert set(metrics["postprocessed"]["pixel_auroc"]) == set(SCORE_NAMES)
    assert 0 < metrics["active_units"] <= 16 and metrics["kl_q95"] > 0


def test_trained_model_scores_lesions_above_healthy_tissue(evaluated_run):
    _, metrics = evaluated_run
    assert metrics["pixel_auroc"]["rec"] > MIN_REC_AUROC, metrics["pixel_auroc"]


def test_outputs_threshold_and_mlflow(evaluated_run):
    out, metrics = evaluated_run
    for name in ("metrics.json", "per_subject.csv", "roc_pr.png", "panels.png"):
        assert (out / name).is_file(), name
    assert len((out / "per_subject.csv").read_text().splitlines()) == 1 + 4
    threshold = json.loads((out / "checkpoints" / "threshold.json").read_text())
    default = threshold["default"]
    assert default["threshold"] == metrics[default["postprocessing"]]["dice_split"]["combined"]["threshold"]
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    (run,) = client.search_runs(client.get_experiment_by_name("cevae").experiment_id)
    assert run.info.run_name == "cevae", "evaluation logs into the run that trained the checkpoint"
    assert run.data.metrics["eval/paper/pixel_auroc/rec"] == pytest.approx(metrics["pixel_auroc"]["rec"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/eval")} >= {
        "evaluation/eval/metrics.json", "evaluation/eval/threshold.json", "evaluation/eval/roc_pr.png",
        "evaluation/eval/curves.json"}


def test_evaluation_on_real_labelled_scans(evaluated_run, shared_data, tmp_path):
    out, _ = evaluated_run
    checkpoint = tmp_path / "checkpoint" / "model.pt"  # a copy: this evaluation writes its own threshold.json
    checkpoint.parent.mkdir()
    shutil.copy(out / "checkpoints" / "model.pt", checkpoint)
    entries = prepare_entries("brats2013-deepmedic", shared_data / "brats2013", "T1c")[:2]
    entries += prepare_entries("open-ms", shared_data / "open_ms", "T1")
    datalist = write_datalist({"test": entries}, tmp_path / "real.json")
    run_bundle(tmp_path, datalist, EVAL_FILES, ckpt_path=str(checkpoint))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_subjects"] == 3 and metrics["n_slices"] > 300
    assert 0.0 <= metrics["pixel_auroc"]["combined"] <= 1.0


def test_one_subject_and_label_groups(evaluated_run, tiny_demo, tmp_path):
    out, _ = evaluated_run
    checkpoint = tmp_path / "checkpoint" / "model.pt"
    checkpoint.parent.mkdir()
    shutil.copy(out / "checkpoints" / "model.pt", checkpoint)
    entry = json.loads(tiny_demo.read_text())["test"][0]
    entry = {k: str(tiny_demo.parent / v) if k in ("image", "brainmask", "label") else v for k, v in entry.items()}
    datalist = write_datalist({"test": [entry]}, tmp_path / "one.json")
    run_bundle(tmp_path, datalist, EVAL_FILES, ckpt_path=str(checkpoint),
               label_groups={"lesion": [1], "absent": [7]})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    split = metrics["paper"]["dice_split"]["combined"]
    assert math.isnan(split["dice"]) and math.isfinite(split["threshold"]), "no held-out Dice from one subject"
    # a group holding every label value is the plain pixel metric; a value that never occurs gives NaN
    assert metrics["paper"]["pixel_auroc_lesion"] == pytest.approx(metrics["paper"]["pixel_auroc"])
    assert metrics["postprocessed"]["pixel_auprc_lesion"] == pytest.approx(metrics["postprocessed"]["pixel_auprc"])
    assert math.isnan(metrics["paper"]["pixel_auroc_absent"]["rec"])


def test_evaluation_refuses_settings_that_differ_from_training(evaluated_run):
    out, _ = evaluated_run
    with pytest.raises(Exception) as info:
        run_bundle(out, json.loads((out / "config.json").read_text())["datalist"], EVAL_FILES, normalization="zscore")
    assert "normalization='zscore' (trained with 'percentile')" in str(input_error(info.value))
