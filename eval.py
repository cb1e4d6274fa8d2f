"""Evaluate a Holistic CLIP checkpoint: retrieval, zero-shot classification, branch analysis, a dense
probe, and pictures. Implements paper.md section 4 (inference): score(image, text) = mean over branches
of the branch cosines <v_k, t>; the branches can also be read one at a time.

    python eval.py --ckpt runs/NAME/ckpt.pt --data data/shapes/val.jsonl      # table, results.jsonl, PNGs
    python eval.py --ckpt runs/NAME/ckpt.pt --data VAL.jsonl --zeroshot-folder DIR [--classnames FILE]
    python eval.py --ckpt runs/NAME/ckpt.pt --data VAL.jsonl --zeroshot-jsonl FILE --classnames FILE
    python eval.py --compare runs/A runs/B                                     # latest results side by side
    python -m pytest -q tests/test_eval.py

The model is rebuilt from the checkpoint alone (config and tokenizer travel inside it). One JSON line is
appended to results.jsonl in the checkpoint's folder (or --out), and the pictures go there too:
curves.png (from metrics.jsonl), branch_slot.png (K x M heatmap), attention.png, retrieval.png.

Letters: K image branches, M texts per image, E joint embedding dim, B a batch, P patches per image
(model.py's N). Here N counts the images of the evaluated split, as in the signatures train.py calls.
"""
import argparse
import json
import math
import re
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import make_grid
from tqdm import tqdm

import data
from model import HolisticCLIP, ModelConfig


# ----------------------------------------------------------------------------------------------------
# embedding a split

def in_order(dataset, batch_size, workers=0):
    """The split in file order. A plain loader rather than data.make_loader: train.py evaluates on rank 0
    only, where make_loader's DistributedSampler would hand out just 1/W of the split."""
    return DataLoader(dataset, batch_size, shuffle=False, num_workers=workers)


@torch.no_grad()
def embed_split(model, dataset, batch_size=256, device="cpu", workers=0):
    """All images and captions of a split -> img (N, K, E), txt (N, M, E): float32, unit, on the CPU."""
    model.eval()
    img, txt = [], []
    for images, tokens in tqdm(in_order(dataset, batch_size, workers), desc="embed", disable=None):
        img.append(model.encode_image(images.to(device)).float().cpu())  # (B, K, E)
        txt.append(model.encode_text(tokens.to(device)).float().cpu())   # (B, M, E)
    return torch.cat(img), torch.cat(txt)


# ----------------------------------------------------------------------------------------------------
# retrieval with the multi-caption protocol
# Scores s(i, (j, m)) = mean_k <img[i, k], txt[j, m]> = <mean_k img[i, k], txt[j, m]>: the mean of the
# branch cosines, NOT renormalised (paper section 4; the logit scale is one positive factor: no rank moves).
# Image -> text: image i is a hit at k when ANY of its M captions is among the k best of all N*M texts.
# Text -> image: every caption (j, m) is a query; a hit at k when image j is among the k best of N images.
# Tie rule, ties count against the query: a query's rank is the number of WRONG candidates scoring >= its
# (best) correct one, 0 = first place, and hit@k <=> rank < k. A model that scores everything alike gets 0.
# Chunking: the (N, N, M) score tensor is built tile by tile (chunk images x chunk images x M) and only
# counts per query are kept, so 100k images x 500k texts need O(chunk^2 M + N M) memory, not N x NM.

