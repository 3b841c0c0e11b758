"""Inference in the input's native geometry (RAS, LPS, PSR, anisotropic), from the bundle's inference config."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import CONFIGS
from monai.bundle import ConfigWorkflow
from scipy import ndimage

from pipeline.data.datalist import load_datalist
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.inference import AnomalyInference
from pipeline.metrics import dice
from pipeline.networks import CeVAEReconstruction

PSR_FROM_RAS = np.array([[0, 0, 1, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], float)  # voxel map, a-offset below


def reoriented(array, affine, layout):
    """``array`` (RAS voxel order) stored as ``layout`` with an anisotropic voxel size; same world positions."""
    scale = np.diag([1.0, 1.0, 1.5, 1.0])  # declare 1.5x thicker slices: anisotropic spacing
    affine = affine @ scale
    if layout == "RAS":
        return array, affine
    if layout == "LPS":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [array.shape[0] - 1, array.shape[1] - 1]
        return array[::-1, ::-1].copy(), affine @ flip
    voxel_map = PSR_FROM_RAS.copy()  # new (p, s, r) -> RAS voxel (r, a = n_a - 1 - p, s)
    voxel_map[1, 3] = array.shape[1] - 1
    return array.transpose(1, 2, 0)[::-1].copy(), affine @ voxel_map


def to_ras_order(array, layout):
    if layout == "RAS":
        return array
    if layout == "LPS":
        return array[::-1, ::-1]
    return array[::-1].transpose(2, 0, 1)


@pytest.fixture(scope="module")
def tumour_case(tiny_demo):
    return next(e for e in load_datalist(tiny_demo, "test") if e["kind"] == "tumour")


LAYOUTS = ("RAS", "LPS", "PSR")


@pytest.fixture(scope="module")
def layout_runs(evaluated_run, tumour_case, tmp_path_factory):
    """Inference on the tumour case stored in each layout: ``{layout: (input files, written outputs)}``."""
    out, _ = evaluated_run
    tmp = tmp_path_factory.mktemp("layouts")
    infer = AnomalyInference(CeVAEReconstruction(z_dim=16, channels=(8, 16, 32, 64)),
                             out / "checkpoints" / "model.pt", brain_volume_transform(), tmp / "out")
    runs = {}
    for layout in LAYOUTS:
        files = {}
        for key in ("image", "brainmask", "label"):
            img = nib.load(tumour_case[key])
            data, affine = reoriented(np.asanyarray(img.dataobj), img.affine, layout)
            files[key] = tmp / f"{key}_{layout}.nii.gz"
            nib.save(nib.Nifti1Image(data, affine), files[key])
        runs[layout] = (files, infer(files["image"], files["brainmask"]))
    return runs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_have_the_input_geometry_and_find_the_lesion(evaluated_run, layout_runs, layout):
    out, _ = evaluated_run
    files, written = layout_runs[layout]
    source = nib.load(files["image"])
    label = np.asanyarray(nib.load(files["label"]).dataobj) > 0
    brain = np.asanyarray(nib.load(files["brainmask"]).dataobj) > 0
    for key in ("anomaly", "seg"):
        result = nib.load(written[key])
        assert result.shape == source.shape
        np.testing.assert_array_equal(result.affine, source.affine)
    anomaly = np.asanyarray(nib.load(written["anomaly"]).dataobj)
    assert anomaly[label].mean() > 1.5 * anomaly[brain & ~label].mean(), "the tumour stands out where it is"
    score = json.loads(open(written["score"]).read())
    assert score["threshold"] == json.loads((out / "checkpoints" / "threshold.json").read_text())["default"]["threshold"]


def test_the_three_layouts_give_the_same_map(layout_runs):
    maps = {layout: to_ras_order(np.asanyarray(nib.load(written["anomaly"]).dataobj), layout)
            for layout, (_, written) in layout_runs.items()}
    for layout in ("LPS", "PSR"):
        np.testing.assert_allclose(maps[layout], maps["RAS"], rtol=1e-4, atol=1e-6)


def test_inversion_puts_the_lesion_back_where_it_was(tumour_case):
    chain = brain_volume_transform(image_size=64)
    pre = chain(dict(tumour_case))
    infer = AnomalyInference(CeVAEReconstruction(), "unused.pt", chain, ".")
    back = infer._invert(pre, {"anomaly": pre["label"][0].numpy()})["anomaly"]
    original = np.asanyarray(nib.load(tumour_case["label"]).dataobj).astype(float)
    assert back.shape == original.shape
    offset = np.array(ndimage.center_of_mass(back)) - np.array(ndimage.center_of_mass(original))
    assert np.all(np.abs(offset) < 0.5), f"lesion centre moved by {offset} voxels"
    assert dice(back > 0.5, original > 0) > 0.8


def test_missing_threshold_says_what_to_do(evaluated_run, tumour_case, tmp_path):
    out, _ = evaluated_run
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes((out / "checkpoints" / "model.pt").read_bytes())
    infer = AnomalyInference(CeVAEReconstruction(z_dim=16, channels=(8, 16, 32, 64)), checkpoint,
                             brain_volume_transform(), tmp_path)
    with pytest.raises(FileNotFoundError, match="--threshold"):
        infer(tumour_case["image"])
    infer.threshold = 0.01
    assert nib.load(infer(tumour_case["image"])["seg"]).shape == nib.load(tumour_case["image"]).shape


def test_bundle_inference_config_single_and_batch(evaluated_run, tiny_demo, tumour_case, tmp_path):
    out, _ = evaluated_run
    common = {"ckpt": str(out / "checkpoints" / "model.pt"), "z_dim": 16, "channels": [8, 16, 32, 64]}
    for mode, extra in (("single", {"input_image": tumour_case["image"]}), ("batch", {"datalist": str(tiny_demo)})):
        workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=str(CONFIGS / "metadata.json"),
                                  logging_file=False, run_id="inference", output_dir=str(tmp_path / mode),
                                  **common, **extra)
        workflow.initialize()
        workflow.run()
    assert len(list((tmp_path / "single").glob("*_anomaly.nii.gz"))) == 1
    assert len(list((tmp_path / "batch").glob("*_seg.nii.gz"))) == 4
    assert torch.load(out / "checkpoints" / "model.pt", weights_only=True)["model"]
