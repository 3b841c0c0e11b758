"""Training through the bundle: loss goes down, checkpoints, VAE skips the CE pass, resume, MLflow, CLI."""

from __future__ import annotations

import getpass
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from bundle_helpers import CLI_ENV, TINY, TRAIN_CLI, initialized_workflow, run_bundle
from conftest import REPO, input_error
from mlflow import MlflowClient

from pipeline.anomaly_map import AnomalyMap
from pipeline.bundle_support import train_val_split
from pipeline.calibration import LabelFreeCalibration
from pipeline.data.context_encoding import ContextEncodingNoise
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.engines import CeVAETrainer
from pipeline.engines.checkpoint import AtomicCheckpointSaver
from pipeline.engines.handlers import HealthyCalibration, StopOnNonFiniteLoss, TrainingStopped, raise_if_stopped
from pipeline.errors import find_cause
from pipeline.healthy import healthy_brain_maps, healthy_thresholds
from pipeline.io import WriteError, file_sha256
from pipeline.losses import CeVAELoss
from pipeline.networks import CeVAE
from pipeline.scoring import OPTION_SETS, SCORE_NAMES
from pipeline.thresholds import checkpoint_sha256


def epoch_metric(output_dir, name):
    client = MlflowClient(f"sqlite:///{output_dir}/mlruns.db")
    (run,) = client.search_runs(client.get_experiment_by_name("cevae").experiment_id)
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)]


def encoder_samples(network):
    """Count training-mode encoder calls and the samples they carry (validation runs in eval mode)."""
    counter = {"samples": 0, "calls": 0}

    def hook(module, inputs, _output):
        if module.training:
            counter["samples"] += inputs[0].shape[0]
            counter["calls"] += 1

    network.encoder.register_forward_hook(hook)
    return counter


@pytest.fixture(scope="module")
def cevae_run(tiny_demo, tmp_path_factory):
    out = tmp_path_factory.mktemp("cevae_run")
    return run_bundle(out, tiny_demo, epochs=3, synthetic_volumes=2, tracking_uri=None), out  # 2: a paired SE; tracked


def run_page_sections(keys) -> list[tuple[str, list[str]]]:
    """The chart sections of MLflow 3's run page for metric ``keys``, in the order it shows them: one section per
    prefix (all but the last ``/`` part), prefixed sections sorted (JavaScript's default sort: by UTF-16 code
    units), then the un-prefixed keys as "Model metrics" (``getBaseChartAndSectionConfigs`` in MLflow's
    ``runs-charts.types.ts``; ``extractChartSectionName``)."""
    grouped: dict[str, list[str]] = {}
    for key in sorted(keys):
        grouped.setdefault(key.rpartition("/")[0] or "Model metrics", []).append(key)
    order = sorted((s for s in grouped if s != "Model metrics"), key=lambda s: s.encode("utf-16-be"))
    return [(s, grouped[s]) for s in order + ["Model metrics"] if s in grouped]


def test_training_lowers_the_loss_and_writes_checkpoints(cevae_run):
    _, out = cevae_run
    losses = epoch_metric(out, "Training/train_loss")
    assert len(losses) == 3 and losses[-1] < losses[0]
    for name in ("model.pt", "last.pt"):
        assert (out / "checkpoints" / name).is_file()
    best = torch.load(out / "checkpoints" / "model.pt", weights_only=True)
    assert set(best) == {"model", "loss"} and 0 < float(best["loss"]["sigma"]) < 1, "the calibrated sigma is saved"
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert set(last) == {"model", "loss", "optimizer", "trainer", "rng", "validator"}
    assert last["trainer"]["iteration"] == 3 * last["trainer"]["epoch_length"]
    assert not list(out.glob("checkpoints/.*tmp*")), "no temporary files left behind"


