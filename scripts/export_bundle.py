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

and ``configs/train.json`` builds the trained network by default (its architecture settings are the training's), so
``monai.bundle.load`` with MONAI's default workflow type and fine-tuning from ``models/model.pt`` get that network.

``large_files.yml`` gets the MD5 of ``model.pt`` and, with ``--weights-url``, the URL it will be served from: a
Model Zoo pull request carries no weights, its CI downloads them from there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import WriteError, atomic_path, make_output_folder
from pipeline.release import build


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
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:  # staged beside the zip
            root = build(Path(tmp), args.checkpoint, args.weights_url)
            with atomic_path(out) as partial, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(root.rglob("*")):
                    if path.is_file() and "__pycache__" not in path.parts:
                        archive.write(path, path.relative_to(root.parent))
    except (InputError, WriteError) as err:  # their messages name the file and the fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # full or read-only disk while staging: the bundle is staged in the --out folder
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"error: cannot write the bundle {out}{where}: {err.strerror or err}; free space in {out.parent} "
            "or choose another --out",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
