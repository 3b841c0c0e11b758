"""Inference in the input's native geometry (RAS, LPS, PSR, anisotropic), from the bundle's inference config."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import inference_workflow, run_bundle
from conftest import input_error
from scipy import ndimage

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.datalist import load_datalist, write_datalist
from pipeline.data.preparers import prepare_entries
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.errors import InputError
from pipeline.inference import AnomalyInference, inference_entries
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
    infer = AnomalyInference(
        AnomalyMap(CeVAEReconstruction(z_dim=16, channels=(8, 16, 32, 64))),
        out / "checkpoints" / "model.pt",
        brain_volume_transform(),
        tmp / "out",
    )
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
    point = json.loads((out / "checkpoints" / "threshold.json").read_text())["healthy"]["synthetic"]["operating_point"]
    assert score["threshold"] == point["threshold"] and score["option_set"] == point["option_set"]
    assert score["threshold_source"].startswith("label-free operating point")


def test_the_three_layouts_give_the_same_map(layout_runs):
    maps = {
        layout: to_ras_order(np.asanyarray(nib.load(written["anomaly"]).dataobj), layout)
        for layout, (_, written) in layout_runs.items()
    }
    for layout in ("LPS", "PSR"):
        np.testing.assert_allclose(maps[layout], maps["RAS"], rtol=1e-4, atol=1e-6)


def test_inversion_puts_the_lesion_back_where_it_was(tumour_case):
    chain = brain_volume_transform(image_size=64)
    pre = chain(dict(tumour_case))
    infer = AnomalyInference(AnomalyMap(CeVAEReconstruction()), "unused.pt", chain, ".")
    back = infer._invert(pre, {"anomaly": pre["label"][0].numpy()})["anomaly"]
    original = np.asanyarray(nib.load(tumour_case["label"]).dataobj).astype(float)
    assert back.shape == original.shape
    offset = np.array(ndimage.center_of_mass(back)) - np.array(ndimage.center_of_mass(original))
    assert np.all(np.abs(offset) < 0.5), f"lesion centre moved by {offset} voxels"
    assert dice(back > 0.5, original > 0) > 0.8


def tiny_inference(checkpoint, output_dir, **kwargs):
    return AnomalyInference(
        AnomalyMap(CeVAEReconstruction(z_dim=16, channels=(8, 16, 32, 64))),
        checkpoint,
        brain_volume_transform(),
        output_dir,
        **kwargs,
    )


def test_missing_or_foreign_thresholds_say_what_to_do(evaluated_run, tumour_case, tmp_path):
    out, _ = evaluated_run
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes((out / "checkpoints" / "model.pt").read_bytes())
    with pytest.raises(InputError, match="does not exist.*--threshold"):
        tiny_inference(checkpoint, tmp_path)(tumour_case["image"])
    content = json.loads((out / "checkpoints" / "threshold.json").read_text())
    (tmp_path / "threshold.json").write_text(json.dumps({**content, "checkpoint_sha256": "0" * 64}))
    with pytest.raises(InputError, match="another checkpoint"):  # thresholds of a model that was replaced
        tiny_inference(checkpoint, tmp_path)(tumour_case["image"])
    (tmp_path / "threshold.json").unlink()
    with pytest.raises(InputError, match="healthy validation subjects.*none.*--option_set paper"):  # no constants
        tiny_inference(checkpoint, tmp_path, threshold=0.01)(tumour_case["image"])
    written = tiny_inference(checkpoint, tmp_path, threshold=0.01, option_set="paper")(tumour_case["image"])
    assert nib.load(written["seg"]).shape == nib.load(tumour_case["image"]).shape


def test_inference_never_replaces_earlier_results_unless_asked(evaluated_run, tumour_case, tmp_path):
    out, _ = evaluated_run
    checkpoint = out / "checkpoints" / "model.pt"
    written = tiny_inference(checkpoint, tmp_path)(tumour_case["image"])
    before = {key: Path(path).read_bytes() for key, path in written.items()}
    with pytest.raises(InputError, match=r"_anomaly.nii.gz exists .*--overwrite True"):
        tiny_inference(checkpoint, tmp_path, threshold=0.5)(tumour_case["image"])
    assert {key: Path(path).read_bytes() for key, path in written.items()} == before, "nothing replaced"
    again = tiny_inference(checkpoint, tmp_path, threshold=0.5, overwrite=True)(tumour_case["image"])
    assert json.loads(Path(again["score"]).read_text())["threshold"] == 0.5


def test_threshold_choices(evaluated_run, tumour_case, tmp_path):
    out, _ = evaluated_run
    checkpoint = out / "checkpoints" / "model.pt"
    content = json.loads((out / "checkpoints" / "threshold.json").read_text())
    cases = [
        (
            {"healthy_quantile": 0.995, "option_set": "postprocessed", "score": "combined"},
            content["healthy"]["thresholds"]["postprocessed"]["combined"]["0.995"],
        ),
        (
            {"calibration": "eval", "option_set": "paper", "score": "rec"},
            content["calibrated"]["eval"]["thresholds"]["paper"]["rec"],
        ),
    ]
    for i, (kwargs, expected) in enumerate(cases):
        written = tiny_inference(checkpoint, tmp_path / str(i), **kwargs)(tumour_case["image"])
        assert json.loads(open(written["score"]).read())["threshold"] == expected
    # by default: the label-free operating point that training chose on synthetic lesions, all of it
    point = content["healthy"]["synthetic"]["operating_point"]
    scored = json.loads(open(tiny_inference(checkpoint, tmp_path / "op")(tumour_case["image"])["score"]).read())
    assert scored["operating_point"] == point and scored["threshold"] == point["threshold"]
    assert (scored["option_set"], scored["score"]) == (point["option_set"], point["score"])
    assert scored["scoring_options"]["min_component_size"] == point["min_component_size"]
    assert scored["threshold_source"].startswith("label-free operating point")
    other = "rec" if point["score"] != "rec" else "combined"  # an override of one part: the rest still applies
    scored = json.loads(
        open(tiny_inference(checkpoint, tmp_path / "o", score=other)(tumour_case["image"])["score"]).read()
    )
    quantile = f"{point['quantile']:g}"
    assert (
        scored["operating_point"] is None and scored["score"] == other and scored["option_set"] == point["option_set"]
    )
    assert scored["threshold"] == content["healthy"]["thresholds"][point["option_set"]][other][quantile]
    for kwargs, message in (
        ({"healthy_quantile": 0.97}, "quantile 0.97"),
        ({"calibration": "brats"}, "'brats'"),
        ({"option_set": "mine"}, "unknown option set"),
    ):
        with pytest.raises(InputError, match=message):
            tiny_inference(checkpoint, tmp_path / "x", **kwargs)(tumour_case["image"])


def test_bundle_inference_config_single_batch_and_dataset_dir(evaluated_run, tumour_case, tmp_path):
    """``--input_image``, ``--datalist`` (laid out as BraTS lays out its cases: every file named alike, the subject
    id in the entry) and MONAI's ``--dataset_dir`` (here a folder of scans without a datalist)."""
    out, _ = evaluated_run
    common = {"ckpt": str(out / "checkpoints" / "model.pt")}  # network and likelihood: from the training's config
    scans = tmp_path / "scans"
    for case in ("pat0001", "pat0002"):
        (scans / case).mkdir(parents=True)
        (scans / case / "T1c.nii.gz").symlink_to(tumour_case["image"])
    cases = [{"subject": c, "image": str(scans / c / "T1c.nii.gz")} for c in ("pat0001", "pat0002")]
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({"test": cases}))
    (scans / "patient.nii.gz").symlink_to(tumour_case["image"])
    for mode, extra in (
        ("single", {"input_image": tumour_case["image"]}),
        ("batch", {"datalist": str(datalist)}),
        ("folder", {"dataset_dir": str(scans)}),
    ):
        inference_workflow(output_dir=str(tmp_path / mode), **common, **extra).run()
    assert len(list((tmp_path / "single").glob("*_anomaly.nii.gz"))) == 1
    assert sorted(p.name for p in (tmp_path / "batch").glob("*_seg.nii.gz")) == [
        "pat0001_seg.nii.gz",
        "pat0002_seg.nii.gz",
    ]
    assert [p.name for p in (tmp_path / "folder").glob("*_seg.nii.gz")] == ["patient_seg.nii.gz"]
    # negative control: without subject ids the second case's outputs would replace the first's, which is refused
    datalist.write_text(json.dumps({"test": [{"image": c["image"]} for c in cases]}))
    with pytest.raises(Exception) as refused:
        inference_workflow(output_dir=str(tmp_path / "nameless"), **common, datalist=str(datalist)).run()
    assert "T1c_anomaly.nii.gz exists" in str(input_error(refused.value))
    assert torch.load(out / "checkpoints" / "model.pt", weights_only=True)["model"]


