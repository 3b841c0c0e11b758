"""Write the embedded demo data set (synthetic T2 brains from nilearn's MNI152 template) and its datalist.

python scripts/make_demo_data.py --out demo_data --n-train 16 --n-test 8 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time

from pipeline.data.demo import make_demo_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n-train", type=int, default=16, help="healthy training subjects (default 16)")
    parser.add_argument("--n-test", type=int, default=8, help="test subjects with lesions (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (default 2)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = make_demo_dataset(args.out, args.n_train, args.n_test, args.seed, args.spacing)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.n_train} training and {args.n_test} test subjects, datalist {path} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