def test_mlflow_run_has_the_params_metrics_and_artifacts(cevae_run):
    _, out = cevae_run
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    experiment = client.get_experiment_by_name("cevae")
    (run,) = client.search_runs(experiment.experiment_id)
    assert run.info.run_name == "cevae-seed0" and run.info.status == "FINISHED"  # <variant>-seed<seed>
    hyper = {
        "model_variant",
        "overlay_name",
        "seed",
        "epochs",
        "batch_size",
        "lr",
        "ce_weight",
        "kl_weight",
        "reconstruction",
        "sigma",
        "z_dim",
        "image_size",
        "context_slices",
        "channels",
        "norm",
        "ce_n_squares",
        "ce_square_size",
        "ce_fill",
        "ce_variant",
        "augment",
        "normalization",
        "min_brain_fraction",
        "border_slices",
        "val_fraction",
        "synthetic_volumes",
        "pretrained",
    }
    extra = {
        "dataset",
        "datalist",
        "datalist_sha256",
        "version_monai",
        "version_torch",
        "version_ignite",
        "version_mlflow",
        "git_commit",
        "max_epochs",
        "epoch_length",
    }
    assert set(run.data.params) == hyper | extra
    assert run.data.params["model_variant"] == "cevae" and run.data.params["ce_weight"] == "0.5"
    (data,) = run.inputs.dataset_inputs  # the healthy datalist as the run's dataset input, with its digest
    assert data.dataset.digest == run.data.params["datalist_sha256"] == file_sha256(run.data.params["datalist"])[:16]
    assert [(t.key, t.value) for t in data.tags] == [("mlflow.data.context", "training")]
    tags = run.data.tags  # as mlflow.start_run would tag it, plus this code's commit and a description
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in the environment nor in the password database: MLflow's fallback
        user = "unknown"
    assert tags["mlflow.user"] == user and tags["mlflow.source.type"] == "LOCAL"
    assert tags.get("mlflow.source.git.commit", "unknown") == run.data.params["git_commit"]
    note = tags["mlflow.note.content"]
    assert note.startswith("cevae (ce_weight 0.5) trained on") and run.data.params["datalist_sha256"] in note
    curves = {"train_loss", "train_loss_rec", "train_loss_kl", "train_loss_ce", "train_sigma"}
    curves = {f"Training/{k}" for k in curves | {"val_neg_elbo", "val_rec", "val_kl", "lr"}}
    metrics = set(curves)
    metrics |= {
        f"healthy_{k}" for k in ("rec_mse", "mean_brain_mse", "rec_vs_mean_brain", "active_units", "kl_per_dim")
    }
    metrics |= {
        f"healthy_threshold/{c}/{s}/q{q}"
        for c in OPTION_SETS
        for s in SCORE_NAMES
        for q in ("0.95", "0.98", "0.99", "0.995", "0.999")
    }
    metrics |= {f"synthetic_dice/{c}/{s}" for c in OPTION_SETS for s in SCORE_NAMES}
    metrics |= {f"operating_point/{k}" for k in ("synthetic_dice", "quantile", "threshold", "min_component_size")}
    assert set(run.data.metrics) == metrics
    assert all(len(client.get_metric_history(run.info.run_id, k)) == 3 for k in curves), "a curve: every epoch"
    # the run page opens on the training curves: its first chart section holds them, and only them
    sections = run_page_sections(run.data.metrics)
    assert set(sections[0][1]) == curves and sections[0][0] == "Training"
    unprefixed = run_page_sections({k.removeprefix("Training/") for k in metrics})  # negative control: as before
    assert unprefixed[-1][0] == "Model metrics" and "train_loss" in unprefixed[-1][1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"config.json", "model.pt", "threshold.json", "reconstructions.png"}