def retrieval_metrics(img, txt, branch="mean", ks=(1, 5, 10), chunk=1024):
    """img (N, K, E), txt (N, M, E) -> {"i2t_R@k", "t2i_R@k", "slot{m}/i2t_R@k", "slot{m}/t2i_R@k"} in %.
    branch="mean" is the official aggregation; an int k scores with branch k alone."""
    q = img.mean(1) if branch == "mean" else img[:, branch]  # (N, E) the image side of every score
    txt = txt.to(q.device)
    N, M, _ = txt.shape
    blocks = [slice(a, min(a + chunk, N)) for a in range(0, N, chunk)]

    def tile(a, b):  # images a against the captions of images b: (|a|, |b|, M)
        return (q[a] @ txt[b].flatten(0, 1).T).view(-1, b.stop - b.start, M)

    # pass 1: each image's own M scores, from the diagonal tiles (the same arithmetic as pass 2, so a
    # wrong candidate that ties a correct one compares equal, bit for bit)
    pos = torch.cat([tile(a, a).diagonal().T for a in blocks])  # (N, M): s(i, (i, m))
    best = pos.amax(1)                                           # (N,) threshold of the image query
    # pass 2: count, per query, the wrong candidates scoring >= the threshold
    rank_i2t = torch.zeros(N, dtype=torch.long, device=q.device)      # among all N*M texts
    rank_slot = torch.zeros(N, M, dtype=torch.long, device=q.device)  # among slot m's N texts only
    rank_t2i = torch.zeros(N, M, dtype=torch.long, device=q.device)   # caption (j, m) among N images
    ids = torch.arange(N, device=q.device)
    pairs = [(a, b) for a in blocks for b in blocks]
    for a, b in tqdm(pairs, desc="retrieval", disable=None if len(pairs) > 1 else True):
        s = tile(a, b)                                     # (A, B, M)
        wrong = (ids[a, None] != ids[None, b])[..., None]  # (A, B, 1): pairs of different images
        rank_i2t[a] += ((s >= best[a, None, None]) & wrong).sum((1, 2))
        rank_slot[a] += ((s >= pos[a, None, :]) & wrong).sum(1)
        rank_t2i[b] += ((s >= pos[None, b, :]) & wrong).sum(0)

    def recall(rank, k):
        return 100 * (rank < k).sum().item() / rank.numel()
    out = {f"{d}_R@{k}": recall(r, k) for d, r in (("i2t", rank_i2t), ("t2i", rank_t2i)) for k in ks}
    for m in range(M):  # slot m alone: its N captions are the gallery (i2t) or the queries (t2i)
        out.update({f"slot{m}/{d}_R@{k}": recall(r, k) for d, r in
                    (("i2t", rank_slot[:, m]), ("t2i", rank_t2i[:, m])) for k in ks})
    return out


# ----------------------------------------------------------------------------------------------------
# branch analysis: which branch answers which perspective, and do the branches stay apart?

def branch_analysis(img, txt):
    """img (N, K, E), txt (N, M, E) -> branch_slot_sim (K x M lists), branch_wins (K counts),
    inter_branch_cos (None when K = 1)."""
    K = img.shape[1]
    sim = torch.einsum("nke,nme->nkm", img, txt)  # (N, K, M) branch k vs the image's own slot-m caption
    # free matching's choice k*(b, m) = argmax_k <v[b, k], t[b, m]> over every pair, counted per branch
    wins = torch.bincount(sim.argmax(1).flatten(), minlength=K)   # (K,)
    gram = (img @ img.transpose(1, 2)).mean(0)                     # (K, K) batch mean, as in the hinge
    off = (gram.sum() - gram.diagonal().sum()) / (K * (K - 1)) if K > 1 else None
    return {"branch_slot_sim": sim.mean(0).tolist(), "branch_wins": wins.tolist(),
            "inter_branch_cos": None if off is None else off.item()}


# ----------------------------------------------------------------------------------------------------
# zero-shot classification
# Classes are scored like retrieval: mean_k <v_k, c>. Per image this ranks classes exactly as
# encode_image(reduce="mean") would (renormalising multiplies one image's scores by one positive number).

@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu"):
    """C class names x P templates ("a {} shape.") -> (C, E): the renormalised template mean per class."""
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer.tokenize(texts, context_length=model.config.context_length)           # (C*P, T)
    emb = model.encode_text(tokens.to(device)).float().cpu().view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)                                                   # (C, E)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores (N, C), labels (N,) -> {k: % of rows whose class is in the top k}; ties count against."""
    rank = (scores >= scores.gather(1, labels[:, None])).sum(1) - 1  # wrong classes scoring >= the right one
    return {k: 100 * (rank < k).sum().item() / len(rank) for k in ks}


