"""loss.py: the multi-to-multi (M2M) contrastive loss of Holistic CLIP (paper.md section 3).

Reading order:
  clip_loss         CLIP's symmetric InfoNCE, the K = M = 1 case; read it first
  gather            all-gather with gradient (identity on one process)
  m2m_loss          the loss family with the official semantics: one-to-one when K == M, free
                    matching when K != M; the reference path materialises the logits
                    (tokens=...: multi-positive targets, identical texts right for each other's images)
  branch_diversity  the 0.7 hinge that keeps the K branches apart
  fused path        the same m2m_loss computed tile by tile with an online logsumexp (a custom
                    autograd Function, tiles compiled by torch.compile); never holds K x B x B logits
  check             `python loss.py`: fused == reference in float64

Commands:
  python loss.py                       # fused == reference in float64, value and gradients
  python loss.py --no-compile          # the same with the tiles run eagerly (no compile wait)
  python bench/loss.py                 # time and peak memory: reference vs fused, eager and compiled
  python -m pytest -q tests/test_loss.py

Letters: B images per rank, W world size, K image branches, M texts per image, E embed dim; in the fused
path Q queries (B*M per direction), G banks (M or K) of W*B columns, R rows (B*K or B*M), r x c one tile.
Inputs are unit vectors img (B, K, E), txt (B, M, E) and scale = exp(logit_scale), a 0-dim tensor
(CLIP initialises logit_scale to ln(1/0.07); train.py clamps it at ln(100)).
"""
import argparse
import functools

import torch
import torch.distributed as dist
import torch.nn.functional as F

DIVERSITY_THRESHOLD = 0.7  # paper.md section 3 and the official loss_modify.py: hinge on mean branch cosine
TILES = (1024, 4096)  # (rows, columns) per tile of the fused path: a few fp32 buffers of 16 MiB


# ----------------------------------------------------------------------------
# CLIP: one image, one text

def clip_loss(img, txt, scale):
    """Symmetric InfoNCE. img, txt (B, E) unit vectors, scale 0-dim -> 0-dim loss.
    Image b's positive is text b and vice versa; the other B - 1 items of the batch are negatives."""
    logits = scale * img @ txt.T  # (B, B): logits[i, j] = s <img i, txt j>
    labels = torch.arange(len(img), device=img.device)  # (B,) the pairs sit on the diagonal
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ----------------------------------------------------------------------------
# Distributed: each rank scores its B local rows against the W*B gathered columns

def rank_world():
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x):
    """(B, ...) -> (W*B, ...) in rank order. The gradient flows back to every rank's x (open_clip's
    gather_with_grad): the backward of all_gather sums each rank's gradient for this rank's rows."""
    if rank_world()[1] == 1:
        return x
    import torch.distributed.nn.functional as dist_nn  # only needed (and only importable) when distributed
    out = torch.cat(dist_nn.all_gather(x), 0)  # (W*B, ...)
    # on gloo, all_gather's backward scatters into buffers strided like the incoming gradient and ignores the
    # strides: a non-contiguous gradient came back wrong in the 2-process test, so make it contiguous first
    if out.requires_grad:
        out.register_hook(lambda grad: grad.contiguous())
    return out


def gather_tokens(tokens):
    """(B, M, T) ids -> (W*B, M, T) in rank order, no gradient (identity on one process)."""
    if rank_world()[1] == 1:
        return tokens
    parts = [torch.empty_like(tokens) for _ in range(rank_world()[1])]
    dist.all_gather(parts, tokens.contiguous())
    return torch.cat(parts)


# ----------------------------------------------------------------------------
# M2M: K branches, M texts (the reference; read this one)

def choose_branch(img, txt):
    """k*(b, m), the branch that image b uses for its text slot m. (B, K, E), (B, M, E) -> (B, M) long.
    Paired slots (m < K when K <= M) use branch m. Free slots (m >= K when K < M, all slots when K > M)
    take the branch most similar to the sample's own text, as the official code does: argmax over k of
    the own-pair logit, no gradient through the choice."""
    K, M = img.shape[1], txt.shape[1]
    with torch.no_grad():
        own = torch.einsum("bke,bme->bkm", img, txt)  # (B, K, M) cosine of each branch with each own text
        branch = own.argmax(1)  # (B, M) best branch per (sample, slot)
        if K <= M:
            branch[:, :K] = torch.arange(K, device=img.device)  # one-to-one: slot m <-> branch m
    return branch


def positives_ce(logits, positive):
    """Cross-entropy with several right answers: -log of the softmax mass on them, averaged over rows.
    logits, positive (R, C), positive a bool mask; with one True per row (the own pair) it is F.cross_entropy."""
    return (logits.logsumexp(1) - logits.masked_fill(~positive, float("-inf")).logsumexp(1)).mean()


