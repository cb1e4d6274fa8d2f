"""Evaluate a Holistic CLIP checkpoint: retrieval, zero-shot classification, branch analysis, a dense
probe, and pictures. Implements paper.md section 4 (inference): score(image, text) = mean over branches
of the branch cosines <v_k, t> (branch_mean; --aggregate for calibrated alternatives); the branches can also be
read one at a time. The headline retrieval ranks held-out captions the model never trained on (held_out).

    python eval.py --ckpt runs/NAME/ckpt.pt --data data/shapes/val.jsonl      # table, results.jsonl, PNGs
    python eval.py --ckpt runs/NAME/ckpt.pt --data VAL.jsonl --zeroshot-folder DIR [--classnames FILE]
    python eval.py --ckpt runs/NAME/ckpt.pt --data VAL.jsonl --zeroshot-jsonl FILE --classnames FILE
    python -m pytest -q tests/test_eval.py

Reading order: embed_split, branch_mean and score, retrieval_metrics and held_out, branch_analysis, zero-shot,
the dense probe, evaluate (what train.py calls), print_table, main. The model is rebuilt from the checkpoint
alone (config and tokenizer travel inside it). One JSON line is appended to results.jsonl in the checkpoint's
folder (or --out), and the pictures go there too, drawn by results/pictures.py: curves.png (from metrics.jsonl),
branch_slot.png (K x M heatmap), attention.png, retrieval.png.

Letters: n images in the evaluated split (lower case: a whole split, not a batch), B images per batch, K image
branches, M texts per image, N patches per image, T text tokens, E joint embedding dim, S image side, C classes.
"""
import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
from model import HolisticCLIP, ModelConfig
from prepare import world
from results.pictures import plot_attention, plot_curves, plot_heatmap, plot_retrieval


# ----------------------------------------------------------------------------------------------------
# embedding a split, and the one aggregation of the K branches

@torch.no_grad()
def embed_split(model, dataset, batch_size=256, device="cpu", workers=0):
    """All images and captions of a split -> img (n, K, E), txt (n, M, E): float32, unit, on the CPU.
    The split in file order through a plain DataLoader, not data.make_loader: train.py evaluates on
    rank 0 only, where make_loader's DistributedSampler would hand out just 1/W of the split."""
    model.eval()
    img, txt = [], []
    for images, tokens in tqdm(DataLoader(dataset, batch_size, num_workers=workers), desc="embed", disable=None):
        img.append(model.encode_image(images.to(device)).float().cpu())  # (B, K, E)
        txt.append(model.encode_text(tokens.to(device)).float().cpu())   # (B, M, E)
    return torch.cat(img), torch.cat(txt)


def branch_mean(img):
    """img (n, K, E) unit branch embeddings -> (n, E), the image side of the official score (paper.md
    section 4): score(image, text) = mean_k <v_k, t>, the mean of the K branch cosines (the logit scale s
    multiplies every score alike and is left out: no rank moves). A dot product is linear in the image
    vector, so mean_k <v_k, t> = <mean_k v_k, t>: the branch mean scores every text with one matmul
    instead of K. It is NOT renormalised (it is shorter when the branches disagree); renormalising
    would rescale each image's scores by its own factor: image -> text ranks stay, text -> image ranks move."""
    return img.mean(1)


# The official mean is the default aggregation. The alternatives calibrate the branches first (a plain max over
# raw branch cosines favours whichever branch scores everything high): each branch's cosines are standardised by
# their mean and spread over every (image, text) pair being ranked, then averaged (std-mean: a weighted branch
# mean, weights 1 / spread) or maxed (std-max).
AGGREGATIONS = ("mean", "std-mean", "std-max")