def test_training_ends_with_healthy_thresholds_of_the_selected_checkpoint(cevae_run, tiny_demo):
    _, out = cevae_run
    content = json.loads((out / "checkpoints" / "threshold.json").read_text())
    assert content["checkpoint_sha256"] == checkpoint_sha256(out / "checkpoints" / "model.pt")
    healthy = content["healthy"]
    validation = train_val_split(tiny_demo, TINY["val_fraction"], 0)[1]
    assert healthy["subjects"] == [e["image"] for e in validation] and healthy["quantiles"][2] == 0.99
    # reference without the network: the `intensity` score of the plain option set is the preprocessed image (in the
    # training's normalisation), so its thresholds are numpy quantiles of the healthy validation subjects' brain voxels
    trained = json.loads((out / "checkpoints" / "config.json").read_text())
    transform = brain_volume_transform(normalization=trained["normalization"])
    voxels = np.concatenate(
        [np.asarray(d["image"][0])[np.asarray(d["brainmask"][0]) > 0] for d in (transform(e) for e in validation)]
    )
    expected = np.quantile(voxels, [0.95, 0.98, 0.99, 0.995, 0.999])
    got = [healthy["thresholds"]["paper"]["intensity"][q] for q in ("0.95", "0.98", "0.99", "0.995", "0.999")]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert healthy["n_voxels"] == voxels.size
    for config in OPTION_SETS:  # every option set and score, quantiles in increasing order
        for score in SCORE_NAMES:
            values = list(healthy["thresholds"][config][score].values())
            assert values == sorted(values) and values[0] < values[-1], (config, score)
    check = healthy["validation"]
    assert check["rec_mse"] > 0 and check["mean_brain_mse"] > 0 and 0 <= check["active_units"] <= 16
    synthetic = healthy["synthetic"]  # no labels: synthetic lesions in the same healthy subjects
    assert synthetic["n_volumes"] == 2 * len(validation) and synthetic["quantile"] == 0.99
    assert set(synthetic["dice"]) == set(OPTION_SETS) and "foreign" not in synthetic["kinds"], "one subject"
    logged = epoch_metric(out, "synthetic_dice/postprocessed/combined")
    assert logged == [synthetic["dice"]["postprocessed"]["combined"]], "logged once, at the end"
    point = synthetic["operating_point"]  # within a paired standard error of the best model candidate
    eligible = [  # the model's maps, except those scaled by the scored volume itself (authors' kl_grad, combined)
        c["dice"]
        for c in synthetic["candidates"]
        if c["score"] == "rec" or (c["score"] != "intensity" and not OPTION_SETS[c["option_set"]].test_volume_scaled)
    ]
    selection = synthetic["selection"]
    assert selection["best"]["dice"] == max(eligible)
    tolerance = selection["standard_errors"][f"{point['option_set']}/{point['score']}"]
    assert max(eligible) - tolerance <= point["synthetic_dice"] <= max(eligible)
    assert point["threshold"] == healthy["thresholds"][point["option_set"]][point["score"]][f"{point['quantile']:g}"]
    assert epoch_metric(out, "operating_point/synthetic_dice") == [point["synthetic_dice"]]
    # the healthy scale of the postprocessed KL gradient, stored with the option set: medians over the validation
    # volumes of each volume's min and max of |dKL/dx| (reference: autograd on each volume's summed KL, by hand)
    network = CeVAE(channels=TINY["channels"], z_dim=TINY["z_dim"]).eval()
    network.load_state_dict(torch.load(out / "checkpoints" / "model.pt", weights_only=True)["model"])
    lows, highs = [], []
    for volume in (transform(e) for e in validation):
        x = volume["image"].as_tensor().permute(3, 0, 1, 2).contiguous().requires_grad_(True)  # (D, 1, H, W)
        mu, logvar = network.encode(x)
        (grad,) = torch.autograd.grad((0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(), x)
        lows.append(float(grad.abs().min()))
        highs.append(float(grad.abs().max()))
    stored = content["options"]["postprocessed"]
    assert stored["grad_low"] == pytest.approx(np.median(lows), abs=1e-4 * np.median(highs))  # ~0: rounding
    assert stored["grad_high"] == pytest.approx(np.median(highs), rel=1e-4)
    assert content["options"]["paper"]["grad_high"] is None, "only the healthy-scaled set is fitted"


def test_healthy_calibration_scores_with_the_selected_checkpoint_not_the_last_weights(tiny_demo, tmp_path):
    """The best epoch need not be the last: the calibration must load ``model.pt`` (the selected weights) and not
    score with the network as training left it. Reference: :func:`healthy_thresholds` of a network that holds the
    checkpoint's weights; negative control: the network's own (last) weights give other thresholds."""
    small = {"channels": TINY["channels"], "z_dim": TINY["z_dim"]}
    torch.manual_seed(0)
    selected = CeVAE(**small)
    torch.manual_seed(1)
    last = CeVAE(**small)
    loss = CeVAELoss(sigma=0.1)
    (tmp_path / "checkpoints").mkdir()
    checkpoint = tmp_path / "checkpoints" / "model.pt"
    torch.save({"model": selected.state_dict(), "loss": loss.state_dict()}, checkpoint)
    validation = train_val_split(tiny_demo, TINY["val_fraction"], 0)[1]
    transform, options = brain_volume_transform(), {"paper": OPTION_SETS["paper"]}
    calibration = LabelFreeCalibration(synthetic_volumes=2)
    metrics = HealthyCalibration(
        checkpoint, AnomalyMap(last, loss, options), validation, transform, calibration
    ).calibrate()
    written = json.loads((tmp_path / "checkpoints" / "threshold.json").read_text())["healthy"]["thresholds"]
    for network, same in ((selected, True), (last, False)):
        volumes = [transform(dict(e)) for e in validation]
        maps = healthy_brain_maps(AnomalyMap(network.eval(), loss), volumes, options)
        reference = healthy_thresholds(maps)["thresholds"]
        for score in ("rec", "combined"):
            equal = np.allclose(list(written["paper"][score].values()), list(reference["paper"][score].values()))
            assert equal == same, (score, same)
    assert metrics["healthy_threshold/paper/rec/q0.99"] == written["paper"]["rec"]["0.99"]
    assert any(not torch.equal(a, b) for a, b in zip(last.state_dict().values(), selected.state_dict().values()))


def test_vae_runs_one_forward_pass_per_step(tiny_demo, tmp_path):
    counts = {}
    for variant, files in (("cevae", ("train.json",)), ("vae", ("train.json", "vae.json"))):
        workflow = initialized_workflow(tmp_path / variant, tiny_demo, files, epochs=1)
        counter = encoder_samples(workflow.parser.get_parsed_content("network"))
        workflow.run()
        trainer = workflow.parser.get_parsed_content("train#trainer")
        counts[variant] = (counter, len(workflow.parser.get_parsed_content("train#dataset")), trainer.state.iteration)
        assert workflow.parser.get_parsed_content("run_name") == f"{variant}-seed0"  # MLflow's run name
        workflow.finalize()
    for variant, per_slice in (("vae", 1), ("cevae", 2)):
        counter, slices, steps = counts[variant]
        assert counter["calls"] == steps, f"{variant}: one network pass per step"
        assert counter["samples"] == per_slice * slices, f"{variant}: {per_slice} encoded input(s) per slice"


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_demo, tmp_path):
    run_bundle(tmp_path / "straight", tiny_demo, epochs=2)
    run_bundle(tmp_path / "resumed", tiny_demo, epochs=1)
    first = json.loads((tmp_path / "resumed" / "checkpoints" / "threshold.json").read_text())
    run_bundle(tmp_path / "resumed", tiny_demo, epochs=2, resume=True)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["trainer"]["iteration"] == 2 * resumed["trainer"]["epoch_length"]
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0)
    torch.testing.assert_close(resumed["loss"]["sigma"], straight["loss"]["sigma"], rtol=0, atol=0)
    # the resumed run ends with the healthy thresholds of its own selected checkpoint, like the straight one
    thresholds = [
        json.loads((tmp_path / run / "checkpoints" / "threshold.json").read_text()) for run in ("straight", "resumed")
    ]
    assert thresholds[1]["checkpoint_sha256"] == checkpoint_sha256(tmp_path / "resumed" / "checkpoints" / "model.pt")
    assert thresholds[1]["healthy"] == thresholds[0]["healthy"] != first["healthy"]


