#!/usr/bin/env python3
"""Run `qrloss bench` over the configurations of docs/performance.md and
print the tables as Markdown.

Every row is one `qrloss bench` run, which times the kernel and a
STREAM-style triad floor in the same process (median of --repeat runs), so
each ratio comes from a single run on a single machine state.

Example:
    /usr/bin/python3 bench/report.py --qrloss build-bench/qrloss --repeat 7
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys

MAIN_SHAPES = ("16,6,512,512", "8,5,256,256")
CLASS_COUNTS = (2, 4, 8, 16, 32, 64)
IMAGE_SIDES = (64, 256, 1024, 2048)


def parse_repeat(text):
    """Returns --repeat as an int, or raises for a value that qrloss bench
    would reject after the earlier configurations had run."""
    try:
        repeat = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer, got {text!r}") from None
    if not 1 <= repeat <= 10000:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 1 to 10000, got {repeat}")
    return repeat


def run_bench(qrloss, loss, from_logits, shape, dtype, threads, repeat):
    """Runs one `qrloss bench` and returns its JSON object."""
    command = [str(qrloss), "bench", "--loss", loss, "--shape", shape,
               "--dtype", dtype, "--threads", str(threads),
               "--repeat", str(repeat)]
    if from_logits:
        command.append("--from-logits")
    result = subprocess.run(command, check=True, capture_output=True,
                            text=True)
    return json.loads(result.stdout)


def elements(shape):
    count = 1
    for extent in shape.split(","):
        count *= int(extent)
    return count


def main_table(args):
    print("| loss | input | dtype | shape | threads | median ms | floor ms "
          "| ratio_to_floor | GB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for shape in MAIN_SHAPES:
        for loss in ("qr", "rq"):
            for from_logits in (False, True):
                for dtype in ("float32", "float64"):
                    r = run_bench(args.qrloss, loss, from_logits, shape,
                                  dtype, 0, args.repeat)
                    print(f"| {loss} | {r['input']} | {dtype} | {shape} "
                          f"| {r['threads']} | {r['median_s'] * 1e3:.1f} "
                          f"| {r['floor_s'] * 1e3:.1f} "
                          f"| {r['ratio_to_floor']:.2f} "
                          f"| {r['gbytes_per_s']:.1f} |")


def scaling_tables(args):
    print("\nCost per element against C (float32, shape 4,C,256,256, all "
          "threads):\n")
    print("| loss | input | C | ns per element | ratio_to_floor |")
    print("| --- | --- | --- | --- | --- |")
    for loss in ("qr", "rq"):
        for from_logits in (False, True):
            for classes in CLASS_COUNTS:
                shape = f"4,{classes},256,256"
                r = run_bench(args.qrloss, loss, from_logits, shape,
                              "float32", 0, args.repeat)
                ns = r["median_s"] / elements(shape) * 1e9
                print(f"| {loss} | {r['input']} | {classes} | {ns:.3f} "
                      f"| {r['ratio_to_floor']:.2f} |")

    print("\nCost per element against image size (float32, shape "
          "1,6,S,S, all threads):\n")
    print("| loss | input | S | ns per element | ratio_to_floor |")
    print("| --- | --- | --- | --- | --- |")
    for loss in ("qr", "rq"):
        for from_logits in (False, True):
            for side in IMAGE_SIDES:
                shape = f"1,6,{side},{side}"
                r = run_bench(args.qrloss, loss, from_logits, shape,
                              "float32", 0, args.repeat)
                ns = r["median_s"] / elements(shape) * 1e9
                print(f"| {loss} | {r['input']} | {side} | {ns:.3f} "
                      f"| {r['ratio_to_floor']:.2f} |")

    print("\nThread scaling (float32, 16,6,512,512):\n")
    print("| loss | input | 1 thread ms | all threads ms | threads "
          "| speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for loss in ("qr", "rq"):
        for from_logits in (False, True):
            one = run_bench(args.qrloss, loss, from_logits, MAIN_SHAPES[0],
                            "float32", 1, args.repeat)
            full = run_bench(args.qrloss, loss, from_logits, MAIN_SHAPES[0],
                             "float32", 0, args.repeat)
            print(f"| {loss} | {one['input']} | {one['median_s'] * 1e3:.1f} "
                  f"| {full['median_s'] * 1e3:.1f} | {full['threads']} "
                  f"| {one['median_s'] / full['median_s']:.2f} |")


def main():
    # The docstring's first paragraph, joined into one line.
    parser = argparse.ArgumentParser(
        description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--qrloss", type=pathlib.Path,
                        default=pathlib.Path("build-bench/qrloss"),
                        help="path of the qrloss binary (default: "
                             "build-bench/qrloss)")
    parser.add_argument("--repeat", type=parse_repeat, default=7,
                        help="timed runs per configuration, 1 to 10000 (the "
                             "limits of qrloss bench); the median is "
                             "reported (default: 7)")
    parser.add_argument("--only-main", action="store_true",
                        help="print only the main table")
    args = parser.parse_args()
    if not (args.qrloss.is_file() and os.access(args.qrloss, os.X_OK)):
        print(f"report.py: error: --qrloss: no executable file at "
              f"{args.qrloss}; build it with meson setup build-bench "
              "-Dbenchmarks=true -Dtests=false && ninja -C build-bench",
              file=sys.stderr)
        sys.exit(2)
    main_table(args)
    if not args.only_main:
        scaling_tables(args)


if __name__ == "__main__":
    main()
