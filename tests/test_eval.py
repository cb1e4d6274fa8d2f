"""Tests for eval.py: retrieval on hand-made score tables (several captions per image, ties), chunked against a
naive float64 loop, zero-shot on a stub model with a known answer, mIoU on hand-made masks, the K x M branch
matrix on constructed embeddings, the dense probe's mask bookkeeping, and the command line on a tiny checkpoint
(results line, PNG sizes) and what it refuses (a NaN model, other files as checkpoints, bad records). Tie rule
under test: a query's rank = the number of WRONG candidates scoring >= its best correct one; hit@k <=> rank < k
(ties and NaN count against the query). Letters as in eval.py: n images in the split, N patches per image.

    python -m pytest -q tests/test_eval.py
"""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import caption
import data
import eval
from model import PRESETS, HolisticCLIP, ModelConfig
from prepare import world as synthetic  # the world's vocabulary; `world` is the fixture below
from prepare.world import SLOTS

M = len(SLOTS)  # the world's captions per image

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# retrieval

def from_scores(S):
    """A score table S[i, j, m] = s(image i, caption m of image j) -> (img (n, 1, n), txt (n, M, n)) whose
    dot products reproduce it exactly: img[i] = e_i, txt[j, m] = S[:, j, m]."""
    return torch.eye(len(S))[:, None], S.permute(1, 2, 0).contiguous()


# n = 3 images, M = 2 captions; row i lists s(i, (j, m)) for (j, m) = (0,0) (0,1) (1,0) (1,1) (2,0) (2,1)
SCORES = torch.tensor([[5., 1., 4., 0., 3., 0.],
                       [6., 0., 1., 2., 0., 0.],
                       [2., 2., 2., 2., 2., 1.]]).view(3, 3, 2)


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_retrieval_hand_made(chunk):
    # Ranks by hand (wrong candidates scoring >= the correct one; a tie counts against the query):
    # i2t, best own caption: image 0: 5 beats all -> 0; image 1: best own 2, 6 above -> 1; image 2: best own 2,
    #   four wrong texts tie at 2 -> 4.
    # t2i, caption (j, m) vs column S[:, j, m]: (0,0) [5,6,2] -> 1; (0,1) [1,0,2] -> 1; (1,0) [4,1,2] -> 2;
    #   (1,1) [0,2,2] tie -> 1; (2,0) [3,0,2] -> 1; (2,1) [0,0,1] -> 0.
    # slot 0 i2t: [5,4,3] -> 0, [6,1,0] -> 1, [2,2,2] -> 2; slot 1 i2t: [1,0,0] -> 0, [0,2,0] -> 0, [2,2,1] -> 2.
    r = eval.retrieval_metrics(*from_scores(SCORES), ks=(1, 2, 3), chunk=chunk)
    third = 100 / 3
    expect = {"i2t_R@1": third, "i2t_R@2": 2 * third, "i2t_R@3": 2 * third,
              "t2i_R@1": 100 / 6, "t2i_R@2": 500 / 6, "t2i_R@3": 100,
              "slot0/i2t_R@1": third, "slot0/i2t_R@2": 2 * third, "slot0/i2t_R@3": 100,
              "slot1/i2t_R@1": 2 * third, "slot1/i2t_R@2": 2 * third, "slot1/i2t_R@3": 100,
              "slot0/t2i_R@1": 0, "slot0/t2i_R@2": 2 * third, "slot0/t2i_R@3": 100,
              "slot1/t2i_R@1": third, "slot1/t2i_R@2": 100, "slot1/t2i_R@3": 100}
    assert r == pytest.approx(expect)


def test_retrieval_all_tied_scores_zero():
    # a collapsed model (every score equal) must not look perfect: every wrong candidate ties, so R@k = 0
    r = eval.retrieval_metrics(*from_scores(torch.ones(4, 4, 3)), ks=(1, 5, 9), chunk=3)
    assert r["i2t_R@9"] == 0 and r["t2i_R@1"] == 0 and r["i2t_R@5"] == 0
    assert r["slot2/i2t_R@1"] == 0 and r["slot1/t2i_R@5"] == 100  # 3 wrong images < 5


