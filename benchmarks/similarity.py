"""Benchmark the similarity functions: reference per-unit loop, full-P path and streaming path.

Run from the repository root:

    .venv/bin/python benchmarks/similarity.py                 # all cases
    .venv/bin/python benchmarks/similarity.py --case study    # one case

Every measurement runs in a fresh subprocess, so its peak memory is its own.
Inputs are random: image embeddings I [N x D], text embeddings T [M x D]
and activations A [N x K] (non-negative, like pooled ReLU outputs).  The
timed work starts from the embeddings, so the reference and full-P modes
include building P = normalise(I) @ normalise(T).T, as the pipeline does.

Modes:

* reference: the formulas of CLIP-Dissect written as a loop over units on a
  full P (written here from the formulas, independent of the library);
* full: the library function called with P;
* stream: the library function called with the embeddings (P never built).

Peak extra memory is the process's peak resident set size (VmHWM) during
the timed work minus its resident size before it.  The peak is reset via
/proc/self/clear_refs before the work, where the kernel allows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


CASES = {
    "study": {"n": 4095, "m": 763, "k": 512, "d": 512, "modes": ("reference", "full", "stream"), "repeats": 3},
    "large": {"n": 30000, "m": 20000, "k": 512, "d": 512, "modes": ("reference", "full", "stream"), "repeats": 1},
    "huge": {"n": 1000000, "m": 20000, "k": 512, "d": 512, "modes": ("stream",), "repeats": 1},
}
FUNCTIONS = ("soft_wpmi", "cos_similarity")


def read_status_kib(field: str) -> int:
    """Return a field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; return False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def make_inputs(n: int, m: int, k: int, d: int, seed: int):
    """Return random image embeddings, text embeddings and activations."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, generator=generator)
    images = torch.randn(n, d, generator=generator) * 0.3 + shared
    texts = torch.randn(m, d, generator=generator) * 0.3 + shared
    activations = torch.rand(n, k, generator=generator)
    return images, texts, activations


def full_p(images, texts):
    """Return P = normalise(I) @ normalise(T).T, as the pipeline builds it."""
    import torch

    return torch.nn.functional.normalize(images, dim=1) @ torch.nn.functional.normalize(texts, dim=1).T


def reference_soft_wpmi(P, A, top_k=100, a=10.0, lam=1.0, min_prob=1e-7, p_start=0.998, p_end=0.97):
    """Return soft-WPMI S [K x M], one unit at a time, from the formulas."""
    import torch

    probabilities = torch.softmax(a * P, dim=1)
    weights = p_start - torch.arange(top_k, dtype=torch.float32) / top_k * (p_start - p_end)
    weights = weights.unsqueeze(1)
    log_likelihood = torch.empty(A.shape[1], P.shape[1])
    for unit in range(A.shape[1]):
        top = torch.topk(A[:, unit], k=top_k).indices
        terms = torch.log(weights * probabilities[top] + (1.0 - weights) + min_prob)
        log_likelihood[unit] = terms.sum(dim=0)
    log_prior = torch.logsumexp(log_likelihood, dim=0) - math.log(A.shape[1])
    return log_likelihood - lam * log_prior


def reference_cos_similarity(P, A):
    """Return cos_similarity S [K x M], one unit at a time, from the formula."""
    import torch

    concept_norms = torch.linalg.vector_norm(P, dim=0)
    scores = torch.empty(A.shape[1], P.shape[1])
    for unit in range(A.shape[1]):
        column = A[:, unit]
        scores[unit] = (column @ P) / (torch.linalg.vector_norm(column) * concept_norms)
    return scores


def measure(args: argparse.Namespace) -> None:
    """Run one measurement in this process and write its result as JSON."""
    import numpy as np
    import torch

    import mammo_dissect

    images, texts, activations = make_inputs(args.n, args.m, args.k, args.d, args.seed)
    function = mammo_dissect.similarity_function(args.function)
    reset_ok = reset_peak_rss()
    before_kib = read_status_kib("VmRSS")
    start = time.perf_counter()
    if args.measure == "reference":
        P = full_p(images, texts)
        reference = {"soft_wpmi": reference_soft_wpmi, "cos_similarity": reference_cos_similarity}
        scores = reference[args.function](P, activations)
    elif args.measure == "full":
        P = full_p(images, texts)
        scores = function(P, activations)
    else:
        scores = function(None, activations, image_embeddings=images, text_embeddings=texts)
    seconds = time.perf_counter() - start
    peak_kib = read_status_kib("VmHWM")
    if args.scores:
        np.save(args.scores, scores.numpy())
    result = {
        "seconds": seconds,
        "peak_extra_mib": (peak_kib - before_kib) / 1024,
        "peak_reset": reset_ok,
        "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(result))


def run_child(case: dict, function: str, mode: str, scores_path: str | None) -> dict:
    """Run one measurement in a fresh interpreter and return its result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = handle.name
    command = [
        sys.executable, __file__, "--measure", mode, "--function", function,
        "--n", str(case["n"]), "--m", str(case["m"]), "--k", str(case["k"]), "--d", str(case["d"]),
        "--result", result_path,
    ]
    if scores_path:
        command += ["--scores", scores_path]
    subprocess.run(command, check=True)
    result = json.loads(Path(result_path).read_text())
    os.unlink(result_path)
    return result


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_case(name: str, function: str, modes: list[str]) -> None:
    """Measure every mode of one case and print a Markdown table row per mode."""
    import numpy as np

    case = dict(CASES[name])
    case["modes"] = [mode for mode in case["modes"] if mode in modes]
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for mode in case["modes"]:
            scores_path = str(Path(folder) / f"{mode}.npy")
            results = [run_child(case, function, mode, scores_path if i == 0 else None) for i in range(case["repeats"])]
            rows.append((mode, results))
        scores = {mode: np.load(Path(folder) / f"{mode}.npy") for mode in case["modes"]}
    size = f"N={case['n']:,} M={case['m']:,} K={case['k']} D={case['d']}"
    for mode, results in rows:
        seconds = statistics.median(result["seconds"] for result in results)
        memory = statistics.median(result["peak_extra_mib"] for result in results)
        baseline = "reference" if "reference" in scores else "full"
        if baseline in scores and mode != baseline:
            difference = f"{float(np.abs(scores[mode] - scores[baseline]).max()):.2e} (to {baseline})"
        else:
            difference = "-"
        print(f"load average now: {os.getloadavg()[0]:.1f}", file=sys.stderr)
        print(
            f"| {function} | {size} | {mode} | {len(results)} | {seconds:.2f} | {memory:,.0f} | {difference} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all", help="which input size to run")
    parser.add_argument("--function", choices=[*FUNCTIONS, "all"], default="all", help="similarity function")
    parser.add_argument("--modes", default="reference,full,stream", help="comma-separated modes to run")
    parser.add_argument("--measure", choices=["reference", "full", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--m", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return

    import torch

    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; Python {platform.python_version()}")
    print(f"load average at start (1, 5, 15 min): {os.getloadavg()}")
    print("| function | size | mode | runs | seconds (median) | peak extra MiB (median) | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cases = list(CASES) if args.case == "all" else [args.case]
    functions = list(FUNCTIONS) if args.function == "all" else [args.function]
    for name in cases:
        for function in functions:
            run_case(name, function, args.modes.split(","))


if __name__ == "__main__":
    main()