def test_inference_takes_scoring_settings_from_the_training_run(evaluated_run, tumour_case, tmp_path):
    out, _ = evaluated_run
    ckpt = str(out / "checkpoints" / "model.pt")
    workflow = inference_workflow(ckpt=ckpt, input_image=tumour_case["image"], output_dir=str(tmp_path))
    loss = workflow.parser.get_parsed_content("loss")
    trained = json.loads((out / "checkpoints" / "config.json").read_text())
    assert (loss.kl_weight, loss.reconstruction) == (trained["kl_weight"], trained["reconstruction"])
    assert workflow.parser.get_parsed_content("z_dim") == 16
    with pytest.raises(Exception) as info:  # an override that contradicts the training is refused
        inference_workflow(ckpt=ckpt, input_image=tumour_case["image"], output_dir=str(tmp_path), kl_weight=0.5).run()
    assert "kl_weight=0.5 (trained with 1.0)" in str(input_error(info.value))


def train_then_infer(output_dir, datalist, image, epochs=2, **overrides):
    """``run training`` then ``run inference`` on ``image``, nothing in between; returns the score file."""
    run_bundle(output_dir, datalist, epochs=epochs, **overrides)
    assert json.loads((output_dir / "checkpoints" / "threshold.json").read_text())["healthy"]
    workflow = inference_workflow(
        ckpt=str(output_dir / "checkpoints" / "model.pt"),
        input_image=str(image),
        output_dir=str(output_dir / "inference"),
    )
    workflow.run()
    name = Path(image).name.split(".nii")[0]
    seg = nib.load(output_dir / "inference" / f"{name}_seg.nii.gz")
    assert seg.shape == nib.load(image).shape
    return json.loads((output_dir / "inference" / f"{name}_score.json").read_text())


