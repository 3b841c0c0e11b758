"""End-to-end evaluation through the bundle: a briefly trained model, every output, real labelled scans."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil

import numpy as np
import pytest
from bundle_helpers import TINY, run_bundle
from conftest import input_error
from mlflow import MlflowClient
from scipy import ndimage

from pipeline.anomaly_map import AnomalyMap
from pipeline.calibration import LabelFreeCalibration
from pipeline.data.datalist import load_datalist, write_datalist
from pipeline.data.preparers import prepare_entries
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import brain_slice_indices
from pipeline.evaluation import AnomalyEvaluation, DefaultSegmentation, LabelledSet
from pipeline.evaluation.option_set_metrics import coverage_warnings
from pipeline.evaluation.segmentation import counts_at, dice_entry_of, dice_search
from pipeline.evaluation.subjects import ScoredSubject, pooled_dice, segmentation_counts
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.scoring import OPTION_SETS, SCORE_NAMES, ScoreOptions

EVAL_FILES = ("train.json", "evaluate.json")
# measured with this fixture (seed 0, CPU): pixel AUROC of `rec` 0.782 (paper scoring), 0.840 post-processed;
# the bound leaves a margin for platform differences
MIN_REC_AUROC = 0.65


def test_metrics_json_has_every_key(evaluated_run):
    _, metrics = evaluated_run
    for key in ("slice_auroc", "slice_auprc", "pixel_auroc", "pixel_auprc", "dice_best"):
        assert set(SCORE_NAMES) <= set(metrics[key]), key
    assert set(metrics["dice_split"]) == set(SCORE_NAMES)
    assert {"threshold", "dice", "dice_mean_per_subject", "calibration_dice"} <= set(metrics["dice_split"]["combined"])
    for key in ("kl_q95", "kl_q95_per_dim", "active_units", "n_subjects", "n_slices", "checkpoint", "datalist"):
        assert key in metrics
    assert metrics["n_subjects"] == 4 and len(metrics["calibration_subjects"]) == 1
    assert 0 < metrics["active_units"] <= 16 and metrics["kl_q95"] > 0
    assert metrics["kl_q95_per_dim"] == pytest.approx(metrics["kl_q95"] / 16), "KL per latent dimension"
    quantiles = ["0.95", "0.98", "0.99", "0.995", "0.999"]
    for config in OPTION_SETS:
        out = metrics[config]
        assert set(out["pixel_auroc"]) == set(SCORE_NAMES)
        assert out["prevalence"] == metrics["baselines"]["prevalence"] > 0, "prevalence beside every AUPRC"
        for score in SCORE_NAMES:
            assert list(out["dice_healthy"][score]) == quantiles
            for entry in [out["dice_split"][score], *out["dice_healthy"][score].values()]:
                assert 0 < entry["whole_brain"] < 1 and 0 <= entry["brain_fraction"] <= 1, "whole-brain Dice beside"
                assert entry["covers_over_half_brain"] == (entry["brain_fraction"] > 0.5)
            for where in ("calibrated", "healthy"):
                found = out["lesion_detection"][where][score]
                assert found["lesions"] >= 1 and 0 <= found["recall"] <= 1 and found["fp_per_volume"] >= 0
            assert out["lesion_detection"]["healthy"][score]["subjects"] == 4
            for key in ("pixel_auroc", "pixel_auprc"):
                lo, hi = out["ci95"][key][score]
                assert lo <= out[key][score] <= hi, f"{config}/{key}/{score}: the estimate lies in its interval"
            lo, hi = out["ci95"]["dice_healthy"][score]
            assert lo <= out["dice_healthy"][score]["0.99"]["dice"] <= hi
            lo, hi = out["ci95"]["dice_split"][score]
            assert lo <= out["dice_split"][score]["dice"] <= hi


def test_slice_metrics_use_the_slices_training_would_use(evaluated_run, tiny_demo):
    _, metrics = evaluated_run
    transform = brain_volume_transform()
    expected = sum(
        len(brain_slice_indices(transform(e)["brainmask"], TINY["min_brain_fraction"]))
        for e in load_datalist(tiny_demo, "test")
    )
    assert metrics["n_slices_scored"] == expected < metrics["n_slices"]
    assert metrics["n_slices_normal"] + metrics["n_slices_anomalous"] <= expected


def test_evaluation_settings_check_names_and_name_the_test_set_by_its_content(tiny_demo, tmp_path):
    """A test set's name and label groups become MLflow key parts: '/' or empty is refused (control: plain names
    pass); its identity is the datalist's SHA-256 and key, not its path (a copy has the same identity, another key
    does not); the default segmentation keys its quantile as threshold.json does."""
    for bad in ({"name": "a/b"}, {"name": ""}, {"label_groups": {"core/x": [1]}}):
        with pytest.raises(ValueError, match="non-empty without '/'"):
            LabelledSet(tiny_demo, **bad)
    plain = LabelledSet(str(tiny_demo), name="brats", label_groups={"core": [1.0, 3]})
    assert plain.label_groups == {"core": [1, 3]} and plain.datalist == tiny_demo
    copy = tmp_path / "copy.json"
    copy.write_bytes(tiny_demo.read_bytes())
    assert LabelledSet(copy).identity() == LabelledSet(tiny_demo).identity() != LabelledSet(tiny_demo, "x").identity()
    assert DefaultSegmentation("normative", "rec", 0.995).to_dict() == {
        "option_set": "normative",
        "score": "rec",
        "quantile": "0.995",
    }


def test_dice_healthy_uses_the_thresholds_of_the_healthy_subjects(evaluated_run):
    out, metrics = evaluated_run
    content = json.loads((out / "checkpoints" / "threshold.json").read_text())
    for config in OPTION_SETS:
        for score in SCORE_NAMES:
            for q, value in content["healthy"]["thresholds"][config][score].items():
                assert metrics[config]["dice_healthy"][score][q]["threshold"] == value
    assert metrics["default"] == {
        "option_set": "postprocessed",
        "score": "combined",
        "quantile": "0.99",
        "threshold": content["healthy"]["thresholds"]["postprocessed"]["combined"]["0.99"],
    }


def test_trained_model_scores_lesions_above_healthy_tissue(evaluated_run):
    _, metrics = evaluated_run
    assert metrics["pixel_auroc"]["rec"] > MIN_REC_AUROC, metrics["pixel_auroc"]


def test_outputs_threshold_and_mlflow(evaluated_run):
    out, metrics = evaluated_run
    for name in ("metrics.json", "per_subject.csv", "roc_pr.png", "panels.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(io.StringIO((out / "per_subject.csv").read_text())))
    assert len(rows) == 4
    for row in rows:  # per-subject AUROC, AUPRC and Dice of every option set and score
        for config in OPTION_SETS:
            assert 0 <= float(row[f"auroc_{config}_combined"]) <= 1 and 0 <= float(row[f"auprc_{config}_rec"]) <= 1
            assert 0 <= float(row[f"dice_healthy_q0.99_{config}_combined"]) <= 1
    content = json.loads((out / "checkpoints" / "threshold.json").read_text())
    assert set(content) == {"checkpoint_sha256", "options", "healthy", "calibrated"}
    for config in OPTION_SETS:  # beside the real Dice at the healthy threshold: the synthetic-lesion Dice of it
        synthetic = content["healthy"]["synthetic"]["dice"][config]
        assert metrics[config]["synthetic_dice_healthy"] == synthetic and 0 <= synthetic["combined"] <= 1
    point = metrics["operating_point"]  # inference's default on the real test set, beside its synthetic Dice
    assert {k: point[k] for k in content["healthy"]["synthetic"]["operating_point"]} == (
        content["healthy"]["synthetic"]["operating_point"]
    )
    lesions = metrics["postprocessed"]["lesion_detection"]["healthy"]["combined"]["lesions"]
    assert 0 <= point["dice"] <= 1 and point["lesions"] == lesions >= 4 and 0 <= point["detected"] <= lesions
    calibrated = content["calibrated"]["eval"]["thresholds"]
    assert calibrated["postprocessed"]["combined"] == metrics["postprocessed"]["dice_split"]["combined"]["threshold"]
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    (run,) = client.search_runs(client.get_experiment_by_name("cevae").experiment_id)
    assert run.info.run_name == "cevae-seed0", "evaluation logs into the run that trained the checkpoint"
    assert run.data.metrics["eval/paper/pixel_auroc/rec"] == pytest.approx(metrics["pixel_auroc"]["rec"])
    assert run.data.metrics["eval/operating_point/dice"] == pytest.approx(point["dice"])
    logged = run.data.metrics
    assert logged["eval/postprocessed/dice_healthy_q0.99/combined"] == pytest.approx(
        metrics["postprocessed"]["dice_healthy"]["combined"]["0.99"]["dice"]
    )
    assert logged["eval/authors/pixel_auroc_ci95_lo/combined"] == pytest.approx(
        metrics["authors"]["ci95"]["pixel_auroc"]["combined"][0]
    )
    assert logged["eval/dice_whole_brain_all"] == pytest.approx(metrics["baselines"]["dice_whole_brain_all"])
    assert "eval/paper/lesion_recall_healthy/combined" in logged
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/eval")} >= {
        "evaluation/eval/metrics.json",
        "evaluation/eval/threshold.json",
        "evaluation/eval/roc_pr.png",
        "evaluation/eval/curves.json",
    }


def copy_checkpoint(out, folder):
    """The evaluated run's model.pt and threshold.json in ``folder`` (a copy: evaluations there add to it)."""
    folder.mkdir()
    for name in ("model.pt", "threshold.json"):
        shutil.copy(out / "checkpoints" / name, folder / name)
    return folder / "model.pt"


