"""MLflow as a user meets it: MONAI's own ``--tracking mlflow`` on ``run training``/``run evaluating`` (one run, each
value once), the trained model logged with ``mlflow.pytorch.log_model`` and registered, and two evaluations of one
checkpoint on different test sets side by side."""

from __future__ import annotations

import json
import subprocess

import mlflow
import pytest
import torch
from bundle_helpers import BUNDLE_RUN, CLI_ENV, CONFIGS
from conftest import REPO

from pipeline.data.datalist import load_datalist, write_datalist
from pipeline.networks import CeVAEReconstruction

EPOCHS = 2
TINY = ["--z_dim", "16", "--channels", "[8,16,32,64]", "--batch_size", "16", "--progress_bar", "False"]
EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"


def bundle_run(*args):
    return subprocess.run([*BUNDLE_RUN, *args], cwd=REPO, capture_output=True, text=True, env=CLI_ENV)


@pytest.fixture(scope="module")
def tracked(tiny_demo, tmp_path_factory):
    """``run training`` and ``run evaluating`` with ``--tracking mlflow`` and ``--register_model``: (output dir,
    the training's log, MLflow client, run id)."""
    out = tmp_path_factory.mktemp("tracked") / "run"
    common = ["--datalist", str(tiny_demo), "--output_dir", str(out), "--tracking", "mlflow", *TINY]
    trained = bundle_run(
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--epochs",
        str(EPOCHS),
        *common,
        "--register_model",
        "cevae-tiny",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = bundle_run("evaluating", "--config_file", EVALUATE, *common)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    info = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())
    return out, trained.stdout + trained.stderr, mlflow.MlflowClient(info["tracking_uri"]), info["run_id"]


def test_monai_tracking_flag_gives_one_run_with_each_value_once(tracked):
    out, log, client, run_id = tracked
    assert "MONAI's MLFlowHandler (train#handlers#" in log  # --tracking did add its handler, and it gave way
    (experiment,) = [e for e in client.search_experiments() if e.name == "cevae"]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert len(client.get_metric_history(run_id, "train_loss")) == EPOCHS
    assert "eval/postprocessed/pixel_auroc/combined" in client.get_run(run_id).data.metrics
    assert not list(out.glob("config_*.json")), "MONAI's copy of the executed config is off (checkpoints/config.json)"
    # the store and its artifacts live together: moving the output folder moves both
    assert experiment.artifact_location == (out / "mlruns").as_uri()
    assert (out / "mlruns" / run_id / "artifacts" / "config.json").is_file()


def test_the_logged_model_loads_with_mlflow_and_is_registered(tracked):
    out, _, client, run_id = tracked
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    assert isinstance(model, CeVAEReconstruction)
    trained = torch.load(out / "checkpoints" / "model.pt", weights_only=True)["model"]
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained), "the best checkpoint's weights"
    x = torch.rand(3, 1, 64, 64)  # any batch size
    assert model(x).shape == x.shape
    (version,) = client.search_model_versions("name='cevae-tiny'")
    assert version.run_id == run_id and version.status == "READY"


def test_evaluations_on_two_test_sets_keep_both_results(tracked, tiny_demo, tmp_path):
    out, _, client, run_id = tracked
    other = write_datalist({"test": load_datalist(tiny_demo, "test")[:2]}, tmp_path / "other_test.json")
    before = client.get_run(run_id).data.metrics
    common = ["--datalist", str(tiny_demo), "--output_dir", str(out), "--eval_datalist", str(other), *TINY]
    common += ["--eval_output_dir", str(tmp_path / "other")]
    refused = bundle_run("evaluating", "--config_file", EVALUATE, *common)  # the default name 'eval' is taken
    assert refused.returncode == 2 and "already holds the results of the test set" in refused.stderr
    assert "--eval_name" in refused.stderr and "Traceback" not in refused.stderr
    assert client.get_run(run_id).data.metrics == before, "nothing was overwritten"
    named = bundle_run("evaluating", "--config_file", EVALUATE, *common, "--eval_name", "other")
    assert named.returncode == 0, named.stderr[-3000:]
    after = client.get_run(run_id).data.metrics
    assert {k: v for k, v in after.items() if k.startswith("eval/")} == {
        k: v for k, v in before.items() if k.startswith("eval/")
    }
    assert "other/postprocessed/pixel_auroc/combined" in after
    calibrated = json.loads((out / "checkpoints" / "threshold.json").read_text())["calibrated"]
    assert set(calibrated) == {"eval", "other"}