def m2m_loss(img, txt, scale, fused=False, compile=True, tiles=TILES, tokens=None):
    """Multi-to-multi contrastive loss. img (B, K, E), txt (B, M, E) unit vectors, scale 0-dim -> 0-dim.
    For each slot m: image b's row scores its branch k*(b, m) against slot m of every text; text (b, m)'s
    row scores branch k*(b, m) of every image against itself. Cross-entropy with the own pair as target,
    averaged over rows, slots and the two directions. K = M = 1 is clip_loss; K = 1 is one-to-many.
    Under torch.distributed the columns are the gathered global batch and the targets sit at rank*B + b,
    so the mean over ranks equals the loss of one process on the global batch.
    fused=True computes the same value tile by tile (below); compile=False runs its tiles eagerly.
    tokens (B, M, T): multi-positive targets. In slot m, texts with the same tokens as the own text are right
    answers too (a text shared by several images is not a negative of their images, nor those images of it):
    positives_ce over that set, on the gathered batch. The reference path only."""
    assert img.dim() == 3 and txt.dim() == 3 and img.shape[0] == txt.shape[0] and img.shape[2] == txt.shape[2], \
        f"m2m_loss wants img (B, K, E) and txt (B, M, E), got {tuple(img.shape)} and {tuple(txt.shape)}"
    B, K, E = img.shape
    M = txt.shape[1]
    rank, _ = rank_world()
    all_img, all_txt = gather(img), gather(txt)  # (W*B, K, E), (W*B, M, E)
    branch = choose_branch(img, txt)  # (B, M)
    labels = torch.arange(B, device=img.device) + rank * B  # (B,) own pair's column in the global batch
    if fused:
        if tokens is not None:
            raise ValueError("multi-positive targets are computed by the reference loss only: use fused=False")
        return fused_m2m_loss(img, txt, all_img, all_txt, scale, branch, labels, tiles, compile)
    if tokens is not None:  # same[b, j, m]: text (b, m) and text (j, m) of the gathered batch are identical
        all_tokens = gather_tokens(tokens)                                                  # (W*B, M, T)
        same = (tokens[:, None] == all_tokens[None]).all(-1)                                # (B, W*B, M)

    q = img.gather(1, branch[:, :, None].expand(B, M, E))  # (B, M, E): q[b, m] = img[b, k*(b, m)]
    rows = torch.arange(B, device=img.device)
    loss = 0
    for m in range(M):
        i2t = scale * q[:, m] @ all_txt[:, m].T  # (B, W*B): image b's branch k*(b, m) vs slot m of all texts
        if K <= M and m < K:  # paired slot: every image uses branch m, one matmul (the CLIP loss)
            t2i = scale * txt[:, m] @ all_img[:, m].T  # (B, W*B): text (b, m) vs branch m of all images
        else:  # free slot: text (b, m) meets branch k*(b, m) of every image; score all K, keep its own
            t2i = scale * torch.einsum("be,ike->bki", txt[:, m], all_img)  # (B, K, W*B)
            t2i = t2i[rows, branch[:, m]]  # (B, W*B)
        if tokens is None:
            loss = loss + (F.cross_entropy(i2t, labels) + F.cross_entropy(t2i, labels)) / 2
        else:
            loss = loss + (positives_ce(i2t, same[:, :, m]) + positives_ce(t2i, same[:, :, m])) / 2
    return loss / M


def branch_diversity(img, threshold=DIVERSITY_THRESHOLD):
    """R = max(0, mean off-diagonal of G - threshold), G (K, K) = batch mean of each image's branch Gram
    matrix. img (B, K, E) -> 0-dim; 0 when K == 1. Computed on the gathered global batch so that DDP
    matches one process exactly (the official code uses each rank's local batch)."""
    K = img.shape[1]
    if K == 1:
        return img.new_zeros(())
    v = gather(img)  # (W*B, K, E)
    gram = torch.einsum("bke,ble->kl", v, v) / len(v)  # (K, K) mean cosine between branches k and l
    off_diagonal = ~torch.eye(K, dtype=torch.bool, device=img.device)  # (K, K)
    return F.relu(gram[off_diagonal].mean() - threshold)


# ----------------------------------------------------------------------------
# Fused M2M: the same loss without the logits
#
# Each cross-entropy row above scores one query vector against one *bank* of W*B column vectors:
#   image -> text: query (b, m) = img[b, k*(b, m)], its bank m         = slot m of every text  (M banks)
#   text -> image: query (b, m) = txt[b, m],        its bank k*(b, m)  = that branch of every image (K banks)
# and its target is the own pair, column rank*B + b of the bank. RowCrossEntropy computes these B*M rows
# for one direction without the logits: it sorts the queries by bank, cuts them into row tiles, walks
# the bank's columns in column tiles keeping a running max and sum (online logsumexp), and recomputes
# each tile in the backward pass, where d ce_i / d x_ij = softmax_ij - [j is the target]. Queries are
# row ids into img or txt, so no (B, M, E) copy is made and the gradients land straight in (B*K, E)
# and (B*M, E) buffers. Memory: O(B*(K+M)*E) plus a few row tile x column tile buffers. Arithmetic in
# fp32 (fp64 for fp64 inputs) even for bf16 features. One-to-one is the special case k*(b, m) = m.