def test_retrieval_nan_is_never_a_hit():
    # a broken model's NaN scores fail every ">=": they must count against the query, never for it
    r = eval.retrieval_metrics(*from_scores(torch.full((3, 3, 2), math.nan)), ks=(1, 5, 10))
    assert set(r.values()) == {0}  # even R@10 with only 4 wrong texts: no NaN query is a hit
    # one NaN coordinate in caption (2, 0)'s embedding: its score with every image is NaN. It counts against
    # the other queries (image 0 loses its first place to it) and its own queries are never hits
    img, txt = from_scores(SCORES)
    txt[2, 0, 1] = math.nan
    r = eval.retrieval_metrics(img, txt, ks=(1, 10), chunk=2)
    assert r["i2t_R@1"] == 0 and r["slot0/i2t_R@1"] == 0 and r["t2i_R@1"] == pytest.approx(100 / 6)
    assert r["i2t_R@10"] == pytest.approx(200 / 3) and r["t2i_R@10"] == pytest.approx(500 / 6)
    assert r["slot0/i2t_R@10"] == pytest.approx(200 / 3) and r["slot0/t2i_R@10"] == pytest.approx(200 / 3)


def naive_ranks(img, txt, branch):
    """float64 loops: scores as the mean over branches of the branch cosines (or one branch); the position
    (0-based) of the first correct item in a descending sort. Random data has no ties."""
    img, txt = img.double(), txt.double()
    n, K, _ = img.shape
    M = txt.shape[1]
    per_branch = torch.stack([torch.einsum("ie,jme->ijm", img[:, k], txt) for k in range(K)])  # (K, n, n, M)
    if branch in ("std-mean", "std-max"):  # each branch standardised over all n x n x M pairs, by torch.std
        flat = per_branch.flatten(1)
        z = (per_branch - flat.mean(1)[:, None, None, None]) / flat.std(1, correction=0)[:, None, None, None]
        s = z.mean(0) if branch == "std-mean" else z.amax(0)
    else:
        s = per_branch.mean(0) if branch == "mean" else per_branch[branch]  # (n, n, M)
    i2t, t2i, slot = [], [], [[] for _ in range(M)]
    for i in range(n):
        order = s[i].flatten().argsort(descending=True).tolist()  # texts j * M + m
        i2t.append(min(order.index(i * M + m) for m in range(M)))
        for m in range(M):
            slot[m].append(s[i, :, m].argsort(descending=True).tolist().index(i))
    for j in range(n):
        for m in range(M):
            t2i.append(s[:, j, m].argsort(descending=True).tolist().index(j))
    return torch.tensor(i2t), torch.tensor(t2i), [torch.tensor(x) for x in slot]


@pytest.mark.parametrize("branch", ["mean", 0, 2, "std-mean", "std-max"])
def test_retrieval_chunked_matches_naive(branch):
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(23, 3, 8, generator=g), dim=-1)  # n = 23, K = 3, E = 8
    txt = F.normalize(torch.randn(23, 4, 8, generator=g), dim=-1)  # M = 4
    i2t, t2i, slot = naive_ranks(img, txt, branch)
    full = eval.retrieval_metrics(img, txt, branch=branch, chunk=1024)
    for chunk in (5, 23):  # uneven tiles (5, 5, 5, 5, 3) and one tile
        assert eval.retrieval_metrics(img, txt, branch=branch, chunk=chunk) == full
    for k in (1, 5, 10):
        assert full[f"i2t_R@{k}"] == pytest.approx(100 * (i2t < k).double().mean().item())
        assert full[f"t2i_R@{k}"] == pytest.approx(100 * (t2i < k).double().mean().item())
        for m in range(4):
            assert full[f"slot{m}/i2t_R@{k}"] == pytest.approx(100 * (slot[m] < k).double().mean().item())