def test_evaluation_recalibrates_when_its_option_sets_change(evaluated_run, tiny_demo, tmp_path, monkeypatch):
    """Stored healthy thresholds are used as they are for the option sets they were made with; an evaluation with a
    changed option set computes them anew (and only then), adds its options to threshold.json, and without healthy
    data says why it cannot."""
    out, _ = evaluated_run
    checkpoint = copy_checkpoint(out, tmp_path / "checkpoint")
    stored = json.loads((checkpoint.parent / "threshold.json").read_text())
    calls = []
    calibrate = LabelFreeCalibration.__call__
    monkeypatch.setattr(LabelFreeCalibration, "__call__", lambda *a, **k: calls.append(1) or calibrate(*a, **k))
    healthy = load_datalist(tiny_demo, "training")[:1]

    def evaluate(configs, healthy_data):
        model = AnomalyMap(CeVAE(channels=TINY["channels"], z_dim=TINY["z_dim"]), CeVAELoss(), configs)
        ev = AnomalyEvaluation(
            model,
            checkpoint,
            LabelledSet(tiny_demo),
            brain_volume_transform(),
            tmp_path / "eval",
            default=DefaultSegmentation(option_set="paper"),
            healthy_data=healthy_data,
            calibration=LabelFreeCalibration(synthetic_volumes=2),
        )
        model.load(checkpoint, reference="optional")
        return ev.healthy()

    same = {c: OPTION_SETS[c] for c in stored["options"]}
    assert evaluate(same, healthy)["thresholds"] == stored["healthy"]["thresholds"] and calls == []
    changed = {"paper": ScoreOptions(median_size=3)}
    with pytest.raises(Exception, match="option sets differ"):
        evaluate(changed, None)
    fresh = evaluate(changed, healthy)
    assert calls == [1] and fresh["subjects"] == [healthy[0]["image"]]
    assert fresh["synthetic"]["operating_point"]["option_set"] == "paper", "the operating point is chosen anew"
    assert fresh["thresholds"]["paper"]["rec"] != stored["healthy"]["thresholds"]["paper"]["rec"]
    written = json.loads((checkpoint.parent / "threshold.json").read_text())
    assert written["options"]["paper"]["median_size"] == 3 and written["healthy"] == fresh


