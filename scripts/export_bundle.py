"""Build a self-contained MONAI bundle zip: the `pipeline` code is copied into the bundle's own `scripts` package
and the configs point there, so the zip runs without this repository (only its metadata's packages installed).

    python scripts/export_bundle.py --out cevae_bundle.zip [--checkpoint runs/demo/cevae/checkpoints/model.pt]
        [--weights-url https://host/cevae/model.pt]

With ``--checkpoint`` the bundle gets, in ``models/``:

* ``model.pt``: the network's **plain state dict** (what MONAI's ``ckpt_export``, ``monai.bundle.load`` and the
  Model Zoo's CI read without ``key_in_ckpt``); training's own checkpoints keep their ``{"model", "loss"}`` format;
* ``config.json``: the training's executed config (network, preprocessing and likelihood settings), with the
  likelihood ``sigma`` that training calibrated written in as a number (it travelled in the checkpoint's ``loss``);
* ``threshold.json``: the healthy-data thresholds, checked against the training checkpoint and bound to the
  exported weights' SHA-256;
* ``model.ts``: the TorchScript module of ``network_def`` (``monai.bundle ckpt_export``), when it exports and loads.

``large_files.yml`` gets the MD5 of ``model.pt`` and, with ``--weights-url``, the URL it will be served from: a
Model Zoo pull request carries no weights, its CI downloads them from there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from pipeline.data.validation import InputError
from pipeline.engines.checkpoint import split_trained
from pipeline.io import atomic_path, atomic_write_json, atomic_write_text, make_output_folder
from pipeline.run_record import EXECUTED_CONFIG, training_config
from pipeline.thresholds import THRESHOLD_FILENAME, checkpoint_sha256, read_thresholds, threshold_path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cevae"
LIBRARY = REPO / "pipeline"
NOT_SHIPPED = ("benchmarks", "experiments")  # run this repository's bundle configs; not part of the model
# `pipeline.x` / `import pipeline` / `from pipeline` -> the bundle's own `scripts` package
PACKAGE_REFERENCE = re.compile(r"\bpipeline(?=[.\s])")


def _rewrite(text: str) -> str:
    return PACKAGE_REFERENCE.sub("scripts", text)


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


def build(out_dir: Path, checkpoint: Path | None = None, weights_url: str = "") -> Path:
    """Write the self-contained bundle folder ``out_dir/cevae`` and return it."""
    root = out_dir / "cevae"
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
        target.write_text(_rewrite(source.read_text()))
    if checkpoint is not None:
        models = root / "models"
        models.mkdir(exist_ok=True)
        export_weights(checkpoint, models)
        export_torchscript(root)
        digest = hashlib.md5((models / "model.pt").read_bytes()).hexdigest()
        text = (root / "large_files.yml").read_text()
        text = re.sub(r'hash_val: ".*"', f'hash_val: "{digest}"', text, count=1)
        text = re.sub(r'url: ".*"', f"url: {json.dumps(weights_url)}", text, count=1)
        atomic_write_text(text, root / "large_files.yml")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="zip file to write (its folder is created if missing)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model.pt of a training run to ship")
    parser.add_argument("--weights-url", default="", help="URL that will serve models/model.pt (large_files.yml)")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    if args.weights_url and args.checkpoint is None:
        print("error: --weights-url needs --checkpoint (the weights it serves)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        make_output_folder(out.parent, "--out folder")
        with tempfile.TemporaryDirectory() as tmp:
            root = build(Path(tmp), args.checkpoint, args.weights_url)
            with atomic_path(out) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(root.rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        archive.write(path, path.relative_to(root.parent))
    except (InputError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
