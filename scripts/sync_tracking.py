"""Send to MLflow what runs kept while the tracking server was unreachable.

    python scripts/sync_tracking.py OUTPUT_DIR [OUTPUT_DIR ...]

Training and evaluation keep every write they could not send (metrics, parameters, artifacts, run status) in a
``tracking_spool/`` folder of their output folder (``pipeline.tracking.spool``) and send it themselves when the
server answers again during the run; what is left when a run ends is sent by this command, in the order it was
logged, to the server each write was meant for. Exit status 0 when everything went through, 2 otherwise (nothing
is lost: run it again later).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of training or evaluation runs")
    args = parser.parse_args(argv)
    from pipeline.tracking import sync

    pending = 0
    for folder in args.folders:
        if not folder.is_dir():
            print(
                f"error: {folder} is not a folder; give the --output_dir of a training or evaluation run",
                file=sys.stderr,
            )
            return 2
        try:
            left = sync(folder)
        except Exception as err:  # a write the server rejects: say which, keep the spool
            print(f"error: {folder}: {err}", file=sys.stderr)
            return 2
        if not left:
            print(f"{folder}: nothing to send")
        for spool, count in left.items():
            print(f"{spool}: {'all sent' if count == 0 else f'{count} writes still pending (server unreachable)'}")
            pending += count
    return 0 if pending == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