def test_evaluation_on_real_labelled_scans(evaluated_run, shared_data, tmp_path):
    out, _ = evaluated_run
    checkpoint = copy_checkpoint(out, tmp_path / "checkpoint")
    entries = prepare_entries("brats2013-deepmedic", shared_data / "brats2013", "T1c")[:1]
    entries += prepare_entries("open-ms", shared_data / "open_ms", "T1")
    datalist = write_datalist({"test": entries}, tmp_path / "real.json")
    run_bundle(tmp_path, datalist, EVAL_FILES, ckpt_path=str(checkpoint), eval_name="real")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_subjects"] == 2 and metrics["n_slices"] > 200
    assert 0.0 <= metrics["pixel_auroc"]["combined"] <= 1.0
    with open(tmp_path / "per_subject.csv", newline="") as table:  # named by the layouts' subject ids (case folders)
        assert [row["subject"] for row in csv.DictReader(table)] == ["pat0001", "patient07"]


def test_one_subject_and_label_groups(evaluated_run, tiny_demo, tmp_path):
    out, _ = evaluated_run
    checkpoint = copy_checkpoint(out, tmp_path / "checkpoint")
    entry = json.loads(tiny_demo.read_text())["test"][0]
    entry = {k: str(tiny_demo.parent / v) if k in ("image", "brainmask", "label") else v for k, v in entry.items()}
    datalist = write_datalist({"test": [entry]}, tmp_path / "one.json")
    groups = {"lesion": [1], "absent": [7]}
    run_bundle(tmp_path, datalist, EVAL_FILES, ckpt_path=str(checkpoint), eval_name="one", label_groups=groups)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    split = metrics["paper"]["dice_split"]["combined"]
    assert math.isnan(split["dice"]) and math.isfinite(split["threshold"]), "no held-out Dice from one subject"
    intervals = metrics["postprocessed"]["ci95"]
    assert all(math.isnan(v) for key in intervals for v in intervals[key]["rec"]), "no interval over one subject"
    # a group holding every label value is the plain pixel metric; a value that never occurs gives NaN
    assert metrics["paper"]["pixel_auroc_lesion"] == pytest.approx(metrics["paper"]["pixel_auroc"])
    assert metrics["postprocessed"]["pixel_auprc_lesion"] == pytest.approx(metrics["postprocessed"]["pixel_auprc"])
    assert math.isnan(metrics["paper"]["pixel_auroc_absent"]["rec"])