def read_labelled(folder=None, jsonl=None, classnames=None):
    """An image folder per class, or a jsonl of {"image", "label": name or index} -> (paths, labels, names).
    Folder classes come in sorted order, named by `classnames` if given; a jsonl needs `classnames`."""
    if folder:
        dirs = sorted(p for p in Path(folder).iterdir() if p.is_dir())
        names = classnames or [d.name.replace("_", " ") for d in dirs]
        assert len(names) == len(dirs), f"{folder}: {len(dirs)} class folders but {len(names)} class names"
        items = [(str(f), c) for c, d in enumerate(dirs) for f in sorted(d.iterdir()) if f.is_file()]
        return [p for p, _ in items], torch.tensor([c for _, c in items]), names
    paths, labels = [], []
    for line_no, line in enumerate(open(jsonl, encoding="utf-8"), 1):
        if line.strip():
            try:
                r = json.loads(line)
                labels.append(r["label"] if isinstance(r["label"], int) else classnames.index(r["label"]))
                paths.append(str(Path(jsonl).parent / r["image"]))
            except (ValueError, KeyError) as e:
                raise data.DataError(f"{jsonl}:{line_no}: bad record ({e!r})") from None
    return paths, torch.tensor(labels), classnames


def read_lines(path):
    return [s.strip() for s in open(path, encoding="utf-8") if s.strip()]


def load_batch(transform, paths):
    return torch.stack([transform(data.load_image(p)) for p in paths])  # (B, 3, S, S)


@torch.no_grad()
def zeroshot_dataset(model, tokenizer, paths, labels, names, templates, batch_size=256, device="cpu", workers=0):
    """Top-1/top-5 (%) of a user dataset: class prompts vs the images' branch-mean scores."""
    classes = zeroshot_classifier(model, tokenizer, names, templates, device)  # (C, E)
    load = partial(load_batch, data.image_transform(model.config.image_size, train=False))
    img = torch.cat([model.encode_image(x.to(device)).float().cpu() for x in tqdm(
        DataLoader(paths, batch_size, num_workers=workers, collate_fn=load), desc="zero-shot", disable=None)])
    return topk_accuracy(img.mean(1) @ classes.T, labels)  # (N, C) scores


# ----------------------------------------------------------------------------------------------------
# dense probe (the paper's dense visual tasks, where the synthetic world knows every pixel's object)
# Each patch embedding (ln_post + proj, like the class tokens) is labelled with its nearest class text:
# class 0 = background (the renormalised mean of the background-pattern prompts), class 1 + s = the prompts
# of data.SHAPES[s]. Patch labels are upsampled to pixels (nearest) and compared with the drawn masks.

def confusion(pred, gt, C):
    """Class maps pred, gt (any equal shapes, values < C) -> (C, C) counts, rows = truth, columns = guess."""
    return torch.bincount(gt.flatten() * C + pred.flatten(), minlength=C * C).view(C, C)


def mean_iou(conf):
    """(C, C) confusion -> mean over classes present (in truth or guess) of TP / (TP + FP + FN), in %."""
    tp = conf.diagonal().double()
    union = conf.sum(0) + conf.sum(1) - conf.diagonal()
    return 100 * (tp[union > 0] / union[union > 0]).mean().item()


@torch.no_grad()
def dense_probe(model, dataset, tokenizer, batch_size=256, device="cpu", workers=0):
    """Records with "scene" -> mIoU (%) of per-patch shape labels against the masks redrawn by data.py."""
    bg = zeroshot_classifier(model, tokenizer, data.PATTERNS, data.LABEL_TEMPLATES["bg_pattern"], device)
    shapes = zeroshot_classifier(model, tokenizer, data.SHAPES, data.LABEL_TEMPLATES["main_shape"], device)
    classes = torch.cat([F.normalize(bg.mean(0), dim=0)[None], shapes])  # (1 + len(SHAPES), E)
    C, conf, i = len(classes), 0, 0
    for images, _ in tqdm(in_order(dataset, batch_size, workers), desc="dense", disable=None):
        patches = model.encode_patches(images.to(device)).float().cpu()  # (B, P, E)
        g = math.isqrt(patches.shape[1])                                   # patch grid side
        guess = (patches @ classes.T).argmax(-1).view(-1, 1, g, g)         # (B, 1, g, g) class per patch
        for b in range(len(guess)):
            scene = dataset.records[i + b]["scene"]
            lut = torch.tensor([0] + [data.SHAPES.index(o["shape"]) + 1 for o in scene["objects"]])
            truth = lut[torch.from_numpy(data.scene_masks(scene))]         # (S, S) object id -> class
            pred = F.interpolate(guess[b:b + 1].float(), size=truth.shape, mode="nearest")[0, 0].long()
            conf = conf + confusion(pred, truth, C)
        i += len(guess)
    return mean_iou(conf)


