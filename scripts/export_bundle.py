"""Build a self-contained MONAI bundle zip: the `pipeline` code is copied into the bundle's own `scripts` package
and the configs point there, so the zip runs without this repository (only its metadata's packages installed).

    python scripts/export_bundle.py --out cevae_bundle.zip [--checkpoint runs/demo/cevae/checkpoints/model.pt]
        [--weights-url https://host/cevae/model.pt] [--evaluation NAME=EVAL_OUTPUT_DIR ...]

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

``configs/metadata.json``'s ``eval_metrics`` are the checkpoint's own figures (``pipeline.eval_metrics``): the
healthy ones from its ``threshold.json`` and, for each ``--evaluation NAME=DIR``, those of the ``run evaluating``
that wrote ``DIR/metrics.json``, prefixed ``NAME_`` (an evaluation of other weights is refused); the description's
sentence on the weights names the checkpoint's training settings. Without ``--checkpoint`` the bundle ships no weights
and no ``eval_metrics``.

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
    parser.add_argument(
        "--evaluation",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an evaluation of --checkpoint (run evaluating's --eval_output_dir) whose figures go into eval_metrics",
    )
    args = parser.parse_args(argv)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    for flag, given in (("--weights-url", args.weights_url), ("--evaluation", args.evaluation)):
        if given and args.checkpoint is None:
            print(f"error: {flag} needs --checkpoint (the weights it describes)", file=sys.stderr)
            return 2
    pairs = [item.partition("=")[::2] for item in args.evaluation]
    evaluations = dict(pairs)
    if len(evaluations) != len(pairs) or not all(name and where for name, where in pairs):
        print(
            "error: --evaluation takes NAME=DIR, each NAME once (e.g. brats2013_t1c=runs/r/brats2013_t1c)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    try:
        make_output_folder(out.parent, "--out folder")
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:  # staged beside the zip
            root = build(Path(tmp), args.checkpoint, args.weights_url, evaluations)
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
