"""Convergence curves: the held-out image->text R@1 and the main-shape zero-shot top-1 against the step, from the
validations a run logs with --eval-every (its metrics.jsonl) and its final evaluation (results.jsonl). Draws one
line per run into a PNG and prints, per run, each metric's change over the last fifth of the run.

    python results/curves.py runs/ablation/*-s0 --out results/curves.png
"""
import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

METRICS = {"i2t_R@1": "held-out image->text R@1 (%)", "zs/main_shape/top1": "zero-shot main shape top-1 (%)"}
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def curve(run):
    """A run folder -> (steps, {metric: values}) over its validations, the final evaluation last."""
    lines = [json.loads(line) for line in open(run / "metrics.jsonl") if '"val/' in line]
    points = [(r["step"], {k: r.get(f"val/{k}") for k in METRICS}) for r in lines]
    final = [json.loads(line) for line in open(run / "results.jsonl") if line.strip()]
    if final and (not points or final[0]["step"] > points[-1][0]):  # train.py's own evaluation at the end
        points.append((final[0]["step"], {k: final[0].get(k) for k in METRICS}))
    return [s for s, _ in points], {k: [v[k] for _, v in points] for k in METRICS}


def plot(curves, out, w=420, h=260, margin=36):
    """{run: (steps, values)} -> one panel per metric side by side, a legend below."""
    legend = 16 * len(curves)
    img = Image.new("RGB", (len(METRICS) * (w + margin) + margin, h + 2 * margin + legend), "white")
    d = ImageDraw.Draw(img)
    last = max(max(steps) for steps, _ in curves.values())
    for p, (key, title) in enumerate(METRICS.items()):
        x0, y0 = margin + p * (w + margin), margin
        top = max(max(v for v in values[key] if v is not None) for _, values in curves.values())
        top = 10 * (int(top) // 10 + 1)  # the y axis runs 0 .. the next multiple of 10 above every value
        d.rectangle([x0, y0, x0 + w, y0 + h], outline="black")
        d.text((x0, 8), title, fill="black")
        for tick in range(0, top + 1, max(10, top // 5 // 10 * 10)):
            y = y0 + h - h * tick / top
            d.line([x0 - 4, y, x0, y], fill="black")
            d.text((x0 - 24, y - 6), str(tick), fill="black")
        d.text((x0 + w - 60, y0 + h + 4), f"step {last}", fill="black")
        for c, (steps, values) in enumerate(curves.values()):
            xy = [(x0 + w * s / last, y0 + h - h * v / top) for s, v in zip(steps, values[key]) if v is not None]
            d.line(xy, fill=COLOURS[c % len(COLOURS)], width=2)
    for c, run in enumerate(curves):
        y = h + 2 * margin + 16 * c - 8
        d.line([margin, y + 6, margin + 20, y + 6], fill=COLOURS[c % len(COLOURS)], width=3)
        d.text((margin + 28, y), run, fill="black")
    img.save(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders trained with --eval-every")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    args = p.parse_args()
    curves = {run.name: curve(run) for run in args.runs}
    print("| run | " + " | ".join(f"{k}: at 4/5 of the run -> end" for k in METRICS) + " |\n|---|---|---|")
    for run, (steps, values) in curves.items():  # the validation nearest 4/5 of the run, against the last
        i = min(range(len(steps)), key=lambda j: abs(steps[j] - 0.8 * steps[-1]))
        print(f"| {run} | " + " | ".join(f"{values[k][i]:.1f} (step {steps[i]}) -> {values[k][-1]:.1f}"
                                          for k in METRICS) + " |")
    plot(curves, args.out)
    print(f"wrote {args.out}")
