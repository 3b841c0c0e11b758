"""The main job on the embedded demo data: build the data set (if needed), then run the pipeline on it.

    python scripts/demo.py --data-dir demo_data
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline.data.datalist import load_datalist
from pipeline.data.demo import make_demo_dataset
from pipeline.data.preprocessing import brain_volume_transform
from pipeline.data.slices import BrainSliceDataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="demo_data", help="demo data folder (built if it has no datalist)")
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    args = parser.parse_args(argv)
    datalist = Path(args.data_dir) / "datalist.json"
    if not datalist.is_file():
        start = time.perf_counter()
        make_demo_dataset(args.data_dir, args.n_train, args.n_test, args.seed)
        print(f"built the demo data in {args.data_dir} ({time.perf_counter() - start:.1f} s)")
    chain = brain_volume_transform(image_size=args.image_size)
    for key in ("training", "test"):
        start = time.perf_counter()
        slices = BrainSliceDataset(load_datalist(datalist, key), chain, progress=False)
        subjects = int(slices.subject.max()) + 1
        print(f"{key}: {subjects} subjects, {len(slices)} brain slices of {args.image_size}x{args.image_size} "
              f"({len(slices) / subjects:.1f} per subject), preprocessed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