# ----------------------------------------------------------------------------------------------------
# everything at once (train.py calls this on rank 0)

def evaluate(model, dataset, device="cpu", batch_size=256, workers=0, embeddings=None, tokenizer=None):
    """Retrieval (mean and per branch), branch analysis, and, given the tokenizer for the prompts, zero-shot
    on records with "labels" and the dense probe on records with "scene".
    embeddings: (img, txt) already computed by embed_split, to skip a second pass over the split."""
    was_training = model.training
    model.eval()
    img, txt = embeddings if embeddings is not None else embed_split(model, dataset, batch_size, device, workers)
    res = retrieval_metrics(img.to(device), txt)  # scores and counts on the device
    for k in range(img.shape[1]):  # each branch alone: which one retrieves best?
        r = retrieval_metrics(img.to(device), txt, branch=k, ks=(1,))
        res[f"branch{k}/i2t_R@1"], res[f"branch{k}/t2i_R@1"] = r["i2t_R@1"], r["t2i_R@1"]
    res.update(branch_analysis(img, txt))
    records, tok = dataset.records, tokenizer  # the prompts need it: the dataset keeps only token ids
    if tok is not None and all("labels" in r for r in records):  # the synthetic world's label kinds
        for kind, names in data.LABEL_KINDS.items():
            classes = zeroshot_classifier(model, tok, names, data.LABEL_TEMPLATES[kind], device)  # (C, E)
            labels = torch.tensor([names.index(r["labels"][kind]) for r in records])           # (N,)
            acc = topk_accuracy(img.mean(1) @ classes.T, labels)
            res[f"zs/{kind}/top1"], res[f"zs/{kind}/top5"] = acc[1], acc[5]
    if tok is not None and all("scene" in r for r in records):
        res["dense_miou"] = dense_probe(model, dataset, tok, batch_size, device, workers)
    model.train(was_training)
    return res


def print_table(results, file=sys.stdout):
    """Fixed-width: retrieval rows i2t / t2i x R@1/5/10, then R@1 per slot and per branch, and the rest."""
    def row(name, cells):
        print(f"{name:<16}" + "".join(f"{c:>9}" for c in cells), file=file)

    def nums(keys):
        return [f"{results[k]:.2f}" for k in keys]
    d = {"i2t": "image->text", "t2i": "text->image"}
    row("retrieval", ["R@1", "R@5", "R@10"])
    for x in d:
        row(d[x], nums([f"{x}_R@{k}" for k in (1, 5, 10)]))
    for group in ("slot", "branch"):
        n = sum(k.startswith(group) and k.endswith("/i2t_R@1") for k in results)
        row(f"R@1 per {group}", [f"{group[0]}{j}" for j in range(n)])
        for x in d:
            row(d[x], nums([f"{group}{j}/{x}_R@1" for j in range(n)]))
    zs = sorted({k.split("/")[1] for k in results if k.startswith("zs/")})
    if zs:
        print("zero-shot top1/top5  " + " | ".join(
            f"{z} {results[f'zs/{z}/top1']:.1f}/{results[f'zs/{z}/top5']:.1f}" for z in zs), file=file)
    extra = [f"dense mIoU {results['dense_miou']:.2f}"] if "dense_miou" in results else []
    if results.get("inter_branch_cos") is not None:
        extra.append(f"inter-branch cos {results['inter_branch_cos']:.3f}")
    if "branch_wins" in results:
        extra.append(f"branch wins {results['branch_wins']}")
    if extra:
        print(" | ".join(extra), file=file)
    sim = results.get("branch_slot_sim", [])
    if sim:  # the K x M matrix, mean <branch k, own slot-m caption>
        row("sim per slot", [f"s{m}" for m in range(len(sim[0]))])
        for k, sims in enumerate(sim):
            row(f"branch {k}", [f"{s:.3f}" for s in sims])


# ----------------------------------------------------------------------------------------------------
# pictures (PIL + torchvision only): cells of `cell` px, 2 px grid padding, 16 px text headers

RED = torch.tensor([0.85, 0.1, 0.1])
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def blend(base, x):
    """base (..., 3, H, W) RGB in [0, 1], x (..., 1, H, W) in [0, 1] -> base tinted towards red by x."""
    return base * (1 - 0.7 * x) + 0.7 * x * RED.view(3, 1, 1)


