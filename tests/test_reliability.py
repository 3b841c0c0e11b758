"""Nothing trained is lost or silently mixed: output-folder guard and lock, artefacts bound to their checkpoint,
tracking-server outages, a full disk (an interrupted comparison: test_compare.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch
from bundle_helpers import CLI_ENV, TRAIN_CLI, initialized_workflow, run_bundle
from conftest import REPO, MlflowServer, Outage, input_error, script_main
from ignite.engine import Events
from mlflow import MlflowClient

from pipeline.errors import InputError
from pipeline.io import file_sha256
from pipeline.tracking.scan_model import example_scan

TINY_ARGS = [
    "--synthetic_volumes",
    "1",
    "--epochs",
    "1",
    "--batch_size",
    "16",
    "--z_dim",
    "16",
    "--channels",
    "[8,16,32,64]",
    "--progress_bar",
    "False",
    "--min_brain_fraction",
    "0.3",
    "--val_fraction",
    "0.34",
]


def cli(cmd, **kwargs):
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=CLI_ENV, **kwargs)


def one_line_error(result) -> str:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    return line


def epochs_done(output_dir) -> int:
    """Epochs completed in a run's ``last.pt``."""
    trainer = torch.load(output_dir / "checkpoints" / "last.pt", weights_only=True)["trainer"]
    return trainer["iteration"] // trainer["epoch_length"]


# ------------------------------------------------------------------------------------------ 1. guard and lock
def test_a_trained_run_is_continued_or_replaced_only_when_asked(tiny_demo, tmp_path):
    run_bundle(tmp_path, tiny_demo, epochs=1)
    weights = (tmp_path / "checkpoints" / "model.pt").read_bytes()
    with pytest.raises(Exception) as info:
        run_bundle(tmp_path, tiny_demo, epochs=1, seed=5)
    assert "holds a trained run" in str(input_error(info.value)) and "--resume True" in str(input_error(info.value))
    assert (tmp_path / "checkpoints" / "model.pt").read_bytes() == weights, "refused before any work"
    run_bundle(tmp_path, tiny_demo, epochs=2, resume=True)  # continues
    assert epochs_done(tmp_path) == 2
    (tmp_path / "metrics.json").write_text("{}")  # an evaluation of the old weights
    run_bundle(tmp_path, tiny_demo, epochs=1, seed=5, overwrite=True)  # replaces
    assert epochs_done(tmp_path) == 1
    assert not (tmp_path / "metrics.json").exists(), "outputs derived from the replaced weights are deleted"
    with pytest.raises(Exception) as info:
        run_bundle(tmp_path, tiny_demo, epochs=1, resume=True, overwrite=True)
    assert "only one of them" in str(input_error(info.value))


def test_an_evaluation_does_not_replace_another_silently(evaluated_run, tiny_demo):
    out, metrics = evaluated_run
    before = (out / "metrics.json").read_text()
    with pytest.raises(Exception) as info:
        run_bundle(out, tiny_demo, ("train.json", "evaluate.json"), eval_name="again")
    assert "holds the results of an evaluation" in str(input_error(info.value))
    assert (out / "metrics.json").read_text() == before


