"""Write a datalist JSON for a public data set's folder layout.

    python scripts/prepare_datalist.py --layout brats2017 --root /data/BraTS2017 --out datalist.json --modality T2

The entries go under the layout's role (``training`` for healthy sets, ``test`` for labelled ones) unless
``--key`` says otherwise; other keys already in ``--out`` are kept, so one file can hold a healthy training list
and a test list, and ``--append`` adds to a key's entries (e.g. two test sets in one list; a subject already
listed gets its id suffixed with the modality, e.g. ``patient01_FLAIR``). Paths are written relative to the
datalist's folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.data.datalist import write_datalist
from pipeline.data.preparers import LAYOUTS, prepare_entries
from pipeline.errors import InputError
from pipeline.io import make_output_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", required=True, choices=sorted(LAYOUTS))
    parser.add_argument("--root", required=True, help="top folder of the data set")
    parser.add_argument("--out", required=True, help="datalist JSON to write or update")
    parser.add_argument("--modality", default=None, help="sequence: T2, FLAIR, T1, T1c, ... (layout default)")
    parser.add_argument("--key", default=None, help="datalist key (default: 'training' or 'test' by layout)")
    parser.add_argument("--append", action="store_true", help="add to the key's entries instead of replacing them")
    parser.add_argument(
        "--skip-incomplete",
        action="store_true",
        help="leave out images without a mask/label (warned) instead of failing",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = Path(args.out)
    try:
        make_output_folder(out.parent, "--out folder")  # before scanning the data set
        entries = prepare_entries(args.layout, args.root, args.modality, args.skip_incomplete)
        datalist = json.loads(out.read_text()) if out.is_file() else {}
        base = out.resolve().parent
        for old in datalist.values():  # keep other keys' relative paths valid against the same folder
            for entry in old:
                for k in ("image", "brainmask", "label"):
                    if entry.get(k) is not None:
                        entry[k] = str(base / entry[k])
        key = args.key or LAYOUTS[args.layout].role
        kept = datalist.get(key, []) if args.append else []
        taken = {entry.get("subject") for entry in kept}
        modality = (args.modality or LAYOUTS[args.layout].default_modality).upper()
        for entry in entries:  # e.g. a second sequence of the same subjects: its outputs need their own names
            if entry["subject"] in taken:
                entry["subject"] = f"{entry['subject']}_{modality}"
        datalist[key] = kept + entries
        write_datalist(datalist, out)
    except (InputError, OSError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(entries)} '{key}' entries ({args.layout}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
