"""`python -m bench [NAME ...] [--quick]` runs the named benchmarks (default: all) and writes bench/results/.

glibc's malloc moves its mmap threshold as large blocks are freed, so the same forward pass can run 20 % slower or
faster depending on what was allocated before — larger than the effects we measure. Unless told otherwise the
benchmarks re-run themselves with the threshold pinned (all large blocks from the heap), which is also the fastest
setting for CPU training and inference; the setting is recorded with the results.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

BENCHMARKS = ["lora_overhead", "train_speed", "methods", "merge", "serve"]
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 34), "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    parser.add_argument("--no-malloc-pinning", action="store_true", help="keep glibc's adaptive mmap threshold")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if not args.no_malloc_pinning and any(os.environ.get(k) != v for k, v in PINNED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, "-m", "bench", *sys.argv[1:]], {**os.environ, **PINNED_MALLOC})
    for name in args.names or BENCHMARKS:
        importlib.import_module(f"bench.{name}").run(quick=args.quick)


if __name__ == "__main__":
    main()