def test_retrieval_duplicate_texts_count_as_the_querys_own():
    """The duplicate rule on a hand-made table: caption (1, 0) is the same text as (0, 1) (same id, so the same
    scores in every row). Image 0 owns ids {0, 1}, image 1 {1, 2}, image 2 {3, 4}.
    i2t (best own score; wrong = texts whose id is none of the image's own): image 0: 5, nothing wrong >= 5 -> 0;
      image 1: own (1, 0) = 0, (1, 1) = 2 -> 2, wrong (0, 0) = 6 above -> 1; image 2: 2, four wrong ties -> 4.
    t2i (query (j, m) against column S[:, j, m]; images holding the same text are right): (0, 0) [5,6,2] -> 1;
      (0, 1) [1,0,2] -> 1; (1, 0) [1,0,2] own 0: image 0 holds the text too, so only image 2 -> 1 (without the
      rule 2); (1, 1) [0,2,2] tie -> 1; (2, 0) [3,0,2] -> 1; (2, 1) [0,0,1] -> 0."""
    S = torch.tensor([[5., 1., 1., 0., 3., 0.],
                      [6., 0., 0., 2., 0., 0.],
                      [2., 2., 2., 2., 2., 1.]]).view(3, 3, 2)
    ids = torch.tensor([[0, 1], [1, 2], [3, 4]])
    with_rule = eval.retrieval_metrics(*from_scores(S), ks=(1, 2, 5), chunk=2, text_ids=ids)
    assert with_rule["i2t_R@1"] == pytest.approx(100 / 3) and with_rule["i2t_R@2"] == pytest.approx(200 / 3)
    assert with_rule["t2i_R@1"] == pytest.approx(100 / 6) and with_rule["t2i_R@2"] == 100
    without = eval.retrieval_metrics(*from_scores(S), ks=(1, 2, 5), chunk=2)
    assert without["t2i_R@2"] == pytest.approx(500 / 6)  # (1, 0) ranks 2 when image 0's copy counts as wrong
    assert eval.text_ids(torch.tensor([[[1, 2], [3, 4]], [[3, 4], [1, 5]]])).tolist() == [[0, 2], [2, 1]]


def test_retrieval_duplicate_rule_against_a_loop():
    """Many shared texts (ids from a small set, a text's embedding a function of its id) against the rule written
    out per query: rank = wrong candidates scoring >= the BEST right one, where the right ones are every copy of
    the query's own texts (i2t, per slot) or every image holding the query text (t2i). Integer embeddings in
    float64: exact ties. Earlier, t2i and the slot views compared against the query's own pair only, and a wrong
    image between it and a better copy cost the query its hit."""
    g = torch.Generator().manual_seed(0)
    n, M, K, E = 9, 3, 2, 4
    ids = torch.randint(0, 6, (n, M), generator=g)
    img = torch.randint(-2, 3, (n, K, E), generator=g).double()
    txt = torch.randint(-2, 3, (6, E), generator=g).double()[ids]  # (n, M, E)
    s = torch.einsum("ie,jme->ijm", img.mean(1), txt)              # (n, n, M)

    def rank(scores, right):  # one query: its candidates' scores and which are right
        return int(((scores >= scores[right].max()) & ~right).sum())
    own = [{int(t) for t in ids[i]} for i in range(n)]
    held = torch.tensor([[[int(ids[j, m]) in own[i] for m in range(M)] for j in range(n)] for i in range(n)])
    i2t = [rank(s[i].flatten(), held[i].flatten()) for i in range(n)]
    slot = [[rank(s[i, :, m], held[i, :, m]) for m in range(M)] for i in range(n)]
    t2i = [[rank(s[:, j, m], held[:, j, m]) for m in range(M)] for j in range(n)]
    ks = (1, 2, 3)
    got = eval.retrieval_metrics(img, txt, ks=ks, chunk=4, text_ids=ids)
    for k in ks:
        assert got[f"i2t_R@{k}"] == pytest.approx(100 * sum(r < k for r in i2t) / n)
        assert got[f"t2i_R@{k}"] == pytest.approx(100 * sum(r < k for rs in t2i for r in rs) / (n * M))
        for m in range(M):
            assert got[f"slot{m}/i2t_R@{k}"] == pytest.approx(100 * sum(slot[i][m] < k for i in range(n)) / n)
            assert got[f"slot{m}/t2i_R@{k}"] == pytest.approx(100 * sum(t2i[j][m] < k for j in range(n)) / n)


def test_retrieval_branch_mean_is_unnormalised_branch_average():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(30, 2, 6, generator=g), dim=-1)
    txt = F.normalize(torch.randn(30, 2, 6, generator=g), dim=-1)
    # "mean" = one image vector mean_k v_k, not renormalised (the paper's mean of branch cosines)
    assert eval.retrieval_metrics(img, txt) == eval.retrieval_metrics(img.mean(1, keepdim=True), txt)
    # an int branch reads that branch alone
    assert eval.retrieval_metrics(img, txt, branch=1) == eval.retrieval_metrics(img[:, 1:], txt)


# ----------------------------------------------------------------------------------------------------
# zero-shot, branch analysis, mIoU

class StubTokenizer:
    """Each known text becomes one token: its index in the list."""
    def __init__(self, texts):
        self.ids = {t: i for i, t in enumerate(texts)}

    def tokenize(self, texts, context_length):
        return torch.tensor([[self.ids[t]] for t in texts])  # (n, 1)