def branch_stats(img, txt):
    """img (n, K, E), txt (..., E) -> mean (K,) and spread (K,) of <v_k(i), t> over every image i and text t: exact,
    from E x E second moments (E[s^2] = <C_img_k, C_txt>), with no n x (number of texts) matrix."""
    t = txt.reshape(-1, txt.shape[-1])                                # (texts, E)
    mean = img.mean(0) @ t.mean(0)                                    # (K,)
    second = torch.einsum("nke,nkf->kef", img, img) / len(img)        # (K, E, E)
    square = (second * (t.T @ t / len(t))).sum((1, 2))                # (K,) E[s^2]
    return mean, (square - mean ** 2).clamp_min(1e-12).sqrt()


def score(img, txt, how="mean", stats=None):
    """img (a, K, E), txt (t, E) -> (a, t): each image's score for each text, the K branches aggregated `how` (an
    int k: branch k alone). stats: branch_stats over what is being ranked, for std-mean and std-max."""
    if how == "mean":
        return branch_mean(img) @ txt.T
    if isinstance(how, int):
        return img[:, how] @ txt.T
    mean, spread = stats
    z = (torch.einsum("ake,te->akt", img, txt) - mean[:, None]) / spread[:, None]  # (a, K, t)
    return z.mean(1) if how == "std-mean" else z.amax(1)


# ----------------------------------------------------------------------------------------------------
# retrieval with the multi-caption protocol, on the scores s(i, (j, m)) = <branch_mean(img)[i], txt[j, m]>
# Image -> text: image i is a hit at k when ANY of its M captions is among the k best of all n*M texts.
# Text -> image: every caption (j, m) is a query; a hit at k when image j is among the k best of n images.
# Duplicates (text_ids given): a caption identical to one of the query image's own counts as its own, both ways
# (for "a blurred style picture", every image captioned so is a right answer), so shared texts cost nothing.
# Tie rule, ties count against the query: a query's rank is the number of WRONG candidates scoring >= its best
# right one (its own, or a copy), 0 = first place, and hit@k <=> rank < k. A model scoring all alike gets 0.
# NaN (a broken model) counts against too: ~(s < t), not s >= t (False for NaN); a NaN right score: no hit at any k.
# Chunking: the (n, n, M) score tensor is built tile by tile (chunk images x chunk images x M) and only
# counts per query are kept, so 100k images x 500k texts need O(chunk^2 M + n M) memory, not n x nM.

