"""Model Zoo sharing: metadata schema, verify_net_in_out, TorchScript export, the self-contained bundle zip, the
Zoo's own CI on it (weights downloaded from large_files.yml), and MONAI's ``load`` and ``download`` of it."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
import torch
from bundle_helpers import BUNDLE, CLI_ENV
from conftest import REPO, script_main
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from pipeline.data.datalist import load_datalist
from pipeline.networks import CeVAEReconstruction
from pipeline.release import ZOO_NAME, ship_model_card
from pipeline.scoring import OPTION_SETS

SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"  # copy of the Model Zoo schema, for offline checks
TINY_NET_SETTINGS = {"z_dim": 16, "channels": [8, 16, 32, 64], "synthetic_volumes": 1}
TINY_NET = [f"--{k}={json.dumps(v)}" for k, v in TINY_NET_SETTINGS.items()]


def bundle_command(*args, cwd=BUNDLE):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, env=CLI_ENV
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_metadata_is_valid_against_the_model_zoo_schema(tmp_path):
    """MONAI's ``verify_metadata`` (in-process, what ``python -m monai.bundle verify_metadata`` runs) against the
    Zoo's schema; a metadata without its ``version`` is refused (negative control)."""
    configs = BUNDLE / "configs"
    verify_metadata(meta_file=str(configs / "metadata.json"), filepath=str(SCHEMA))
    broken = {k: v for k, v in json.loads((configs / "metadata.json").read_text()).items() if k != "version"}
    (tmp_path / "metadata.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="version"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


def test_verify_net_in_out():
    configs = BUNDLE / "configs"
    verify_net_in_out(
        net_id="network_def", meta_file=str(configs / "metadata.json"), config_file=str(configs / "inference.json")
    )


def test_torchscript_export_gives_the_same_reconstruction(evaluated_run, tmp_path):
    out, _ = evaluated_run
    checkpoint = out / "checkpoints" / "model.pt"
    configs = BUNDLE / "configs"
    ckpt_export(  # in-process, as `python -m monai.bundle ckpt_export network_def ...` runs it
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(checkpoint),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        key_in_ckpt="model",
        **TINY_NET_SETTINGS,
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    net = CeVAEReconstruction(z_dim=16, channels=(8, 16, 32, 64)).eval()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    x = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(scripted(x), net(x))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no request log on stderr
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real HTTP server on the loopback interface over a folder: ``(folder, base URL)``."""
    folder = tmp_path_factory.mktemp("served")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture(scope="module")
def exported(evaluated_run, served, tmp_path_factory):
    """``scripts/export_bundle.py`` of the tiny trained run with its weights URL on the loopback server and its
    evaluation on the demo's test subjects (``demo``), which then serves the zip and the weights: ``(zip, extracted
    bundle folder)``."""
    out, _ = evaluated_run
    folder, url = served
    tmp = tmp_path_factory.mktemp("export")
    archive = tmp / "dist" / "cevae.zip"  # dist/ does not exist yet: the script creates it
    checkpoint = str(out / "checkpoints" / "model.pt")
    weights_url = f"{url}/model.pt"
    assert (
        script_main("export_bundle")(
            [
                "--out",
                str(archive),
                "--checkpoint",
                checkpoint,
                "--weights-url",
                weights_url,
                "--evaluation",
                f"demo={out}",
            ]
        )
        == 0
    )
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(tmp / "unzipped")
    root = tmp / "unzipped" / ZOO_NAME
    shutil.copy(root / "models" / "model.pt", folder / "model.pt")
    shutil.copy(archive, folder / "cevae.zip")
    return archive, root


def test_export_ships_plain_weights_bound_thresholds_and_the_weights_url(exported, evaluated_run, served):
    archive, root = exported
    out, _ = evaluated_run
    trained = torch.load(out / "checkpoints" / "model.pt", weights_only=True)
    weights = torch.load(root / "models" / "model.pt", weights_only=True)
    assert weights.keys() == trained["model"].keys()  # a plain state dict, no "model"/"loss" nesting
    assert all(torch.equal(weights[k], trained["model"][k]) for k in weights)
    config = json.loads((root / "models" / "config.json").read_text())
    assert config["sigma"] == pytest.approx(float(trained["loss"]["sigma"]))  # the calibrated sigma, as a number
    digest = hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
    assert json.loads((root / "models" / "threshold.json").read_text())["checkpoint_sha256"] == digest
    large = ConfigParser.load_config_file(str(root / "large_files.yml"))["large_files"][0]
    assert large["url"] == f"{served[1]}/model.pt"
    assert large["hash_val"] == hashlib.md5((root / "models" / "model.pt").read_bytes()).hexdigest()
    torch.jit.load(str(root / "models" / "model.ts"))
    with zipfile.ZipFile(archive) as zipped:
        names = set(zipped.namelist())
        assert {f"{ZOO_NAME}/models/model.ts", f"{ZOO_NAME}/scripts/inference.py"} <= names
        assert not any(name.startswith(f"{ZOO_NAME}/scripts/benchmarks/") for name in names), "benchmarks stay home"
    assert re.fullmatch(r"cevae_brain_mri_[a-z_]+", ZOO_NAME), "method, data and task, as the Zoo names bundles"
    assert "pipeline." not in (root / "configs" / "inference.json").read_text()


def test_the_exports_eval_metrics_are_those_of_its_own_checkpoint(exported, evaluated_run, tmp_path):
    """The exported ``eval_metrics`` are the shipped checkpoint's: its healthy figures from its ``threshold.json`` and
    its evaluation's (``--evaluation demo=DIR``), read here from the files themselves; none of the checked-in figures of
    the pretrained weights is carried over, nor the description's sentence on them (it names the trained settings).
    An evaluation of other weights stops the export (exit 2, no zip), and a bundle without weights has no figures."""
    _, root = exported
    out, metrics = evaluated_run
    shipped = json.loads((root / "configs" / "metadata.json").read_text())["eval_metrics"]
    healthy = json.loads((out / "checkpoints" / "threshold.json").read_text())["healthy"]
    point = metrics["operating_point"]
    mapped = f"{point['option_set']}_{point['score']}"
    expected = {
        "healthy_validation_mse_vs_mean_brain": healthy["validation"]["rec_vs_mean_brain"],
        "healthy_validation_synthetic_lesion_dice_operating_point": point["synthetic_dice"],
        "demo_dice_operating_point": point["dice"],
        "demo_lesion_recall_operating_point": point["recall"],
        "demo_false_positive_components_per_volume_operating_point": point["fp_per_volume"],
        "demo_dice_whole_brain_mask": metrics["baselines"]["dice_whole_brain_all"],
        f"demo_pixel_auroc_{mapped}": metrics[point["option_set"]]["pixel_auroc"][point["score"]],
        f"demo_pixel_auprc_{mapped}": metrics[point["option_set"]]["pixel_auprc"][point["score"]],
        "demo_slice_auroc_elbo": metrics["slice_auroc"]["elbo"],
    }
    assert {key: shipped[key] for key in expected} == {key: round(value, 3) for key, value in expected.items()}
    optional = {"demo_dice_intensity_healthy_q099", f"demo_pixel_auroc_{mapped}_core"}  # read from nested tables
    assert set(expected) <= set(shipped) <= set(expected) | optional  # no brats2013_t1c_* of the checked-in file
    description = json.loads((root / "configs" / "metadata.json").read_text())["description"]
    trained = json.loads((out / "checkpoints" / "config.json").read_text())
    assert "IXI T1" not in description and f"seed {trained['seed']}, up to {trained['epochs']} epochs" in description
    assert description.count("The shipped weights: a ceVAE (ce_weight 0.5) trained by this bundle") == 1

    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({**metrics, "checkpoint_sha256": "0" * 64}))
    checkpoint = str(out / "checkpoints" / "model.pt")
    archive = tmp_path / "b.zip"
    argv = ["--out", str(archive), "--checkpoint", checkpoint, "--evaluation", f"demo={other}"]
    assert script_main("export_bundle")(argv) == 2 and not archive.exists()
    configs = shutil.copytree(BUNDLE / "configs", tmp_path / "configs")
    ship_model_card(None, configs)
    assert "eval_metrics" not in json.loads((configs / "metadata.json").read_text())


def test_the_export_draws_the_training_curves_of_its_own_run_only(exported, evaluated_run, tmp_path):
    """The exported docs/training_curves.png is drawn from the MLflow run that trained the exported checkpoint (the
    repository's copy shows the pretrained model's curves: a different image); a checkpoint without a tracked run
    gets no figure rather than another training's (negative control)."""
    from pipeline.release import CURVES, export_training_curves

    _, root = exported
    out, _ = evaluated_run
    shipped = root / "docs" / CURVES
    assert shipped.stat().st_size > 10_000 and shipped.read_bytes() != (BUNDLE / "docs" / CURVES).read_bytes()
    untracked = tmp_path / "untracked" / "checkpoints"
    untracked.mkdir(parents=True)
    shutil.copy(out / "checkpoints" / "model.pt", untracked / "model.pt")
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(shipped, docs / CURVES)
    assert not export_training_curves(untracked / "model.pt", docs) and not (docs / CURVES).exists()
    assert export_training_curves(out / "checkpoints" / "model.pt", docs) and (docs / CURVES).stat().st_size > 10_000


ZOO_CI = REPO.parent / "shared" / "tools" / "model_zoo_ci"


@pytest.mark.skipif(not ZOO_CI.is_dir(), reason="the Model Zoo CI copy (../shared/tools/model_zoo_ci) is absent")
def test_model_zoo_ci_passes_with_the_weights_downloaded_from_large_files(exported, served, tmp_path):
    _, root = exported
    bundle = tmp_path / root.name
    shutil.copytree(root, bundle)
    (bundle / "models" / "model.pt").unlink()  # as in a Zoo pull request: weights come from large_files.yml
    env = {**CLI_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", str(ZOO_CI / "run.sh"), str(bundle), str(tmp_path / "zoo")], capture_output=True, text=True, env=env
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    for step in ("directory is verified", "metadata format is verified", "data shape is verified", "successfully"):
        assert step in log, step
    assert "Provided TorchScript module is verified correctly" in log
    downloaded = tmp_path / "zoo" / "models" / root.name / "models" / "model.pt"
    assert downloaded.read_bytes() == (served[0] / "model.pt").read_bytes()
    # negative control: a wrong hash in large_files.yml stops the Zoo's download
    text = (bundle / "large_files.yml").read_text()
    (bundle / "large_files.yml").write_text(text.replace('hash_val: "', 'hash_val: "0'))
    result = subprocess.run(
        ["bash", str(ZOO_CI / "run.sh"), str(bundle), str(tmp_path / "zoo2")], capture_output=True, text=True, env=env
    )
    assert result.returncode != 0 and "md5" in (result.stdout + result.stderr).lower()


ZOO_SETUP_CFG = REPO / "tests" / "data" / "model_zoo_setup.cfg"  # the Zoo's flake8 and isort settings (its header)


def zoo_format_check(bundle):
    """The Zoo's code-format check as its pull requests get it: the bundle under ``models/<name>/`` of a checkout whose
    root holds the Zoo's ``setup.cfg`` (and no ``pyproject.toml`` of this project above it), the commands of the
    Zoo's CI README run in the bundle's folder; ``{tool: (exit status, output)}``."""
    tools = Path(sys.executable).parent
    commands = {
        "black": [tools / "black", "--check", "-l", "120", "."],
        "isort": [tools / "isort", "--check", "--profile", "black", "-l", "120", "."],
        "flake8": [tools / "flake8", "--config", str(bundle.parents[1] / "setup.cfg"), "."],
    }
    results = {}
    for tool, command in commands.items():
        result = subprocess.run([str(c) for c in command], cwd=bundle, capture_output=True, text=True)
        results[tool] = (result.returncode, result.stdout[-2000:] + result.stderr[-2000:])
    return results


def test_the_export_passes_the_model_zoo_code_format_check_in_a_zoo_checkout(exported, tmp_path):
    _, root = exported
    zoo = tmp_path / "model-zoo"
    bundle = zoo / "models" / root.name
    shutil.copytree(root, bundle)
    shutil.copy(ZOO_SETUP_CFG, zoo / "setup.cfg")
    for tool, (status, log) in zoo_format_check(bundle).items():
        assert status == 0, (tool, log)
    # negative control: the package renamed without the Zoo's import order (the bundle's `scripts` imports in a
    # block of their own, as this project sorts `pipeline`) is what the Zoo's isort flags
    module = bundle / "scripts" / "weights_renamed_only.py"
    module.write_text((REPO / "pipeline" / "weights.py").read_text().replace("pipeline", "scripts"))
    status, log = zoo_format_check(bundle)["isort"]
    assert status != 0 and "weights_renamed_only.py" in log


LOAD = """
import json, shutil, sys, torch, monai.bundle
from pathlib import Path
sys.modules["pipeline"] = None  # the repository's package is not there
root, trained, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
name = root.name
try:  # negative control: MONAI only puts the bundle's folder on sys.path when a workflow runs
    monai.bundle.load(name=name, bundle_dir=str(root.parent))
    raise SystemExit("the bundle's scripts were found without the bundle on sys.path")
except Exception as error:
    assert "scripts" in str(error), error
sys.path.insert(0, str(root))  # as the Model Zoo's own check does, and the bundle README says
net = monai.bundle.load(name=name, bundle_dir=str(root.parent), workflow_type="inference")
torch.save(net.state_dict(), work / "loaded.pt")
net = monai.bundle.load(name=name, bundle_dir=str(root.parent))  # MONAI's default workflow type: train.json
torch.save(net.state_dict(), work / "loaded_train.pt")
workflow = monai.bundle.ConfigWorkflow(
    config_file=str(root / "configs" / "inference.json"), workflow_type="inference", logging_file=False,
    meta_file=str(root / "configs" / "metadata.json"),
)
workflow.initialize()
missing = workflow.check_properties()
# negative control: the training checkpoint format ({"model", "loss"}) in models/model.pt
shutil.copytree(root, work / "other" / name)
shutil.copy(trained, work / "other" / name / "models" / "model.pt")
net = monai.bundle.load(name=name, bundle_dir=str(work / "other"), workflow_type="inference")
torch.save(net.state_dict(), work / "nested.pt")
print(json.dumps({"missing": missing, "own_excepthook": sys.excepthook is sys.__excepthook__}))
"""


def bundle_files(root):
    return {p.relative_to(root): p.stat().st_mtime_ns for p in root.rglob("*") if "__pycache__" not in p.parts}


def test_monai_bundle_load_gives_the_trained_network_from_any_directory(exported, evaluated_run, tmp_path):
    """``monai.bundle.load`` in a fresh interpreter, called from a folder that is neither the bundle's nor the
    repository, with the bundle's folder on ``sys.path`` as for every Zoo bundle with a ``scripts`` package, with the
    inference workflow and with MONAI's default (training) workflow: the trained network each time, and nothing
    written to the caller's folder or the bundle."""
    _, root = exported
    out, _ = evaluated_run
    trained = out / "checkpoints" / "model.pt"
    caller = tmp_path / "caller"
    caller.mkdir()
    before = bundle_files(root)
    result = subprocess.run(
        [sys.executable, "-c", LOAD, str(root), str(trained), str(tmp_path)],
        cwd=caller,
        capture_output=True,
        text=True,
        env=CLI_ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # MONAI's inference properties; the session keeps its excepthook (the bundle's one-line errors are for the CLI)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"missing": [], "own_excepthook": True}
    assert list(caller.iterdir()) == [] and bundle_files(root) == before
    expected = torch.load(trained, weights_only=True)["model"]
    for name in ("loaded.pt", "loaded_train.pt"):
        loaded = torch.load(tmp_path / name, weights_only=True)
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected), f"{name}: every tensor is the trained one"
    nested = torch.load(tmp_path / "nested.pt", weights_only=True)
    assert not any(torch.equal(nested[k], expected[k]) for k in expected if k.endswith("weight"))


def test_monai_bundle_download_from_a_url(exported, served, tmp_path):
    _, root = exported
    bundle_command(
        "download", "--name", root.name, "--bundle_dir", str(tmp_path), "--url", f"{served[1]}/cevae.zip", cwd=tmp_path
    )
    for name in ("configs/inference.json", "models/model.pt", "models/threshold.json", "scripts/inference.py"):
        assert (tmp_path / root.name / name).read_bytes() == (root / name).read_bytes(), name


@pytest.mark.slow
def test_self_contained_zip_runs_without_the_repository_from_any_folder(exported, tiny_demo, tmp_path):
    """The exported bundle's inference and training, each as ``python -m monai.bundle run`` in a fresh interpreter
    without the repository's package, started from an unrelated folder: inference with the bundle's config file
    path, training with ``--bundle_root`` (its outputs under the bundle's ``runs/``); nothing lands in the caller's
    folder."""
    _, shipped = exported
    root = tmp_path / "bundles" / "cevae"  # a copy: training writes under its runs/
    shutil.copytree(shipped, root)
    caller = tmp_path / "caller"
    caller.mkdir()
    image = load_datalist(tiny_demo, "test")[0]["image"]
    # the repository's package is blocked: `import pipeline` fails in this process
    launcher = (
        "import sys, runpy; sys.modules['pipeline'] = None; sys.argv = ['monai.bundle'] + sys.argv[1:]; "
        "runpy.run_module('monai.bundle', run_name='__main__')"
    )
    inference = ["run", "inference", "--config_file", str(root / "configs" / "inference.json")]
    inference += ["--input_image", image, "--output_dir", str(tmp_path / "pred")]  # settings: models/config.json
    result = subprocess.run(
        [sys.executable, "-c", launcher, *inference], cwd=caller, capture_output=True, text=True, env=CLI_ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("anomaly", "seg"):
        (written,) = (tmp_path / "pred").glob(f"*_{kind}.nii.gz")
        assert nib.load(written).shape == nib.load(image).shape
    (score,) = (tmp_path / "pred").glob("*_score.json")
    assert json.loads(score.read_text())["threshold_source"].startswith("label-free operating point")
    training = ["run", "training", "--config_file", str(root / "configs" / "train.json"), "--bundle_root", str(root)]
    training += ["--datalist", str(tiny_demo), "--epochs", "1", "--progress_bar", "False", "--batch_size", "16"]
    result = subprocess.run(
        [sys.executable, "-c", launcher, *training, *TINY_NET], cwd=caller, capture_output=True, text=True, env=CLI_ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "runs" / "cevae-seed0" / "checkpoints" / "model.pt").is_file()  # runs/<variant>-seed<seed>
    assert list(caller.iterdir()) == []


def test_bundle_option_sets_are_the_library_ones():
    """The knobs of configs/train.json's option sets (what the bundle runs) equal pipeline.scoring.OPTION_SETS
    (what the library and inference use when no threshold.json names them)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    assert parser.get_parsed_content("option_sets") == OPTION_SETS
    changed = ConfigParser()
    changed.read_config(str(BUNDLE / "configs" / "train.json"))
    changed["option_sets#authors#grad_sigma"] = 2.0  # negative control: a changed knob is seen
    assert changed.get_parsed_content("option_sets") != OPTION_SETS


def test_export_requires_an_existing_checkpoint(tmp_path):
    assert (
        script_main("export_bundle")(["--out", str(tmp_path / "b.zip"), "--checkpoint", str(tmp_path / "none.pt")]) == 2
    )
    assert not (tmp_path / "b.zip").exists()


def test_metadata_eval_metrics_are_the_benchmark_figures():
    """configs/metadata.json's eval_metrics are the figures of the shipped weights in docs/benchmarks.md, named as
    the export names a checkpoint's (healthy validation figures, then those of its BraTS2013 T1c evaluation)."""
    metrics = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["eval_metrics"]
    text = (REPO / "docs" / "benchmarks.md").read_text()
    section = text.split("## The pretrained model")[1].split("\n## ")[0]  # the shipped weights
    assert metrics and all(k.startswith(("healthy_validation_", "brats2013_t1c_")) for k in metrics)
    for key, value in metrics.items():
        assert f"{value:.3f}" in section, (key, value)


def test_monai_check_properties_passes_for_training_and_inference(tiny_demo, tmp_path):
    """What Zoo bundles' unit tests call: ``ConfigWorkflow(...).check_properties()`` after ``initialize`` lists no
    missing property (the training's key metric is ``train#key_metric``, referred to by the trainer, as MONAI
    expects). Negative control: the key metric written inline again is reported by MONAI itself."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE / "configs"
    train = ConfigWorkflow(
        config_file=str(configs / "train.json"),
        workflow_type="train",
        datalist=str(tiny_demo),
        output_dir=str(tmp_path / "run"),
        epochs=1,
        progress_bar=False,
    )
    train.initialize()
    try:
        assert train.check_properties() == []
        train.parser["train#trainer#key_train_metric"] = train.parser["train#key_metric"]  # inline, as before
        with pytest.raises(AttributeError, match="startswith"):
            train.check_properties()
    finally:
        train.finalize()
    infer = ConfigWorkflow(
        config_file=str(configs / "inference.json"), workflow_type="infer", meta_file=str(configs / "metadata.json")
    )
    infer.initialize()
    assert infer.check_properties() == []
