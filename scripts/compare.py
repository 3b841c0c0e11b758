"""VAE vs ceVAE (or any sweep of the CE weight) over seeds, trained and evaluated through the bundle, compared
from MLflow.

    python scripts/compare.py --seeds 0 1 2 --epochs 15 --output-dir runs/compare       # embedded demo data
    python scripts/compare.py --datalist-train T.json --datalist-test E.json [E2.json ...] --seeds 0 1 2 \\
        --paper --output-dir O --experiment ixi-t1                                         # real data, 60 epochs
    python scripts/compare.py --from-mlflow latest --output-dir O [--tracking-uri URI]     # tables only
    python scripts/compare.py --resume --output-dir O                                      # after a kill or a failure

Every (CE weight, seed) pair is one child run, nested under one parent run: ``python -m monai.bundle run training``
then ``run evaluating`` once per test set, as subprocesses (exactly the commands a user types; their logs go to
``O/runs/<child>/*.log``). The comparison is then read back from MLflow (``MlflowClient.search_runs`` on the
parent's children), so it can be rebuilt later or on another machine that sees the same tracking server:

* ``O/comparison.md`` and ``O/comparison.csv``: mean ± std over seeds of every evaluation metric, per variant, test
  set, option set and score (the CSV in long form, with every seed's value);
* ``O/roc.png``: pixel ROC curves of each variant's best seed (by ``--primary``), per test set and option set;
* ``O/bars.png``: headline metrics per variant, bars at the mean and one dot per seed.

The four files are logged to the parent run (artifact folder ``comparison``). Tracking goes to ``--tracking-uri``,
else ``MLFLOW_TRACKING_URI``, else ``sqlite:///O/mlruns.db``. ``O`` is locked for the comparison's life; a folder
that holds another comparison is refused unless ``--resume`` (continue it with its recorded settings: finished
children are reused, a killed training resumes from its last checkpoint) or ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.experiments.comparison import NO_OVERLAY
from pipeline.experiments.sweep import DEMO_EPOCHS, PAPER_EPOCHS, compare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--datalist-train", help="datalist with a 'training' list (default: the demo data)")
    add("--datalist-test", nargs="+", help="datalists with a 'test' list (default: --datalist-train)")
    add("--test-names", nargs="+", help="MLflow names of the test sets (default: 'eval', or the file names)")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--ce-weights", nargs="+", type=float, default=[0.0, 0.5], help="λ per variant (0 = VAE)")
    add(
        "--overlays",
        nargs="+",
        default=[NO_OVERLAY],
        metavar="NAME",
        help="bundle config overlays to compare, "
        f"each configs/NAME.json added after train.json (e.g. legacy_likelihood); {NO_OVERLAY!r} = the defaults",
    )
    add("--epochs", type=int, help=f"training epochs (default {DEMO_EPOCHS}, {PAPER_EPOCHS} with --paper)")
    add("--paper", action="store_true", help="the paper's 60 epochs (the defaults are its network and settings)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="bundle override for every run (repeatable)")
    add("--output-dir", default="runs/compare")
    add("--demo-dir", default="demo_data", help="demo data folder (built if missing)")
    add("--experiment", default="cevae-compare", help="MLflow experiment")
    add("--run-name", help="name of the parent run (default: compare-<time>)")
    add("--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI, else sqlite:///<output-dir>/mlruns.db)")
    add("--from-mlflow", metavar="RUN_ID", help="no training: rebuild the comparison of this parent run ('latest')")
    add(
        "--resume",
        action="store_true",
        help="continue the comparison that --output-dir holds, with its recorded "
        "settings: finished children are reused, a killed training resumes from its last checkpoint",
    )
    add("--overwrite", action="store_true", help="replace the comparison that --output-dir holds")
    add("--primary", default="postprocessed/pixel_auroc/combined", help="metric that picks the best seed for roc.png")
    args = parser.parse_args(argv)
    try:
        comparison, files, parent, uri = compare(args)
    except (OSError, ValueError, LookupError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(comparison.markdown().split("## every metric")[0])
    print("wrote " + ", ".join(str(f) for f in files) + f"\nMLflow: parent run {parent} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