def lse_tile(rows, cols, scale, run_max, run_sum):
    """Fold one tile into the running logsumexp. rows (r, E), cols (c, E), run_max/run_sum (r,)."""
    x = scale * (rows.to(scale.dtype) @ cols.to(scale.dtype).T)  # (r, c) logits in fp32
    new_max = torch.maximum(run_max, x.amax(1))  # (r,)
    run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(x - new_max[:, None]).sum(1)  # rescale, add
    return new_max, run_sum


def grad_tile(rows, cols, scale, lse, grad, target):
    """Gradients of sum_i grad_i * ce_i restricted to one tile: (r, E), (c, E), 0-dim.
    target (r,) = each row's target column counted from this tile's first column (may lie outside)."""
    rows, cols = rows.to(scale.dtype), cols.to(scale.dtype)
    dots = rows @ cols.T  # (r, c) cosines, recomputed
    hit = target[:, None] == torch.arange(cols.shape[0], device=cols.device)  # (r, c) True at the target
    p = (torch.exp(scale * dots - lse[:, None]) - hit.to(dots.dtype)) * grad[:, None]  # (r, c) d loss / d x
    return scale * p @ cols, scale * p.T @ rows, (p * dots).sum()


@functools.cache
def compiled(fn):
    """torch.compile'd tile function (fuses the exp/max/sum around the matmul). dynamic=True: one
    graph serves every tile shape (last tiles, banks of different sizes)."""
    return torch.compile(fn, dynamic=True)


def row_tiles(group, counts, rows_per_tile):
    """Yield (g, idx): idx (r,) = the ids of one row tile of queries, all of bank g. counts: a list, the
    queries of each bank, known on the host (reading them off the GPU would stall it)."""
    order = torch.argsort(group, stable=True)  # (Q,) queries sorted bank by bank
    start = 0
    for g, count in enumerate(counts):
        for r0 in range(start, start + count, rows_per_tile):
            yield g, order[r0:min(r0 + rows_per_tile, start + count)]
        start += count


class RowCrossEntropy(torch.autograd.Function):
    """ce[i] = logsumexp_j x[i, j] - x[i, target[i]], x[i, j] = scale * <rows[src[i]], banks[group[i], j]>,
    computed tile by tile. rows (R, E), banks (G, W*B, E), scale 0-dim, src/group/target (Q,) long,
    counts (G,) list of ints = queries per bank -> ce (Q,) in fp32 (fp64 for fp64 inputs)."""

    @staticmethod
    def forward(ctx, rows, banks, scale, src, group, counts, target, tiles, fns):
        acc = torch.promote_types(rows.dtype, torch.float32)
        s = scale.detach().to(acc)
        lse = torch.empty(len(src), dtype=acc, device=rows.device)  # (Q,)
        own = torch.empty(len(src), dtype=acc, device=rows.device)  # (Q,) the target logits
        with torch.autocast(rows.device.type, enabled=False):  # fp32 tiles even inside a bf16 autocast
            for g, idx in row_tiles(group, counts, tiles[0]):
                r = rows[src[idx]]  # (r, E) one row tile of queries
                run_max = torch.full((len(idx),), -torch.inf, dtype=acc, device=rows.device)
                run_sum = torch.zeros(len(idx), dtype=acc, device=rows.device)
                for c0 in range(0, banks.shape[1], tiles[1]):
                    run_max, run_sum = fns[0](r, banks[g, c0:c0 + tiles[1]], s, run_max, run_sum)
                lse[idx] = run_max + run_sum.log()
                own[idx] = s * (r.to(acc) * banks[g, target[idx]].to(acc)).sum(-1)  # (r,)
        ctx.save_for_backward(rows, banks, scale, src, group, target, lse)
        ctx.counts, ctx.tiles, ctx.fns = counts, tiles, fns
        return lse - own

    @staticmethod
    def backward(ctx, grad_ce):
        rows, banks, scale, src, group, target, lse = ctx.saved_tensors
        tiles, acc = ctx.tiles, lse.dtype
        s, grad_ce = scale.to(acc), grad_ce.to(acc)
        d_rows = torch.zeros_like(rows, dtype=acc)  # (R, E)
        d_banks = torch.zeros_like(banks, dtype=acc)  # (G, W*B, E), laid out like banks
        d_scale = torch.zeros((), dtype=acc, device=rows.device)
        with torch.autocast(rows.device.type, enabled=False):
            for g, idx in row_tiles(group, ctx.counts, tiles[0]):
                r, lse_r, grad_r, d_r = rows[src[idx]], lse[idx], grad_ce[idx], 0  # (r, E), (r,), (r,)
                for c0 in range(0, banks.shape[1], tiles[1]):
                    c1 = c0 + tiles[1]
                    dr, dc, ds = ctx.fns[1](r, banks[g, c0:c1], s, lse_r, grad_r, target[idx] - c0)
                    d_r, d_scale = d_r + dr, d_scale + ds
                    d_banks[g, c0:c1] += dc  # (c, E)
                d_rows.index_add_(0, src[idx], d_r)  # several queries may share a row (free matching)
        return (d_rows.to(rows.dtype), d_banks.to(banks.dtype), d_scale.to(scale.dtype)) + (None,) * 6


