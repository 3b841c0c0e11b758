"""The self-contained MONAI bundle of a trained model (``scripts/export_bundle.py`` is its command line): the
``pipeline`` code copied into the bundle's own ``scripts`` package with the configs pointing there, and with a
checkpoint, ``models/{model.pt, config.json, threshold.json, model.ts}`` and the weights' URL and MD5 in
``large_files.yml`` (the command line's docstring says what each holds). Not copied into the bundle itself."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import isort
import matplotlib
import torch

from pipeline.data.transforms import VALUE_RANGES
from pipeline.errors import read_json
from pipeline.eval_metrics import eval_metrics
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.networks.cevae import ARCHITECTURE_KEYS
from pipeline.run_record import EXECUTED_CONFIG, training_config
from pipeline.thresholds import THRESHOLD_FILENAME, checkpoint_sha256, read_thresholds, threshold_path
from pipeline.tracking import RUN_INFO_FILENAME, curve_key
from pipeline.weights import split_trained

__all__ = [
    "ZOO_NAME",
    "build",
    "describe_weights",
    "export_torchscript",
    "export_training_curves",
    "export_weights",
    "ship_architecture",
    "ship_model_card",
]

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cevae"
# the exported bundle's name (its folder, ``models/<name>/`` of a Model Zoo pull request, and what ``monai.bundle
# download --name`` and ``load(name=...)`` take): method, data and task, as the Zoo asks (its CONTRIBUTING.md:
# "spleen_ct_segmentation", "swin_unetr_btcv_segmentation"); metadata.json's "name" is the display name
ZOO_NAME = "cevae_brain_mri_anomaly_detection"
LIBRARY = REPO / "pipeline"
# tools of this repository, not part of the model
NOT_SHIPPED = ("benchmarks", "experiments", "release.py", "eval_metrics.py")
# the description's sentence on the weights in models/, which an export replaces (describe_weights)
WEIGHTS_SENTENCE = re.compile(r"The shipped weights: .*?\.(?= eval_metrics are)")
CURVES = "training_curves.png"  # in the bundle's docs/: the shipped weights' training curves (its README shows it)
# `pipeline.x` / `import pipeline` / `from pipeline` -> the bundle's own `scripts` package
PACKAGE_REFERENCE = re.compile(r"\bpipeline(?=[.\s])")


# The Model Zoo's import order (its setup.cfg: isort profile black, line length 120, first party `models`). In a Zoo
# checkout the bundle's `scripts` package is not found from the checkout's root, so isort files it among the
# third-party imports; said explicitly here so the export does not depend on where isort would look.
ZOO_IMPORT_ORDER = isort.Config(
    profile="black", line_length=120, known_first_party=["models"], known_third_party=["scripts"]
)


def _rewrite(text: str) -> str:
    return PACKAGE_REFERENCE.sub("scripts", text)


def _rewrite_code(text: str) -> str:
    """A module of ``pipeline`` as the bundle's ``scripts`` module, its imports in the Zoo's order."""
    return isort.code(_rewrite(text), config=ZOO_IMPORT_ORDER)


def export_weights(checkpoint: Path, models: Path) -> None:
    """Write ``models/{model.pt, config.json, threshold.json}`` from a training checkpoint (see the docstring)."""
    weights, sigma = split_trained(checkpoint)
    torch.save(weights, models / "model.pt")
    config = training_config(checkpoint)
    if sigma is not None and config.get("sigma", "calibrated") == "calibrated":
        config["sigma"] = sigma
    config["exported_from"] = {
        "checkpoint_sha256": checkpoint_sha256(checkpoint),
        "sigma": "the likelihood sigma of the checkpoint's loss state" if sigma is not None else "as trained",
    }
    atomic_write_json(config, models / EXECUTED_CONFIG)
    if threshold_path(checkpoint).is_file():
        thresholds = read_thresholds(checkpoint)  # refuses thresholds computed for other weights
        thresholds["checkpoint_sha256"] = checkpoint_sha256(models / "model.pt")
        atomic_write_json(thresholds, models / THRESHOLD_FILENAME)


def ship_architecture(checkpoint: Path, configs: Path) -> None:
    """Make the network that the bundle's ``configs/train.json`` builds by default the trained one (what
    ``monai.bundle.load`` with MONAI's default workflow type and fine-tuning from ``models/model.pt`` build), and
    ``metadata.json``'s ``network_data_format`` its input and output: the side ``image_size``, for a 2.5D
    network ``1 + 2 * context_slices`` channels (the Zoo's ``verify_net_in_out`` feeds the network that shape), and
    the value range of the trained intensity normalisation (:data:`pipeline.data.transforms.VALUE_RANGES`)."""
    trained = training_config(checkpoint)
    config = json.loads((configs / "train.json").read_text())
    config.update({key: trained[key] for key in ARCHITECTURE_KEYS if key in trained})
    atomic_write_text(json.dumps(config, indent=4) + "\n", configs / "train.json")
    metadata = json.loads((configs / "metadata.json").read_text())
    k = int(config.get("context_slices", 0))
    value_range = VALUE_RANGES[trained.get("normalization", config["normalization"])]
    for name, what in (("inputs", "image"), ("outputs", "reconstruction")):
        for entry in metadata["network_data_format"][name].values():
            entry["spatial_shape"] = [config["image_size"]] * 2
            entry["value_range"] = value_range
            entry["num_channels"] = 1 + 2 * k
            entry["channel_def"] = {str(i + k): what if i == 0 else f"{what} of slice {i:+d}" for i in range(-k, k + 1)}
    atomic_write_text(json.dumps(metadata, indent=4) + "\n", configs / "metadata.json")


def ship_model_card(checkpoint: Path | None, configs: Path, evaluations: Mapping[str, Path] | None = None) -> None:
    """What ``metadata.json`` says of the weights in ``models/``: its ``eval_metrics`` are those of ``checkpoint``
    (:func:`pipeline.eval_metrics.eval_metrics`, from its ``threshold.json`` and the ``evaluations`` of it) and its
    description's sentence on the weights is :func:`describe_weights`; without a checkpoint (no weights) no figures.
    The checked-in figures and sentence describe the shipped weights only, never another model."""
    metadata = json.loads((configs / "metadata.json").read_text())
    metadata.pop("eval_metrics", None)
    if checkpoint is not None:
        metadata["eval_metrics"] = eval_metrics(checkpoint, evaluations)
        sentence = describe_weights(training_config(checkpoint))
        metadata["description"] = WEIGHTS_SENTENCE.sub(lambda _: sentence, metadata["description"], count=1)
    atomic_write_text(json.dumps(metadata, indent=4) + "\n", configs / "metadata.json")


def describe_weights(trained: dict) -> str:
    """The description's sentence on the weights in ``models/``, from their training's executed config."""
    weight = float(trained.get("ce_weight", 0.5))
    variant = "a plain VAE (ce_weight 0)" if weight == 0 else f"a ceVAE (ce_weight {weight:g})"
    datalist = "/".join(Path(str(trained.get("datalist", "a datalist"))).parts[-2:])
    size = trained.get("image_size", "?")
    return (
        f"The shipped weights: {variant} trained by this bundle on the healthy subjects of {datalist} (seed "
        f"{trained.get('seed', '?')}, up to {trained.get('epochs', '?')} epochs, the best validation ELBO kept), "
        f"{size}x{size} slices, {trained.get('normalization', '?')} intensities."
    )


def export_torchscript(root: Path) -> bool:
    """``models/model.ts`` through MONAI's own ``ckpt_export`` (in a fresh process, from the bundle folder, as the
    Zoo runs it); True if it was written and loads."""
    command = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts"]
    command += ["--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json"]
    command += ["--config_file", "configs/inference.json", "--bundle_root", "."]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    target = root / "models" / "model.ts"
    if done.returncode != 0 or not target.is_file():
        print(f"warning: no models/model.ts (ckpt_export failed: {done.stderr.strip()[-300:]})", file=sys.stderr)
        target.unlink(missing_ok=True)
        return False
    torch.jit.load(str(target))
    return True


def export_training_curves(checkpoint: Path, docs: Path) -> bool:
    """Draw ``docs/training_curves.png`` from the MLflow run that trained ``checkpoint`` (its ``mlflow_run.json``):
    the training loss and the validation negative ELBO per epoch, the kept epoch (the best validation ELBO, what
    ``model.pt`` holds) marked. Without a tracked run, or with its store out of reach, the figure is removed (it
    would show another training's curves) and ``False`` returned."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = docs / CURVES
    figure.unlink(missing_ok=True)
    info_path = checkpoint.parent / RUN_INFO_FILENAME
    if not info_path.is_file():
        return False
    info = read_json(info_path, "delete it to export without the training curves", "MLflow run record")
    try:
        client = MlflowClient(info["tracking_uri"])
        # runs logged before bundle 0.13.2 hold the curves without their section prefix
        history = {
            k: client.get_metric_history(info["run_id"], curve_key(k)) or client.get_metric_history(info["run_id"], k)
            for k in ("train_loss", "val_neg_elbo")
        }
    except (MlflowException, OSError):
        return False
    curves = {key: sorted((m.step, m.value) for m in metrics) for key, metrics in history.items()}
    if not all(curves.values()):
        return False
    kept = min(curves["val_neg_elbo"], key=lambda point: point[1])[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    titles = {"train_loss": "training loss (the ceVAE objective)", "val_neg_elbo": "validation negative ELBO"}
    for ax, (key, points) in zip(axes, curves.items()):
        ax.plot(*zip(*points), color="tab:blue" if key == "train_loss" else "tab:orange")
        ax.axvline(kept, color="grey", linestyle="--", label=f"kept: epoch {kept}")
        later = [value for _, value in points[len(points) // 10 :]]  # the scale of the plateau, not of epoch 1
        low, high = min(later), max(later)
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
        ax.set(title=f"{titles[key]}, y from epoch {points[len(points) // 10][0]}", xlabel="epoch")
        ax.legend()
    fig.suptitle(f"MLflow run {info['run_id']}")
    fig.tight_layout()
    fig.savefig(figure, dpi=90)
    plt.close(fig)
    return True


def build(
    out_dir: Path, checkpoint: Path | None = None, weights_url: str = "", evaluations: Mapping[str, Path] | None = None
) -> Path:
    """Write the self-contained bundle folder ``out_dir/<ZOO_NAME>`` and return it; ``evaluations``
    (``{name: run evaluating's output folder}``, of ``checkpoint``) go into ``eval_metrics``."""
    root = out_dir / ZOO_NAME
    shutil.copytree(
        BUNDLE, root, ignore=shutil.ignore_patterns("runs", "demo_data", "inference", "eval", "__pycache__")
    )
    for path in (root / "configs").glob("*.json"):
        path.write_text(_rewrite(path.read_text()))
    scripts = root / "scripts"
    for source in LIBRARY.rglob("*.py"):
        if source.relative_to(LIBRARY).parts[0] in NOT_SHIPPED:
            continue
        target = scripts / source.relative_to(LIBRARY)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_rewrite_code(source.read_text()))
    ship_model_card(checkpoint, root / "configs", evaluations)
    if checkpoint is not None:
        models = root / "models"
        models.mkdir(exist_ok=True)
        export_weights(checkpoint, models)
        ship_architecture(checkpoint, root / "configs")
        export_torchscript(root)
        export_training_curves(checkpoint, root / "docs")
        digest = hashlib.md5((models / "model.pt").read_bytes()).hexdigest()
        text = (root / "large_files.yml").read_text()
        text = re.sub(r'hash_val: ".*"', f'hash_val: "{digest}"', text, count=1)
        text = re.sub(r'url: ".*"', f"url: {json.dumps(weights_url)}", text, count=1)
        atomic_write_text(text, root / "large_files.yml")
    return root