def test_resume_after_the_last_epoch_finishes_the_run_without_training_again(tiny_demo, tmp_path):
    """A run killed after its last epoch (here: its MLflow run left RUNNING) resumes by closing, not by training
    the trained weights again (ignite restarts a finished engine), and keeps its best epoch."""
    out = tmp_path / "run"
    straight = run_bundle(out, tiny_demo, epochs=2, tracking_uri=None)
    best_epoch = straight.parser.get_parsed_content("validate#evaluator").state.best_metric_epoch
    before = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    model_sha = checkpoint_sha256(out / "checkpoints" / "model.pt")
    assert before["validator"]["best_metric_epoch"] == best_epoch > 0
    tracked = json.loads((out / "checkpoints" / "mlflow_run.json").read_text())
    client = MlflowClient(tracked["tracking_uri"])
    client.update_run(tracked["run_id"], status="RUNNING")  # what a kill before the run's end leaves
    resumed = run_bundle(out, tiny_demo, epochs=2, resume=True, tracking_uri=None)
    after = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert after["trainer"]["iteration"] == before["trainer"]["iteration"]
    for key, value in before["model"].items():
        torch.testing.assert_close(after["model"][key], value, rtol=0, atol=0)
    assert checkpoint_sha256(out / "checkpoints" / "model.pt") == model_sha
    assert resumed.parser.get_parsed_content("validate#evaluator").state.best_metric_epoch == best_epoch
    runs = client.search_runs([tracked["experiment_id"]])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(tracked["run_id"], "FINISHED")]
    # a last.pt of bundle < 0.6.0 (no best epoch in it) still resumes
    torch.save({key: value for key, value in after.items() if key != "validator"}, out / "checkpoints" / "last.pt")
    run_bundle(out, tiny_demo, epochs=3, resume=True)
    trainer = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] == 3 * trainer["epoch_length"]


def test_a_completed_run_keeps_no_resume_state_unless_asked(tiny_demo, tmp_path):
    """By default a completed training removes last.pt (only a resume needs it; the runs of this suite keep it with
    --keep_last True, the negative control); resuming such a run says how to train further instead."""
    out = tmp_path / "run"
    run_bundle(out, tiny_demo, epochs=1, keep_last=False)
    assert {p.name for p in (out / "checkpoints").iterdir()} >= {"model.pt", "threshold.json", "config.json"}
    assert not (out / "checkpoints" / "last.pt").exists()
    with pytest.raises(Exception) as info:
        run_bundle(out, tiny_demo, epochs=2, resume=True)
    message = str(input_error(info.value))
    assert "completed and kept no last.pt" in message and f"--pretrained {out / 'checkpoints' / 'model.pt'}" in message


def test_resume_without_checkpoint_says_what_to_do(tiny_demo, tmp_path):
    with pytest.raises(Exception) as info:
        run_bundle(tmp_path / "none", tiny_demo, epochs=1, resume=True)
    err = info.value
    while err.__cause__ is not None and not isinstance(err, FileNotFoundError):
        err = err.__cause__
    assert isinstance(err, FileNotFoundError) and "run training without --resume first" in str(err)