def test_evaluation_refuses_settings_that_differ_from_training(evaluated_run, tmp_path):
    out, _ = evaluated_run
    with pytest.raises(Exception) as info:
        run_bundle(
            out,
            json.loads((out / "checkpoints" / "config.json").read_text())["datalist"],
            EVAL_FILES,
            normalization="percentile",
            eval_output_dir=str(tmp_path),
        )
    assert "normalization='percentile' (trained with 'zscore')" in str(input_error(info.value))


def synthetic_subjects(n=3, shape=(24, 24, 16), seed=0):
    """Subjects with one small lesion each (0.2 % of the brain) and a score that is higher inside it, on smooth noise
    (so that false positives form blobs that survive the removal of small components)."""
    rng = np.random.default_rng(seed)
    subjects = []
    for i in range(n):
        brain = np.ones(shape, bool)
        label = np.zeros(shape, bool)
        label[5 + i : 8 + i, 10:13, 6:8] = True
        noise = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
        score = (noise / noise.std() + 4.0 * label).astype(np.float32)
        subject = ScoredSubject(f"s{i}", brain, label)
        subject.voxels = {"cc": {"combined": score[brain]}}
        subjects.append(subject)
    return subjects


def test_best_dice_with_component_removal_finds_small_lesions():
    subjects, options = synthetic_subjects(), ScoreOptions(min_component_size=7)
    _, found = dice_search(subjects, "cc", "combined", options)
    # reference: every distinct threshold that segments at most 5 % of the voxels (a larger segmentation cannot
    # beat Dice 2 * 0.002 / (0.002 + 0.05) = 0.08 on lesions of 0.2 %), each with its components removed
    voxels = np.sort(np.concatenate([s.voxels["cc"]["combined"] for s in subjects]))
    candidates = voxels[-int(0.05 * voxels.size) :]
    brute = max(pooled_dice(counts_at(subjects, "cc", "combined", float(t), options)) for t in candidates)
    assert found >= 0.98 * brute and brute > 0.5
    # negative control: the former 64-point grid of quantiles in [0.5, 1] misses such small lesions
    coarse = np.unique(np.quantile(voxels, np.linspace(0.5, 1.0, 64)))
    old = max(pooled_dice(counts_at(subjects, "cc", "combined", float(t), options)) for t in coarse)
    assert old < 0.8 * brute