class StubModel(torch.nn.Module):
    """encode_text looks the text's embedding up in a table."""
    def __init__(self, table):
        super().__init__()
        self.table, self.config = table, SimpleNamespace(context_length=4)

    def encode_text(self, tokens):
        return self.table[tokens[..., 0]]


def test_zeroshot_known_answer():
    e = torch.eye(4)
    names, templates = ["cat", "dog", "fox"], ["a {}.", "the {}!"]
    # template 0 of class c embeds as unit(e_c + e_3), template 1 as unit(e_c - e_3): their renormalised mean is e_c
    texts = [t.format(c) for c in names for t in templates]
    table = torch.stack([F.normalize(e[c] + (1 if t == 0 else -1) * e[3], dim=0) for c in range(3) for t in range(2)])
    classes = eval.zeroshot_classifier(StubModel(table), StubTokenizer(texts), names, templates)
    assert torch.allclose(classes, e[:3], atol=1e-6)
    u = lambda *v: F.normalize(sum(v), dim=0)  # noqa: E731
    # image (K = 2 branches) -> scores mean_k <v_k, e_c>; labels and the correct class's rank by hand:
    img = torch.stack([torch.stack([e[0], e[3]]),          # label 0: scores (.5, 0, 0) -> rank 0
                       torch.stack([e[1], u(e[1], e[2])]),  # label 1: (0, .85, .35) -> 0
                       torch.stack([e[0], u(e[2], e[0])]),  # label 2: (.85, 0, .35) -> 1
                       torch.stack([e[0], e[2]]),           # label 1: (.5, 0, .5) -> 2
                       torch.stack([e[0], e[1]])])          # label 0: (.5, .5, 0) tie -> 1 (ties count against)
    acc = eval.topk_accuracy(img.mean(1) @ classes.T, torch.tensor([0, 1, 2, 1, 0]), ks=(1, 2, 3, 5))
    assert acc == pytest.approx({1: 40, 2: 80, 3: 100, 5: 100})


def test_topk_nan_is_never_a_hit():
    nan = math.nan
    scores = torch.tensor([[nan, 1., 0.],   # label 1: the NaN class counts against it -> rank 1
                           [0., nan, 1.],   # label 0: NaN and 1 above -> rank 2
                           [1., 0., 2.],    # label 2 -> rank 0
                           [0., nan, 0.]])  # label 1 scores NaN: never a hit, not even in the top 5 of 3
    acc = eval.topk_accuracy(scores, torch.tensor([1, 0, 2, 1]), ks=(1, 2, 3, 5))
    assert acc == pytest.approx({1: 25, 2: 50, 3: 75, 5: 75})


def test_branch_analysis_constructed():
    e, r2 = torch.eye(4), math.sqrt(0.5)
    u = lambda *v: F.normalize(sum(v), dim=0)  # noqa: E731
    img = torch.stack([torch.stack([e[0], e[1]]), torch.stack([e[0], u(e[0], e[1])])])  # (n=2, K=2, E=4)
    txt = torch.stack([torch.stack([e[0], e[1], u(e[0], 2 * e[1])]),
                       torch.stack([e[0], u(e[1], e[2]), e[1]])])                         # (n=2, M=3, E=4)
    a = eval.branch_analysis(img, txt)
    # sim[b, k, m]: b0: k0 (1, 0, 1/sqrt5), k1 (0, 1, 2/sqrt5); b1: k0 (1, 0, 0), k1 (r2, r2^2, r2)
    expect = [[1, 0, 0.5 / math.sqrt(5)], [r2 / 2, (1 + 0.5) / 2, (2 / math.sqrt(5) + r2) / 2]]
    assert torch.allclose(torch.tensor(a["branch_slot_sim"]), torch.tensor(expect), atol=1e-6)
    assert a["branch_wins"] == [2, 4]  # argmax_k per (b, m): b0 -> 0, 1, 1; b1 -> 0, 1, 1
    assert a["inter_branch_cos"] == pytest.approx((0 + r2) / 2)
    assert eval.branch_analysis(img[:, :1], txt)["inter_branch_cos"] is None  # K = 1: no pair of branches