class NaNAfter(CeVAELoss):
    """A loss that turns NaN from the given iteration on (counts calls)."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, *args, **kwargs):
        terms = super().forward(*args, **kwargs)
        self.calls += 1
        if self.calls >= self.bad_call:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    data = [{"image": torch.rand(1, 64, 64)} for _ in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    net = CeVAE(z_dim=8, channels=(4, 8, 8, 8))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    saver = AtomicCheckpointSaver(tmp_path, net, optimizer)
    trainer = CeVAETrainer(
        "cpu",
        5,
        loader,
        net,
        optimizer,
        NaNAfter(bad_call=4),
        ContextEncodingNoise(),
        train_handlers=[saver, StopOnNonFiniteLoss()],
    )
    trainer.run()
    assert trainer.state.epoch == 2 and trainer.state.iteration == 4, "stopped at the first NaN"
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["trainer"]["iteration"] == 2, "saved after epoch 1 (2 iterations), not after the NaN"
    assert trainer.state.stop_reason == "the training loss is not finite at epoch 2, iteration 4"
    with pytest.raises(TrainingStopped, match=f"the last good checkpoint is {tmp_path / 'last.pt'}"):
        raise_if_stopped(trainer, tmp_path)
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_compiled_training_matches_eager_and_saves_the_plain_module(tmp_path):
    """``compile=True`` trains through torch.compile (TorchDynamo, here with its eager backend: no C++ compiler
    needed) to the same weights as eager training; checkpoints hold the uncompiled module's keys."""
    weights = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        data = [{"image": torch.rand(1, 64, 64)} for _ in range(8)]
        net = CeVAE(z_dim=8, channels=(4, 8, 8, 8))
        optimizer = torch.optim.Adam(net.parameters(), 1e-3)
        saver = AtomicCheckpointSaver(tmp_path / str(compiled), net, optimizer)
        trainer = CeVAETrainer(
            "cpu",
            2,
            torch.utils.data.DataLoader(data, batch_size=4),
            net,
            optimizer,
            CeVAELoss(),
            ContextEncodingNoise(),
            train_handlers=[saver],
            compile=compiled,
            compile_kwargs={"backend": "eager"},
        )
        assert (trainer.forward_network is not net) == compiled
        trainer.run()
        weights[compiled] = torch.load(tmp_path / str(compiled) / "last.pt", weights_only=True)["model"]
    assert weights[True].keys() == weights[False].keys() and not any("_orig_mod" in k for k in weights[True])
    for key in weights[False]:
        torch.testing.assert_close(weights[True][key], weights[False][key])


def test_amp_dtype_is_checked_and_bfloat16_needs_no_loss_scaling():
    loader = torch.utils.data.DataLoader([{"image": torch.rand(1, 64, 64)}], batch_size=1)
    net = CeVAE(z_dim=8, channels=(4, 8, 8, 8))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    with pytest.raises(ValueError, match="amp_dtype"):
        CeVAETrainer("cpu", 1, loader, net, optimizer, CeVAELoss(), amp_dtype="float32")
    trainer = CeVAETrainer("cpu", 1, loader, net, optimizer, CeVAELoss(), amp=True)
    assert not trainer.amp and trainer.loss_scaler is None, "AMP is CUDA-only; on CPU training runs in float32"
    assert trainer.amp_kwargs["dtype"] == torch.bfloat16