def viewable(images, cell):
    """Model inputs (n, 3, S, S) -> (n, 3, cell, cell) RGB in [0, 1]: the CLIP normalisation undone."""
    x = images * torch.tensor(data.STD).view(3, 1, 1) + torch.tensor(data.MEAN).view(3, 1, 1)
    return F.interpolate(x, size=(cell, cell), mode="bilinear", align_corners=False).clamp(0, 1)


def stack(pictures, nrow):
    """Equal-size PIL images -> one PIL image, nrow per row, no gaps."""
    return to_pil_image(make_grid([pil_to_tensor(p) for p in pictures], nrow=nrow, padding=0))


def with_header(picture, labels, step):
    """Add a 16 px white strip above a PIL image with labels at x = 4 + i * step."""
    out = Image.new("RGB", (picture.width, picture.height + 16), "white")
    out.paste(picture, (0, 16))
    for i, text in enumerate(labels):
        ImageDraw.Draw(out).text((4 + i * step, 2), text, fill="black")
    return out


def line_chart(title, series, size=(360, 240)):
    """series {name: (xs, ys)} -> one PIL panel: frame, lines, min/max of both axes, a legend."""
    W, H = size
    L, R, T, Bt = 52, 8, 18, 18  # margins: left (y labels), right, top (title), bottom (x labels)
    xs = [x for sx, _ in series.values() for x in sx]
    ys = [y for _, sy in series.values() for y in sy]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span = max(y1 - y0, 0.02 * max(abs(y0), abs(y1)), 1e-12)  # >= 2% of the values: float noise stays flat
    x1, y0, y1 = max(x1, x0 + 1e-12), (y0 + y1 - span) / 2, (y0 + y1 + span) / 2
    out = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(out)
    d.rectangle([L, T, W - R, H - Bt], outline="grey")
    for j, (name, (sx, sy)) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        points = [(L + (x - x0) / (x1 - x0) * (W - L - R), H - Bt - (y - y0) / (y1 - y0) * (H - T - Bt))
                  for x, y in zip(sx, sy)]
        d.line(points, fill=colour, width=2)
        for px, py in points if len(points) < 40 else []:  # sparse series (evaluations): mark each point
            d.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        d.text((W - R - 6 * len(name) - 4, T + 3 + 11 * j), name, fill=colour)
    d.text((L, 3), title, fill="black")
    d.text((2, T), f"{y1:.3g}", fill="black")
    d.text((2, H - Bt - 10), f"{y0:.3g}", fill="black")
    d.text((L, H - Bt + 4), f"{x0:g}", fill="black")
    d.text((W - R - 6 * len(f"{x1:g}"), H - Bt + 4), f"{x1:g}", fill="black")
    return out


