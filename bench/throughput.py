"""ViT-B/16 training throughput on one GPU: this project's train.py against open_clip, side by side in one
run (results/benchmarks.md). Needs CUDA; open_clip is optional (pip install open_clip_torch: not a dependency
of the project), its rows are skipped without it.

    python bench/throughput.py                           # every row of the table
    python bench/throughput.py --rows openclip k1 k4     # some of them
    python bench/throughput.py --rows check              # first 20 losses: compiled bf16 vs eager fp32

Every row is its own process (a fresh GPU and compile): `train.py --synthetic-tensors` (one random batch
made on the GPU, no data loading), or the same loop written for open_clip's model and loss below.
Time per step: the mean over each window of --log-every 10 steps (train.py's own log line), the median over
the windows after the first (compile and warm-up); img/s = B / that. MFU: 3 x model.flops_per_sample (the
convention of open_clip's profile, the same count for both) x img/s over --peak-tflops (798: the bf16 matmul
rate measured on this H100 kind; this script measures it again and prints it). Memory:
torch.cuda.max_memory_allocated.
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model import PRESETS, ModelConfig, flops_per_sample  # noqa: E402

# name -> (K, M, train.py flags); B = --batch-size unless the flags say otherwise
ROWS = {
    "k1-eager": (1, 1, ["--no-compile"]),
    "k1": (1, 1, ["--compile"]),
    "k4": (4, 4, ["--compile"]),
    "k4-noiso": (4, 4, ["--compile", "--no-isolate-cls"]),
    "k4-mlp": (4, 4, ["--compile", "--branch-type", "mlp"]),
    "k6": (6, 6, ["--compile"]),
    "k4-b512": (4, 4, ["--compile", "--batch-size", "512"]),
    "k4-b576": (4, 4, ["--compile", "--batch-size", "576"]),  # ~72 GiB by the B = 256 and 512 rows
}


def matmul_tflops():
    """bf16 8192^3 matmul rate on random data, median of 10 after 3 warm-ups."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * 8192 ** 3 / (statistics.median(times[3:]) * 1e-3) / 1e12


def step_ms(rows):
    """Median over the log windows after the first of the mean step time in each."""
    return statistics.median(r["ms"] for r in rows[1:])


