"""The pictures eval.py draws beside its results.jsonl (PIL + torchvision only): curves.png (the run's
metrics.jsonl), branch_slot.png (the K x M heatmap), attention.png (each branch's class-token attention),
retrieval.png (text->image examples). results/curves.py draws the ablation's convergence picture with line_chart.

    python eval.py --ckpt runs/NAME/ckpt.pt --data data/shapes/val.jsonl      # the four PNGs in runs/NAME/

Cells of `cell` px, 2 px grid padding, 16 px text headers. Pixel sizes are spelt out (width, height, left, top,
...): W and T keep their meanings (world size, tokens).
"""
import json
import math

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid

import data

RED = torch.tensor([0.85, 0.1, 0.1])
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22"]


def blend(base, x):
    """base (..., 3, h, w) RGB in [0, 1], x (..., 1, h, w) in [0, 1] -> base tinted towards red by x."""
    return base * (1 - 0.7 * x) + 0.7 * x * RED.view(3, 1, 1)


def viewable(images, cell):
    """Model inputs (b, 3, S, S) -> (b, 3, cell, cell) RGB in [0, 1]: the CLIP normalisation undone."""
    x = images * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    return F.interpolate(x, size=(cell, cell), mode="bilinear", align_corners=False).clamp(0, 1)


def with_header(picture, labels, step):
    """Add a 16 px white strip above a PIL image with labels at x = 4 + i * step."""
    out = Image.new("RGB", (picture.width, picture.height + 16), "white")
    out.paste(picture, (0, 16))
    for i, text in enumerate(labels):
        ImageDraw.Draw(out).text((4 + i * step, 2), text, fill="black")
    return out


def line_chart(title, series, size=(360, 240)):
    """series {name: (xs, ys)} -> one PIL panel: frame, lines, min/max of both axes, a legend."""
    width, height = size
    left, right, top, bottom = 52, 8, 18, 18  # margins: room for the y labels, the title, the x labels
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span = max(y1 - y0, 0.02 * max(abs(y0), abs(y1)), 1e-12)  # >= 2% of the values: float noise stays flat
    x1, y0, y1 = max(x1, x0 + 1e-12), (y0 + y1 - span) / 2, (y0 + y1 + span) / 2
    out = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(out)
    d.rectangle([left, top, width - right, height - bottom], outline="grey")
    for j, (name, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        points = [(left + (x - x0) / (x1 - x0) * (width - left - right),
                   height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)) for x, y in zip(sx, sy)]
        d.line(points, fill=colour, width=2)
        for px, py in points if len(points) < 40 else []:  # sparse series (evaluations): mark each point
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        d.text((width - right - 6 * len(name) - 4, top + 3 + 11 * j), name, fill=colour)  # ~6 px a letter
    for xy, text in [((left, 3), title), ((2, top), f"{y1:.3g}"), ((2, height - bottom - 10), f"{y0:.3g}"),
                     ((left, height - bottom + 4), f"{x0:g}"),
                     ((width - right - 6 * len(f"{x1:g}"), height - bottom + 4), f"{x1:g}")]:  # title, axis ends
        d.text(xy, text, fill="black")
    return out


def tile(pictures, per_row):
    """PIL images of one size -> one PIL image, `per_row` of them a row, no gaps (len(pictures): a row, 1: a column)."""
    return to_pil_image(make_grid([pil_to_tensor(p) for p in pictures], nrow=per_row, padding=0))