@pytest.mark.slow
def test_multi_process_training_on_gloo(tiny_demo, tmp_path):
    """torchrun with 2 CPU processes (gloo), DDP: every epoch the ranks train on disjoint shards of the training
    slices (drawn anew each epoch) and score disjoint shards of the validation slices, the validation metric is the
    mean over *all* of them on both ranks (recomputed here from the weights; one rank's own shard gives another
    value), weights and sigma stay equal across ranks; only rank 0 saves and tracks. Rank 1 leaves when training
    ends, before rank 0's end-of-training calibration does: no final barrier that a slow calibration could time out
    (NCCL: 10 min). Recorded by ``tests/distributed_probe.py``, attached from a config overlay."""
    train_config = json.loads((REPO / "bundles/cevae/configs/train.json").read_text())
    run = list(train_config["run"])
    at = run.index("$@train#trainer.run()")
    run[at:at] = [
        "$import distributed_probe",
        "$distributed_probe.attach(@train#trainer, @validate#evaluator, @network, @loss, @output_dir)",
    ]
    overlay = tmp_path / "probe.json"
    overlay.write_text(json.dumps({"run": run}))
    configs = f"['bundles/cevae/configs/train.json','bundles/cevae/configs/multi_gpu_train.json','{overlay}']"
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--datalist",
        str(tiny_demo),
        "--output_dir",
        str(out),
        "--epochs",
        "2",
        "--batch_size",
        "8",
        "--z_dim",
        "16",
        "--channels",
        "[8,16,32,64]",
        "--synthetic_volumes",
        "1",
        "--progress_bar",
        "False",
    ]
    env = {**CLI_ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), CLI_ENV.get("PYTHONPATH")]))}
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((out / f"probe_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(r["epochs"]) for r in ranks] == [2, 2]
    for epoch in (0, 1):
        first, second = (r["epochs"][epoch] for r in ranks)
        train = [set(first["train_indices"]), set(second["train_indices"])]
        padding = -first["train_size"] % 2  # the sampler repeats slices to give both ranks as many
        assert train[0] | train[1] == set(range(first["train_size"]))
        assert len(train[0] & train[1]) == padding, "training shards overlap beyond the sampler's padding"
        val = [set(first["val_indices"]), set(second["val_indices"])]
        assert not val[0] & val[1] and val[0] | val[1] == set(range(first["val_size"]))
        assert len(first["val_indices"]) + len(second["val_indices"]) == first["val_size"], "each slice scored once"
        assert first["val_neg_elbo"] == pytest.approx(second["val_neg_elbo"], rel=1e-6)
        assert first["val_neg_elbo"] == pytest.approx(first["val_reference"], rel=1e-4), "not the mean over all"
        assert abs(first["val_own_shard"] - first["val_reference"]) > 1e-3 * abs(first["val_reference"])
        assert first["weights"] == second["weights"] and first["sigma"] == pytest.approx(second["sigma"], rel=1e-6)
    assert ranks[0]["epochs"][0]["train_indices"] != ranks[0]["epochs"][1]["train_indices"], "not reshuffled"
    assert ranks[0]["epochs"][0]["weights"] != ranks[0]["epochs"][1]["weights"], "did not train"
    assert ranks[1]["left_at"] < ranks[0]["calibrated_at"], "rank 1 waited for rank 0's calibration"
    state = torch.load(out / "checkpoints" / "model.pt", weights_only=True)["model"]
    net = CeVAE(z_dim=16, channels=(8, 16, 32, 64))
    net.load_state_dict(state)  # saved without the DDP "module." prefix
    client = MlflowClient(f"sqlite:///{out}/mlruns.db")
    runs = client.search_runs(client.get_experiment_by_name("cevae").experiment_id)
    assert len(runs) == 1, "only rank 0 tracks"
    assert len(client.get_metric_history(runs[0].info.run_id, "Training/train_loss")) == 2


def test_mistyped_override_is_refused(tiny_demo, tmp_path):
    with pytest.raises(Exception) as info:
        run_bundle(tmp_path, tiny_demo, epoch=1)
    text = "".join(str(e) for e in (info.value, info.value.__cause__) if e is not None)
    assert "unknown config key(s): 'epoch' (did you mean 'epochs'?)" in text
    assert not (tmp_path / "checkpoints").exists(), "refused before anything ran"


def test_the_seed_fixes_the_initial_weights_and_the_slice_order(tiny_demo, tmp_path):
    """The config's seed fixes the network's initial weights and the order of the training slices; another seed
    changes both (negative control). That whole trainings of one seed end bit-identical is checked by the resume tests
    (two separate trainings compared tensor by tensor)."""

    def start(name: str, seed: int) -> tuple[dict, torch.Tensor]:
        workflow = initialized_workflow(tmp_path / name, tiny_demo, seed=seed)
        weights = {k: v.clone() for k, v in workflow.parser.get_parsed_content("network").state_dict().items()}
        first_batch = next(iter(workflow.parser.get_parsed_content("train#dataloader")))["image"]
        workflow.finalize()
        return weights, first_batch

    (a, batch_a), (b, batch_b), (other, batch_other) = start("a", 3), start("b", 3), start("other", 4)
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(batch_a, batch_b)
    assert not any(torch.equal(a[k], other[k]) for k in a if k.endswith("weight"))
    assert batch_a.shape == batch_other.shape and not torch.equal(batch_a, batch_other)


class RunsCode:
    """An object whose unpickling would run code (creates a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoints_with_code_are_refused(tmp_path):
    from pipeline.errors import InputError
    from pipeline.inference import AnomalyInference

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": RunsCode(marker)}, checkpoint)
    infer = AnomalyInference(AnomalyMap(CeVAE()), checkpoint, lambda d: d, tmp_path, threshold=0.5)
    with pytest.raises(InputError, match="holds Python objects besides tensors and was refused") as refused:
        infer._prepare()
    assert not marker.exists(), "no code ran while loading"
    assert "weights_only=False" not in str(refused.value), "never the advice to load it unsafely"


def test_cli_reports_bad_input_in_one_line(tmp_path):
    """The command line's one error path (a fresh interpreter: the bundle's error hook, exit 2, no traceback)."""
    datalist = tmp_path / "missing.json"
    cmd = [*TRAIN_CLI, "--datalist", str(datalist), "--output_dir", str(tmp_path)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=CLI_ENV)
    assert result.returncode == 2
    assert f"error: datalist {datalist} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_output_folder_that_cannot_be_made_is_named_with_the_fix(tiny_demo, tmp_path):
    """Its message, in-process (the command line turns every such error into one line, exit 2: the test above)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(Exception) as refused:
        run_bundle(blocker / "out", tiny_demo)
    expected = f"cannot create the output folder {blocker / 'out'}: Not a directory; choose a writable output folder"
    assert expected in str(find_cause(refused.value, WriteError))


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_demo, tmp_path):
    """A command-line training killed with SIGKILL in its second epoch, resumed, ends with the weights of an
    uninterrupted run (both of those in-process: the same workflow)."""
    settings = {"epochs": 4, "batch_size": 4}  # TINY's net, 4 epochs of many small steps
    run_bundle(tmp_path / "straight", tiny_demo, **settings)
    killed = tmp_path / "killed"
    cli_settings = {**TINY, **settings, "datalist": tiny_demo, "output_dir": killed}
    process = subprocess.Popen(
        TRAIN_CLI + [arg for key, value in cli_settings.items() for arg in (f"--{key}", str(value))],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # in epoch 2, right after epoch 1's checkpoint
    process.wait()
    interrupted_at = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["trainer"]["iteration"]
    run_bundle(killed, tiny_demo, resume=True, **settings)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert interrupted_at < resumed["trainer"]["iteration"] == straight["trainer"]["iteration"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_fine_tuning_starts_from_the_pretrained_weights(evaluated_run, tiny_demo, tmp_path):
    out, _ = evaluated_run
    pretrained = out / "checkpoints" / "model.pt"
    trained = torch.load(pretrained, weights_only=True)["model"]

    def weights_before_and_after_restoring(folder, **overrides):
        workflow = initialized_workflow(folder, tiny_demo, epochs=1, **overrides)
        try:
            network = workflow.parser.get_parsed_content("network")
            before = {k: v.clone() for k, v in network.state_dict().items()}
            steps = workflow.parser["run"]
            first = next(i for i, step in enumerate(steps) if "prepare_training_dir" in step)  # after the checks
            restore = next(i for i, step in enumerate(steps) if "restore_training_state" in step)
            for i in range(first, restore + 1):  # the run's steps up to restore_training_state, without training
                workflow.parser.get_parsed_content(f"run#{i}")
            return before, network.state_dict()
        finally:
            workflow.finalize()

    fresh, tuned = weights_before_and_after_restoring(tmp_path / "tuned", pretrained=str(pretrained))
    assert all(torch.equal(tuned[k], trained[k]) for k in trained)
    assert not any(torch.equal(fresh[k], trained[k]) for k in trained if k.endswith("weight"))  # it did change
    with pytest.raises(Exception) as info:  # another architecture than the pretrained model's
        weights_before_and_after_restoring(tmp_path / "other", pretrained=str(pretrained), z_dim=32)
    assert "z_dim=32 (trained with 16)" in str(input_error(info.value))


def test_a_non_finite_loss_fails_the_run_in_one_line_and_in_mlflow(tiny_demo, tmp_path):
    """A diverging training (an absurd learning rate) stops at the first non-finite loss: the run raises the one-line
    error that the bundle's command line prints with exit status 2, and its MLflow run ends FAILED with the reason,
    with no model logged."""
    workflow = initialized_workflow(tmp_path / "nan", tiny_demo, epochs=3, lr=1e38, tracking_uri=None)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors of config expressions
        workflow.run()
    error = input_error(raised.value)
    assert isinstance(error, TrainingStopped) and re.match(
        r"training stopped: the training loss is not finite", str(error)
    )
    assert "\n" not in str(error)
    tracked = json.loads((tmp_path / "nan" / "checkpoints" / "mlflow_run.json").read_text())
    run = MlflowClient(tracked["tracking_uri"]).get_run(tracked["run_id"])
    assert run.info.status == "FAILED" and run.data.tags["stop_reason"].startswith("the training loss is not finite")
    assert "model" not in {a.path for a in MlflowClient(tracked["tracking_uri"]).list_artifacts(tracked["run_id"])}


def test_resume_after_a_failed_first_save_starts_over_instead_of_a_dead_end(tiny_demo, tmp_path):
    """A run that wrote model.pt but died during its first last.pt save (disk full, kill -9) left a temporary file:
    a plain run is refused (it holds a trained run), so --resume True must work: it removes the temporary file and
    trains from the first epoch."""
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({"model": CeVAE(channels=TINY["channels"], z_dim=TINY["z_dim"]).state_dict()}, ckpt / "model.pt")
    (ckpt / ".last.pt.abc123.tmp").write_bytes(b"")
    with pytest.raises(RuntimeError) as refused:
        run_bundle(tmp_path / "run", tiny_demo, epochs=1)
    assert "holds a trained run" in str(input_error(refused.value))
    run_bundle(tmp_path / "run", tiny_demo, epochs=1, resume=True)
    trainer = torch.load(ckpt / "last.pt", weights_only=True)["trainer"]
    assert trainer["iteration"] == trainer["epoch_length"], "one epoch, from the first"
    assert not list(ckpt.glob(".*.tmp*")), "the interrupted save's temporary file is gone"


def test_augmentation_is_off_by_default_and_the_overlay_turns_it_on(tiny_demo, tmp_path):
    """The trainer gets no augmentation from the defaults and the documented one from configs/augment.json (what
    training then does with it is tested on SliceAugmentation itself, tests/test_transforms.py)."""
    from pipeline.data.augmentation import SliceAugmentation

    for files, expected in ((("train.json",), type(None)), (("train.json", "augment.json"), SliceAugmentation)):
        workflow = initialized_workflow(tmp_path / files[-1], tiny_demo, files, epochs=1)
        try:
            trainer = workflow.parser.get_parsed_content("train#trainer")
            assert isinstance(trainer.augmentation, expected), files
        finally:
            workflow.finalize()


def test_tracking_uri_none_turns_mlflow_off(cevae_run, tiny_demo, two_test_subjects, tmp_path, monkeypatch):
    """``--tracking_uri none``: training and evaluation write their own files and no MLflow store, run record or
    spool, also with ``MLFLOW_TRACKING_URI`` set; negative control: this module's default run has its store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/from_environment.db")
    out = tmp_path / "run"
    run_bundle(out, tiny_demo, epochs=1, tracking_uri="none")
    run_bundle(
        out, tiny_demo, ("train.json", "evaluate.json"), tracking_uri="none", eval_datalist=str(two_test_subjects)
    )
    assert (out / "checkpoints" / "model.pt").is_file() and (out / "checkpoints" / "threshold.json").is_file()
    assert (out / "metrics.json").is_file()
    for absent in ("mlruns.db", "checkpoints/mlflow_run.json", "tracking_spool", "mlruns"):
        assert not (out / absent).exists(), absent
    assert not (tmp_path / "from_environment.db").exists()
    assert (cevae_run[1] / "mlruns.db").is_file() and (cevae_run[1] / "checkpoints" / "mlflow_run.json").is_file()


def test_the_reconstruction_figure_shows_the_kept_checkpoint_not_the_last_epoch(tmp_path):
    """At the end of training the figure draws with ``model.pt`` (the best validation ELBO, what every later stage
    uses), loaded into a copy: the live network keeps its last-epoch weights (negative control: they differ); without
    the file it draws the live network. The PNG is written and its title says which."""
    from ignite.engine import Engine

    from pipeline.engines.figures import ReconstructionFigure

    torch.manual_seed(0)
    live, kept = CeVAE(z_dim=8, channels=(4, 8, 8, 8)), CeVAE(z_dim=8, channels=(4, 8, 8, 8))
    torch.save({"model": kept.state_dict(), "loss": CeVAELoss().state_dict()}, tmp_path / "model.pt")
    slices = [{"image": torch.rand(1, 64, 64)} for _ in range(6)]
    figure = ReconstructionFigure(tmp_path / "r.png", live, slices, checkpoint=tmp_path / "model.pt")
    shown, what = figure.shown_network()
    assert what.startswith("model.pt") and shown is not live
    for name, value in shown.state_dict().items():
        assert torch.equal(value, kept.state_dict()[name]), name
    assert any(not torch.equal(v, kept.state_dict()[k]) for k, v in live.state_dict().items())
    assert (
        ReconstructionFigure(tmp_path / "r.png", live, slices, checkpoint=tmp_path / "none.pt").shown_network()[0]
        is live
    )
    engine = Engine(lambda *_: None)
    engine.state.epoch = 7
    figure(engine)
    assert (tmp_path / "r.png").stat().st_size > 0


def test_the_reconstruction_figure_s_grey_scale_spans_the_brain_s_intensities(tmp_path, monkeypatch):
    """z-scored slices (the default normalisation: about -3..3, background at the brain's mean, 0): the figure's
    grey scale is the 0.5-99.5 percentiles of the inputs' brain pixels (numpy's percentiles as reference), the same
    for every panel. Negative control: the former fixed [0, 1] would clip two thirds of these brain pixels to black or
    white; a window over all pixels (the background included) is another one."""
    import matplotlib.axes
    from ignite.engine import Engine

    from pipeline.display import display_window
    from pipeline.engines.figures import ReconstructionFigure

    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(6, 1, 64, 64)
    masks[..., 16:48, 12:52] = 1
    images = torch.randn(6, 1, 64, 64, generator=generator) * masks  # z-scored brain, background 0
    brain = images[masks > 0].numpy()
    low, high = display_window(images, masks)
    assert (low, high) == pytest.approx(tuple(np.percentile(brain, [0.5, 99.5])), rel=1e-3)
    assert np.mean((brain < 0) | (brain > 1)) > 0.6, "a [0, 1] window clips two thirds of a z-scored brain"
    assert display_window(images) != pytest.approx((low, high), rel=1e-3), "the background counts without masks"
    windows = []
    real = matplotlib.axes.Axes.imshow

    def recording(self, *args, **kwargs):
        windows.append((kwargs["vmin"], kwargs["vmax"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording)
    slices = [{"image": image, "brainmask": mask} for image, mask in zip(images, masks)]
    figure = ReconstructionFigure(tmp_path / "r.png", CeVAE(z_dim=8, channels=(4, 8, 8, 8)), slices)
    engine = Engine(lambda *_: None)
    engine.state.epoch = 1
    figure(engine)
    picked = torch.linspace(0, 5, 4).round().long().unique()
    expected = display_window(images[picked], masks[picked])
    assert len(windows) == 16 and all(w == pytest.approx(expected) for w in windows)