def retrieval_metrics(img, txt, branch="mean", ks=(1, 5, 10), chunk=1024, text_ids=None):
    """img (n, K, E), txt (n, M, E) -> {"i2t_R@k", "t2i_R@k", "slot{m}/i2t_R@k", "slot{m}/t2i_R@k"} in %.
    branch: how the K branches make one score (score(): "mean", the official one, or an AGGREGATIONS
    alternative), or an int k to score with branch k alone. text_ids (n, M): equal ids for identical texts
    (text_ids()), for the duplicate rule above; None: every text is distinct."""
    txt = txt.to(img.device)
    n, M, _ = txt.shape
    text_ids = None if text_ids is None else text_ids.to(img.device)
    blocks = [slice(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    stats = branch_stats(img, txt) if branch in AGGREGATIONS[1:] else None

    def tile(a, b):  # images a against the captions of images b: (|a|, |b|, M)
        return score(img[a], txt[b].flatten(0, 1), branch, stats).view(-1, b.stop - b.start, M)

    ids = torch.arange(n, device=img.device)
    pairs = [(a, b) for a in blocks for b in blocks]

    def right(a, b):  # (|a|, |b|, 1 or M): caption (j, m) is image i's own, or (text_ids) the same text as one
        if text_ids is None:
            return (ids[a, None] == ids[None, b])[..., None]
        return (text_ids[None, b, :, None] == text_ids[a, None, None, :]).any(-1)

    # pass 1: each query's threshold, its best right candidate. Image i's own M scores from the diagonal tiles
    # (the same arithmetic as pass 2, so a wrong candidate that ties a right one compares equal, bit for bit)
    pos = torch.cat([tile(a, a).diagonal().T for a in blocks])  # (n, M): s(i, (i, m))
    top_slot, top_t2i = pos.clone(), pos.clone()                # (n, M): image i in slot m, caption (j, m)
    if text_ids is not None:  # and every copy: for caption (j, m), the best of the images holding that text
        for a, b in pairs:
            s = tile(a, b).masked_fill(~right(a, b), -math.inf)  # (|a|, |b|, M), the right pairs only
            top_slot[a], top_t2i[b] = torch.maximum(top_slot[a], s.amax(1)), torch.maximum(top_t2i[b], s.amax(0))
    best = top_slot.amax(1)                                     # (n,) threshold of the image query
    # pass 2: count, per query, the wrong candidates scoring >= the threshold
    rank_i2t = torch.zeros(n, dtype=torch.long, device=img.device)      # among all n*M texts
    rank_slot = torch.zeros(n, M, dtype=torch.long, device=img.device)  # among slot m's n texts only
    rank_t2i = torch.zeros(n, M, dtype=torch.long, device=img.device)   # caption (j, m) among n images
    for a, b in tqdm(pairs, desc="retrieval", disable=None if len(pairs) > 1 else True):
        s, wrong = tile(a, b), ~right(a, b)                # (|a|, |b|, M), (|a|, |b|, 1 or M)
        rank_i2t[a] += (~(s < best[a, None, None]) & wrong).sum((1, 2))
        rank_slot[a] += (~(s < top_slot[a, None, :]) & wrong).sum(1)
        rank_t2i[b] += (~(s < top_t2i[None, b, :]) & wrong).sum(0)
    rank_i2t[best.isnan()] = rank_slot[top_slot.isnan()] = rank_t2i[top_t2i.isnan()] = max(ks)  # NaN: no hit

    def recall(rank, k):
        return 100 * (rank < k).sum().item() / rank.numel()
    out = {f"{d}_R@{k}": recall(r, k) for d, r in (("i2t", rank_i2t), ("t2i", rank_t2i)) for k in ks}
    for m in range(M):  # slot m alone: its n captions are the gallery (i2t) or the queries (t2i)
        out.update({f"slot{m}/{d}_R@{k}": recall(r, k) for d, r in
                    (("i2t", rank_slot[:, m]), ("t2i", rank_t2i[:, m])) for k in ks})
    return out


def text_ids(tokens):
    """tokens (n, M, T) -> (n, M) long, equal exactly for identical token rows (identical texts)."""
    return torch.unique(tokens.flatten(0, 1), dim=0, return_inverse=True)[1].view(tokens.shape[:2])


@torch.no_grad()
def held_out(model, dataset, tokenizer, batch_size=256, device="cpu"):
    """The split's held-out captions (prepare/world.py's "human": H per image, never trained on) -> (txt (n, H, E)
    unit float32 on the CPU, their text_ids); None when not every record has H of them."""
    captions = [r.get("human") for r in dataset.records]
    if tokenizer is None or not all(isinstance(c, list) and c and len(c) == len(captions[0]) for c in captions):
        return None
    tokens = tokenizer.tokenize([t for c in captions for t in c], model.config.context_length)  # (n * H, T)
    txt = torch.cat([model.encode_text(t.to(device)).float().cpu() for t in tokens.split(batch_size)])
    return txt.view(len(captions), -1, txt.shape[-1]), text_ids(tokens.view(len(captions), -1, tokens.shape[-1]))


# ----------------------------------------------------------------------------------------------------
# branch analysis: which branch answers which perspective, and do the branches stay apart?

def branch_analysis(img, txt):
    """img (n, K, E), txt (n, M, E) -> branch_slot_sim (K x M lists), branch_wins (K counts),
    inter_branch_cos (None when K = 1)."""
    K = img.shape[1]
    sim = torch.einsum("nke,nme->nkm", img, txt)  # (n, K, M) branch k vs the image's own slot-m caption
    # free matching's choice k*(i, m) = argmax_k <v[i, k], t[i, m]> over every pair, counted per branch
    wins = torch.bincount(sim.argmax(1).flatten(), minlength=K)   # (K,)
    gram = (img @ img.transpose(1, 2)).mean(0)                     # (K, K) split mean, as in the hinge
    off = (gram.sum() - gram.diagonal().sum()) / (K * (K - 1)) if K > 1 else None
    return {"branch_slot_sim": sim.mean(0).tolist(), "branch_wins": wins.tolist(),
            "inter_branch_cos": None if off is None else off.item()}


# ----------------------------------------------------------------------------------------------------
# zero-shot classification: classes are scored like retrieval texts, <branch_mean(img), c>

@torch.no_grad()
def zeroshot_classifier(model, tokenizer, classnames, templates, device="cpu"):
    """C class names x the prompt templates ("a {} shape.") -> (C, E): the renormalised template mean
    per class, as in CLIP (paper.md section 4)."""
    texts = [t.format(c) for c in classnames for t in templates]
    tokens = tokenizer.tokenize(texts, context_length=model.config.context_length)  # (C * templates, T)
    emb = model.encode_text(tokens.to(device)).float().cpu().view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)                                          # (C, E)


def zeroshot_accuracy(img, classes, labels, aggregate="mean"):
    """img (n, K, E), classes (C, E), labels (n,) -> top-1/top-5 (%), the K branches aggregated as in score()."""
    stats = branch_stats(img, classes) if aggregate in AGGREGATIONS[1:] else None
    return topk_accuracy(score(img, classes, aggregate, stats), labels)  # (n, C) scores


def topk_accuracy(scores, labels, ks=(1, 5)):
    """scores (n, C), labels (n,) -> {k: % of rows whose class is in the top k}; ties and NaN count against."""
    right = scores.gather(1, labels[:, None])  # (n, 1); below: the wrong classes not below it, NaN: no hit at any k
    rank = torch.where(right[:, 0].isnan(), max(ks), (~(scores < right)).sum(1) - 1)
    return {k: 100 * (rank < k).sum().item() / len(rank) for k in ks}


def read_labelled(folder=None, jsonl=None, classnames=None):
    """An image folder per class, or a jsonl of {"image", "label": name or index} -> (paths, labels, names).
    Folder classes come in sorted order, named by `classnames` if given; a jsonl needs `classnames`. A set that
    cannot be scored (no folder, names that do not fit, a label that is no class) is a DataError naming the file."""
    if folder:
        if not Path(folder).is_dir():
            raise data.DataError(f"{folder}: not a folder")
        dirs = sorted(p for p in Path(folder).iterdir() if p.is_dir())
        names = classnames or [d.name.replace("_", " ") for d in dirs]
        if not dirs or len(names) != len(dirs):
            raise data.DataError(f"{folder}: {len(dirs)} class folders but {len(names)} class names")
        items = [(str(f), c) for c, d in enumerate(dirs) for f in sorted(d.iterdir()) if f.is_file()]
        return [p for p, _ in items], torch.tensor([c for _, c in items]), names
    paths, labels = [], []
    for line_no, line in enumerate(read_lines(jsonl, strip=False), 1):
        if line.strip():
            try:
                r = json.loads(line)
                label = r["label"] if type(r["label"]) is int else classnames.index(r["label"])
                if not 0 <= label < len(classnames):
                    raise ValueError(f"label {label} is not one of the {len(classnames)} classes")
                labels.append(label)
                paths.append(str(Path(jsonl).resolve().parent / r["image"]))  # the real folder, as data.py
            except (ValueError, KeyError, TypeError) as e:
                raise data.DataError(f"{jsonl}:{line_no}: bad record ({e!r})") from None
    return paths, torch.tensor(labels), classnames


def read_lines(path, strip=True):
    """A text file's lines (stripped, blank ones dropped); a file that cannot be read is a DataError."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise data.DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return [s.strip() for s in lines if s.strip()] if strip else lines


def load_batch(transform, paths):
    return torch.stack([transform(data.load_image(p)) for p in paths])  # (B, 3, S, S)


@torch.no_grad()
def zeroshot_dataset(model, tokenizer, paths, labels, names, templates, batch_size=256, device="cpu", workers=0,
                     aggregate="mean"):
    """Top-1/top-5 (%) of a user dataset: class prompts vs the images' aggregated scores."""
    classes = zeroshot_classifier(model, tokenizer, names, templates, device)  # (C, E)
    load = partial(load_batch, data.image_transform(model.config.image_size, train=False))
    img = torch.cat([model.encode_image(x.to(device)).float().cpu() for x in tqdm(
        DataLoader(paths, batch_size, num_workers=workers, collate_fn=load), desc="zero-shot", disable=None)])
    return zeroshot_accuracy(img, classes, labels, aggregate)


# ----------------------------------------------------------------------------------------------------
# dense probe (the paper's dense visual tasks, where the synthetic world knows every pixel's object)
# Each patch embedding (ln_post + proj, like the class tokens) is labelled with its nearest class text:
# class 0 = background (the renormalised mean of the background-pattern prompts), class 1 + s = the prompts
# of world.SHAPES[s]. Patch labels are upsampled to pixels (nearest) and compared with the drawn masks.

def confusion(pred, gt, C):
    """Class maps pred, gt (any equal shapes, values < C) -> (C, C) counts, rows = truth, columns = guess."""
    return torch.bincount(gt.flatten() * C + pred.flatten(), minlength=C * C).view(C, C)


def mean_iou(conf):
    """(C, C) confusion -> mean over classes present (in truth or guess) of TP / (TP + FP + FN), in %."""
    tp = conf.diagonal().double()
    union = conf.sum(0) + conf.sum(1) - conf.diagonal()  # TP + FP + FN per class
    return 100 * (tp[union > 0] / union[union > 0]).mean().item()


@torch.no_grad()
def dense_probe(model, dataset, tokenizer, batch_size=256, device="cpu", workers=0):
    """Records with "scene" -> mIoU (%) of per-patch shape labels against the masks redrawn by prepare/world.py."""
    bg = zeroshot_classifier(model, tokenizer, world.PATTERNS, world.LABEL_TEMPLATES["bg_pattern"], device)
    shapes = zeroshot_classifier(model, tokenizer, world.SHAPES, world.LABEL_TEMPLATES["main_shape"], device)
    classes = torch.cat([F.normalize(bg.mean(0), dim=0)[None], shapes])  # (C = 1 + len(SHAPES), E)
    C, conf, i = len(classes), 0, 0
    for images, _ in tqdm(DataLoader(dataset, batch_size, num_workers=workers), desc="dense", disable=None):
        patches = model.encode_patches(images.to(device)).float().cpu()  # (B, N, E)
        g = math.isqrt(patches.shape[1])                                   # patch grid side, N = g^2
        guess = (patches @ classes.T).argmax(-1).view(-1, 1, g, g)         # (B, 1, g, g) class per patch
        for b in range(len(guess)):
            scene = dataset.records[i + b]["scene"]
            lut = torch.tensor([0] + [world.SHAPES.index(o["shape"]) + 1 for o in scene["objects"]])
            truth = lut[torch.from_numpy(world.scene_masks(scene))]        # (S, S) object id -> class
            pred = F.interpolate(guess[b:b + 1].float(), size=truth.shape, mode="nearest")[0, 0].long()
            conf = conf + confusion(pred, truth, C)
        i += len(guess)
    return mean_iou(conf)


# ----------------------------------------------------------------------------------------------------
# everything at once (train.py calls this on rank 0)

def world_shaped(v, key):
    """Whether a record's value v of "labels" (a known class of every world.LABEL_KINDS kind) or "scene" (with
    "image_size", "objects" of known shapes with boxes) is the world's: other data may hold anything there."""
    if key == "labels":
        return isinstance(v, dict) and all(v.get(kind) in names for kind, names in world.LABEL_KINDS.items())
    return (isinstance(v, dict) and "image_size" in v and isinstance(v.get("objects"), list)
            and all(isinstance(o, dict) and o.get("shape") in world.SHAPES and "box" in o for o in v["objects"]))


def evaluate(model, dataset, device="cpu", batch_size=256, workers=0, embeddings=None, tokenizer=None, views=True,
             aggregate="mean"):
    """The headline retrieval "i2t_R@k", "t2i_R@k": on the held-out captions when every record has them (the
    paper's protocol: models are evaluated on texts they never trained on), else on the training texts; "own/..."
    on the training texts (any of the M); with the duplicate rule. views: also the interpretability views (per slot
    and per branch on the training texts, branch analysis) and the dense probe. Given the tokenizer (the dataset
    keeps only token ids): zero-shot and the dense probe when every record has the world's "labels" and "scene"
    (world_shaped; else skipped, said on stderr). embeddings: (img, txt) already computed by embed_split.
    aggregate: how the headline retrieval and zero-shot combine the K branches (score(); the views use "mean")."""
    was_training = model.training
    model.eval()
    img, txt = embeddings if embeddings is not None else embed_split(model, dataset, batch_size, device, workers)
    ids = text_ids(dataset.tokens)
    own = retrieval_metrics(img.to(device), txt, text_ids=ids)
    heldout = held_out(model, dataset, tokenizer, batch_size, device)
    texts, head_ids = heldout if heldout else (txt, ids)
    head = (retrieval_metrics(img.to(device), texts, aggregate, text_ids=head_ids)
            if heldout or aggregate != "mean" else own)
    res = {"retrieval_texts": "held-out" if heldout else "training", "n": len(img), "aggregate": aggregate,
           **{k: v for k, v in head.items() if "/" not in k}, **{f"own/{k}": v for k, v in own.items() if "/" not in k}}
    if views:
        res.update({k: v for k, v in own.items() if k.startswith("slot")})
        for k in range(img.shape[1]):  # each branch alone: which one retrieves best?
            r = retrieval_metrics(img.to(device), txt, branch=k, ks=(1,), text_ids=ids)
            res[f"branch{k}/i2t_R@1"], res[f"branch{k}/t2i_R@1"] = r["i2t_R@1"], r["t2i_R@1"]
        res.update(branch_analysis(img, txt))
    ok = {k: all(world_shaped(r.get(k), k) for r in dataset.records) for k in ("labels", "scene")}  # world's own
    for key, part in (("labels", "zero-shot"), ("scene", "dense probe")):
        if tokenizer is not None and not ok[key] and any(key in r for r in dataset.records):
            print(f"{part} skipped: not every record's {key!r} is the world's (prepare/world.py)", file=sys.stderr)
    if tokenizer is not None and ok["labels"]:  # the synthetic world's labels
        for kind, names in world.LABEL_KINDS.items():
            classes = zeroshot_classifier(model, tokenizer, names, world.LABEL_TEMPLATES[kind], device)  # (C, E)
            labels = torch.tensor([names.index(r["labels"][kind]) for r in dataset.records])         # (n,)
            acc = zeroshot_accuracy(img, classes, labels, aggregate)
            res[f"zs/{kind}/top1"], res[f"zs/{kind}/top5"] = acc[1], acc[5]
    if tokenizer is not None and ok["scene"] and views:
        res["dense_miou"] = dense_probe(model, dataset, tokenizer, batch_size, device, workers)
    model.train(was_training)
    return res


def print_table(results, file=None):
    """Fixed-width: the headline retrieval rows i2t / t2i x R@1/5/10 and zero-shot, how to read them, then the views
    on the training texts (any of the M, per slot, per branch) and the rest. file: sys.stdout as it is now."""
    file = file or sys.stdout

    def row(name, cells):  # a 16-character name, then 9 characters per cell
        print(f"{name:<16}" + "".join(f"{c:>9}" for c in cells), file=file)

    def retrieval(title, prefix=""):
        row(title, ["R@1", "R@5", "R@10"])
        for x in d:
            row(d[x], [f"{results[f'{prefix}{x}_R@{k}']:.2f}" for k in (1, 5, 10)])
    d = {"i2t": "image->text", "t2i": "text->image"}
    held = results.get("retrieval_texts") == "held-out"
    retrieval("held-out texts" if held else "retrieval")
    zs = sorted({k.split("/")[1] for k in results if k.startswith("zs/")})
    if zs:
        print("zero-shot top1/top5  " + " | ".join(
            f"{z} {results[f'zs/{z}/top1']:.1f}/{results[f'zs/{z}/top5']:.1f}" for z in zs), file=file)
    if held:
        print(f"how to read it: compare the two above across runs (held-out image->text R@1 by chance "
              f"{100 / results['n']:.1f} %, main_shape by chance {100 / len(world.SHAPES):.1f} %); below, the texts it "
              f"trained on", file=file)
        retrieval("own texts", "own/")
    for group in ("slot", "branch"):  # M slots, K branches: counted from the keys
        count = sum(k.startswith(group) and k.endswith("/i2t_R@1") for k in results)
        if not count:  # evaluate(views=False)
            continue
        row(f"R@1 per {group}", [f"{group[0]}{j}" for j in range(count)])
        for x in d:
            row(d[x], [f"{results[f'{group}{j}/{x}_R@1']:.2f}" for j in range(count)])
    extra = [f"dense mIoU {results['dense_miou']:.2f}"] if "dense_miou" in results else []
    cos = results.get("inter_branch_cos")  # None when K = 1
    extra += [f"inter-branch cos {cos:.3f}"] if cos is not None else []
    extra += [f"branch wins {results['branch_wins']}"] if "branch_wins" in results else []
    if extra:
        print(" | ".join(extra), file=file)
    sim = results.get("branch_slot_sim", [])
    if sim:  # the K x M matrix, mean <branch k, own slot-m caption>
        row("sim per slot", [f"s{m}" for m in range(len(sim[0]))])
        for k, sims in enumerate(sim):
            row(f"branch {k}", [f"{s:.3f}" for s in sims])


# ----------------------------------------------------------------------------------------------------
# command line: the flags' checks, the checkpoint, main; a bad input file (DataError) exits with its message

def check_flags(args):
    """The flag-validation layer, right after parsing: a combination that cannot work stops here (exit 1)."""
    if args.zeroshot_jsonl and not args.classnames:
        sys.exit("error: --zeroshot-jsonl needs --classnames FILE (one class name per line)")
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size {args.batch_size}: must be at least 1")


def load_checkpoint(path, device):
    """train.py's ckpt.pt -> (the checkpoint, its HolisticCLIP in eval mode on `device`, its tokenizer). Another
    file (text, truncated, a captioner.pt) or a non-finite weight (a NaN model): a DataError naming the file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model, tok = HolisticCLIP(ModelConfig(**ckpt["config"])), data.Tokenizer.from_dict(ckpt["tokenizer"])
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # unpickling, zip, missing key, config or weights of another model: its first sentence
        why = str(e).replace("\n", ". ").split(". ")[0][:160]
        raise data.DataError(f"{path}: not a train.py checkpoint ({type(e).__name__}: {why})") from None
    if bad := [k for k, v in ckpt["model"].items() if v.is_floating_point() and not v.isfinite().all()]:
        raise data.DataError(f"{path}: {len(bad)} non-finite tensors (e.g. {bad[0]}): this checkpoint is broken")
    return ckpt, model.to(device).eval(), tok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="runs/NAME/ckpt.pt written by train.py")
    p.add_argument("--data", required=True, help="records to evaluate (.jsonl/.csv/.tsv), e.g. data/shapes/val.jsonl")
    p.add_argument("--out", help="folder for results.jsonl and the PNGs (default: the checkpoint's folder)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the PNGs")
    p.add_argument("--aggregate", choices=AGGREGATIONS, default="mean",
                   help="how the K branches make one score: the official mean, or standardised, then mean or max")
    user = p.add_mutually_exclusive_group()
    user.add_argument("--zeroshot-folder", help="user zero-shot set: one sub-folder of images per class")
    user.add_argument("--zeroshot-jsonl", help='user zero-shot set: records {"image": path, "label": name or index}')
    p.add_argument("--classnames", help="one class name per line (folder: names the sorted sub-folders)")
    p.add_argument("--templates", help='one prompt template per line, with "{}" (default: "a photo of a {}.")')
    args = p.parse_args()
    check_flags(args)
    # the model and tokenizer from the checkpoint alone; the records and every image checked before the long part
    ckpt, model, tok = load_checkpoint(args.ckpt, args.device)
    out = Path(args.out or Path(args.ckpt).parent)  # made now: a folder that cannot be must not cost the measuring
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise data.DataError(f"{out}: cannot make the output folder ({e.strerror})") from None
    records = data.check_images(args.data, data.read_records(args.data), workers=args.workers)
    dataset = data.ImageTextDataset(records, tok, model.config.image_size, context_length=model.config.context_length)
    print(f"{args.ckpt}: step {ckpt.get('step')} | K {model.config.branches} | {len(dataset)} images | "
          f"M {dataset.tokens.shape[1]} | {tok.truncated} captions truncated | device {args.device}")
    user = args.zeroshot_folder or args.zeroshot_jsonl  # read now: a bad file fails before the long part
    if user:
        paths, labels, names = read_labelled(args.zeroshot_folder, args.zeroshot_jsonl,
                                             read_lines(args.classnames) if args.classnames else None)
        templates = read_lines(args.templates) if args.templates else ["a photo of a {}."]
        if not templates or (bad := [t for t in templates if "{}" not in t]):  # each class its own prompt
            raise data.DataError(f"{args.templates}: " + (f"{bad[0]!r} has no {{}} for the class name" if templates
                                                          else "no templates"))
        if bad := next(filter(None, map(partial(data.load_image, verify=True), paths)), None):
            raise data.DataError(bad)  # "IMAGE: cannot read image (why)", before the long part too
    # measure
    img, txt = embed_split(model, dataset, args.batch_size, args.device, args.workers)  # (n, K, E), (n, M, E)
    results = evaluate(model, dataset, args.device, args.batch_size, args.workers, (img, txt), tok,
                       aggregate=args.aggregate)
    if user:
        acc = zeroshot_dataset(model, tok, paths, labels, names, templates, args.batch_size, args.device, args.workers,
                               args.aggregate)
        results[f"zs/{Path(user).stem}/top1"], results[f"zs/{Path(user).stem}/top5"] = acc[1], acc[5]
    print_table(results)

    # record: one JSON line per evaluation (its key "N" is the split's n images), then the pictures
    meta = {"ckpt": str(args.ckpt), "data": str(args.data), "step": ckpt.get("step"), "epoch": ckpt.get("epoch"),
            "K": img.shape[1], "M": txt.shape[1], "N": len(img), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps({**meta, **results}) + "\n")
    if args.plots:
        slots = world.SLOTS if txt.shape[1] == len(world.SLOTS) else [f"slot {m}" for m in range(txt.shape[1])]
        if (Path(args.ckpt).parent / "metrics.jsonl").exists():
            plot_curves(Path(args.ckpt).parent / "metrics.jsonl").save(out / "curves.png")
        plot_heatmap(results["branch_slot_sim"], slots).save(out / "branch_slot.png")
        plot_attention(model, dataset, device=args.device).save(out / "attention.png")
        plot_retrieval(dataset, branch_mean(img), txt, slots).save(out / "retrieval.png")
    print(f"appended to {out / 'results.jsonl'}" + (f"; pictures in {out}" if args.plots else ""))


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:  # its message names the file (and line): no traceback
        sys.exit(f"error: {e}")
