"""Bad input at every stage (training, evaluation, inference): an error naming the file, earlier outputs intact,
and concurrent runs on one MLflow store."""

from __future__ import annotations

import json
import os
import re
import subprocess

import nibabel as nib
import numpy as np
import pytest
from bundle_helpers import CLI_ENV, CONFIGS, TINY, TRAIN_CLI, run_bundle
from conftest import REPO, input_error, script_main
from mlflow import MlflowClient
from monai.bundle import ConfigWorkflow

from pipeline.data.datalist import load_datalist, write_datalist

CASES = {
    "nan": "NaN or Inf",
    "missing": "does not exist",
    "shape": "has shape",
    "4d": "4D series",
}


def broken_datalist(tiny_demo, tmp_path, case):
    """A copy of the tiny demo lists whose first training and test entries carry the defect ``case``."""
    lists = {key: load_datalist(tiny_demo, key) for key in ("training", "test")}
    source = lists["test"][0]
    image = nib.load(source["image"])
    data = np.asanyarray(image.dataobj).astype(np.float32)
    bad = {"image": tmp_path / f"{case}_image.nii.gz", "brainmask": source["brainmask"], "label": source["label"]}
    if case == "nan":
        data[data.shape[0] // 2, data.shape[1] // 2, data.shape[2] // 2] = np.nan
    elif case == "shape":
        bad["brainmask"] = tmp_path / "short_mask.nii.gz"
        mask = np.asanyarray(nib.load(source["brainmask"]).dataobj)[:-3]
        nib.save(nib.Nifti1Image(mask, image.affine), bad["brainmask"])
    elif case == "4d":
        data = np.stack([data, data], axis=-1)
    if case != "missing":
        nib.save(nib.Nifti1Image(data, image.affine), bad["image"])
    bad = {k: str(v) for k, v in bad.items()}
    lists["training"][0] = {k: bad[k] for k in ("image", "brainmask")}
    lists["test"][0] = bad
    return write_datalist(lists, tmp_path / "broken.json"), bad["image"]


STAGES = {
    "training": (("train.json",), {}),
    "evaluation": (("train.json", "evaluate.json"), {}),
    "inference": (("inference.json",), {"run_id": "inference"}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_each_stage_names_the_bad_file_and_keeps_earlier_outputs(evaluated_run, tiny_demo, tmp_path, stage, case):
    out, _ = evaluated_run
    datalist, bad_file = broken_datalist(tiny_demo, tmp_path, case)
    files, extra = STAGES[stage]
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    sentinel = output_dir / "earlier_output.json"  # not an evaluation's own file: --overwrite would delete those
    sentinel.write_text('{"earlier": true}')
    settings = {"output_dir": str(output_dir), "datalist": str(datalist), "z_dim": 16, "channels": [8, 16, 32, 64]}
    if stage == "inference":
        settings.update(ckpt=str(out / "checkpoints" / "model.pt"), threshold=0.1)
    else:
        settings.update(
            {k: v for k, v in TINY.items() if k not in settings},
            epochs=1,
            ckpt_path=str(out / "checkpoints" / "model.pt"),
            eval_name="broken",  # 'eval' holds the fixture's test set
        )
    config = [str(CONFIGS / f) for f in files]
    workflow = ConfigWorkflow(
        config_file=config if len(config) > 1 else config[0],
        logging_file=False,
        meta_file=str(CONFIGS / "metadata.json"),
        **extra,
        **settings,
    )

    def initialize_and_run():
        workflow.initialize()
        workflow.run()

    with pytest.raises(Exception) as info:
        initialize_and_run()
    err = input_error(info.value)
    assert err is not None, info.value
    named = "short_mask.nii.gz" if case == "shape" else os.path.basename(bad_file)
    assert CASES[case] in str(err) and named in str(err), str(err)
    assert sentinel.read_text() == '{"earlier": true}', "earlier outputs are left intact"


@pytest.mark.slow
def test_concurrent_runs_on_one_store_all_land(tiny_demo, tmp_path):
    """Two command-line trainings from the repository root, side by side on one SQLite store: both finish, with
    their checkpoints, and both runs land (the suite's complete ``run training`` from the command line)."""
    store = f"sqlite:///{tmp_path}/shared.db"
    base = [
        *TRAIN_CLI,
        "--datalist",
        str(tiny_demo),
        "--epochs",
        "1",
        "--batch_size",
        "16",
        "--z_dim",
        "16",
        "--channels",
        "[8,16,32,64]",
        "--synthetic_volumes",
        "1",
        "--progress_bar",
        "False",
        "--tracking_uri",
        store,
    ]
    runs = [
        subprocess.Popen(
            base + ["--output_dir", str(tmp_path / n), "--run_name", n],
            cwd=REPO,
            env=CLI_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in ("a", "b")
    ]
    for process in runs:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-6000:]
    assert all((tmp_path / n / "checkpoints" / "model.pt").is_file() for n in ("a", "b"))
    client = MlflowClient(store)
    finished = client.search_runs(client.get_experiment_by_name("cevae").experiment_id)
    assert sorted(r.info.run_name for r in finished) == ["a", "b"]
    assert all(r.info.status == "FINISHED" and "Training/train_loss" in r.data.metrics for r in finished)


TOOLS = {  # command line -> a file its output folder argument will be created in (None: a folder argument)
    "export_bundle": ["--out", "{out}/b.zip"],
    "benchmark": ["--quick", "--out", "{out}/bench.json"],
    "compare": ["--output-dir", "{out}", "--demo-dir", "{out}/demo", "--seeds", "0", "--epochs", "1"],
    "make_demo_data": ["--out", "{out}", "--n-train", "1", "--n-test", "1"],
    "prepare_datalist": ["--layout", "ixi", "--root", "{data}", "--out", "{out}/d.json"],
}


@pytest.mark.parametrize("tool", TOOLS)
def test_command_line_tools_refuse_an_output_folder_they_cannot_create_in_one_line(tool, tiny_demo, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where the output folder's parent should be
    args = [a.format(out=blocker / "out", data=tiny_demo.parent) for a in TOOLS[tool]]
    assert script_main(tool)(args) == 2  # an exception instead would fail this test with its traceback
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert "Not a directory" in line and str(blocker) in line, line


def test_command_line_tools_create_a_missing_output_folder(tmp_path):
    out = tmp_path / "new" / "deeper"
    assert script_main("make_demo_data")(["--out", str(out), "--n-train", "1", "--n-test", "1"]) == 0
    assert (out / "datalist.json").is_file()  # export_bundle: tests/test_bundle_sharing.py (dist/ is created)


@pytest.mark.parametrize(
    "key, value, must_be",
    [
        ("image_size", 0, "a whole number >= 8"),
        ("image_size", 7, "a whole number >= 8"),
        ("image_size", 100, "divisible"),
        ("epochs", 0, "a whole number >= 1"),
        ("batch_size", 0, "a whole number >= 1"),
        ("lr", float("nan"), "a finite number > 0"),
        ("z_dim", 0, "a whole number >= 1"),
        ("val_fraction", 1.0, r"in \[0, 1\)"),
        ("ce_weight", -1.0, r"in \[0, 1\]"),
        ("epochs", True, "a whole number"),
        ("augment", "heavy", "one of none, standard"),
        ("synthetic_volumes", 0, "a whole number >= 1"),
    ],
)
def test_out_of_range_settings_stop_before_anything_is_built_in_one_line(tiny_demo, tmp_path, key, value, must_be):
    with pytest.raises(RuntimeError) as refused:  # MONAI wraps errors of config expressions
        run_bundle(tmp_path / "run", tiny_demo, **{key: value})
    error = input_error(refused.value)
    assert error is not None and re.match(
        rf"--{key} must be .*{must_be}.*, got {re.escape(repr(value))}; e\.g\. --", str(error)
    )
    assert not (tmp_path / "run" / "checkpoints").exists(), "stopped before the run's folder was prepared"


def test_the_default_settings_pass_the_range_checks():
    """Negative control: every default of configs/train.json passes."""
    from pipeline.settings_check import RULES, check_settings

    defaults = json.loads((REPO / "bundles" / "cevae" / "configs" / "train.json").read_text())
    assert set(RULES) <= set(defaults)
    check_settings({key: defaults[key] for key in RULES})


def test_datalist_entries_that_are_not_paths_and_a_single_subject_are_named_in_one_error(tiny_demo, tmp_path):
    from pipeline.bundle_support import train_val_split
    from pipeline.errors import InputError

    entries = load_datalist(tiny_demo, "training")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"training": [{"image": 7}, {"image": ["a.nii.gz"]}, {"image": entries[0]["image"]}]}))
    with pytest.raises(InputError, match=r"(?s)2 problem\(s\).*entry 0 'image' must be a file path.*got 7") as found:
        load_datalist(bad, "training")
    assert "entry 1 'image' must be a file path (a string), got ['a.nii.gz']" in str(found.value)
    single = write_datalist({"training": entries[:1]}, tmp_path / "one.json")
    with pytest.raises(InputError, match=r"1 healthy subject\(s\).*leave 1 for training and 0 for validation"):
        train_val_split(single, 0.1, 0)
    training, validation = train_val_split(tiny_demo, 0.34, 0)  # negative control: three subjects split
    assert len(training) == 2 and len(validation) == 1