def test_mean_iou_hand_made():
    gt = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 1]])
    # IoU by hand: class 0 = 2 / (3 + 3 - 2) = .5; class 1 = 3 / (3 + 4 - 3) = .75; class 2 = 1 / (2 + 1 - 1) = .5
    for C in (3, 5):  # classes never seen (3, 4) do not count
        assert eval.mean_iou(eval.confusion(pred, gt, C)) == pytest.approx(100 * (0.5 + 0.75 + 0.5) / 3)
    assert eval.mean_iou(eval.confusion(gt, gt, 3)) == 100


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny synthetic world: 32 train + 16 val images, tokenizer trained on the train captions."""
    out = tmp_path_factory.mktemp("world")
    synthetic.make_world(str(out), train_size=32, val_size=16)
    return out


def test_dense_probe_all_background(world):
    # a stub whose every patch is the background text: IoU(background) = background pixels / all pixels, every
    # shape class present in the masks has IoU 0, so mIoU = that fraction / (1 + number of shape classes present)
    bg_texts = [t.format(p) for p in synthetic.PATTERNS for t in synthetic.LABEL_TEMPLATES["bg_pattern"]]
    shape_texts = [t.format(s) for s in synthetic.SHAPES for t in synthetic.LABEL_TEMPLATES["main_shape"]]
    C = 1 + len(synthetic.SHAPES)
    per_shape = len(synthetic.LABEL_TEMPLATES["main_shape"])
    table = torch.eye(C)[[0] * len(bg_texts) + [1 + i // per_shape for i in range(len(shape_texts))]]  # (texts, C)
    model = StubModel(table)
    model.encode_patches = lambda images: torch.eye(C)[0].expand(len(images), 64, C)  # (B, N = 64, E = C)
    tok = data.Tokenizer.load(str(world / "tokenizer.json"))
    dataset = data.ImageTextDataset(data.read_records(str(world / "val.jsonl")), tok, 64, context_length=48)
    background, pixels, present = 0, 0, set()
    for r in dataset.records:
        masks = synthetic.scene_masks(r["scene"])
        background, pixels = background + (masks == 0).sum(), pixels + masks.size
        present |= {r["scene"]["objects"][i - 1]["shape"] for i in set(masks.flatten().tolist()) - {0}}
    miou = eval.dense_probe(model, dataset, StubTokenizer(bg_texts + shape_texts), batch_size=5)
    assert miou == pytest.approx(100 * background / pixels / (1 + len(present)))


# ----------------------------------------------------------------------------------------------------
# the command line on a tiny checkpoint

KEYS = ["ckpt", "data", "step", "K", "M", "N", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10",
        "slot0/i2t_R@1", f"slot{M - 1}/t2i_R@10", "branch0/i2t_R@1", "branch1/t2i_R@1", "branch_slot_sim",
        "branch_wins", "inter_branch_cos", "dense_miou", "zs/val_shapes/top1", "zs/val_shapes/top5"]
KEYS += [f"zs/{kind}/top{k}" for kind in synthetic.LABEL_KINDS for k in (1, 5)]


def tiny_checkpoint(world, path):
    """A random K = 2 HolisticCLIP on the world's tokenizer, saved as train.py saves it -> (model, tokenizer)."""
    torch.manual_seed(0)
    tok = data.Tokenizer.load(str(world / "tokenizer.json"))
    small = dict(vision_width=32, vision_layers=1, vision_heads=2, text_width=32, text_layers=1, text_heads=2,
                 embed_dim=16, branches=2, mlp_branch_layers=1, vocab_size=tok.vocab_size, context_length=40)
    cfg = ModelConfig(**{**PRESETS["tiny"], **small})
    model = HolisticCLIP(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": asdict(cfg), "tokenizer": tok.to_dict(), "step": 7,
                "epoch": 1, "args": {}, "optimizer": {}, "rng": {}}, path)
    return model, tok