def plot_curves(metrics_path):
    """metrics.jsonl -> a row of 360 x 240 panels: loss*, lr, scale, and every "val/..." key together."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    keys = sorted({k for r in rows for k in r})
    groups = {"loss": [k for k in keys if k.startswith("loss")], "lr": ["lr"], "scale": ["scale"],
              "validation (%)": [k for k in keys if k.startswith("val/")]}
    panels = []
    for title, names in groups.items():
        series = {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in names}
        series = {k: v for k, v in series.items() if v[0]}
        if series:
            panels.append(line_chart(title, series))
    return stack(panels, nrow=len(panels))


def plot_heatmap(matrix, cols, cw=72, ch=28):
    """K x M list of lists -> heatmap of cw x ch cells (white = the minimum, red = the maximum), numbers."""
    sim = torch.tensor(matrix)
    K, M = sim.shape
    L, T = 64, 40
    rgb = blend(torch.ones(3, K, M), ((sim - sim.min()) / (sim.max() - sim.min()).clamp_min(1e-12))[None])
    out = Image.new("RGB", (L + cw * M + 8, T + ch * K + 8), "white")
    d = ImageDraw.Draw(out)
    d.text((4, 4), "mean <branch k, own slot-m caption>", fill="black")
    for m, name in enumerate(cols):
        d.text((L + m * cw + 4, T - 14), name[:11], fill="black")
    for k in range(K):
        d.text((4, T + k * ch + 8), f"branch {k}", fill="black")
        for m in range(M):
            box = [L + m * cw, T + k * ch, L + (m + 1) * cw - 1, T + (k + 1) * ch - 1]
            d.rectangle(box, fill=tuple(int(255 * c) for c in rgb[:, k, m]))
            d.text((box[0] + 20, box[1] + 8), f"{sim[k, m]:.2f}", fill="black")
    return out


@torch.no_grad()
def plot_attention(model, dataset, n=4, cell=96, device="cpu"):
    """Rows = the first n images; columns = the image, then each branch's class-token attention."""
    images = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))])  # (n, 3, S, S)
    pics = viewable(images, cell)                                                # (n, 3, cell, cell)
    att = model.class_attention(images.to(device)).float().cpu()                 # (n, K, P)
    g = math.isqrt(att.shape[-1])                                                # patch grid side
    lo, hi = att.amin(-1, keepdim=True), att.amax(-1, keepdim=True)
    att = (att - lo) / (hi - lo).clamp_min(1e-12)                                # each map stretched to [0, 1]
    heat = F.interpolate(att.view(len(pics), -1, g, g), size=(cell, cell), mode="nearest")  # (n, K, cell, cell)
    K = heat.shape[1]
    tiles = torch.stack([pics] + [blend(pics, heat[:, k:k + 1]) for k in range(K)], 1)  # (n, K+1, 3, cell, cell)
    grid = make_grid(tiles.flatten(0, 1), nrow=K + 1, padding=2, pad_value=1.0)
    return with_header(to_pil_image(grid), ["image"] + [f"branch {k}" for k in range(K)], cell + 2)


