"""scripts/compare.py as `make demo` runs it (a local store under runs/demo), killed and resumed, then read through
the README's `mlflow ui` server: the tables, the figures, the rebuild from MLflow alone; its one-line errors."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from bundle_helpers import CLI_ENV, TINY, TINY_EVALUATION
from conftest import REPO, SERVER_ENV, MlflowServer, script_main
from mlflow import MlflowClient

COMPARISON_ARGS = [  # one child: seed 0, two epochs, ceVAE with the legacy likelihood overlay, a label group
    "--seeds",
    "0",
    "--epochs",
    "2",
    "--ce-weights",
    "0.5",
    "--overlays",
    "legacy_likelihood",
    '--set=label_groups={"lesion": [1]}',
]
CHILD, VARIANT = "cevae-0.5-legacy_likelihood-seed0", "ceVAE (λ=0.5) + legacy_likelihood"


def comparison_args(tiny_demo, test_datalist) -> list[str]:
    """``scripts/compare.py`` options of the tests' comparisons (the bundle's tiny settings as ``--set``)."""
    settings = {**TINY, **TINY_EVALUATION}
    tiny = [f"--set={key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in settings.items()]
    return ["--datalist-train", str(tiny_demo), "--datalist-test", str(test_datalist), *COMPARISON_ARGS, *tiny]


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def rest(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def readme_mlflow_ui(cwd):
    """The README's ``mlflow ui`` command, run from ``cwd`` (as after ``make demo``): yields its URI. One worker
    instead of MLflow's four (each imports the whole server; the answers do not depend on it)."""
    (command,) = re.findall(r"^mlflow ui .*$", (REPO / "README.md").read_text(), flags=re.M)
    server = MlflowServer(cwd)
    env = {**CLI_ENV, **SERVER_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server.process = subprocess.Popen(
        ["bash", "-c", f"{command} --host 127.0.0.1 --port {server.port} --workers 1"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        server.wait_until_up()
        yield server.uri
    finally:
        server.stop()


def kill_in_training(args, out):
    """``scripts/compare.py args`` in a process group of its own, killed (SIGKILL, with the training it runs) as soon
    as its child has saved its first ``last.pt``."""
    process = subprocess.Popen(
        [sys.executable, "scripts/compare.py", *args, "--output-dir", str(out)],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own process group: the comparison and the trainings it starts
    )
    child = out / "runs" / CHILD
    assert process.stdout.readline() == f"[1/1] {CHILD}: training, log {child / 'training.log'}\n"
    killed = child / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not killed.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_killed_comparison_resumes_and_mlflow_serves_and_rebuilds_it(tiny_demo, two_test_subjects, tmp_path, capsys):
    """Killed in the middle of its child's training, a comparison is refused a plain restart and resumes with
    ``--resume``: the training continued from its ``last.pt``, the killed run's log kept; resumed again, the finished
    child is reused. Its tables hold the child's metrics with their intervals; the README's ``mlflow ui`` serves its
    runs and artifacts over HTTP, and ``--from-mlflow`` rebuilds the same tables from that server alone."""
    args = comparison_args(tiny_demo, two_test_subjects)
    out = tmp_path / "runs" / "demo"  # where `make demo` writes, relative to tmp_path
    kill_in_training(args, out)
    child = out / "runs" / CHILD
    assert not (out / "comparison.csv").exists()
    main = script_main("compare")
    capsys.readouterr()
    assert main(args + ["--output-dir", str(out)]) == 2
    assert "holds the comparison" in capsys.readouterr().err, "a plain restart is refused"
    assert main(["--resume", "--output-dir", str(out)]) == 0
    progress = capsys.readouterr().out.splitlines()
    assert progress[0] == f"[1/1] {CHILD}: resuming its training, log {child / 'training.log'}"
    assert progress[1].startswith(f"[1/1] {CHILD}: evaluating on ") and str(child) in progress[1]
    assert progress[2].startswith(f"[1/1] {CHILD}: trained and evaluated")
    trained = json.loads((child / "checkpoints" / "config.json").read_text())
    assert (trained["reconstruction"], trained["kl_weight"], trained["overlay_name"]) == (
        "l2",
        1.0,
        "legacy_likelihood",
    )
    # continued from its last.pt to the end (that a resumed training ends with an uninterrupted one's weights is
    # test_training.py's test_sigkill_then_resume_matches_an_uninterrupted_run)
    resumed = torch.load(child / "checkpoints" / "last.pt", weights_only=True)
    trainer = resumed["trainer"]
    assert trainer["max_epochs"] == 2 and trainer["iteration"] == 2 * trainer["epoch_length"]
    log = (child / "training.log").read_text()
    assert "resumed from " + str(child / "checkpoints" / "last.pt") in log
    # the killed training's log is kept before the resumed one's, and the resumed training found the slice cache
    # that the killed one had built (the comparison's children share it)
    found = re.findall(r"slice cache (\S+): (\d+) of (\d+) volumes preprocessed", log)
    assert len(found) == 4 and {f[0] for f in found} == {str(out / "runs" / "slice_cache")}
    assert all(built == total for _, built, total in found[:2]) and all(built == "0" for _, built, _ in found[2:])
    # the tables: the child's own metrics, with their bootstrap intervals
    rows = read_csv(out / "comparison.csv")
    assert {r["variant"] for r in rows} == {VARIANT}
    by_key = {r["metric"]: r for r in rows}
    metrics = json.loads((child / "eval" / "metrics.json").read_text())
    row = by_key["eval/paper/pixel_auroc/combined"]
    assert row["n"] == "1" and row["seeds"] == "0"
    assert float(row["mean"]) == pytest.approx(metrics["paper"]["pixel_auroc"]["combined"], rel=1e-5)
    assert float(by_key["eval/kl_q95"]["mean"]) == pytest.approx(metrics["kl_q95"], rel=1e-5)
    table = (out / "comparison.md").read_text()
    assert "| pixel AUROC combined |" in table and VARIANT in table
    assert "## test set `eval`, option set `authors`" in table and "healthy_threshold" not in table.split("## every")[0]
    lo, hi = metrics["postprocessed"]["ci95"]["pixel_auroc"]["combined"]
    row = next(
        line
        for line in table.split("## test set `eval`, option set `postprocessed`")[1].splitlines()
        if line.startswith("| pixel AUROC combined |")
    )
    assert f"[{lo:.3f}, {hi:.3f}]" in row, "the bootstrap interval beside the mean"
    assert "| Dice of the whole brain, all subjects |" in table and "| Dice at healthy q0.99 combined" in table
    assert "| pixel AUROC combined, lesion vs healthy |" in table
    for name in ("roc.png", "bars.png"):
        assert (out / name).stat().st_size > 1000
    # resumed once more: the finished child is reused, nothing trained or evaluated again, the same tables
    model = (child / "checkpoints" / "model.pt").stat().st_mtime
    assert main(["--resume", "--output-dir", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"[1/1] {CHILD}: done before, reused"
    assert (child / "checkpoints" / "model.pt").stat().st_mtime == model
    assert (out / "comparison.md").read_text() == table and read_csv(out / "comparison.csv") == rows
    # the README's `mlflow ui`, run where `make demo` was: the runs and their artifacts over HTTP
    with readme_mlflow_ui(tmp_path) as uri:
        api = f"{uri}/api/2.0/mlflow"
        experiment = rest(f"{api}/experiments/get-by-name?experiment_name=cevae-compare")["experiment"]
        assert experiment["artifact_location"] == (out / "mlruns").as_uri()
        parent = json.loads((out / "parent_run.json").read_text())["run_id"]
        client = MlflowClient(uri)
        children = client.search_runs([experiment["experiment_id"]], f"tags.mlflow.parentRunId = '{parent}'")
        assert [r.info.run_name for r in children] == [CHILD]
        assert len(client.search_runs([experiment["experiment_id"]])) == 2, "the parent and its child, once each"
        listed = rest(f"{api}/artifacts/list?run_id={parent}&path=comparison")["files"]
        assert {"comparison/comparison.md", "comparison/roc.png"} <= {f["path"] for f in listed}
        # the same tables again, from the server alone: no training, no files of the first call
        again = tmp_path / "again"
        rebuild = ["--from-mlflow", "latest", "--tracking-uri", uri, "--output-dir", str(again)]
        assert main(rebuild) == 0
    assert (again / "comparison.md").read_text() == table
    assert read_csv(again / "comparison.csv") == rows
    assert not (again / "runs").exists()
    assert (out / "mlruns" / parent / "artifacts" / "comparison" / "comparison.md").is_file()
    assert not (tmp_path / "mlruns").exists(), "no artifacts in the working folder"


def test_compare_reports_failures_in_one_line(tiny_demo, tmp_path, capsys):
    main = script_main("compare")
    assert main(["--datalist-train", str(tmp_path / "missing.json"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    assert (
        main(
            [
                "--datalist-train",
                str(tiny_demo),
                "--set",
                "epoch=3",
                "--seeds",
                "0",
                "--output-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown config key(s): 'epoch'" in err and "training.log" in err
    assert main(["--from-mlflow", "latest", "--experiment", "nothing", "--output-dir", str(tmp_path / "o")]) == 2
    assert "no comparison run in experiment 'nothing'" in capsys.readouterr().err
    assert main(["--datalist-train", str(tiny_demo), "--overlays", "mine", "--output-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "no overlay 'mine'" in err and "'legacy_likelihood'" in err and "'tuned_on_brats'" in err
    off = ["--datalist-train", str(tiny_demo), "--tracking-uri", "none", "--output-dir", str(tmp_path / "o3")]
    assert main(off) == 2 and "read back from MLflow" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists(), "refused before anything is written"