def test_training_then_inference_segments_without_labels(tiny_demo, tumour_case, tmp_path):
    score = train_then_infer(tmp_path, tiny_demo, tumour_case["image"])
    assert (
        score["threshold_source"].startswith("label-free operating point")
        and 0 < score["segmented_brain_fraction"] < 0.5
    )


def test_training_on_real_scans_then_inference_on_a_patient(shared_data, tmp_path):
    healthy = prepare_entries("ixi", shared_data / "ixi_t1", "T1", skip_incomplete=True)[:4]
    datalist = write_datalist({"training": healthy}, tmp_path / "ixi.json")
    patient = prepare_entries("brats2013-deepmedic", shared_data / "brats2013", "T1c")[0]
    score = train_then_infer(tmp_path / "run", datalist, patient["image"], val_fraction=0.25)
    assert (
        score["threshold_source"].startswith("label-free operating point") and score["segmented_brain_fraction"] < 0.5
    )


def test_a_missing_input_names_the_flag_not_a_datalist(tumour_case, tmp_path):
    assert inference_entries(image=tumour_case["image"]) == [{"image": tumour_case["image"]}]  # negative control
    with pytest.raises(InputError, match=r"^--input_image .*nope.nii.gz: file not found; check the path") as refused:
        inference_entries(image=tmp_path / "nope.nii.gz")
    assert "datalist" not in str(refused.value)
    with pytest.raises(InputError, match=r"^--input_mask .*mask.nii.gz: file not found"):
        inference_entries(image=tumour_case["image"], mask=tmp_path / "mask.nii.gz")


def test_dataset_dir_entries_come_from_its_datalist_or_its_images(tiny_demo, tumour_case, tmp_path):
    from_datalist = inference_entries(dataset_dir=Path(tiny_demo).parent)  # the demo folder: its datalist.json
    assert from_datalist == load_datalist(tiny_demo, "test") and len(from_datalist) == 4
    assert inference_entries(dataset_dir=Path(tiny_demo).parent, key="training") == load_datalist(tiny_demo, "training")
    assert inference_entries(dataset_dir=None) == []  # a workflow built without input (monai.bundle.load)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"^--dataset_dir .*empty holds neither a datalist.json nor NIfTI images"):
        inference_entries(dataset_dir=tmp_path / "empty")
    with pytest.raises(InputError, match=r"^--dataset_dir .*absent: no such folder"):
        inference_entries(dataset_dir=tmp_path / "absent")
    # an explicit datalist or image wins over the folder
    assert inference_entries(image=tumour_case["image"], dataset_dir=Path(tiny_demo).parent) == [
        {"image": tumour_case["image"]}
    ]
