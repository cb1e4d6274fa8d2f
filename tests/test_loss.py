"""Tests for loss.py: the M2M loss against independent computations.

    python -m pytest -q tests/test_loss.py            # ~25 s on 2 CPU cores
    python -m pytest -q tests/test_loss.py -m slow    # the torch.compile'd path (cold compile ~40 s)

Independent references: a naive Python loop written from paper.md section 3, a hand-computed 2 x 2 CLIP
example, the special cases K = M = 1 (CLIP) and K = 1 (one-to-many), float64 agreement of the fused and
reference paths, torch.autograd.gradcheck, and a second process (2-rank gloo run).
The compiled test is marked slow (pytest.ini skips slow tests by default): a cold torch.compile of the
two tile functions took 37-42 s on 2 shared CPU cores (under 10 s with a warm inductor cache).
"""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loss import RowCrossEntropy, branch_diversity, clip_loss, grad_tile, lse_tile, m2m_loss, unit

CASES = [(3, 3), (2, 4), (4, 2)]  # (K, M): one-to-one, K < M, K > M


def features(B, K, M, E=8, seed=0, dtype=torch.float64):
    """Random unit img (B, K, E), txt (B, M, E) and a float64 scale."""
    torch.manual_seed(seed)
    return unit(B, K, E, dtype=dtype), unit(B, M, E, dtype=dtype), torch.tensor(7.5, dtype=torch.float64)


def value_and_grads(fn, img, txt, scale):
    """fn(img, txt, scale) and its gradients with respect to the three inputs, on fresh leaves."""
    x = [t.detach().clone().requires_grad_() for t in (img, txt, scale)]
    loss = fn(*x)
    loss.backward()
    return [loss.detach()] + [torch.zeros_like(t) if t.grad is None else t.grad for t in x]


# ----------------------------------------------------------------------------
# reference against independent computations

def naive_m2m(img, txt, s):
    """paper.md section 3 in plain Python: for every slot m and sample b pick branch k (m when the slot
    is paired, else the argmax of the own-pair similarity), then one image->text row (image b's branch k
    vs slot-m texts of all images) and one text->image row (branch k of all images vs text (b, m))."""
    img, txt = img.tolist(), txt.tolist()
    B, K, M = len(img), len(img[0]), len(txt[0])
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    ce = lambda row, target: math.log(sum(math.exp(x) for x in row)) - row[target]
    total = 0.0
    for m in range(M):
        for b in range(B):
            if K == M or (K < M and m < K):
                k = m
            else:
                k = max(range(K), key=lambda k: dot(img[b][k], txt[b][m]))
            i2t = [s * dot(img[b][k], txt[j][m]) for j in range(B)]
            t2i = [s * dot(img[i][k], txt[b][m]) for i in range(B)]
            total += (ce(i2t, b) + ce(t2i, b)) / 2
    return total / (M * B)


@pytest.mark.parametrize("K,M", CASES)
def test_reference_equals_naive_loop(K, M):
    img, txt, scale = features(5, K, M)
    assert m2m_loss(img, txt, scale).item() == pytest.approx(naive_m2m(img, txt, scale.item()), abs=1e-12)


def test_clip_loss_by_hand():
    # img = identity, txt = [(0.6, 0.8), (0, 1)], s = 2: logits = [[1.2, 0], [1.6, 2]]
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    rows = (math.log(math.exp(1.2) + math.exp(0)) - 1.2 + math.log(math.exp(1.6) + math.exp(2)) - 2) / 2
    cols = (math.log(math.exp(1.2) + math.exp(1.6)) - 1.2 + math.log(math.exp(0) + math.exp(2)) - 2) / 2
    assert clip_loss(img, txt, 2.0).item() == pytest.approx((rows + cols) / 2, abs=1e-12)


def test_one_branch_one_text_is_clip():
    img, txt, scale = features(6, 1, 1)
    assert m2m_loss(img, txt, scale).item() == pytest.approx(clip_loss(img[:, 0], txt[:, 0], scale).item(), abs=1e-12)


def test_one_branch_many_texts_is_mean_of_clip():
    img, txt, scale = features(6, 1, 4)
    mean = sum(clip_loss(img[:, 0], txt[:, m], scale) for m in range(4)) / 4
    assert m2m_loss(img, txt, scale).item() == pytest.approx(mean.item(), abs=1e-12)


def test_branch_diversity():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(7, 1, 8) + 0.3 * torch.randn(7, 3, 8), dim=-1)  # close branches
    cos = [(img[:, k] * img[:, l]).sum(-1).mean().item() for k in range(3) for l in range(3) if k != l]
    assert sum(cos) / 6 > 0.7
    assert branch_diversity(img).item() == pytest.approx(sum(cos) / 6 - 0.7, abs=1e-6)
    assert branch_diversity(unit(7, 3, 64)).item() == 0.0  # random branches: far below the hinge
    assert branch_diversity(img[:, :1]).item() == 0.0  # K = 1