def test_a_segmentation_of_most_of_the_brain_is_flagged(caplog):
    subjects, options = synthetic_subjects(), ScoreOptions()
    whole = pooled_dice(segmentation_counts([s.brain for s in subjects], subjects))
    voxels = np.concatenate([s.voxels["cc"]["combined"] for s in subjects])
    low, high = (  # 90 % and 1 % of the voxels
        dice_entry_of(counts_at(subjects, "cc", "combined", t, options), subjects, t, whole)
        for t in (float(np.quantile(voxels, 0.1)), float(np.quantile(voxels, 0.99)))
    )
    assert low["covers_over_half_brain"] and not high["covers_over_half_brain"]
    assert low["dice"] == pytest.approx(whole, abs=0.01) and low["whole_brain"] == whole
    warnings = coverage_warnings("cc", {"dice_split": {"combined": low}, "dice_healthy": {"combined": {"0.99": high}}})
    assert len(warnings) == 1 and "cc/dice_split/combined" in warnings[0] and "whole-brain" in caplog.text


def test_evaluation_recomputes_stale_healthy_thresholds_or_says_why(
    evaluated_run, tiny_demo, two_test_subjects, tmp_path
):
    out, metrics = evaluated_run
    checkpoint = copy_checkpoint(out, tmp_path / "checkpoint")
    stale = json.loads((checkpoint.parent / "threshold.json").read_text())
    (checkpoint.parent / "threshold.json").write_text(json.dumps({**stale, "checkpoint_sha256": "0" * 64}))
    test_only = write_datalist({"test": load_datalist(tiny_demo, "test")}, tmp_path / "test_only.json")
    with pytest.raises(Exception) as info:  # a test-only datalist has no healthy subjects to recompute them from
        run_bundle(tmp_path, test_only, EVAL_FILES, ckpt_path=str(checkpoint))
    assert "another checkpoint" in str(input_error(info.value))
    # with the training datalist (its healthy validation subjects): recomputed
    run_bundle(tmp_path, tiny_demo, EVAL_FILES, ckpt_path=str(checkpoint), eval_datalist=str(two_test_subjects))
    fresh = json.loads((checkpoint.parent / "threshold.json").read_text())
    assert fresh["checkpoint_sha256"] == stale["checkpoint_sha256"]
    for config, per_score in stale["healthy"]["thresholds"].items():  # the same thresholds as training computed
        for score, values in per_score.items():
            assert fresh["healthy"]["thresholds"][config][score] == pytest.approx(values, rel=1e-5)


def test_panels_draw_each_map_on_the_brain_only(tmp_path, monkeypatch):
    """``panels.png`` draws a map's voxels outside the brain masked (black) and its colour bar over the brain's
    values: a normative z-map of mostly negative values, drawn with its background (0, not scored) on the scale,
    showed the whole outside of the brain as the highest score. Negative control: the unmasked map's scale ends at
    that 0."""
    import matplotlib.axes

    from pipeline.evaluation.figures import plot_panels
    from pipeline.evaluation.subjects import ScoredSubject
    from pipeline.score_options import OPTION_SETS

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (20, 24, 3)], indexing="ij"))
    brain = ((grid[:2] / 0.8) ** 2).sum(0) <= 1
    label = brain & ((((grid[:2] - 0.3) / 0.2) ** 2).sum(0) <= 1)
    subject = ScoredSubject("s", brain, label)
    rng = np.random.default_rng(0)
    subject.voxels["normative"] = {s: rng.normal(-2.0, 0.5, int(brain.sum())) for s in SCORE_NAMES}
    slices = {"image": rng.normal(size=(3, 20, 24)), "recon": rng.normal(size=(3, 20, 24))}
    drawn = []
    real = matplotlib.axes.Axes.imshow

    def recording(self, image, *args, **kwargs):
        shown = real(self, image, *args, **kwargs)
        drawn.append((image, shown))
        return shown

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording)
    point = {"option_set": "normative", "score": "rec", "quantile": 0.999, "threshold": -1.0}
    point |= {"min_component_size": 1, "dice": 0.5, "synthetic_dice": 0.5}
    plot_panels([(subject, slices, 1)], {"operating_point": point}, OPTION_SETS, {}, tmp_path / "panels.png")
    assert (tmp_path / "panels.png").stat().st_size > 1000
    for score, (image, shown) in zip(("rec", "kl_grad", "combined"), drawn[3:6]):
        values, inside = subject.volume("normative", score)[..., 1], brain[..., 1]
        assert np.array_equal(np.ma.getmaskarray(image), ~inside.T), "outside the brain masked"
        assert (shown.norm.vmin, shown.norm.vmax) == pytest.approx((values[inside].min(), values[inside].max()))
        assert values[~inside].max() == 0 > values[inside].max(), "unmasked, the scale would end at the background"