def fused_m2m_loss(img, txt, all_img, all_txt, scale, branch, labels, tiles, compile):
    """m2m_loss from its parts (see m2m_loss): img (B, K, E) and txt (B, M, E) local, all_img (W*B, K, E)
    and all_txt (W*B, M, E) gathered, branch (B, M) = k*, labels (B,) = rank*B + b."""
    B, K, E = img.shape
    M = txt.shape[1]
    fns = (compiled(lse_tile), compiled(grad_tile)) if compile else (lse_tile, grad_tile)
    b = torch.arange(B, device=img.device)[:, None]  # (B, 1)
    slot = torch.arange(M, device=img.device).expand(B, M)  # (B, M)
    target = labels[:, None].expand(B, M).reshape(-1)  # (B*M,) query (b, m)'s own pair: column rank*B + b
    # queries per bank, on the host: B per slot for image -> text; B per branch for text -> image when
    # every slot is paired (K == M), else data-dependent (free matching), the loss's only read of the GPU
    per_slot = [B] * M
    per_branch = per_slot if K == M else torch.bincount(branch.reshape(-1), minlength=K).tolist()
    # image -> text: query (b, m) is row b*K + k*(b, m) of img (B*K, E); its bank is slot m of every text
    ce_i2t = RowCrossEntropy.apply(img.reshape(B * K, E), all_txt.transpose(0, 1), scale,  # banks (M, W*B, E)
                                   (b * K + branch).reshape(-1), slot.reshape(-1), per_slot, target, tiles, fns)
    # text -> image: query (b, m) is row b*M + m of txt (B*M, E); its bank is branch k*(b, m) of every image
    ce_t2i = RowCrossEntropy.apply(txt.reshape(B * M, E), all_img.transpose(0, 1), scale,  # banks (K, W*B, E)
                                   torch.arange(B * M, device=img.device), branch.reshape(-1), per_branch, target,
                                   tiles, fns)
    return (ce_i2t.mean() + ce_t2i.mean()) / 2  # (B*M,) rows each; the mean over slots, rows, directions


# ----------------------------------------------------------------------------
# Command line: the check

def unit(*shape, dtype=torch.float32, device="cpu"):
    """Random unit vectors along the last dim."""
    return F.normalize(torch.randn(*shape, dtype=dtype, device=device), dim=-1)


def check(batch=50, tiles=(16, 24), compile=True):
    """Fused vs reference in float64, one-to-one and both free cases; returns the largest difference."""
    worst = 0.0
    for K, M in [(4, 4), (2, 5), (5, 2)]:
        img, txt = unit(batch, K, 32, dtype=torch.float64), unit(batch, M, 32, dtype=torch.float64)
        scale = torch.tensor(14.3, dtype=torch.float64)
        results = []
        for fused in (False, True):
            x = [t.clone().requires_grad_() for t in (img, txt, scale)]
            loss = m2m_loss(*x, fused=fused, compile=compile, tiles=tiles)
            loss.backward()
            results.append([loss] + [t.grad for t in x])
        diffs = [(a - b).abs().max().item() for a, b in zip(*results)]
        worst = max(worst, *diffs)
        print(f"K={K} M={M} B={batch}: loss {results[0][0].item():.6f} | max |fused - reference| "
              f"loss {diffs[0]:.1e}, d_img {diffs[1]:.1e}, d_txt {diffs[2]:.1e}, d_scale {diffs[3]:.1e}")
    return worst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="fused == reference in float64: value and gradients, one-to-one and "
                                     "both free-matching cases (the timing table: python bench/loss.py)")
    parser.add_argument("--check", action="store_true", help="the default and only action (kept for scripts)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="compile the fused tiles (a cold compile takes ~40 s on a CPU)")
    args = parser.parse_args()
    worst = check(compile=args.compile)
    print(f"largest difference {worst:.1e}: {'ok' if worst < 1e-10 else 'MISMATCH'}")
    raise SystemExit(0 if worst < 1e-10 else 1)