def _holding(folder, shared: bool) -> subprocess.Popen:
    """Another process that claims ``folder``: exclusively as a run claims its output folder, or shared as an
    evaluation claims the training folder it reads."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.output_dir import claim; "
            "claim(sys.argv[1], 'evaluation', shared=sys.argv[2] == '1'); print('held', flush=True); time.sleep(120)",
            str(folder),
            "1" if shared else "0",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=CLI_ENV,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_a_busy_folder_stops_at_once_naming_the_holder(tiny_demo, tmp_path):
    holder = _holding(tmp_path, shared=False)
    try:
        start = time.monotonic()
        line = one_line_error(
            cli(TRAIN_CLI + ["--datalist", str(tiny_demo), "--output_dir", str(tmp_path), *TINY_ARGS])
        )
        assert f"is in use by process {holder.pid}" in line and time.monotonic() - start < 60
        assert not (tmp_path / "checkpoints").exists(), "nothing written"
        with pytest.raises(RuntimeError) as refused:  # the evaluation, in-process (MONAI wraps the error)
            run_bundle(tmp_path, tiny_demo, ("train.json", "evaluate.json"))
        assert f"is in use by process {holder.pid}" in str(input_error(refused.value))
        assert script_main("compare")(["--output-dir", str(tmp_path), "--seeds", "0"]) == 2
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash releases the lock
        holder.wait()
    run_bundle(tmp_path, tiny_demo, epochs=1)  # the folder is free again
    assert (tmp_path / "checkpoints" / "model.pt").is_file()


def test_a_training_folder_is_not_replaced_while_an_evaluation_reads_it(tiny_demo, tmp_path):
    """#24 item 2: an evaluation (its results elsewhere) claims the training folder it reads, shared: a training's
    ``--overwrite`` of that folder is refused in one line naming the reader, and the checkpoint stays; other readers
    share it, but one that would also write its results there (an exclusive claim) waits for the others. The bundle's
    evaluation takes the claim: refused while a training holds the folder. Negative control: once the reader is
    gone, the same ``--overwrite`` goes through."""
    from pipeline.output_dir import claim, prepare_training_dir, release

    training = tmp_path / "run"
    (training / "checkpoints").mkdir(parents=True)
    (training / "checkpoints" / "model.pt").write_bytes(b"the weights being read")
    reader = _holding(training, shared=True)
    try:
        with pytest.raises(InputError, match=f"is in use by process {reader.pid}"):
            prepare_training_dir(training, overwrite=True)
        assert (training / "checkpoints" / "model.pt").read_bytes() == b"the weights being read"
        assert claim(training, "evaluation", shared=True) == training.resolve()  # readers share
        with pytest.raises(InputError, match=f"is in use by process {reader.pid}"):
            claim(training, "evaluation")  # ... but not with one that writes there
        release(training)
    finally:
        reader.send_signal(signal.SIGKILL)
        reader.wait()
    prepare_training_dir(training, overwrite=True)  # the reader is gone: replaced
    assert not (training / "checkpoints").exists()
    release(training)
    writer = _holding(training, shared=False)
    try:
        with pytest.raises(RuntimeError) as refused:  # the bundle's evaluation, results elsewhere
            run_bundle(training, tiny_demo, ("train.json", "evaluate.json"), eval_output_dir=str(tmp_path / "eval"))
        assert f"is in use by process {writer.pid}" in str(input_error(refused.value))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


# ------------------------------------------------------------------------------------------ 2. bound artefacts
def test_export_refuses_thresholds_of_other_weights(evaluated_run, tmp_path):
    out, _ = evaluated_run
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("model.pt", "threshold.json", "config.json"):
        (folder / name).write_bytes((out / "checkpoints" / name).read_bytes())
    export = script_main("export_bundle")
    assert export(["--out", str(tmp_path / "ok.zip"), "--checkpoint", str(folder / "model.pt")]) == 0
    torch.save({"model": {}}, folder / "model.pt")  # the weights were replaced, the thresholds were not
    assert export(["--out", str(tmp_path / "b.zip"), "--checkpoint", str(folder / "model.pt")]) == 2
    assert not (tmp_path / "b.zip").exists()


def test_export_stages_beside_its_zip_and_a_full_disk_stops_it_in_one_line(
    evaluated_run, tmp_path, monkeypatch, capsys
):
    """The export builds the bundle in a hidden folder beside ``--out`` (a full or unusable TMPDIR does not matter:
    here Python's temporary folder is a file); a disk that fills while the zip is written stops it in one line
    naming the bundle and the fix, and leaves nothing in the ``--out`` folder."""
    import errno
    import tempfile
    import zipfile

    checkpoint = evaluated_run[0] / "checkpoints" / "model.pt"
    export = script_main("export_bundle")
    not_a_folder = tmp_path / "tmpdir_is_a_file"
    not_a_folder.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_folder))
    out = tmp_path / "ok" / "b.zip"
    assert export(["--out", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.zip"], "no staging folder left"
    write = zipfile.ZipFile.write

    def full_disk(self, filename, *args, **kwargs):
        if "model.pt" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, filename, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", full_disk)
    capsys.readouterr()
    full = tmp_path / "full" / "b.zip"
    assert export(["--out", str(full), "--checkpoint", str(checkpoint)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"error: cannot write {full}: No space left on device; no b.zip was written. Free disk space" in line
    assert not list(full.parent.iterdir()), "neither a partial zip nor the staging folder is left"


# ------------------------------------------------------------------------------------------ 3. tracking outages
def logged_epochs(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_tracking_outage_loses_nothing_and_does_not_stall_training(tiny_demo, two_test_subjects, tmp_path, capsys):
    server = MlflowServer(tmp_path)
    server.start()
    tracking = Outage(server)  # the server as the run sees it: down and back without a restart
    tracking.up()
    out = tmp_path / "run"
    try:
        workflow = initialized_workflow(out, tiny_demo, epochs=6, tracking_uri=tracking.uri, tracking_retry_s=0)
        trainer = workflow.parser.get_parsed_content("train#trainer")
        times = {}
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: times.setdefault(e.state.epoch, time.monotonic()))
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: tracking.down())  # down after epoch 2
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=4), lambda e: tracking.up())  # back after epoch 4
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=5), lambda e: tracking.down())  # down to the end
        workflow.run()
        workflow.finalize()
        assert times[4] - times[2] < 30, "the epochs without a server were not slowed down by it"
        spool = out / "tracking_spool" / "spool.jsonl"
        assert spool.is_file(), "what the run could not send is kept"
        run_id = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())["run_id"]
        # evaluation while the server is down: kept beside its outputs too
        evaluate = ("train.json", "evaluate.json")
        run_bundle(out, tiny_demo, evaluate, tracking_uri=tracking.uri, eval_datalist=str(two_test_subjects))
        assert (out / "metrics.json").is_file() and (out / "tracking_spool").is_dir()
        tracking.up()
        client = MlflowClient(tracking.uri)
        assert logged_epochs(client, run_id, "Training/train_loss") == [1, 2, 3, 4, 5], "3 and 4 sent when it came back"
        sync = script_main("sync_tracking")
        assert sync([str(out)]) == 0, capsys.readouterr()
        run = client.get_run(run_id)
        assert logged_epochs(client, run_id, "Training/train_loss") == [1, 2, 3, 4, 5, 6]
        assert logged_epochs(client, run_id, "Training/val_neg_elbo") == [1, 2, 3, 4, 5, 6]
        assert "healthy_rec_mse" in run.data.metrics and "eval/paper/pixel_auroc/rec" in run.data.metrics
        assert run.info.status == "FINISHED"
        inputs = {(i.dataset.digest, i.tags[0].value) for i in run.inputs.dataset_inputs}  # the test list: spooled
        assert inputs == {
            (file_sha256(tiny_demo)[:16], "training"),
            (file_sha256(two_test_subjects)[:16], "evaluation"),
        }
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"model.pt", "threshold.json", "evaluation"} <= artifacts
        mlflow.set_tracking_uri(server.uri)  # the MLflow model, logged while the server was down: sent by the sync
        try:
            model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")  # its weights, config and thresholds were kept
            scan = example_scan()
            assert model.predict(scan)["segmentation"].shape == scan["image"].shape
        finally:
            mlflow.set_tracking_uri(None)
        capsys.readouterr()
        assert not spool.exists() and sync([str(out)]) == 0 and "nothing to send" in capsys.readouterr().out
    finally:
        tracking.down()
        server.stop()


# ------------------------------------------------------------------------------------------ 5. write errors
FAIL_SECOND_SAVE = """
import errno, pathlib, runpy, sys
calls, write = [0], pathlib.Path.write_bytes
def failing(self, data):
    calls[0] += ".last.pt." in self.name
    if ".last.pt." in self.name and calls[0] == 2:  # the disk is full when epoch 2 saves last.pt
        raise OSError(errno.ENOSPC, "No space left on device")
    return write(self, data)
pathlib.Path.write_bytes = failing
sys.argv = ["monai.bundle"] + sys.argv[1:]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_in_one_line(tiny_demo, tmp_path):
    settings = [a if a != "1" else "3" for a in TINY_ARGS]  # 3 epochs
    cmd = (
        [sys.executable, "-c", FAIL_SECOND_SAVE]
        + TRAIN_CLI[3:]
        + ["--datalist", str(tiny_demo), "--output_dir", str(tmp_path), *settings]
    )
    line = one_line_error(cli(cmd))
    assert "cannot write" in line and "last.pt: No space left on device" in line and "previous last.pt" in line
    assert epochs_done(tmp_path) == 1, "epoch 1's last.pt is intact"
    assert torch.load(tmp_path / "checkpoints" / "model.pt", weights_only=True)
    assert not list((tmp_path / "checkpoints").glob(".*tmp*")), "no temporary file left behind"
