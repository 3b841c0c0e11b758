"""Metric functions against sklearn, the threshold split, and the scores' definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.metrics import (
    ThresholdCurve,
    best_dice_threshold,
    dice,
    remove_small_components,
    slice_labels,
    split_calibration,
)
from pipeline.data.transforms import equalize_in_brain
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.scoring import PAPER, ScoreOptions, elbo_terms, kl_gradient, postprocess_volume, raw_scores, score_maps


@pytest.mark.parametrize("case", ["random", "ties", "rare", "perfect", "inverted"])
def test_auroc_and_average_precision_match_sklearn(case):
    rng = np.random.default_rng(1)
    labels = rng.random(5000) < (0.01 if case == "rare" else 0.2)
    scores = {
        "random": rng.normal(size=5000),
        "ties": rng.integers(0, 4, 5000).astype(float),
        "rare": rng.normal(size=5000) + labels,
        "perfect": labels + 0.1 * rng.random(5000),
        "inverted": -labels.astype(float),
    }[case]
    curve = ThresholdCurve.from_scores(scores, labels)
    assert curve.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert curve.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    # the curves on a grid (curves.json) are sklearn's ROC curve, interpolated
    fpr, tpr, _ = roc_curve(labels, scores)
    grid = np.linspace(0, 1, 101)
    np.testing.assert_allclose(curve.tpr_at(grid), np.interp(grid, fpr, tpr), atol=1e-12)


def test_single_class_inputs_give_nan_not_an_error():
    all_normal = ThresholdCurve.from_scores(np.arange(5.0), np.zeros(5, bool))
    assert np.isnan(all_normal.auroc()) and np.isnan(all_normal.average_precision())
    all_anomalous = ThresholdCurve.from_scores(np.arange(5.0), np.ones(5, bool))
    assert np.isnan(all_anomalous.auroc())
    assert all_anomalous.average_precision() == pytest.approx(average_precision_score(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="NaN"):
        ThresholdCurve.from_scores(np.array([0.0, np.nan]), np.array([0, 1], bool))


def test_best_dice_is_the_exhaustive_maximum():
    rng = np.random.default_rng(2)
    labels = rng.random(3000) < 0.1
    scores = (rng.normal(size=3000) + 1.5 * labels).astype(np.float32)  # scores are kept as float32
    threshold, best = best_dice_threshold(scores, labels)
    brute = max((dice(scores >= t, labels), t) for t in np.unique(scores))
    assert best == pytest.approx(brute[0]) and threshold == pytest.approx(brute[1])
    assert dice(scores >= threshold, labels) == pytest.approx(best)


def test_connected_components_and_slice_labels():
    seg = np.zeros((10, 10, 4), bool)
    seg[1:4, 1:4, 1] = True  # 9 voxels
    seg[8, 8, 3] = True  # 1 voxel
    kept = remove_small_components(seg, min_size=5)
    assert kept.sum() == 9 and not kept[8, 8, 3]
    label = np.zeros((10, 10, 4), bool)
    label[:5, :5, 1] = True  # 25 pixels -> anomalous
    label[:2, :2, 2] = True  # 4 pixels -> excluded
    assert slice_labels(label, min_pixels=20).tolist() == [0, 1, -1, 0]


def test_calibration_split_is_deterministic_and_keeps_subjects_whole():
    subjects = [f"s{i:02d}" for i in range(10)]
    cal, rest = split_calibration(subjects, 0.2, seed=3)
    assert len(cal) == 2 and set(cal).isdisjoint(rest) and set(cal) | set(rest) == set(subjects)
    assert split_calibration(subjects[::-1], 0.2, seed=3) == (cal, rest), "independent of the input order"
    assert split_calibration(subjects, 0.2, seed=4) != (cal, rest)
    assert split_calibration(["a", "b"], 0.2, 0)[0] in (["a"], ["b"])


def test_batched_kl_gradient_equals_the_per_slice_gradient():
    torch.manual_seed(0)
    net = CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval()
    x = torch.rand(5, 1, 64, 64)
    batched = kl_gradient(net, x)
    for i in range(5):
        torch.testing.assert_close(batched[i : i + 1], kl_gradient(net, x[i : i + 1]), rtol=1e-5, atol=1e-8)
    assert torch.equal(kl_gradient(net, x[1:3]), batched[1:3]) or torch.allclose(kl_gradient(net, x[1:3]), batched[1:3])


def test_slice_score_is_the_vae_term_of_the_training_loss():
    torch.manual_seed(0)
    net = CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        mu, logvar = net.encode(x)
        for kl_weight in (1.0, 0.01):
            terms = elbo_terms(net, x, kl_weight=kl_weight)
            torch.testing.assert_close(terms["neg_elbo"], terms["rec"] + kl_weight * terms["kl"])
            # the training loss of the plain VAE with the mean as its sample is the batch mean of this score
            loss = CeVAELoss(ce_weight=0.0, kl_weight=kl_weight)(x, net.decode(mu), mu, logvar)
            torch.testing.assert_close(loss["loss"], terms["neg_elbo"].mean())


def test_score_maps_follow_their_options():
    torch.manual_seed(1)
    net = CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval()
    x = torch.rand(3, 1, 64, 64)
    raw = raw_scores(net, x)
    plain = score_maps(raw, x, PAPER)
    torch.testing.assert_close(plain["rec"], (x - raw["recon"]).abs())
    torch.testing.assert_close(plain["combined"], plain["rec"] * plain["kl_grad"])
    torch.testing.assert_close(plain["intensity"], x)
    post = score_maps(raw, x, ScoreOptions(positive_residuals=True, normalize_slices=True))
    assert float(post["rec"].min()) >= 0 and torch.all(post["rec"][(x - raw["recon"]) < 0] == 0)
    torch.testing.assert_close(post["kl_grad"].flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(post["kl_grad"].flatten(1).amin(1), torch.zeros(3))
    delta = torch.zeros(1, 1, 64, 64)
    delta[0, 0, 30, 30] = 1.0
    smoothed = score_maps({"recon": delta, "kl_grad": delta}, delta, ScoreOptions(grad_sigma=3.0, grad_kernel=7))
    support = torch.nonzero(smoothed["kl_grad"][0, 0] > 0)
    assert support.min(0).values.tolist() == [27, 27] and support.max(0).values.tolist() == [33, 33], "7x7 kernel"
    assert float(smoothed["kl_grad"].sum()) == pytest.approx(1.0, rel=1e-5)
    vol = np.random.default_rng(0).random((8, 8, 6)).astype(np.float32)
    mask = np.zeros((8, 8, 6), bool)
    mask[2:6, 2:6, :] = True
    masked = postprocess_volume(vol, mask, ScoreOptions(brain_mask=True, mask_erosion=1))
    assert np.all(masked[~mask] == 0) and np.all(masked[3:5, 3:5, 1:5] == vol[3:5, 3:5, 1:5])


def test_histogram_equalisation_gives_brain_quantiles():
    volume = np.array([[[5.0, 1.0], [3.0, 9.0]]])
    brain = np.array([[[1, 1], [1, 0]]])
    out = equalize_in_brain(volume, brain)
    np.testing.assert_allclose(out, [[[1.0, 1 / 3], [2 / 3, 0.0]]])
