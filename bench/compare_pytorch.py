#!/usr/bin/env python3
"""Time a plain PyTorch transcription of the QR and RQ losses against qrloss.

For every combination of loss (qr, rq), path (probs, logits) and dtype
(float32, float64), the script times one forward and backward pass of its own
PyTorch transcription on the CPU. The logits path applies softmax over the
class axis inside the timed region. It then runs
`qrloss bench --loss L [--from-logits] --shape S --dtype D --threads N
--repeat R` with the same settings and prints one JSON line per combination,
with torch_median_s, qrloss_median_s and speedup = torch / qrloss.

The transcription follows the losses of Rolf et al., "Resolving label
uncertainty with implicit generative models" (ICLR 2022), with the eps rules
of torchgeo 0.8 and the L1 norms written as plain sums:
    QR: qbar_c = mean over pixels of q_c
        L = sum_c qbar_c log(qbar_c + eps) - mean over pixels of sum_c q_c log(p_c + eps)
    RQ: s_c = max(sum over pixels of q_c, eps)
        r = (q p / s_c) / max(sum_c q p / s_c, 1e-12) per pixel
        L = mean over pixels of sum_c r_c (log(r_c + eps) - log(q_c + eps))

Without torch the script prints a message and exits with status 0. Without
the qrloss binary it prints the torch timings only.

Example:
    /usr/bin/python3 bench/compare_pytorch.py --shape 16,6,512,512 --threads 16
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

try:
    import torch
except ImportError as torch_import_error:
    torch = None
    TORCH_IMPORT_ERROR = torch_import_error

PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_QRLOSS_CANDIDATES = (
    PROJECT_ROOT / "build-bench" / "qrloss",
    PROJECT_ROOT / "build" / "qrloss",
)
DEFAULT_SHAPE = "16,6,512,512"
DEFAULT_EPS = 1e-8
MIN_REPEAT = 5
# The limits of `qrloss bench`, checked here before PyTorch is timed.
MAX_REPEAT = 10000
MAX_THREADS = 4096

# RQ clamps each pixel's sum of q * p / s_c to at least this value.
PIXEL_SUM_FLOOR = 1e-12

# The logits are standard normal times this scale, which spreads the softmax
# outputs over several orders of magnitude.
LOGIT_SCALE = 2.0

LOSSES = ("qr", "rq")
PATHS = ("probs", "logits")
DTYPES = ("float32", "float64")


def pixel_dims(tensor):
    """Return the pixel axes (b, h, w) of a (B, C) or (B, C, H, W) tensor."""
    return (0,) + tuple(range(2, tensor.dim()))


def qr_loss(q, p, eps):
    n_pixels = q.numel() // q.shape[1]
    qbar = q.sum(dim=pixel_dims(q)) / n_pixels
    return (qbar * torch.log(qbar + eps)).sum() - (q * torch.log(p + eps)).sum() / n_pixels


def rq_loss(q, p, eps):
    n_pixels = q.numel() // q.shape[1]
    class_sum = q.sum(dim=pixel_dims(q), keepdim=True).clamp_min(eps)
    u = q * p / class_sum
    r = u / u.sum(dim=1, keepdim=True).clamp_min(PIXEL_SUM_FLOOR)
    return (r * (torch.log(r + eps) - torch.log(q + eps))).sum() / n_pixels


LOSS_FUNCTIONS = {"qr": qr_loss, "rq": rq_loss}


def make_inputs(shape, dtype, seed):
    """Return (logits, probs, target) with probs = softmax(logits) over C."""
    generator = torch.Generator().manual_seed(seed)
    logits = LOGIT_SCALE * torch.randn(shape, generator=generator, dtype=torch.float64)
    target = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.05
    target = target / target.sum(dim=1, keepdim=True)
    torch_dtype = getattr(torch, dtype)
    probs = torch.softmax(logits, dim=1)
    return logits.to(torch_dtype), probs.to(torch_dtype), target.to(torch_dtype)


def time_torch(loss, path, inputs, eps, repeat):
    """Return the median seconds of `repeat` forward and backward passes.

    One untimed pass runs first, so allocator warm-up is not counted.
    """
    logits, probs, target = inputs
    function = LOSS_FUNCTIONS[loss]
    base = logits if path == "logits" else probs
    durations = []
    for run in range(repeat + 1):
        start = time.perf_counter()
        leaf = base.detach().requires_grad_(True)
        q = torch.softmax(leaf, dim=1) if path == "logits" else leaf
        value = function(q, target, eps)
        value.backward()
        elapsed = time.perf_counter() - start
        if run > 0:
            durations.append(elapsed)
    return statistics.median(durations)


def run_qrloss(binary, loss, path, shape, dtype, threads, repeat):
    """Run `qrloss bench` once and return its JSON object.

    Raises RuntimeError with the command and its output when it fails or
    prints no JSON object.
    """
    # NOTE: the speedup is only fair if `qrloss bench` times the loss together
    # with its gradient, as time_torch does. This script cannot check that.
    command = [str(binary), "bench", "--loss", loss]
    if path == "logits":
        command.append("--from-logits")
    command += ["--shape", ",".join(str(extent) for extent in shape), "--dtype", dtype,
                "--threads", str(threads), "--repeat", str(repeat)]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:  # an executable file that is not a program
        raise RuntimeError(f"{binary} cannot be run: {error}") from None
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed with exit status "
                           f"{completed.returncode}: {completed.stderr.strip()}")
    for line in reversed(completed.stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "median_s" in result:
                return result
    try:
        result = json.loads(completed.stdout)
    except json.JSONDecodeError:
        result = None
    if isinstance(result, dict) and "median_s" in result:
        return result
    raise RuntimeError(f"{' '.join(command)} printed no JSON object with median_s: "
                       f"{completed.stdout.strip()[:500]}")


def find_qrloss(requested):
    """Return the qrloss binary to run, or None when there is none."""
    candidates = [requested] if requested is not None else DEFAULT_QRLOSS_CANDIDATES
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def cpu_name():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_shape(text):
    try:
        shape = [int(extent) for extent in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid shape {text!r}: expected B,C,H,W or B,C")
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"invalid shape {text!r}: expected 2 or 4 positive extents")
    return shape


def parse_int(text):
    """Returns text as an int; argparse names the option in its error."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer, got {text!r}") from None


