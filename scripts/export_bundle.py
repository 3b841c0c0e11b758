"""Build a self-contained MONAI bundle zip: the `pipeline` code is copied into the bundle's own `scripts` package
and the configs point there, so the zip runs without this repository (only its metadata's packages installed).

    python scripts/export_bundle.py --out cevae_bundle.zip [--checkpoint runs/demo/cevae/checkpoints/model.pt]

With ``--checkpoint`` the weights go into ``models/`` with the two files next to them that inference reads: the
training's executed ``config.json`` (network, preprocessing and likelihood settings) and ``threshold.json`` (the
healthy-data thresholds, bound to the weights by their hash); the weights' hash goes into ``large_files.yml``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.thresholds import read_thresholds, threshold_path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "cevae"
LIBRARY = REPO / "pipeline"
# `pipeline.x` / `import pipeline` / `from pipeline` -> the bundle's own `scripts` package
PACKAGE_REFERENCE = re.compile(r"\bpipeline(?=[.\s])")


def _rewrite(text: str) -> str:
    return PACKAGE_REFERENCE.sub("scripts", text)


def build(out_dir: Path, checkpoint: Path | None = None) -> Path:
    """Write the self-contained bundle folder ``out_dir/cevae`` and return it."""
    root = out_dir / "cevae"
    shutil.copytree(
        BUNDLE, root, ignore=shutil.ignore_patterns("runs", "demo_data", "inference", "eval", "__pycache__")
    )
    for path in (root / "configs").glob("*.json"):
        path.write_text(_rewrite(path.read_text()))
    scripts = root / "scripts"
    for source in LIBRARY.rglob("*.py"):
        target = scripts / source.relative_to(LIBRARY)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_rewrite(source.read_text()))
    if checkpoint is not None:
        models = root / "models"
        models.mkdir(exist_ok=True)
        shutil.copy(checkpoint, models / "model.pt")
        if threshold_path(checkpoint).is_file():
            read_thresholds(checkpoint)  # refuses thresholds computed for other weights
        for name in ("config.json", "threshold.json"):
            if (checkpoint.parent / name).is_file():
                shutil.copy(checkpoint.parent / name, models / name)
        digest = hashlib.md5((models / "model.pt").read_bytes()).hexdigest()
        text = (root / "large_files.yml").read_text()
        (root / "large_files.yml").write_text(re.sub(r'hash_val: ".*"', f'hash_val: "{digest}"', text, count=1))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="zip file to write")
    parser.add_argument("--checkpoint", type=Path, default=None, help="model.pt to ship in models/")
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    from pipeline.data.validation import InputError

    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            root = build(Path(tmp), args.checkpoint)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        partial = out.with_name(f".{out.name}.tmp")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(root.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(root.parent))
        partial.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
