"""scripts/compare.py against a real MLflow tracking server over HTTP: train, evaluate, compare, rebuild."""

from __future__ import annotations

import csv
import json
import re

import pytest
from conftest import script_main


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_compare_through_mlflow_server_and_rebuild(server_comparison, tmp_path):
    out, mlflow_server = server_comparison
    main = script_main("compare")
    rows = read_csv(out / "comparison.csv")
    legacy = "ceVAE (λ=0.5) + legacy_likelihood"
    assert {r["variant"] for r in rows} == {"ceVAE (λ=0.5)", legacy}
    child = out / "runs" / "cevae-0.5-legacy_likelihood-seed0"
    trained = json.loads((child / "checkpoints" / "config.json").read_text())
    assert (trained["reconstruction"], trained["kl_weight"], trained["overlay_name"]) == ("l2", 1.0, legacy.split()[-1])
    by_key = {(r["variant"], r["metric"]): r for r in rows}
    for variant, child in (("ceVAE (λ=0.5)", "cevae-0.5-seed0"), (legacy, "cevae-0.5-legacy_likelihood-seed0")):
        metrics = json.loads((out / "runs" / child / "eval" / "metrics.json").read_text())
        row = by_key[(variant, "eval/paper/pixel_auroc/combined")]
        assert row["n"] == "1" and row["seeds"] == "0"
        assert float(row["mean"]) == pytest.approx(metrics["paper"]["pixel_auroc"]["combined"], rel=1e-5)
        assert float(by_key[(variant, "eval/kl_q95")]["mean"]) == pytest.approx(metrics["kl_q95"], rel=1e-5)
    table = (out / "comparison.md").read_text()
    assert "| pixel AUROC combined |" in table and "ceVAE (λ=0.5)" in table
    assert "## test set `eval`, option set `authors`" in table and "healthy_threshold" not in table.split("## every")[0]
    metrics = json.loads((out / "runs" / "cevae-0.5-seed0" / "eval" / "metrics.json").read_text())
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
    # the children share one slice cache: the second preprocesses nothing
    logs = [
        (out / "runs" / child / "training.log").read_text()
        for child in ("cevae-0.5-seed0", "cevae-0.5-legacy_likelihood-seed0")
    ]
    found = [re.findall(r"slice cache (\S+): (\d+) of (\d+) volumes preprocessed", log) for log in logs]
    assert len(found[0]) == len(found[1]) == 2 and {f[0] for f in found[0] + found[1]} == {
        str(out / "runs" / "slice_cache")
    }
    assert all(built == total for _, built, total in found[0]) and all(built == "0" for _, built, _ in found[1])

    # the same table again, from the server alone: no training, no files of the first call
    again = tmp_path / "again"
    assert (
        main(
            [
                "--from-mlflow",
                "latest",
                "--experiment",
                "tiny",
                "--tracking-uri",
                mlflow_server.uri,
                "--output-dir",
                str(again),
            ]
        )
        == 0
    )
    assert (again / "comparison.md").read_text() == table
    assert read_csv(again / "comparison.csv") == rows
    assert not (again / "runs").exists()

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    parent = json.loads((out / "parent_run.json").read_text())["run_id"]
    assert {a.path for a in client.list_artifacts(parent, "comparison")} >= {
        "comparison/comparison.md",
        "comparison/roc.png",
    }
    children = client.search_runs([client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["cevae-0.5-legacy_likelihood-seed0", "cevae-0.5-seed0"]


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