# ----------------------------------------------------------------------------
# fused == reference

@pytest.mark.parametrize("K,M", CASES)
def test_fused_equals_reference_float64(K, M):
    img, txt, scale = features(13, K, M)  # 13 rows: not a multiple of either tile side
    ref = value_and_grads(m2m_loss, img, txt, scale)
    fused = value_and_grads(lambda *x: m2m_loss(*x, fused=True, compile=False, tiles=(4, 5)), img, txt, scale)
    for name, a, b in zip(["loss", "d_img", "d_txt", "d_scale"], ref, fused):
        assert (a - b).abs().max().item() < 1e-10, name


@pytest.mark.parametrize("K,M", CASES)
def test_fused_bf16_accumulates_in_fp32(K, M):
    # bf16 features; the reference runs in float64 on the same (rounded) values. Tolerances: loss 1e-4
    # (fp32 accumulation), gradients 1e-2 of their largest entry (they are returned in bf16, 8-bit mantissa).
    img, txt, scale = features(40, K, M, E=32)
    img, txt = img.bfloat16(), txt.bfloat16()
    ref = value_and_grads(m2m_loss, img.double(), txt.double(), scale)
    fused = value_and_grads(lambda *x: m2m_loss(*x, fused=True, compile=False, tiles=(16, 16)),
                            img, txt, scale.float())
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.bfloat16
    assert abs(fused[0].item() - ref[0].item()) < 1e-4
    for a, b in zip(ref[1:], fused[1:]):
        assert (a - b.double()).abs().max().item() < 1e-2 * a.abs().max().item()


def test_gradcheck_row_cross_entropy():
    torch.manual_seed(0)
    rows = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    banks = torch.randn(3, 6, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    src = torch.tensor([0, 1, 1, 2, 3, 4, 4])  # 7 queries on 5 rows: shared rows, as in free matching
    group = torch.tensor([2, 0, 2, 1, 2, 0, 2])  # each query's bank
    target = torch.tensor([0, 5, 3, 1, 4, 2, 5])  # each query's target column
    fn = lambda r, b, s: RowCrossEntropy.apply(r, b, s, src, group, [2, 1, 4], target, (2, 4),
                                                  (lse_tile, grad_tile))
    assert torch.autograd.gradcheck(fn, (rows, banks, scale))


@pytest.mark.slow
def test_fused_compiled_equals_reference():
    for K, M in [(2, 2), (2, 3)]:  # one-to-one and free matching share the two compiled graphs
        img, txt, scale = features(11, K, M)
        ref = value_and_grads(m2m_loss, img, txt, scale)
        fused = value_and_grads(lambda *x: m2m_loss(*x, fused=True, compile=True, tiles=(4, 8)), img, txt, scale)
        for a, b in zip(ref, fused):
            assert (a - b).abs().max().item() < 1e-10


# ----------------------------------------------------------------------------
# distributed: 2 gloo ranks == 1 process on the concatenated batch

DDP_CASES = [(2, 2), (2, 3), (3, 2)]  # one-to-one, free matching with K < M and K > M


def loss_variants():
    """name -> loss function of (img, txt, scale), every path that has to survive DDP."""
    return {
        "reference": lambda i, t, s: m2m_loss(i, t, s),
        "fused": lambda i, t, s: m2m_loss(i, t, s, fused=True, compile=False, tiles=(3, 4)),
        "diversity": lambda i, t, s: branch_diversity(i) * s,
    }


def ddp_worker(rank, world, path, inputs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=world)
    results = {}
    for case, (img, txt, scale) in inputs.items():
        B = len(img) // world
        local = img[rank * B:(rank + 1) * B], txt[rank * B:(rank + 1) * B], scale
        for name, fn in loss_variants().items():
            results[case, name] = value_and_grads(fn, *local)
    torch.save(results, f"{path}/rank{rank}.pt")
    dist.barrier()  # leave together: a rank tearing gloo down while the other still talks can abort
    dist.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path):
    world = 2
    inputs = {}
    for K, M in DDP_CASES:
        img, txt, scale = features(6 * world, K, M, seed=K * 10 + M)
        img = torch.nn.functional.normalize(img + 2 * img[:, :1], dim=-1)  # close branches: hinge active
        inputs[K, M] = img, txt, scale
    mp.spawn(ddp_worker, args=(world, str(tmp_path), inputs), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case, (img, txt, scale) in inputs.items():
        for name, fn in loss_variants().items():
            loss, d_img, d_txt, d_scale = value_and_grads(fn, img, txt, scale)
            parts = [r[case, name] for r in ranks]
            assert loss.item() > 0, (case, name)  # every term is active, including the hinge
            # DDP averages parameter gradients over ranks: mean of the local losses, the local feature
            # gradients concatenated (each one summed over ranks by all_gather's backward) over W
            assert abs(sum(p[0] for p in parts).item() / world - loss.item()) < 1e-12, (case, name)
            assert torch.allclose(torch.cat([p[1] for p in parts]) / world, d_img, atol=1e-12), (case, name)
            assert torch.allclose(torch.cat([p[2] for p in parts]) / world, d_txt, atol=1e-12), (case, name)
            assert abs(sum(p[3] for p in parts).item() / world - d_scale.item()) < 1e-12, (case, name)


# ----------------------------------------------------------------------------
# multi-positive targets: identical texts are right answers of each other's images

def naive_multi_positive(img, txt, s, tokens):
    """naive_m2m with several right answers: in slot m, the rows' positives are every sample whose slot-m tokens
    equal the own ones; the term is -log of the softmax mass on them."""
    img, txt, tokens = img.tolist(), txt.tolist(), tokens.tolist()
    B, K, M = len(img), len(img[0]), len(txt[0])
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs))
    total = 0.0
    for m in range(M):
        for b in range(B):
            k = m if K == M or (K < M and m < K) else max(range(K), key=lambda k: dot(img[b][k], txt[b][m]))
            same = [j for j in range(B) if tokens[j][m] == tokens[b][m]]
            i2t = [s * dot(img[b][k], txt[j][m]) for j in range(B)]
            t2i = [s * dot(img[i][k], txt[b][m]) for i in range(B)]
            total += (lse(i2t) - lse([i2t[j] for j in same]) + lse(t2i) - lse([t2i[j] for j in same])) / 2
    return total / (M * B)


