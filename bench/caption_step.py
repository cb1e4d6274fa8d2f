"""caption.py's training step on the CPU: what the stem's layer order, its memory layout and the optimizer
cost, side by side in one run (results/captioner.md). The captioner is `caption.py train`'s default (tiny
tower: the conv stem and no ViT block; decoder width 128, 1 block; the five prompts), or as --vision-layers and
--layers say, on random images and the first --batch-size records' texts of --data.

    python bench/caption_step.py --data data/shapes5k/train.jsonl --threads 2

Rows, each change on top of the row above it:
  before       conv, BatchNorm, ReLU, max-pool per stage; NCHW; AdamW with foreach (the CPU default)
  pool-first   conv, max-pool, BatchNorm, ReLU: BatchNorm and ReLU on a quarter of the pixels
  channels     the stem's input in channels-last layout (model.py's patchify does this)
  fused        AdamW(fused=True): as caption.py trains now
Time per step: the median of --repeats means over --steps steps, after 5 warm-up steps, rows interleaved.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import caption  # noqa: E402
import data  # noqa: E402

ROWS = ["before", "pool-first", "channels", "fused"]


class NCHWStem(nn.Sequential):
    """The stem run on a plain (NCHW) copy of its input, undoing patchify's channels-last."""

    def forward(self, x):
        return super().forward(x.contiguous())


def make_step(row, args, records, tok):
    torch.manual_seed(0)
    vision = caption.vision_config("tiny", args.vision_layers, tok.vocab_size)
    prompts = list(caption.SLOT_PROMPTS.values())
    net = caption.Captioner(caption.CaptionerConfig(vision, prompts, tok.vocab_size, layers=args.layers))
    if row in ("before", "pool-first"):
        stem = list(net.visual.conv1)  # per stage [conv, pool, norm, relu], then the 1x1
        if row == "before":  # per stage [conv, norm, relu, pool]
            stem = [m for i in range(0, len(stem) - 1, 4) for m in (stem[i], stem[i + 2], stem[i + 3], stem[i + 1])]
            stem.append(list(net.visual.conv1)[-1])
        net.visual.conv1 = NCHWStem(*stem)
    opt = torch.optim.AdamW(net.parameters(), lr=5e-4, **({"fused": True} if row == "fused" else {}))
    images = torch.randn(args.batch_size, 3, 64, 64)
    tokens = data.ImageTextDataset(records, tok, 64, train=False).tokens  # (B, M, T)
    columns = list(caption.SLOT_PROMPTS)  # the caption slot of each prompt

    def step():
        loss = caption.prompts_loss(net, images, tokens, columns)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a world's jsonl (texts for the decoder)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision-layers", type=int, default=0, help="ViT blocks of the captioner's tower")
    p.add_argument("--layers", type=int, default=1, help="decoder blocks")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per row")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    records = data.read_records(args.data)[:args.batch_size]
    tok = data.Tokenizer.beside(args.data, records)
    steps = {row: make_step(row, args, records, tok) for row in ROWS}
    times = {row: [] for row in ROWS}
    for row in ROWS:
        for _ in range(5):
            steps[row]()
    for _ in range(args.repeats):
        for row in ROWS:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[row]()
            times[row].append((time.perf_counter() - start) / args.steps * 1000)
    base = statistics.median(times["before"])
    print(f"B = {args.batch_size}, {args.vision_layers} ViT + {args.layers} decoder blocks, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"{'row':<12}{'ms/step':>9}{'x before':>10}")
    for row in ROWS:
        ms = statistics.median(times[row])
        print(f"{row:<12}{ms:>9.1f}{base / ms:>10.2f}")


if __name__ == "__main__":
    main()
