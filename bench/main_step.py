"""Where one step of the main job goes on the CPU (results/presets.md): the main job's model (tiny-conv, K = M = 6,
CLS design), its batch of 128 and its loss, each part timed on its own, side by side in one run. The parts:
  load         reading and augmenting one batch of the world (ImageTextDataset, in this process)
  stem         the conv stem, forward and backward
  image tower  encode_image (the stem included), forward and backward
  text tower   the six slots through encode_text, forward and backward
  step         forward, fused M2M loss, backward and AdamW: what train.py does per step, loading aside
Time: the median of --repeats means over --steps calls, after 2 warm-up calls, parts interleaved.

    python bench/main_step.py --threads 2
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import ImageTextDataset, Tokenizer, read_records  # noqa: E402
from loss import m2m_loss  # noqa: E402
from model import PRESETS, HolisticCLIP, ModelConfig  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--data", default="data/shapes/train.jsonl", help="the world's train split (python prepare/world.py)")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

B = 128
records = read_records(args.data)[:2 * B]
dataset = ImageTextDataset(records, Tokenizer.load(os.path.join(os.path.dirname(args.data), "tokenizer.json")),
                           64, train=True, context_length=32)
images = torch.stack([dataset[i][0] for i in range(B)])  # (B, 3, S, S)
tokens = dataset.tokens[:B]                              # (B, M, T)
model = HolisticCLIP(ModelConfig(**{**PRESETS["tiny-conv"], "branches": tokens.shape[1], "vocab_size": 1024}))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)


def load():
    torch.stack([dataset[i][0] for i in range(B, 2 * B)])  # decoded afresh every call


def stem():
    model.visual.conv1(images.contiguous(memory_format=torch.channels_last)).sum().backward()


def image_tower():
    model.encode_image(images).sum().backward()


def text_tower():
    torch.stack([model.encode_text(tokens[:, m]) for m in range(tokens.shape[1])], 1).sum().backward()


def step():
    img, txt, scale = model(images, tokens)
    m2m_loss(img, txt, scale, fused=True, compile=False).backward()
    optimizer.step()
    optimizer.zero_grad()


parts = {"load": load, "stem": stem, "image tower": image_tower, "text tower": text_tower, "step": step}
times = {name: [] for name in parts}
for name, f in parts.items():  # warm-up
    f(), f()
for _ in range(args.repeats):
    for name, f in parts.items():
        t0 = time.perf_counter()
        for _ in range(args.steps):
            f()
        times[name].append((time.perf_counter() - t0) / args.steps)
        model.zero_grad()
total = statistics.median(times["load"]) + statistics.median(times["step"])
print(f"tiny-conv, K = M = 6, B = {B}, {args.threads} threads: share of load + step")
for name in parts:
    print(f"{name:<12} {100 * statistics.median(times[name]) / total:5.1f} %")
