"""Model Zoo sharing: metadata schema, verify_net_in_out, TorchScript export, and the self-contained bundle zip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import nibabel as nib
import torch
from bundle_helpers import BUNDLE
from conftest import REPO, script_main
from monai.bundle import ConfigParser

from pipeline.data.datalist import load_datalist
from pipeline.networks import CeVAEReconstruction
from pipeline.scoring import OPTION_SETS

SCHEMA = REPO / "tests" / "data" / "meta_schema_20240725.json"  # copy of the Model Zoo schema, for offline checks
TINY_NET = ["--z_dim", "16", "--channels", "[8,16,32,64]"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def bundle_command(*args, cwd=BUNDLE):
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_metadata_is_valid_against_the_model_zoo_schema():
    result = bundle_command("verify_metadata", "--meta_file", "configs/metadata.json", "--filepath", str(SCHEMA))
    assert "metadata is verified with no error" in result.stdout + result.stderr


def test_verify_net_in_out():
    bundle_command(
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
    )


def test_torchscript_export_gives_the_same_reconstruction(evaluated_run, tmp_path):
    out, _ = evaluated_run
    checkpoint = out / "checkpoints" / "model.pt"
    bundle_command(
        "ckpt_export",
        "network_def",
        "--filepath",
        str(tmp_path / "model.ts"),
        "--ckpt_file",
        str(checkpoint),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--key_in_ckpt",
        "model",
        *TINY_NET,
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    net = CeVAEReconstruction(z_dim=16, channels=(8, 16, 32, 64)).eval()
    net.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    x = torch.rand(3, 1, 64, 64)
    torch.testing.assert_close(scripted(x), net(x))


def test_self_contained_zip_runs_without_the_repository(evaluated_run, tiny_demo, tmp_path):
    out, _ = evaluated_run
    archive = tmp_path / "cevae_bundle.zip"
    assert (
        script_main("export_bundle")(["--out", str(archive), "--checkpoint", str(out / "checkpoints" / "model.pt")])
        == 0
    )
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        zipped.extractall(tmp_path / "unzipped")
    assert {
        "cevae/models/model.pt",
        "cevae/models/config.json",
        "cevae/models/threshold.json",
        "cevae/scripts/inference.py",
    } <= set(names)
    root = tmp_path / "unzipped" / "cevae"
    assert "pipeline." not in (root / "configs" / "inference.json").read_text()
    image = load_datalist(tiny_demo, "test")[0]["image"]
    # the repository's package is blocked: `import pipeline` fails in this process
    launcher = (
        "import sys, runpy; sys.modules['pipeline'] = None; sys.argv = ['monai.bundle'] + sys.argv[1:]; "
        "runpy.run_module('monai.bundle', run_name='__main__')"
    )
    cmd = [
        sys.executable,
        "-c",
        launcher,
        "run",
        "inference",
        "--config_file",
        "configs/inference.json",
        "--input_image",
        image,
        "--output_dir",
        str(tmp_path / "pred"),
    ]  # settings: models/config.json
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    for kind in ("anomaly", "seg"):
        (written,) = (tmp_path / "pred").glob(f"*_{kind}.nii.gz")
        assert nib.load(written).shape == nib.load(image).shape
    (score,) = (tmp_path / "pred").glob("*_score.json")
    assert json.loads(score.read_text())["threshold_source"] == "healthy quantile 0.99"
    cmd = [
        sys.executable,
        "-c",
        launcher,
        "run",
        "training",
        "--config_file",
        "configs/train.json",
        "--datalist",
        str(tiny_demo),
        "--output_dir",
        str(tmp_path / "train"),
        "--epochs",
        "1",
        "--progress_bar",
        "False",
        "--batch_size",
        "16",
        *TINY_NET,
    ]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "train" / "checkpoints" / "model.pt").is_file()


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