def parse_repeat(text):
    repeat = parse_int(text)
    if not MIN_REPEAT <= repeat <= MAX_REPEAT:
        raise argparse.ArgumentTypeError(
            f"expected an integer from {MIN_REPEAT} to {MAX_REPEAT}, got {repeat}")
    return repeat


def parse_threads(text):
    threads = parse_int(text)
    if not 1 <= threads <= MAX_THREADS:
        raise argparse.ArgumentTypeError(
            f"expected an integer from 1 to {MAX_THREADS}, got {threads}")
    return threads


def parse_choices(allowed):
    def parse(text):
        chosen = [item for item in text.split(",") if item]
        unknown = [item for item in chosen if item not in allowed]
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected a comma-separated subset of {','.join(allowed)}")
        return chosen
    return parse


def parse_arguments():
    parser = argparse.ArgumentParser(
        description="Time forward+backward of a PyTorch transcription of the QR and RQ "
                    "losses against `qrloss bench`, printing one JSON line per setting.")
    parser.add_argument("--shape", type=parse_shape, default=parse_shape(DEFAULT_SHAPE),
                        help=f"B,C,H,W or B,C (default {DEFAULT_SHAPE})")
    parser.add_argument("--threads", type=parse_threads, default=None,
                        help=f"threads for torch.set_num_threads and qrloss --threads, "
                             f"1 to {MAX_THREADS} (default: torch.get_num_threads())")
    parser.add_argument("--repeat", type=parse_repeat, default=MIN_REPEAT,
                        help=f"timed runs per setting; the median is reported "
                             f"({MIN_REPEAT} to {MAX_REPEAT}, default {MIN_REPEAT})")
    parser.add_argument("--qrloss", type=pathlib.Path, default=None,
                        help="qrloss binary (default: build-bench/qrloss, else build/qrloss)")
    parser.add_argument("--losses", type=parse_choices(LOSSES), default=list(LOSSES),
                        help="comma-separated losses to time (default qr,rq)")
    parser.add_argument("--paths", type=parse_choices(PATHS), default=list(PATHS),
                        help="comma-separated input paths to time (default probs,logits)")
    parser.add_argument("--dtypes", type=parse_choices(DTYPES), default=list(DTYPES),
                        help="comma-separated dtypes to time (default float32,float64)")
    parser.add_argument("--eps", type=float, default=DEFAULT_EPS,
                        help=f"eps of the torch losses (default {DEFAULT_EPS:g}); "
                             "qrloss bench uses its own default")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return parser.parse_args()


def main():
    arguments = parse_arguments()
    if torch is None:
        print(f"torch cannot be imported ({TORCH_IMPORT_ERROR}); nothing to compare. "
              "Run with a Python that has torch, for example /usr/bin/python3.",
              file=sys.stderr)
        return 0

    threads = arguments.threads if arguments.threads is not None else torch.get_num_threads()
    if threads < 1:
        print(f"error: --threads must be at least 1, got {threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(threads)

    qrloss = find_qrloss(arguments.qrloss)
    if qrloss is None and arguments.qrloss is not None:
        # A path given by hand is a request to compare, not a default to try.
        print(f"error: --qrloss: no executable file at {arguments.qrloss}; build qrloss "
              "(meson setup build-bench -Dbenchmarks=true && ninja -C build-bench) or "
              "pass the path of the built binary", file=sys.stderr)
        return 2
    if qrloss is None:
        searched = " or ".join(str(path) for path in DEFAULT_QRLOSS_CANDIDATES)
        print(f"qrloss binary not found at {searched}; printing torch timings only. "
              "Build it or pass --qrloss PATH.", file=sys.stderr)

    qrloss_failures = 0
    common = {"shape": arguments.shape, "threads": threads, "repeat": arguments.repeat,
              "cpu": cpu_name(), "torch_version": torch.__version__}
    for dtype in arguments.dtypes:
        inputs = make_inputs(arguments.shape, dtype, arguments.seed)
        for loss in arguments.losses:
            for path in arguments.paths:
                record = {"loss": loss, "path": path, "dtype": dtype, **common}
                record["torch_median_s"] = time_torch(loss, path, inputs, arguments.eps,
                                                      arguments.repeat)
                if qrloss is not None:
                    try:
                        result = run_qrloss(qrloss, loss, path, arguments.shape, dtype, threads,
                                            arguments.repeat)
                    except RuntimeError as error:
                        print(f"error: {error}", file=sys.stderr)
                        qrloss_failures += 1
                        record["qrloss_median_s"] = None
                        record["speedup"] = None
                    else:
                        record["qrloss_median_s"] = result["median_s"]
                        for key in ("floor_s", "ratio_to_floor"):
                            if key in result:
                                record[f"qrloss_{key}"] = result[key]
                        median = result["median_s"]
                        record["speedup"] = record["torch_median_s"] / median if median else None
                print(json.dumps(record), flush=True)
        del inputs
    return 1 if qrloss_failures else 0


if __name__ == "__main__":
    sys.exit(main())
