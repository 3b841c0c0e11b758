"""Seed ensembles: the members' raw scores averaged, their own healthy reference, refused when unsound."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle_helpers import inference_workflow, run_bundle

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.datalist import load_datalist
from pipeline.ensemble import AnomalyEnsemble, write_ensemble
from pipeline.errors import InputError
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.scoring import PAPER, POSTPROCESSED

OPTIONS = {"paper": PAPER, "postprocessed": replace(POSTPROCESSED, grad_low=0.0, grad_high=1.0)}


def member(seed: int) -> tuple[CeVAE, CeVAELoss]:
    torch.manual_seed(seed)
    return CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval(), CeVAELoss(sigma=0.2)


def test_an_ensemble_scores_its_members_mean_and_identical_members_score_as_one():
    """Two identical members give exactly one member's maps and slice scores; two different ones give the maps of
    the mean of their raw scores (computed here from each member alone), which differ from either member's (negative
    control); a fresh ensemble restores all of it from ``state_dict``."""
    rng = np.random.default_rng(0)
    brain = np.zeros((64, 64, 10), bool)
    brain[10:54, 12:52, 1:9] = True
    image = torch.from_numpy(rng.random((1, 64, 64, 10)) * brain).float()
    (net_a, loss_a), (net_b, loss_b) = member(0), member(1)
    single = AnomalyMap(net_a, loss_a, OPTIONS)
    terms_1, maps_1 = single(image, brain)
    twins = AnomalyEnsemble([net_a, copy.deepcopy(net_a)], [loss_a, copy.deepcopy(loss_a)], OPTIONS)
    terms_2, maps_2 = twins(image, brain)
    for name in OPTIONS:
        for score, volume in maps_1[name].items():
            np.testing.assert_array_equal(maps_2[name][score], volume, err_msg=f"{name}/{score}")
    torch.testing.assert_close(terms_2["neg_elbo"], terms_1["neg_elbo"], rtol=0, atol=0)
    assert terms_2["mu"].shape == (10, 16)  # the members' posterior means side by side

    pair = AnomalyEnsemble([net_a, net_b], [loss_a, loss_b], OPTIONS)
    terms, maps = pair(image, brain)
    terms_b, maps_b = AnomalyMap(net_b, loss_b, OPTIONS)(image, brain)
    mean_recon = (terms_1["recon"] + terms_b["recon"]) / 2  # (D, 1, H, W)
    expected_rec = (image[0] - mean_recon[:, 0].permute(1, 2, 0)).abs().numpy()
    np.testing.assert_allclose(maps["paper"]["rec"], expected_rec, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["neg_elbo"], (terms_1["neg_elbo"] + terms_b["neg_elbo"]) / 2)
    slices = image.permute(3, 0, 1, 2)
    expected_grad = (single.kl_gradient(slices) + AnomalyMap(net_b, loss_b).kl_gradient(slices)) / 2
    torch.testing.assert_close(pair.kl_gradient(slices), expected_grad)
    np.testing.assert_allclose(maps["paper"]["kl_grad"], expected_grad[:, 0].permute(1, 2, 0).numpy(), rtol=1e-6)
    for alone in (maps_1, maps_b):
        assert np.abs(maps["paper"]["rec"] - alone["paper"]["rec"]).max() > 1e-2

    fresh = AnomalyEnsemble([member(5)[0], member(6)[0]], [CeVAELoss(sigma=0.5), CeVAELoss(sigma=0.5)])
    fresh.load_state_dict(pair.state_dict())
    np.testing.assert_array_equal(fresh(image, brain)[1]["paper"]["combined"], maps["paper"]["combined"])


def assert_close_nested(ours, theirs, path=""):
    """Nested dicts and lists of numbers equal to float32 precision (the single run was calibrated at the end of its
    training, the ensemble in the evaluation: the same maps up to the last bits of float32)."""
    if isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs), path
        for key in theirs:
            assert_close_nested(ours[key], theirs[key], f"{path}/{key}")
    elif isinstance(theirs, (int, float)) and not isinstance(theirs, bool):  # a voxel at a threshold may flip
        assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-3 if path.endswith("dice") else 1e-7), path
    elif isinstance(theirs, list):
        assert len(ours) == len(theirs), path
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_close_nested(a, b, f"{path}/{i}")
    else:
        assert ours == theirs, path


def test_an_ensemble_of_two_copies_of_a_run_evaluates_and_infers_as_the_run(
    evaluated_run, tiny_demo, two_test_subjects, tmp_path
):
    """``run evaluating --ensemble A B`` with B a copy of A calibrates the ensemble anew on the healthy validation
    subject and gets A's healthy constants, thresholds and operating point; ``run inference --ckpt .../ensemble.json`` writes
    A's maps. Unsound ensembles are refused in one line: a member changed since, another ensemble or a training run in
    the folder, a healthy subject a member was not validated on, a single run."""
    run_a, _ = evaluated_run
    run_b = tmp_path / "b"
    shutil.copytree(run_a / "checkpoints", run_b / "checkpoints")
    out = tmp_path / "ensemble"
    ensemble = [str(run_a), str(run_b)]
    evaluation = {"ensemble": ensemble, "eval_datalist": two_test_subjects, "n_bootstrap": 20}  # no metric compared
    run_bundle(out, tiny_demo, ("train.json", "evaluate.json"), **evaluation)
    manifest = out / "checkpoints" / "ensemble.json"
    ours, theirs = (json.loads((d / "threshold.json").read_text()) for d in (manifest.parent, run_a / "checkpoints"))
    assert ours["checkpoint_sha256"] != theirs["checkpoint_sha256"]  # bound to the manifest, fitted here
    trained = {k: v for k, v in theirs["healthy"].items() if k != "validation"}  # training's reconstruction check
    assert_close_nested(ours["healthy"], trained)  # thresholds, synthetic-lesion search, operating point
    assert_close_nested(ours["options"], theirs["options"])  # healthy constants and normative references
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(manifest) and metrics["n_subjects"] == 2

    case = next(e for e in load_datalist(tiny_demo, "test") if e["kind"] == "tumour")
    written = {}
    for name, ckpt in (("ensemble", manifest), ("single", run_a / "checkpoints" / "model.pt")):
        inference_workflow(ckpt=str(ckpt), input_image=case["image"], output_dir=str(tmp_path / name)).run()
        (anomaly,) = (tmp_path / name).glob("*_anomaly.nii.gz")
        written[name] = np.asanyarray(nib.load(anomaly).dataobj)
    np.testing.assert_allclose(written["ensemble"], written["single"], rtol=1e-4, atol=1e-5)  # its own reference

    healthy = [{"image": e} for e in ours["healthy"]["subjects"]]
    with pytest.raises(InputError, match="holds another ensemble"):
        write_ensemble(manifest.parent, [run_b, run_a], healthy)
    with pytest.raises(InputError, match="holds a training run"):
        write_ensemble(run_b / "checkpoints", [run_a, run_b], healthy)
    training = load_datalist(tiny_demo, "training")
    trained_on = next(e for e in training if e["image"] not in ours["healthy"]["subjects"])
    with pytest.raises(InputError, match="was not validated on it"):
        write_ensemble(tmp_path / "other", [run_a, run_b], [trained_on])
    with pytest.raises(InputError, match="at least two"):
        write_ensemble(tmp_path / "other", [run_a], healthy)
    state = torch.load(run_b / "checkpoints" / "model.pt", weights_only=True)
    state["loss"] = {k: v + 1e-3 for k, v in state["loss"].items()}
    torch.save(state, run_b / "checkpoints" / "model.pt")
    with pytest.raises(InputError, match="changed since the ensemble"):
        AnomalyEnsemble.like(AnomalyMap(CeVAE(z_dim=16, channels=(8, 16, 32, 64))), 2).load(manifest)
