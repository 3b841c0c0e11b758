"""MLflow as a user meets it: MONAI's own ``--tracking mlflow`` on ``run training``/``run evaluating`` (one run, each
value once), the trained model logged as a pyfunc that takes a scan, registered and served, and two evaluations of one
checkpoint on different test sets side by side."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import BUNDLE_RUN, CLI_ENV, CONFIGS, TINY_EVALUATION
from conftest import REPO, free_port, input_error
from monai.bundle import ConfigWorkflow

from pipeline.data.datalist import load_datalist, write_datalist
from pipeline.errors import InputError
from pipeline.tracking import ModelLogging
from pipeline.tracking.scan_model import example_scan

EPOCHS = 2
TINY_SETTINGS = {
    "z_dim": 16,
    "channels": [8, 16, 32, 64],
    "batch_size": 16,
    "progress_bar": False,
    "synthetic_volumes": 1,
}
TINY = [arg for key, value in TINY_SETTINGS.items() for arg in (f"--{key}", str(value).replace(" ", ""))]  # as CLI args
EVALUATE = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']"
EVALUATION_ARGS = [arg for key, value in TINY_EVALUATION.items() for arg in (f"--{key}", str(value))]


def bundle_run(*args):
    return subprocess.run([*BUNDLE_RUN, *args], cwd=REPO, capture_output=True, text=True, env=CLI_ENV)


@pytest.fixture(scope="module")
def tracked(tiny_demo, two_test_subjects, tmp_path_factory):
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
        "--register_alias",
        "champion",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = bundle_run(
        "evaluating",
        "--config_file",
        EVALUATE,
        *common,
        "--eval_datalist",
        str(two_test_subjects),
        *EVALUATION_ARGS,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    info = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())
    return out, trained.stdout + trained.stderr, mlflow.MlflowClient(info["tracking_uri"]), info["run_id"]


def test_monai_tracking_flag_gives_one_run_with_each_value_once(tracked):
    out, log, client, run_id = tracked
    assert "MONAI's MLFlowHandler (train#handlers#" in log  # --tracking did add its handler, and it gave way
    (experiment,) = [e for e in client.search_experiments() if e.name == "cevae"]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    assert len(client.get_metric_history(run_id, "Training/train_loss")) == EPOCHS
    assert "eval/postprocessed/pixel_auroc/combined" in client.get_run(run_id).data.metrics
    assert not list(out.glob("config_*.json")), "MONAI's copy of the executed config is off (checkpoints/config.json)"
    # the store and its artifacts live together: moving the output folder moves both
    assert experiment.artifact_location == (out / "mlruns").as_uri()
    assert (out / "mlruns" / run_id / "artifacts" / "config.json").is_file()


@pytest.mark.slow
def test_the_logged_model_takes_a_scan_is_served_and_equals_run_inference(tracked, tiny_demo, tmp_path):
    """The registered MLflow model (a version with a description, the alias asked for) is a pyfunc with the
    preprocessing, anomaly map and operating point inside:
    ``mlflow models serve`` answers a request with a scan over loopback, and the mask it returns is ``run
    inference``'s on the same scan (non-empty, so that the comparison means something)."""
    out, _, client, run_id = tracked
    scan = example_scan(32)
    nib.save(nib.Nifti1Image(scan["image"], scan["affine"]), tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(scan["brainmask"], scan["affine"]), tmp_path / "scan_mask.nii.gz")
    inferred = bundle_run(
        "inference",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--ckpt",
        str(out / "checkpoints" / "model.pt"),
        "--input_image",
        str(tmp_path / "scan.nii.gz"),
        "--input_mask",
        str(tmp_path / "scan_mask.nii.gz"),
        "--output_dir",
        str(tmp_path / "inferred"),
    )
    assert inferred.returncode == 0, inferred.stderr[-3000:]
    expected_seg = np.asarray(nib.load(tmp_path / "inferred" / "scan_seg.nii.gz").dataobj)
    expected_map = nib.load(tmp_path / "inferred" / "scan_anomaly.nii.gz").get_fdata(dtype=np.float32)
    assert 0 < expected_seg.sum() < scan["brainmask"].sum()
    (version,) = client.search_model_versions("name='cevae-tiny'")
    assert version.run_id == run_id and version.status == "READY"
    assert client.get_model_version_by_alias("cevae-tiny", "champion").version == version.version
    assert version.description.startswith("cevae (ce_weight 0.5) trained on the healthy subjects of ")
    assert str(tiny_demo) in version.description and run_id in version.description
    port = free_port()
    # as in an activated environment: MLflow starts `uvicorn` by name
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**CLI_ENV, "MLFLOW_TRACKING_URI": client.tracking_uri, "PATH": path}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/cevae-tiny/1", "-p", str(port)]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--env-manager", "local"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the CLI and its uvicorn workers, ended together below
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "the model server did not start"
                time.sleep(1)
        body = json.dumps({"inputs": {k: v.tolist() for k, v in scan.items()}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
    np.testing.assert_array_equal(np.asarray(answer["segmentation"], dtype=np.uint8), expected_seg)
    np.testing.assert_allclose(np.asarray(answer["anomaly"], dtype=np.float32), expected_map, rtol=1e-5, atol=1e-6)
    other = dict(scan, image=np.flip(scan["image"], 0).copy())  # negative control: another scan, another mask
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        loaded = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
        local = loaded.predict(other)
    finally:
        mlflow.set_tracking_uri(None)
    assert not np.array_equal(local["anomaly"], expected_map)
    workdir = loaded.unwrap_python_model().workdir
    assert workdir.is_dir() and not list(workdir.iterdir()), "no scan or map of the patient left on disk"


def test_evaluations_on_two_test_sets_keep_both_results(tracked, tiny_demo, tmp_path):
    out, _, client, run_id = tracked
    other = write_datalist({"test": load_datalist(tiny_demo, "test")[2:]}, tmp_path / "other_test.json")
    before = client.get_run(run_id).data.metrics
    common = ["--datalist", str(tiny_demo), "--output_dir", str(out), "--eval_datalist", str(other), *TINY]
    common += ["--eval_output_dir", str(tmp_path / "other")]
    settings = {  # the tracked training's settings, in-process
        **TINY_SETTINGS,
        **{"datalist": str(tiny_demo), "output_dir": str(out), "eval_datalist": str(other)},
        "eval_output_dir": str(tmp_path / "other"),
    }
    workflow = ConfigWorkflow([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], **settings)
    workflow.initialize()
    with pytest.raises(RuntimeError) as refused:  # the default name 'eval' is taken (MONAI wraps the error)
        workflow.run()
    workflow.finalize()
    message = str(input_error(refused.value))
    assert "already holds the results of the test set" in message and "--eval_name" in message
    np.testing.assert_equal(client.get_run(run_id).data.metrics, before, "nothing was overwritten")  # NaN == NaN
    named = bundle_run("evaluating", "--config_file", EVALUATE, *common, "--eval_name", "other", *EVALUATION_ARGS)
    assert named.returncode == 0, named.stderr[-3000:]
    after = client.get_run(run_id).data.metrics
    np.testing.assert_equal(
        {k: v for k, v in after.items() if k.startswith("eval/")},
        {k: v for k, v in before.items() if k.startswith("eval/")},
    )
    assert "other/postprocessed/pixel_auroc/combined" in after
    calibrated = json.loads((out / "checkpoints" / "threshold.json").read_text())["calibrated"]
    assert set(calibrated) == {"eval", "other"}


def test_an_alias_without_a_registered_model_is_refused(tmp_path):
    with pytest.raises(InputError, match="--register_alias champion names a version of a registered model"):
        ModelLogging(tmp_path / "model.pt", None, "champion")
    assert ModelLogging(tmp_path / "model.pt", "cevae", "champion").alias == "champion"  # negative control