def plot_retrieval(dataset, img, txt, slots, n=4, top=5, cell=96):
    """n text queries (image i's caption in slot i mod M) -> each one's top images, the query above the
    row; a green frame marks the query's own image, grey the others."""
    rows = []
    for i in range(min(n, len(img))):
        m = i % txt.shape[1]
        best = (img.mean(1) @ txt[i, m]).topk(min(top, len(img))).indices.tolist()  # (N,) mean-branch scores
        pics = viewable(torch.stack([dataset[j][0] for j in best]), cell)             # (top, 3, cell, cell)
        framed = [torch.stack([F.pad(p[c], (3, 3, 3, 3), value=(0.1, 0.7, 0.1)[c] if j == i else 0.6)
                               for c in range(3)]) for j, p in zip(best, pics)]       # 3 px frames
        row = to_pil_image(make_grid(torch.stack(framed), nrow=top, padding=2, pad_value=1.0))
        query = f"[{slots[m]}] {dataset.records[i]['caption'][m]}"
        rows.append(with_header(row, [query[:row.width // 6 - 1]], 0))  # ~6 px per character
    return stack(rows, nrow=1)


# ----------------------------------------------------------------------------------------------------
# comparing runs (ablation tables)

def compare(runs, file=sys.stdout):
    """A markdown table of runs, one row each: the latest results.jsonl line of every run (a folder or the
    file itself). Runs named alike but for a final "-s<seed>" are one row: mean ± standard deviation over
    their seeds. Columns: retrieval R@1 both ways, the best single branch, image->text R@1 per caption
    slot, zero-shot top-1 per label kind, dense mIoU, the mean inter-branch cosine."""
    groups = {}  # row name -> the runs' latest results
    for run in runs:
        path = Path(run) / "results.jsonl" if Path(run).is_dir() else Path(run)
        if not path.exists():  # e.g. a run still training
            print(f"{path}: no results yet, left out", file=sys.stderr)
            continue
        latest = json.loads([line for line in open(path) if line.strip()][-1])
        latest["best_branch/i2t_R@1"] = max((v for k, v in latest.items()
                                             if k.startswith("branch") and k.endswith("/i2t_R@1")), default=None)
        groups.setdefault(re.sub(r"-s\d+$", "", path.parent.name), []).append(latest)
    every = {k for rs in groups.values() for r in rs for k in r}
    keys = ["i2t_R@1", "t2i_R@1", "best_branch/i2t_R@1"]
    keys += sorted((k for k in every if k.startswith("slot") and k.endswith("/i2t_R@1")), key=lambda k: int(k[4:-8]))
    keys += sorted(k for k in every if k.startswith("zs/") and k.endswith("/top1"))
    keys += ["dense_miou", "inter_branch_cos"]

    def cell(values, digits):
        v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
        return "-" if not len(v) else f"{v.mean():.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")
    header = ["run", "seeds"] + [k.removesuffix("/top1").removesuffix("_R@1").replace("/", " ").replace("_", " ")
                                 for k in keys]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), file=file)
    for name, rs in groups.items():
        cells = [cell([r.get(k) for r in rs], 3 if k == "inter_branch_cos" else 1) for k in keys]  # cosine vs %
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |", file=file)


# ----------------------------------------------------------------------------------------------------
# command line

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="runs/NAME/ckpt.pt written by train.py")
    p.add_argument("--data", help="records to evaluate (.jsonl/.csv/.tsv), e.g. data/shapes/val.jsonl")
    p.add_argument("--out", help="folder for results.jsonl and the PNGs (default: the checkpoint's folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the PNGs")
    user = p.add_mutually_exclusive_group()
    user.add_argument("--zeroshot-folder", help="user zero-shot set: one sub-folder of images per class")
    user.add_argument("--zeroshot-jsonl", help='user zero-shot set: records {"image": path, "label": name or index}')
    p.add_argument("--classnames", help="one class name per line (folder: names the sorted sub-folders)")
    p.add_argument("--templates", help='one prompt template per line, with "{}" (default: "a photo of a {}.")')
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="a markdown table of these runs' latest results (seeds of a run averaged)")
    args = p.parse_args()
    if args.compare:
        return compare(args.compare)
    if not (args.ckpt and args.data):
        p.error("give --ckpt and --data (or --compare RUN ...)")
    if args.zeroshot_jsonl and not args.classnames:
        p.error("--zeroshot-jsonl needs --classnames FILE")

    # the model and tokenizer from the checkpoint alone
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    model = HolisticCLIP(ModelConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    model.to(args.device).eval()
    tok = data.Tokenizer.from_dict(ckpt["tokenizer"])
    cfg = model.config
    dataset = data.ImageTextDataset(data.read_records(args.data), tok, cfg.image_size,
                                    context_length=cfg.context_length)
    print(f"{args.ckpt}: step {ckpt.get('step')} | K {cfg.branches} | {len(dataset)} images | "
          f"M {dataset.tokens.shape[1]} | {tok.truncated} captions truncated | device {args.device}")

    user = args.zeroshot_folder or args.zeroshot_jsonl  # read now: a bad file fails before the long part
    if user:
        paths, labels, names = read_labelled(args.zeroshot_folder, args.zeroshot_jsonl,
                                             read_lines(args.classnames) if args.classnames else None)
        templates = read_lines(args.templates) if args.templates else ["a photo of a {}."]

    # measure
    img, txt = embed_split(model, dataset, args.batch_size, args.device, args.workers)
    results = evaluate(model, dataset, args.device, args.batch_size, args.workers, (img, txt), tok)
    if user:
        acc = zeroshot_dataset(model, tok, paths, labels, names, templates, args.batch_size, args.device,
                               args.workers)
        results[f"zs/{Path(user).stem}/top1"], results[f"zs/{Path(user).stem}/top5"] = acc[1], acc[5]
    print_table(results)

    # record: one JSON line per evaluation, then the pictures
    out = Path(args.out or Path(args.ckpt).parent)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"ckpt": str(args.ckpt), "data": str(args.data), "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
            "K": img.shape[1], "M": txt.shape[1], "N": len(img), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({**meta, **results}) + "\n")
    if args.plots:
        M = txt.shape[1]
        slots = data.SLOTS if M == len(data.SLOTS) else [f"slot {m}" for m in range(M)]
        if (Path(args.ckpt).parent / "metrics.jsonl").exists():
            plot_curves(Path(args.ckpt).parent / "metrics.jsonl").save(out / "curves.png")
        plot_heatmap(results["branch_slot_sim"], slots).save(out / "branch_slot.png")
        plot_attention(model, dataset, device=args.device).save(out / "attention.png")
        plot_retrieval(dataset, img, txt, slots).save(out / "retrieval.png")
    print(f"appended to {out / 'results.jsonl'}" + (f"; pictures in {out}" if args.plots else ""))


if __name__ == "__main__":
    main()