def train_py(K, M, flags, args, steps, log_every, extra=()):
    """Run train.py --synthetic-tensors; returns its metrics.jsonl rows."""
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "base", "--synthetic-tensors",
               "--precision", "bf16", "--batch-size", str(args.batch_size), "--branches", str(K), "--texts", str(M),
               "--max-steps", str(steps), "--log-every", str(log_every), "--peak-tflops", str(args.peak_tflops),
               "--logs-dir", logs, "--name", "bench", *flags, *extra]
        print("$ " + " ".join(cmd[1:]).replace(ROOT + "/", ""), flush=True)
        run(cmd, args)
        with open(os.path.join(logs, "bench", "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]


def openclip_rows(compile, batch_size, steps, log_every):
    """open_clip's ViT-B-16 trained like train.py trains: bf16 autocast, fused AdamW (CLIP's betas and eps,
    decay on matrices only), ClipLoss, the logit_scale clamp; one random batch on the GPU; the loss is read
    on log steps only (open_clip's own loop does the same). Returns rows like train.py's metrics.jsonl."""
    import open_clip
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = open_clip.create_model("ViT-B-16", device="cuda")  # random init: no weights are downloaded
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": other, "weight_decay": 0.0}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
    loss_fn = open_clip.ClipLoss()
    forward = torch.compile(model) if compile else model
    images = torch.randn(batch_size, 3, 224, 224, device="cuda")
    tokens = torch.randint(1, 49406, (batch_size, 77), device="cuda")
    tokens[:, -1] = 49407  # EOT, the largest id, at the end of every text
    rows, t = [], time.time()
    for step in range(1, steps + 1):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            img, txt, scale = forward(images, tokens)
            loss = loss_fn(img, txt, scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0:
            loss = loss.item()  # waits for the GPU
            rows.append({"step": step, "loss": loss, "ms": 1000 * (time.time() - t) / log_every,
                         "mem_gib": torch.cuda.max_memory_allocated() / 2**30})
            t = time.time()
    return rows


def openclip(compile, args):
    """open_clip in its own process (see openclip_rows)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--openclip-process", "--batch-size", str(args.batch_size),
           "--steps", str(args.steps)] + (["--compile"] if compile else [])
    print("$ " + " ".join(cmd[1:]).replace(ROOT + "/", ""), flush=True)
    return json.loads(run(cmd, args).strip().splitlines()[-1])


def run(cmd, args):
    """Run one row's process (killed after --row-timeout seconds); its stdout, or an error with its last line."""
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.row_timeout)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return r.stdout


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", default=["openclip-eager", "openclip", *ROWS, "check"],
                   help="openclip-eager, openclip, check, or names in ROWS (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=40, help="steps per row; windows of 10 (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=798.0, help="the MFU denominator (default: %(default)s)")
    p.add_argument("--out", default=None, help="also append each row as a JSON line to this file")
    p.add_argument("--row-timeout", type=float, default=600, help="seconds per process (default: %(default)s)")
    p.add_argument("--openclip-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.openclip_process:
        print(json.dumps(openclip_rows(args.compile, args.batch_size, args.steps, 10)))
        return

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | bf16 matmul {matmul_tflops():.0f} TFLOP/s "
          f"measured, MFU over {args.peak_tflops:.0f}", flush=True)
    base = dict(PRESETS["base"], vocab_size=49408)
    table = []
    for name in args.rows:
        try:
            if name == "check":
                # the first 20 losses on one fixed batch: compiled bf16 (the fast path) against eager fp32.
                # lr 1e-4: at train.py's 1e-3 the loss on one random batch turns chaotic after ~8 steps, and
                # then any two precisions part (results/throughput_h100.txt)
                fast = train_py(4, 4, ["--compile", "--lr", "1e-4"], args, 20, 1)
                slow = train_py(4, 4, ["--no-compile", "--precision", "fp32", "--lr", "1e-4"], args, 20, 1)
                print(f"check K=M=4 B={args.batch_size}, one fixed batch\nstep  compiled bf16  eager fp32  relative")
                for a, b in zip(fast, slow):
                    print(f"{a['step']:4d} {a['loss']:13.5f} {b['loss']:11.5f} {abs(a['loss'] - b['loss']) / b['loss']:9.1e}")
                continue
            if name.startswith("openclip"):
                K, M, B, design = 1, 1, args.batch_size, "cls"
                rows = openclip(name == "openclip", args)
            else:
                K, M, flags = ROWS[name]
                B = int(flags[flags.index("--batch-size") + 1]) if "--batch-size" in flags else args.batch_size
                design = flags[flags.index("--branch-type") + 1] if "--branch-type" in flags else "cls"
                rows = train_py(K, M, flags, args, args.steps, 10)
        except Exception as e:  # an OOM at a large batch, open_clip missing: say so, go on
            print(f"{name}: failed: {e}", flush=True)
            continue
        config = ModelConfig(**base, branches=K, branch_type=design)
        ms = step_ms(rows)
        ips = B / ms * 1e3
        flops = 3 * flops_per_sample(config, M)["total"]
        row = {"row": name, "K": K, "M": M, "B": B, "ms": ms, "img_s": ips,
               "mfu": flops * ips / (args.peak_tflops * 1e12),
               "mem_gib": max(r.get("mem_gib", 0.0) for r in rows), "windows_ms": [round(r["ms"], 2) for r in rows]}
        table.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # each row as soon as it is measured
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    reference = next((r["img_s"] for r in table if r["row"] == "openclip"), None)  # open_clip compiled
    for r in table:
        r["x_openclip"] = r["img_s"] / reference if reference else None
    print(f"\n{'row':15} {'K':>2} {'M':>2} {'B':>4} | {'ms/step':>8} {'img/s':>7} {'MFU':>6} {'GiB':>5} "
          f"{'x open_clip':>11}")
    for r in table:
        ratio = f"{r['x_openclip']:.2f}" if r["x_openclip"] else "-"
        print(f"{r['row']:15} {r['K']:>2} {r['M']:>2} {r['B']:>4} | {r['ms']:8.1f} {r['img_s']:7.0f} "
              f"{100 * r['mfu']:5.1f}% {r['mem_gib']:5.1f} {ratio:>11}")


if __name__ == "__main__":
    main()
