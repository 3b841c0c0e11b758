"""The main job on the embedded demo data: build the data set if needed, train ceVAE and the VAE baseline
through the bundle, evaluate both on the demo test subjects and print the comparison.

    python scripts/demo.py --data-dir demo_data --output-dir runs/demo --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.data.demo import make_demo_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bundles" / "cevae" / "configs"
VARIANTS = {"cevae": [], "vae": ["vae.json"]}
ROWS = [("slice AUROC (ELBO)", "slice_auroc", "elbo"), ("pixel AUROC rec", "pixel_auroc", "rec"),
        ("pixel AUROC kl_grad", "pixel_auroc", "kl_grad"), ("pixel AUROC combined", "pixel_auroc", "combined"),
        ("pixel AUROC intensity", "pixel_auroc", "intensity"), ("pixel AUPRC combined", "pixel_auprc", "combined"),
        ("Dice (20/80 split) combined", "dice_split", "combined"), ("best Dice combined", "dice_best", "combined")]


def bundle(run_id: str, files: list[str], **overrides: object) -> None:
    configs = str([str(CONFIGS / f) for f in files])
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def value(metrics: dict, config: str, key: str, score: str) -> float:
    entry = metrics[config][key][score]
    return entry["dice"] if isinstance(entry, dict) else entry


def table(results: dict[str, dict]) -> str:
    configs = ("paper", "postprocessed")
    header = "| metric | " + " | ".join(f"{v} ({c})" for c in configs for v in results) + " |"
    lines = [header, "|---" * (1 + len(configs) * len(results)) + "|"]
    for label, key, score in ROWS:
        cells = [f"{value(results[v], c, key, score):.3f}" for c in configs for v in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, key in (("KL 0.95-quantile", "kl_q95"), ("active latent units", "active_units")):
        cells = [f"{results[v][key]:.2f}" if isinstance(results[v][key], float) else str(results[v][key])
                 for _ in configs for v in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="demo_data", help="demo data folder (built if it has no datalist)")
    parser.add_argument("--output-dir", default="runs/demo", help="one sub-folder per variant")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per variant (paper: 60)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    datalist = Path(args.data_dir).resolve() / "datalist.json"
    if not datalist.is_file():
        start = time.perf_counter()
        make_demo_dataset(args.data_dir, seed=args.seed)
        print(f"built the demo data in {args.data_dir} ({time.perf_counter() - start:.1f} s)")
    results = {}
    for variant, overlay in VARIANTS.items():
        out = Path(args.output_dir).resolve() / variant
        settings = {"datalist": datalist, "output_dir": out, "epochs": args.epochs, "seed": args.seed,
                    "progress_bar": False}
        start = time.perf_counter()
        bundle("training", ["train.json", *overlay], **settings)
        bundle("evaluating", ["train.json", *overlay, "evaluate.json"], **settings)
        results[variant] = json.loads((out / "metrics.json").read_text())
        print(f"{variant}: trained and evaluated in {time.perf_counter() - start:.0f} s -> {out}")
    print(f"\nVAE vs ceVAE on the demo test subjects ({args.epochs} epochs, seed {args.seed}):\n")
    print(table(results))
    print(f"\nMLflow: mlflow ui --backend-store-uri sqlite:///{Path(args.output_dir).resolve()}/<variant>/mlruns.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