def plot_curves(metrics_path):
    """metrics.jsonl -> a row of 360 x 240 panels: loss*, lr, scale, and every "val/..." key together."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    keys = sorted({k for r in rows for k in r})
    groups = {"loss": [k for k in keys if k.startswith("loss")], "lr": ["lr"], "scale": ["scale"],
              "validation (%)": [k for k in keys if k.startswith("val/")]}
    panels = []
    for title, names in groups.items():
        series = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in names}
        series = {k: v for k, v in series.items() if v[0]}  # keys never logged (e.g. no validation): no line
        if series:
            panels.append(line_chart(title, series))
    return tile(panels, len(panels))  # a row


def plot_heatmap(matrix, cols, cw=72, ch=28):
    """K x M list of lists -> heatmap of cw x ch cells (white = the minimum, red = the maximum), numbers."""
    sim = torch.tensor(matrix)
    K, M = sim.shape
    left, top = 64, 40  # room for the row names and for the title + column names
    rgb = blend(torch.ones(3, K, M), ((sim - sim.min()) / (sim.max() - sim.min()).clamp_min(1e-12))[None])
    out = Image.new("RGB", (left + cw * M + 8, top + ch * K + 8), "white")
    d = ImageDraw.Draw(out)
    d.text((4, 4), "mean <branch k, own slot-m caption>", fill="black")
    for m, name in enumerate(cols):
        d.text((left + m * cw + 4, top - 14), name[:11], fill="black")
    for k in range(K):
        d.text((4, top + k * ch + 8), f"branch {k}", fill="black")
        for m in range(M):
            box = [left + m * cw, top + k * ch, left + (m + 1) * cw - 1, top + (k + 1) * ch - 1]
            d.rectangle(box, fill=tuple(int(255 * c) for c in rgb[:, k, m]))
            d.text((box[0] + 20, box[1] + 8), f"{sim[k, m]:.2f}", fill="black")
    return out


@torch.no_grad()
def plot_attention(model, dataset, n=4, cell=96, device="cpu"):
    """Rows = the first n images; columns = the image, then each branch's class-token attention."""
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])  # (n, 3, S, S)
    pics = viewable(images, cell)                                                # (n, 3, cell, cell)
    att = model.class_attention(images.to(device)).float().cpu()                 # (n, K, N)
    g = math.isqrt(att.shape[-1])                                                # patch grid side
    lo, hi = att.amin(-1, keepdim=True), att.amax(-1, keepdim=True)
    att = (att - lo) / (hi - lo).clamp_min(1e-12)                                # each map stretched to [0, 1]
    heat = F.interpolate(att.view(len(pics), -1, g, g), size=(cell, cell), mode="nearest")  # (n, K, cell, cell)
    K = heat.shape[1]
    tiles = torch.stack([pics] + [blend(pics, heat[:, k:k + 1]) for k in range(K)], 1)  # (n, K+1, 3, cell, cell)
    grid = make_grid(tiles.flatten(0, 1), nrow=K + 1, padding=2, pad_value=1.0)
    return with_header(to_pil_image(grid), ["image"] + [f"branch {k}" for k in range(K)], cell + 2)


def plot_retrieval(dataset, img, txt, slots, n=4, top=5, cell=96):
    """img (n, E) the image side of the score (eval.branch_mean), txt (n, M, E): n text queries (image i's
    caption in slot i mod M) -> each one's top images, the query above the row; a green frame marks the query's
    own image, grey the others."""
    rows = []
    for i in range(min(n, len(img))):
        m = i % txt.shape[1]
        best = (img @ txt[i, m]).topk(min(top, len(img))).indices.tolist()              # the official score
        pics = viewable(torch.stack([dataset[j][0] for j in best]), cell)               # (top, 3, cell, cell)
        framed = [torch.stack([F.pad(p[c], (3, 3, 3, 3), value=(0.1, 0.7, 0.1)[c] if j == i else 0.6)
                               for c in range(3)]) for j, p in zip(best, pics)]         # 3 px frames
        row = to_pil_image(make_grid(torch.stack(framed), nrow=top, padding=2, pad_value=1.0))
        query = f"[{slots[m]}] {dataset.records[i]['caption'][m]}"
        rows.append(with_header(row, [query[:row.width // 6 - 1]], 0))  # ~6 px per character
    return tile(rows, 1)  # a column
