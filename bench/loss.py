"""The loss on its own: time per forward+backward and peak memory of m2m_loss, reference against fused, eager
and compiled, side by side in one run (results/benchmarks.md holds the measured tables).

    python bench/loss.py                                # CUDA if present (B 1024 4096 16384), else CPU (256 1024 2048)
    OMP_NUM_THREADS=1 python bench/loss.py --batch 1024 --branches 4 --texts 6   # free matching

Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the growth of the process's peak resident set
(VmHWM, which includes allocator slack) after giving freed memory back to the OS. Both above the inputs.
Letters: B images per rank, K image branches, M texts per image, E joint embedding dim.
"""
import argparse
import ctypes
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import TILES, m2m_loss, unit  # noqa: E402


def proc_bytes(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak(device):
    """Start a peak-memory window; returns the baseline in bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    # CPU (Linux, glibc): give the memory freed so far back to the OS, so that the step has to fault in
    # every page it uses; then "5" in clear_refs resets VmHWM (the peak RSS) to the current RSS
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_bytes("VmRSS")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_since(device, base):
    """Peak bytes above the baseline since reset_peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return proc_bytes("VmHWM") - base


def benchmark(args):
    """The table: one row per (B, variant), ratios against the compiled reference of the same B."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    batches = args.batch or ([1024, 4096, 16384] if device.type == "cuda" else [256, 1024, 2048])
    dtype = getattr(torch, args.dtype)
    K, M, E = args.branches, args.texts, args.dim
    reference = functools.partial(m2m_loss, fused=False)
    variants = {
        "reference": reference,
        "reference compiled": torch.compile(reference),
        "fused eager": functools.partial(m2m_loss, fused=True, compile=False, tiles=args.tiles),
        "fused compiled": functools.partial(m2m_loss, fused=True, compile=True, tiles=args.tiles),
    }
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print(f"device {device} | K={K} M={M} E={E} {args.dtype} | tiles {tuple(args.tiles)} | time per "
          f"forward+backward, median of {args.repeats} after a warm-up | peak = {memory} above the inputs")
    print(f"{'B':>6} | {'variant':<18} | {'ms':>9} | {'peak MiB':>9} | {'x reference compiled':>20}")
    for B in batches:
        img = unit(B, K, E, dtype=dtype, device=device).requires_grad_()
        txt = unit(B, M, E, dtype=dtype, device=device).requires_grad_()
        scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)  # CLIP's initial scale
        results = {name: measure(fn, img, txt, scale, device, args.repeats) for name, fn in variants.items()}
        for name, (ms, peak) in results.items():
            ratio = ms / results["reference compiled"][0]
            print(f"{B:>6} | {name:<18} | {ms:>9.1f} | {peak / 2**20:>9.1f} | {ratio:>20.2f}", flush=True)


def measure(fn, img, txt, scale, device, repeats):
    """(median ms, peak bytes above the inputs) of one forward+backward of fn."""
    def step():
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale).backward()
    step()  # warm-up: compile, allocator
    steps = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        steps.append(time.perf_counter() - t0)
    img.grad = txt.grad = scale.grad = None
    base = reset_peak(device)
    step()
    return sorted(steps)[len(steps) // 2] * 1e3, peak_since(device, base)  # median: robust to a busy machine


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", help="B values (default 1024 4096 16384 on CUDA, "
                        "256 1024 2048 on CPU)")
    parser.add_argument("--branches", type=int, default=4, help="K")
    parser.add_argument("--texts", type=int, default=4, help="M")
    parser.add_argument("--dim", type=int, default=512, help="E")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiles", type=int, nargs=2, default=TILES, help="rows and columns per fused tile")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per cell")
    benchmark(parser.parse_args())