def shared_texts(B, M, seed=0):
    """Token ids (B, M, 4) where slot m repeats a text across several samples (a few distinct rows per slot), and
    txt (B, M, E) whose equal-token texts are equal vectors, as a text tower makes them."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 3, (B, M, 1), generator=g).expand(B, M, 4) + torch.arange(M)[None, :, None] * 10
    vectors = unit(40, 8, dtype=torch.float64)
    return tokens.contiguous(), vectors[tokens[..., 0]]


@pytest.mark.parametrize("K,M", CASES)
def test_multi_positive_equals_naive_loop(K, M):
    img, _, scale = features(6, K, M)
    tokens, txt = shared_texts(6, M)
    want = naive_multi_positive(img, txt, scale.item(), tokens)
    assert m2m_loss(img, txt, scale, tokens=tokens).item() == pytest.approx(want, abs=1e-12)
    distinct = torch.arange(6 * M).view(6, M, 1).expand(6, M, 4)  # no text shared: the plain loss
    assert m2m_loss(img, txt, scale, tokens=distinct).item() == pytest.approx(m2m_loss(img, txt, scale).item(),
                                                                              abs=1e-12)
    assert want < m2m_loss(img, txt, scale).item()  # the shared texts are no longer negatives
    with pytest.raises(ValueError, match="reference loss only"):
        m2m_loss(img, txt, scale, fused=True, tokens=tokens)


def multi_positive_worker(rank, world, path, inputs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/rendezvous", rank=rank, world_size=world)
    img, txt, scale, tokens = inputs
    B = len(img) // world
    part = slice(rank * B, (rank + 1) * B)
    fn = lambda i, t, s: m2m_loss(i, t, s, tokens=tokens[part])
    torch.save(value_and_grads(fn, img[part], txt[part], scale), f"{path}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_multi_positive_two_ranks_equal_one_process(tmp_path):
    """The positives are found in the gathered batch: 2 ranks of 6 equal one process of 12, value and gradients,
    with texts shared across the ranks."""
    img, _, scale = features(12, 2, 3)
    tokens, txt = shared_texts(12, 3, seed=1)
    mp.spawn(multi_positive_worker, args=(2, str(tmp_path), (img, txt, scale, tokens)), nprocs=2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    loss, d_img, d_txt, d_scale = value_and_grads(lambda i, t, s: m2m_loss(i, t, s, tokens=tokens), img, txt, scale)
    assert abs(sum(p[0] for p in parts).item() / 2 - loss.item()) < 1e-12
    assert torch.allclose(torch.cat([p[1] for p in parts]) / 2, d_img, atol=1e-12)
    assert torch.allclose(torch.cat([p[2] for p in parts]) / 2, d_txt, atol=1e-12)
    assert abs(sum(p[3] for p in parts).item() / 2 - d_scale.item()) < 1e-12