def test_cli(world, tmp_path, monkeypatch, capsys):
    run = tmp_path / "runs" / "tiny"
    model, tok = tiny_checkpoint(world, run / "ckpt.pt")
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5 - s / 2, "lr": s * 1e-4, "scale": 14.3,
                                **({"val/i2t_R@1": 10.0 * s} if s % 2 else {})}) + "\n")
    # a user zero-shot set: jsonl with a "label" field + class-name file (the main shape, read by the world)
    records = [json.loads(line) for line in open(world / "val.jsonl")]
    with open(tmp_path / "val_shapes.jsonl", "w") as f:
        f.writelines(json.dumps({"image": str(world / r["image"]), "label": r["labels"]["main_shape"]}) + "\n"
                     for r in records)
    (tmp_path / "shapes.txt").write_text("\n".join(synthetic.SHAPES) + "\n")
    (tmp_path / "templates.txt").write_text("a {}\none {}\n")

    cmd = [sys.executable, "eval.py", "--ckpt", str(run / "ckpt.pt"), "--data", str(world / "val.jsonl"),
           "--batch-size", "8", "--device", "cpu", "--zeroshot-jsonl", str(tmp_path / "val_shapes.jsonl"),
           "--classnames", str(tmp_path / "shapes.txt"), "--templates", str(tmp_path / "templates.txt")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "image->text" in p.stdout and "text->image" in p.stdout
    lines = (run / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(KEYS) <= set(res), set(KEYS) - set(res)
    assert (res["K"], res["M"], res["N"], res["step"]) == (2, M, 16, 7)
    assert all(0 <= res[k] <= 100 for k in res if "R@" in k or k.startswith("zs/") or k == "dense_miou")
    assert torch.tensor(res["branch_slot_sim"]).shape == (2, M) and sum(res["branch_wins"]) == 16 * M
    # PNG sizes from the drawing code's constants: 96 px cells, 2 px grid padding, 16 px headers
    cell = 96 + 2
    sizes = {"curves.png": (4 * 360, 240),                      # loss, lr, scale, validation panels
             "branch_slot.png": (64 + 72 * M + 8, 40 + 28 * 2 + 8),  # K = 2 rows x M slots
             "attention.png": (3 * cell + 2, 4 * cell + 2 + 16),     # 4 images x (image + K = 2 branches)
             "retrieval.png": (5 * (cell + 6) + 2, 4 * (cell + 6 + 2 + 16))}  # 4 queries x top 5, 3 px frames
    for name, size in sizes.items():
        with Image.open(run / name) as im:
            assert (im.format, im.size, im.mode) == ("PNG", size, "RGB"), name

    # --help: the whole module docstring (commands, letters) and every flag
    monkeypatch.setattr(sys, "argv", ["eval.py", "--help"])
    with pytest.raises(SystemExit) as stop:
        eval.main()
    help_text = capsys.readouterr().out
    assert stop.value.code == 0 and "--zeroshot-folder" in help_text and "--compare" not in help_text

    # the folder form of the same user set (one folder per shape, some empty) gives the same numbers
    for shape in synthetic.SHAPES:
        (tmp_path / "folder" / shape).mkdir(parents=True)
    for r in records:
        (tmp_path / "folder" / r["labels"]["main_shape"] / Path(r["image"]).name).symlink_to(world / r["image"])
    paths, labels, names = eval.read_labelled(folder=tmp_path / "folder")
    assert len(paths) == 16 and names == sorted(synthetic.SHAPES)
    acc = eval.zeroshot_dataset(model.eval(), tok, paths, labels, names, ["a {}", "one {}"], batch_size=8)
    assert acc == pytest.approx({1: res["zs/val_shapes/top1"], 5: res["zs/val_shapes/top5"]})


# ----------------------------------------------------------------------------------------------------
# what the command line refuses: a message naming the file (and line), exit status 1, nothing written

def refused(monkeypatch, *argv):
    """eval.main on a command line it must refuse -> its DataError's message, which the command line prints
    after "error: " (exit status 1, see test_cli_refuses_nan_checkpoint)."""
    monkeypatch.setattr(sys, "argv", ["eval.py", "--device", "cpu", "--no-plots", *map(str, argv)])
    with pytest.raises(data.DataError) as stop:
        eval.main()
    return str(stop.value)


def test_cli_refuses_nan_checkpoint(world, tmp_path):
    """NaN scores pass no ">=" test: a NaN model scored 100 % and was appended to results.jsonl. A batch size of 0
    stops too, named."""
    tiny_checkpoint(world, tmp_path / "good.pt")
    ckpt = torch.load(tmp_path / "good.pt", weights_only=True)
    ckpt["model"]["visual.proj"][0, 0] = math.nan  # one broken weight
    torch.save(ckpt, tmp_path / "ckpt.pt")
    p = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--data",
                        str(world / "val.jsonl"), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert f"error: {tmp_path / 'ckpt.pt'}: 1 non-finite tensors (e.g. visual.proj)" in p.stderr, p.stderr
    assert not (tmp_path / "results.jsonl").exists()
    p = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "good.pt"), "--data",
                        str(world / "val.jsonl"), "--batch-size", "0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)  # a batch of 0 images would loop forever or divide by zero
    assert p.returncode == 1 and p.stderr.strip() == "error: --batch-size 0: must be at least 1", p.stderr


@pytest.mark.parametrize("kind", ["text", "truncated", "captioner"])
def test_cli_refuses_other_files_as_checkpoints(world, tmp_path, monkeypatch, kind):
    tiny_checkpoint(world, tmp_path / "real.pt")
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("step 7\n")
    elif kind == "truncated":  # half of a real checkpoint, as a copy cut short leaves it
        real = (tmp_path / "real.pt").read_bytes()
        path.write_bytes(real[:len(real) // 2])
    else:  # caption.py's checkpoint: a real file of the wrong kind
        cfg = caption.CaptionerConfig(caption.vision_config("tiny", 0, 300), ["main"], 300, 32, 32, 1, 2)
        torch.save({"config": asdict(cfg), "model": caption.Captioner(cfg).state_dict(), "step": 1}, path)
    msg = refused(monkeypatch, "--ckpt", path, "--data", world / "val.jsonl")
    assert msg.startswith(f"{path}: not a train.py checkpoint ("), msg
    assert not (tmp_path / "results.jsonl").exists()


def copy_records(world, path, change):
    """The world's val.jsonl with absolute image paths, the third record changed by `change`, written to path."""
    records = [json.loads(line) for line in open(world / "val.jsonl")]
    for r in records:
        r["image"] = str(world / r["image"])
    change(records[2])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_bad_records_stop_up_front(world, tmp_path, monkeypatch):
    """A record whose image cannot be read, and mixed caption counts: FILE:LINE before any embedding; an --out
    that is a file."""
    tiny_checkpoint(world, tmp_path / "ckpt.pt")
    (tmp_path / "text.png").write_text("not an image")
    bad = copy_records(world, tmp_path / "bad_image.jsonl", lambda r: r.update(image=str(tmp_path / "text.png")))
    msg = refused(monkeypatch, "--ckpt", tmp_path / "ckpt.pt", "--data", bad)
    assert msg.startswith(f"{bad}:3: ") and "text.png" in msg, msg
    mixed = copy_records(world, tmp_path / "mixed.jsonl", lambda r: r.update(caption=r["caption"][:2]))
    msg = refused(monkeypatch, "--ckpt", tmp_path / "ckpt.pt", "--data", mixed)
    assert msg.startswith(f"{mixed}:3: "), msg
    # an --out that cannot be a folder: said before the measuring (it failed after, and the numbers were lost)
    msg = refused(monkeypatch, "--ckpt", tmp_path / "ckpt.pt", "--data", world / "val.jsonl", "--out", bad)
    assert msg == f"{bad}: cannot make the output folder (File exists)", msg
    assert not (tmp_path / "results.jsonl").exists()


def test_labelled_jsonl_reads_images_from_its_real_folder(tmp_path):
    """A symlinked zero-shot jsonl reads its relative image paths from the folder of the file it points to, as
    data.py's records do (they were read from the link's folder)."""
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "labels.jsonl").write_text(json.dumps({"image": "1.png", "label": "b"}) + "\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "set" / "labels.jsonl")
    paths, labels, names = eval.read_labelled(jsonl=tmp_path / "link.jsonl", classnames=["a", "b"])
    assert paths == [str(tmp_path.resolve() / "set" / "1.png")] and labels.tolist() == [1]


def test_cli_bad_user_zero_shot_sets_stop_up_front(world, tmp_path, monkeypatch):
    """A user zero-shot set that cannot be scored is a DataError naming the file before any embedding (these were
    tracebacks, one after the long part); a template without {} gave every class the same prompt, silently."""
    tiny_checkpoint(world, tmp_path / "ckpt.pt")
    image = str(world / data.read_records(str(world / "val.jsonl"))[0]["image"])
    for name in ("a", "b"):
        (tmp_path / "set" / name).mkdir(parents=True)
        os.symlink(image, tmp_path / "set" / name / "1.png")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    (tmp_path / "label7.jsonl").write_text(json.dumps({"image": image, "label": 7}) + "\n")
    (tmp_path / "plain.txt").write_text("a photo of {}\na photo\n")
    cases = {("--zeroshot-folder", tmp_path / "none"): f"{tmp_path / 'none'}: not a folder",
             ("--zeroshot-folder", tmp_path / "set", "--classnames", tmp_path / "three.txt"):
                 f"{tmp_path / 'set'}: 2 class folders but 3 class names",
             ("--zeroshot-jsonl", tmp_path / "label7.jsonl", "--classnames", tmp_path / "no.txt"):
                 f"{tmp_path / 'no.txt'}: cannot read (No such file or directory)",
             ("--zeroshot-jsonl", tmp_path / "label7.jsonl", "--classnames", tmp_path / "three.txt"):
                 f"{tmp_path / 'label7.jsonl'}:1: bad record (ValueError('label 7 is not one of the 3 classes'))",
             ("--zeroshot-folder", tmp_path / "set", "--templates", tmp_path / "plain.txt"):
                 f"{tmp_path / 'plain.txt'}: 'a photo' has no {{}} for the class name"}
    for flags, message in cases.items():
        msg = refused(monkeypatch, "--ckpt", tmp_path / "ckpt.pt", "--data", world / "val.jsonl", *flags)
        assert msg.startswith(message), (flags, msg)
    (tmp_path / "set" / "b" / "2.png").write_text("not an image")
    msg = refused(monkeypatch, "--ckpt", tmp_path / "ckpt.pt", "--data", world / "val.jsonl",
                  "--zeroshot-folder", tmp_path / "set")
    assert msg.startswith(f"{tmp_path / 'set' / 'b' / '2.png'}: cannot read image ("), msg
    assert not (tmp_path / "results.jsonl").exists()


def test_cli_fifo_image_does_not_hang(world, tmp_path):
    """A FIFO opened for reading waits for a writer forever: it must be refused, not read."""
    tiny_checkpoint(world, tmp_path / "ckpt.pt")
    os.mkfifo(tmp_path / "fifo.png")
    fifo = copy_records(world, tmp_path / "fifo.jsonl", lambda r: r.update(image=str(tmp_path / "fifo.png")))
    p = subprocess.run([sys.executable, "eval.py", "--ckpt", str(tmp_path / "ckpt.pt"), "--data", str(fifo),
                        "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "Traceback" not in p.stderr and f"error: {fifo}:3: " in p.stderr, p.stderr


@pytest.mark.parametrize("foreign", ["types", "names"])
def test_evaluate_skips_foreign_labels_and_scenes(world, tmp_path, capsys, foreign):
    """Records keep their other keys, so "labels" and "scene" may be anything: the world's zero-shot and dense
    probe run only on the world's own shapes of them, and a skip is said once (it crashed after training)."""
    model, tok = tiny_checkpoint(world, tmp_path / "ckpt.pt")
    records = data.read_records(str(world / "val.jsonl"))
    r = records[3]
    if foreign == "types":
        r["labels"], r["scene"] = "cat", [1, 2]
    else:  # the right types, names the world does not know
        r["labels"] = {**r["labels"], "main_shape": "blob"}
        r["scene"] = {**r["scene"], "objects": [{**o, "shape": "blob"} for o in r["scene"]["objects"]]}
    dataset = data.ImageTextDataset(records, tok, model.config.image_size, context_length=model.config.context_length)
    res = eval.evaluate(model, dataset, batch_size=8, tokenizer=tok)
    assert res["i2t_R@1"] >= 0 and "dense_miou" not in res and not any(k.startswith("zs/") for k in res)
    err = capsys.readouterr().err
    assert err.count("zero-shot skipped") == 1 and err.count("dense probe skipped") == 1, err


@pytest.mark.parametrize("how", ["mean", "std-mean", "std-max"])
def test_zeroshot_aggregations_match_a_loop(how):
    """zeroshot_accuracy with each aggregation against a loop over images, branches and classes: branch k's
    scores standardised by their mean and spread over all (image, class) pairs, then the mean or the max."""
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(40, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    classes = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 5, (40,), generator=g)
    s = [[[float(img[i, k] @ classes[c]) for c in range(5)] for k in range(3)] for i in range(40)]
    mean = [sum(s[i][k][c] for i in range(40) for c in range(5)) / 200 for k in range(3)]
    spread = [math.sqrt(sum((s[i][k][c] - mean[k]) ** 2 for i in range(40) for c in range(5)) / 200) for k in range(3)]
    right = 0
    for i in range(40):
        if how == "mean":
            agg = [sum(s[i][k][c] for k in range(3)) / 3 for c in range(5)]
        else:
            z = [[(s[i][k][c] - mean[k]) / spread[k] for k in range(3)] for c in range(5)]
            agg = [sum(zc) / 3 if how == "std-mean" else max(zc) for zc in z]
        right += max(range(5), key=agg.__getitem__) == labels[i]
    assert eval.zeroshot_accuracy(img, classes, labels, how)[1] == pytest.approx(100 * right / 40)
