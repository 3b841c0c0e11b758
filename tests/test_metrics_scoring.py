"""Metric functions against sklearn, the threshold split, and the scores' definitions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.anomaly_map import AnomalyMap
from pipeline.data.transforms import equalize_in_brain
from pipeline.losses import CeVAELoss
from pipeline.median import median_filter
from pipeline.metrics import (
    ThresholdCurve,
    best_dice_threshold,
    bootstrap_dice,
    bootstrap_pixel_metrics,
    bootstrap_weights,
    bounding_box,
    dice,
    lesion_detection,
    remove_small_components,
    slice_labels,
    split_calibration,
)
from pipeline.networks import CeVAE
from pipeline.scoring import (
    AUTHORS,
    PAPER,
    POSTPROCESSED,
    ScoreOptions,
    elbo_terms,
    kl_gradient,
    postprocess_volume,
    raw_scores,
    score_maps,
    score_volume,
)


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
    # reference: scipy's labelling of the whole volume, on segmentations of a smooth random field at many levels
    field = ndimage.gaussian_filter(np.random.default_rng(0).random((24, 28, 20)), 1.2)
    for fraction in (1e-3, 0.01, 0.05, 0.2, 0.6):
        seg = field >= np.quantile(field, 1 - fraction)
        before = seg.copy()
        components, _ = ndimage.label(seg, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(components.ravel())
        reference = seg & (sizes[components] >= 7)
        np.testing.assert_array_equal(remove_small_components(seg, 7), reference, err_msg=str(fraction))
        np.testing.assert_array_equal(seg, before)  # the input is left as it was
    assert [(b.start, b.stop) for b in bounding_box(np.zeros((4, 5, 6), bool))] == [(0, 0)] * 3, "empty mask"
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
        for kl_weight, reconstruction, sigma in ((1.0, "l2", 1.0), (0.01, "gaussian", 0.2), (1.0, "gaussian", 0.05)):
            loss = CeVAELoss(ce_weight=0.0, kl_weight=kl_weight, reconstruction=reconstruction, sigma=sigma)
            terms = elbo_terms(net, x, loss)
            torch.testing.assert_close(terms["neg_elbo"], terms["rec"] + kl_weight * terms["kl"])
            # the training loss of the plain VAE with the mean as its sample is the batch mean of this score
            torch.testing.assert_close(loss(x, net.decode(mu), mu, logvar)["loss"], terms["neg_elbo"].mean())
        # a calibrated loss scores with its trained sigma: the same terms as a fixed loss of that sigma
        calibrated = CeVAELoss(ce_weight=0.0)
        calibrated.load_state_dict({"sigma": torch.tensor(0.05)})
        torch.testing.assert_close(elbo_terms(net, x, calibrated)["neg_elbo"], terms["neg_elbo"])


def test_score_maps_follow_their_options():
    torch.manual_seed(1)
    net = CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval()
    x = torch.rand(3, 1, 64, 64)
    raw = raw_scores(net, x, CeVAELoss(reconstruction="l2"))
    plain = score_maps(raw, x, PAPER)
    torch.testing.assert_close(plain["rec"], (x - raw["recon"]).abs())
    torch.testing.assert_close(plain["combined"], plain["rec"] * plain["kl_grad"])
    torch.testing.assert_close(plain["intensity"], x)
    post = score_maps(raw, x, ScoreOptions(positive_residuals=True, grad_normalization="slice"))
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


@pytest.mark.parametrize(
    "shape,size", [((9, 7, 23), 5), ((6, 6, 5), 3), ((5, 8, 2), 5), ((10, 11, 12), 4), ((3, 3, 3), 7)]
)
def test_masked_median_filter_equals_scipy_inside_the_mask(shape, size):
    """The median filter computed at the mask's voxels is scipy's there, voxel for voxel (volume edges, an even size,
    a window larger than the volume), and 0 elsewhere; without a mask it is scipy's everywhere. Negative control: a
    window one voxel smaller gives other values."""
    rng = np.random.default_rng(size)
    volume, mask = rng.random(shape).astype(np.float32), rng.random(shape) > 0.5
    reference = ndimage.median_filter(volume, size=size)
    masked = median_filter(volume, size, mask)
    assert masked.dtype == volume.dtype and np.array_equal(masked, reference * mask)
    assert np.array_equal(median_filter(volume, size), reference)
    assert not np.array_equal(median_filter(volume, size - 1, mask), masked)


def test_postprocessing_filters_the_whole_map_then_masks():
    """The median filter sees the map around the brain (a rim voxel's median takes its outside neighbours), and only
    then is the map multiplied by the eroded brain mask: filtering after masking would give the rim another value."""
    vol = np.random.default_rng(1).random((12, 12, 10)).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[3:9, 3:9, 2:8] = True
    options = ScoreOptions(brain_mask=True, mask_erosion=1, median_size=5)
    out = postprocess_volume(vol, mask, options)
    eroded = ndimage.binary_erosion(mask, iterations=1)
    assert np.array_equal(out, ndimage.median_filter(vol, size=5) * eroded)
    assert not np.array_equal(out, ndimage.median_filter(vol * eroded, size=5) * eroded), "the order matters here"


def test_option_sets_that_post_process_the_intensity_alike_share_its_map_and_each_equals_its_own_scoring():
    """The intensity baseline is post-processed once per distinct (equalisation, median, mask) setting: option sets
    that agree on those share one array, and every map equals that of its option set scored alone (reference).
    Negative control: an option set with another median size gets its own, different map."""
    torch.manual_seed(5)
    network = CeVAE(z_dim=8, channels=(4, 8, 8, 8)).eval()
    image = torch.rand(1, 64, 64, 12)
    brain = np.zeros((64, 64, 12), bool)
    brain[8:56, 12:52, 1:11] = True
    base = replace(POSTPROCESSED, grad_low=0.0, grad_high=1.0)
    configs = {"a": base, "b": replace(base, grad_sigma=1.0), "c": replace(base, median_size=3)}
    model = AnomalyMap(network, CeVAELoss(reconstruction="l2"))
    _, together = score_volume(model.raw_scores, image, brain, configs)
    assert together["a"]["intensity"] is together["b"]["intensity"]
    assert not np.array_equal(together["a"]["intensity"], together["c"]["intensity"])
    for name, options in configs.items():
        _, alone = score_volume(model.raw_scores, image, brain, {name: options})
        for score, volume in alone[name].items():
            np.testing.assert_array_equal(together[name][score], volume, err_msg=f"{name}/{score}")


def test_histogram_equalisation_gives_brain_quantiles():
    volume = np.array([[[5.0, 1.0], [3.0, 9.0]]])
    brain = np.array([[[1, 1], [1, 0]]])
    out = equalize_in_brain(volume, brain)
    np.testing.assert_allclose(out, [[[1.0, 1 / 3], [2 / 3, 0.0]]])


def test_authors_set_normalises_over_the_volume_then_smooths():
    torch.manual_seed(3)
    grad = torch.rand(4, 1, 16, 16) * torch.arange(1.0, 5.0).view(4, 1, 1, 1)  # slices of different scales
    x = torch.rand(4, 1, 16, 16)
    raw = {"recon": torch.zeros_like(x), "kl_grad": grad}
    maps = score_maps(raw, x, AUTHORS)
    # reference: min-max over the whole volume, then a 7x7 Gaussian of sigma 3 with zero padding (scipy)
    normalised = ((grad - grad.min()) / (grad.max() - grad.min())).numpy()
    offsets = np.arange(-3, 4)
    kernel_1d = np.exp(-(offsets**2) / (2 * 3.0**2))
    kernel = np.outer(kernel_1d, kernel_1d) / kernel_1d.sum() ** 2
    reference = np.stack([ndimage.convolve(n[0], kernel, mode="constant") for n in normalised])
    np.testing.assert_allclose(maps["kl_grad"][:, 0].numpy(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps["combined"], x * maps["kl_grad"])
    # negative control: per-slice normalisation gives every slice the same range, the volume keeps their order
    per_slice = score_maps(raw, x, ScoreOptions(grad_normalization="slice"))["kl_grad"].flatten(1).amax(1)
    per_volume = score_maps(raw, x, ScoreOptions(grad_normalization="volume"))["kl_grad"].flatten(1).amax(1)
    torch.testing.assert_close(per_slice, torch.ones(4))
    assert per_volume.tolist() == sorted(per_volume.tolist()) and float(per_volume[0]) < 0.5


def test_thresholded_maps_keep_their_healthy_scale_whatever_else_is_in_the_volume():
    """``postprocessed`` scales the KL gradient by healthy constants: a large lesion (a strong gradient) in one slice
    leaves the maps of the other slices unchanged. Negative control: the authors' per-volume scaling shrinks them.
    Reference: (g - low) / (high - low) by hand; an unfitted option set refuses to score."""
    torch.manual_seed(4)
    grad, x = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16)
    lesioned = grad.clone()
    lesioned[0, 0, 4:10, 4:10] = 50.0  # a lesion in slice 0 only
    healthy = ScoreOptions(grad_normalization="healthy", grad_low=0.0, grad_high=2.0)
    volume = ScoreOptions(grad_normalization="volume")

    def combined(options, g):
        return score_maps({"recon": torch.zeros_like(x), "kl_grad": g}, x, options)["combined"][1:]

    torch.testing.assert_close(combined(healthy, lesioned), combined(healthy, grad))
    torch.testing.assert_close(combined(healthy, grad), x[1:] * grad[1:] / 2.0)
    assert float(combined(volume, lesioned).max()) < 0.1 * float(combined(volume, grad).max()), "scaled down"
    assert (
        volume.test_volume_scaled and not healthy.test_volume_scaled and POSTPROCESSED.grad_normalization == "healthy"
    )
    with pytest.raises(ValueError, match="needs grad_low/grad_high from the healthy validation volumes"):
        score_maps({"recon": x, "kl_grad": grad}, x, POSTPROCESSED)


def test_the_operating_point_is_the_best_candidate_whose_scale_is_not_the_test_volume():
    from pipeline.calibration import choose_operating_point

    sets = {"scaled": AUTHORS, "fixed": replace(POSTPROCESSED, grad_low=0.0, grad_high=1.0)}

    def row(option_set, score, quantile, size, dice):
        return dict(
            option_set=option_set,
            score=score,
            quantile=quantile,
            threshold=quantile / 2,
            min_component_size=size,
            dice=dice,
        )

    table = [
        row("scaled", "combined", 0.99, 0, 0.9),  # the best, but scaled by the scored volume: not eligible
        row("fixed", "intensity", 0.99, 0, 0.8),  # the baseline: never chosen
        row("fixed", "combined", 0.98, 7, 0.5),
        row("fixed", "combined", 0.995, 27, 0.5),  # tie: the higher quantile
        row("scaled", "rec", 0.99, 125, 0.4),  # rec does not depend on the gradient's scale: eligible
    ]
    point = choose_operating_point(table, sets)
    assert (point.option_set, point.score, point.quantile, point.min_component_size) == ("fixed", "combined", 0.995, 27)
    point = choose_operating_point([table[0], table[1], table[4]], sets)
    assert (point.option_set, point.score, point.synthetic_dice) == ("scaled", "rec", 0.4)


def test_the_operating_point_is_the_simplest_map_within_one_standard_error():
    """A map whose best Dice is within its tolerance of the best candidate's stays in the running; of those the one
    with fewer ingredients wins (``rec`` over ``combined``), then the option set configured first, at that map's own
    best candidate; with no tolerance, the best candidate (negative control)."""
    from pipeline.calibration import choose_operating_point

    sets = {
        "first": replace(POSTPROCESSED, grad_low=0.0, grad_high=1.0),
        "second": replace(POSTPROCESSED, normative=True),
    }

    def row(option_set, score, quantile, dice):
        return dict(
            option_set=option_set, score=score, quantile=quantile, threshold=1.0, min_component_size=7, dice=dice
        )

    table = [
        row("second", "combined", 0.995, 0.50),
        row("second", "rec", 0.99, 0.47),
        row("second", "rec", 0.995, 0.46),
        row("first", "rec", 0.995, 0.44),
        row("first", "combined", 0.99, 0.49),
    ]

    def chosen(tolerance=None):
        point = choose_operating_point(table, sets, tolerance)
        return point.option_set, point.score, point.quantile

    assert chosen() == chosen({("second", "rec"): 0.02}) == ("second", "combined", 0.995), "nothing within: the best"
    assert chosen({("second", "rec"): 0.04}) == ("second", "rec", 0.99), "rec within, at its own best quantile"
    both = {("second", "rec"): 0.04, ("first", "rec"): 0.07}
    assert chosen(both) == ("first", "rec", 0.995), "both rec maps within: the option set configured first"


def test_paired_standard_error_of_a_pooled_dice_difference():
    """0 for a map against itself; small for a map that finds the same lesions a little less well on every volume,
    large for one whose misses fall on other volumes (pairing is what tells the two apart); about halved with 4x
    the volumes (1/sqrt(n))."""
    from pipeline.calibration import paired_standard_error

    rng = np.random.default_rng(0)
    first = np.stack([rng.integers(20, 100, 16), np.full(16, 100)], axis=1)
    assert paired_standard_error(first, first, seed=0) == pytest.approx(0, abs=1e-12)
    shifted = first - [[5, 0]]
    shuffled = first[rng.permutation(16)] - [[5, 0]]
    close, far = paired_standard_error(first, shifted, seed=0), paired_standard_error(first, shuffled, seed=0)
    assert close < 0.25 * far, (close, far)
    ratio = paired_standard_error(np.tile(first, (4, 1)), np.tile(shuffled, (4, 1)), seed=0) / far
    assert 0.4 < ratio < 0.6, ratio


def test_lesion_detection_counts_components():
    label = np.zeros((20, 20, 10), bool)
    label[2:5, 2:5, 2:4] = True  # lesion 1: found
    label[10:12, 10:12, 5] = True  # lesion 2: found by one voxel
    label[15:18, 2:4, 7:9] = True  # lesion 3: missed
    seg = np.zeros_like(label)
    seg[3:6, 3:6, 3] = True
    seg[11, 11, 5] = True
    seg[15:18, 15:18, 1:3] = True  # a false positive
    seg[0, 19, 9] = True  # another one
    assert lesion_detection(seg, label) == {"lesions": 3, "detected": 2, "false_positives": 2}
    assert lesion_detection(label, label) == {"lesions": 3, "detected": 3, "false_positives": 0}
    assert lesion_detection(np.zeros_like(label), label)["detected"] == 0


def subjects_for_bootstrap(n_subjects=6, seed=0):
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for s in range(n_subjects):
        y = rng.random(4000) < rng.uniform(0.02, 0.1)
        scores.append((rng.normal(size=4000) + (0.5 + 0.3 * s) * y).astype(np.float32))
        labels.append(y)
    return scores, labels


def test_bootstrap_over_subjects_agrees_with_sklearn_and_covers_the_estimate():
    scores, labels = subjects_for_bootstrap()
    pooled_s, pooled_y = np.concatenate(scores), np.concatenate(labels)
    auroc, auprc = roc_auc_score(pooled_y, pooled_s), average_precision_score(pooled_y, pooled_s)
    # a resample that is the data itself: the binned metrics equal sklearn's to well under 0.001
    ones = np.ones((1, len(scores)))
    same = bootstrap_pixel_metrics(scores, labels, ones)
    assert same["auroc"][0] == pytest.approx(auroc, abs=1e-3) and same["auprc"][0] == pytest.approx(auprc, abs=2e-3)
    exact = bootstrap_pixel_metrics(scores, labels, ones, exact={"auroc": auroc, "auprc": auprc})
    assert exact["auroc"] == pytest.approx([auroc] * 2, abs=1e-12), "the binning error of the data is removed"
    assert exact["auprc"] == pytest.approx([auprc] * 2, abs=1e-12)
    weights = bootstrap_weights(len(scores), 500, seed=0)
    interval = bootstrap_pixel_metrics(scores, labels, weights, exact={"auroc": auroc, "auprc": auprc})
    assert interval["auroc"][0] < auroc < interval["auroc"][1]
    assert interval["auprc"][0] < auprc < interval["auprc"][1]
    # one resample by hand: the subjects drawn, pooled, through sklearn
    row = weights[0].astype(int)
    drawn = [i for i, k in enumerate(row) for _ in range(k)]
    hand = roc_auc_score(np.concatenate([labels[i] for i in drawn]), np.concatenate([scores[i] for i in drawn]))
    single = bootstrap_pixel_metrics(scores, labels, weights[:1])
    assert single["auroc"][0] == pytest.approx(hand, abs=1e-3)
    # negative control: another seed draws other resamples
    assert bootstrap_pixel_metrics(scores, labels, bootstrap_weights(len(scores), 500, seed=1)) != interval


def test_bootstrap_dice_pools_the_resampled_subjects():
    counts = np.array([[10, 20, 30], [0, 5, 10], [40, 50, 45]])  # true positives, segmented, lesion voxels
    assert bootstrap_dice(counts, np.ones((1, 3))) == [pytest.approx(100 / 160)] * 2
    assert bootstrap_dice(counts, np.array([[2.0, 1.0, 0.0]])) == [pytest.approx(40 / 115)] * 2
    lo, hi = bootstrap_dice(counts, bootstrap_weights(3, 1000, seed=0))
    assert lo < 100 / 160 < hi
