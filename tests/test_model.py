"""Tests for model.py: shapes, the CLS isolation mask, the MLP design's independent branches, the causal
text tower, parameter counts and FLOPs.

    python -m pytest -q tests/test_model.py

Independent references: nn.MultiheadAttention loaded with our attention's state dict (same names),
a parameter-count formula written from the config, openai/CLIP's state-dict names, open_clip's
published ViT-B-16 profile (parameters and GFLOPs), and torch.utils.flop_counter on a real forward.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import PRESETS, Attention, HolisticCLIP, ModelConfig, flops_per_sample, isolation_mask

# a model small enough that every test builds its own in milliseconds: N = 16 patches, 3 vision blocks
MICRO = dict(image_size=16, patch_size=4, vision_width=32, vision_layers=3, vision_heads=2, mlp_branch_layers=2,
             vocab_size=50, context_length=12, text_width=32, text_layers=2, text_heads=2, embed_dim=16)
EOT = MICRO["vocab_size"] - 1


def micro(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return HolisticCLIP(ModelConfig(**{**MICRO, **kw})).to(dtype)


def images(B=2, dtype=torch.float64, seed=1):
    return torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def texts(*shape, eot_at=7, seed=2):
    """Random token ids (..., T) below EOT, with EOT (the largest id) at position eot_at."""
    t = torch.randint(1, EOT - 1, (*shape, MICRO["context_length"]), generator=torch.Generator().manual_seed(seed))
    t[..., eot_at] = EOT
    return t


def unit(x):
    return torch.allclose(x.norm(dim=-1), torch.ones((), dtype=x.dtype), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("design", ["cls", "mlp"])
@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("M", [1, 4])
def test_shapes_and_unit_norm(design, K, M):
    model, B, N, E = micro(branches=K, branch_type=design), 2, 16, MICRO["embed_dim"]
    img, txt, scale = model(images(B), texts(B, M))
    assert img.shape == (B, K, E) and txt.shape == (B, M, E) and scale.shape == ()
    assert unit(img) and unit(txt) and math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-6)
    mean = model.encode_image(images(B), reduce="mean")
    assert mean.shape == (B, E) and torch.allclose(mean, img.mean(1) / img.mean(1).norm(dim=-1, keepdim=True))
    assert model.visual(images(B)).shape == (B, K + N, MICRO["vision_width"])
    patches = model.encode_patches(images(B))
    assert patches.shape == (B, N, E) and unit(patches)
    att = model.class_attention(images(B))
    assert att.shape == (B, K, N) and (att >= 0).all()
    assert torch.allclose(att.sum(-1), torch.ones((), dtype=att.dtype))


def test_patchify_is_the_conv():
    model = micro()
    x = images(2)
    conv = model.visual.conv1(x).flatten(2).transpose(1, 2)  # nn.Conv2d itself, (B, N, D)
    assert (model.visual.patchify(x) - conv).abs().max() < 1e-12


def test_conv_stem_against_float64_stages():
    """The conv stem as trained (float32, channels-last input, oneDNN) against its stages written out in float64
    on plain NCHW tensors: per stage a 3x3 conv, a 2x2 max-pool, BatchNorm over the batch, ReLU; then the 1x1.
    The norm's scales are random and some negative, so pooling after the norm instead would not match."""
    model = micro(conv_stem=True, dtype=torch.float32)
    stem = list(model.visual.conv1)  # [conv, pool, norm, relu] x log2(patch), then the 1x1
    with torch.no_grad():
        for norm in stem[2:-1:4]:
            norm.weight.normal_(), norm.bias.normal_()
    x = images(4, dtype=torch.float32)
    ref = x.double()
    for conv, norm in zip(stem[0:-1:4], stem[2:-1:4]):
        ref = nn.functional.max_pool2d(nn.functional.conv2d(ref, conv.weight.double(), padding=1), 2)
        ref = nn.functional.batch_norm(ref, None, None, norm.weight.double(), norm.bias.double(), True, 0.0, norm.eps)
        ref = ref.relu()
    ref = nn.functional.conv2d(ref, stem[-1].weight.double(), stem[-1].bias.double())  # (B, D, H/p, W/p)
    assert (model.visual.patchify(x).double() - ref.flatten(2).transpose(1, 2)).abs().max() < 1e-4


def test_tower_without_blocks():
    """vision_layers = 0 (caption.py's tower): the tokens are conv1's patches after the class token, positions,
    ln_pre and ln_post, written out here."""
    model = micro(vision_layers=0, mlp_branch_layers=0)
    v, x = model.visual, images()
    patches = nn.functional.conv2d(x, v.conv1.weight, stride=MICRO["patch_size"]).flatten(2).transpose(1, 2)
    tokens = torch.cat([v.class_embedding.expand(len(x), -1, -1), patches], 1) + v.positional_embedding
    ref = v.ln_post(v.ln_pre(tokens))  # (B, 1+N, D)
    assert torch.allclose(v(x), ref)
    with pytest.raises(AssertionError, match="K > 1 needs"):
        micro(vision_layers=0, mlp_branch_layers=0, branches=2)


def test_encode_text_any_leading_shape():
    model, t = micro(), texts(2, 3)
    assert torch.allclose(model.encode_text(t)[1, 2], model.encode_text(t[1, 2]))  # (B, M, T) vs (T,)


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_bf16_autocast_forward(design):
    model = micro(branches=3, branch_type=design, dtype=torch.float32)
    x, t = images(dtype=torch.float32), texts(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img, txt, _ = model(x, t)
    ref_img, ref_txt, _ = model(x, t)
    assert img.shape == ref_img.shape and txt.shape == ref_txt.shape
    assert (img.float() - ref_img).abs().max() < 0.05 and (txt.float() - ref_txt).abs().max() < 0.05


# ----------------------------------------------------------------------------------------------------
# attention against nn.MultiheadAttention


@pytest.mark.parametrize("mask", ["none", "causal", "isolation"])
def test_attention_matches_nn_multihead_attention(mask):
    torch.manual_seed(0)
    ours, ref = Attention(32, 4).double(), nn.MultiheadAttention(32, 4, batch_first=True).double()
    nn.init.normal_(ours.in_proj_weight, std=0.2)
    nn.init.normal_(ours.in_proj_bias, std=0.2)
    ref.load_state_dict(ours.state_dict())  # same names and layout: q, k, v rows stacked
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    allowed = {"none": torch.ones(10, 10, dtype=torch.bool), "causal": torch.ones(10, 10).tril().bool(),
               "isolation": isolation_mask(4, 6)}[mask]
    out = ours(x, is_causal=True) if mask == "causal" else ours(x, None if mask == "none" else allowed)
    expected, _ = ref(x, x, x, attn_mask=~allowed)  # nn.MultiheadAttention: True = blocked
    assert torch.allclose(out, expected, atol=1e-12)


def test_isolation_mask_by_hand():
    expected = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(isolation_mask(2, 2), expected)
    # no mask (fast SDPA kernels) unless it masks something
    assert micro(branches=1).visual.attn_mask is None
    assert micro(branches=3, isolate_cls=False).visual.attn_mask is None
    assert micro(branches=3, branch_type="mlp").visual.attn_mask is None


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_class_attention_matches_nn_multihead_attention_weights(design):
    model, K, x = micro(branches=3, branch_type=design), 3, images()
    v, ref = model.visual, nn.MultiheadAttention(32, 2, batch_first=True).double()
    h = v.embed(x)  # (B, 1, L, D)
    for block in v.transformer.resblocks[:-1]:
        h = block(h, v.attn_mask)
    last = v.transformer.resblocks[-1]
    ref.load_state_dict(last.attn.state_dict())
    h = last.ln_1(h).flatten(0, 1)  # (B*S, L, D)
    mask = None if v.attn_mask is None else ~v.attn_mask
    _, w = ref(h, h, h, attn_mask=mask)  # (B*S, L, L), head-averaged
    C = 1 if design == "mlp" else K
    w = w[:, :C, C:] / w[:, :C, C:].sum(-1, keepdim=True)  # class rows over the patches
    assert torch.allclose(model.class_attention(x), w.reshape(2, K, -1), atol=1e-12)


def test_official_mask_adds_one_between_class_tokens():
    """official_mask: every block's attention equals softmax(q k^T / sqrt(d) + bias) v, written out here per head
    in float64, with bias +1 between two different class tokens and 0 elsewhere; the class tokens still see each
    other. class_attention uses the same bias. bf16 autocast runs (the float mask follows the queries' dtype)."""
    model, x, K = micro(branches=3, official_mask=True), images(), 3
    v = model.visual
    h = v.embed(x)[:, 0]  # (B, L, D)
    L = h.shape[1]
    bias = torch.zeros(L, L, dtype=torch.float64)
    bias[:K, :K] = 1 - torch.eye(K, dtype=torch.float64)
    for block in v.transformer.resblocks:
        a = block.attn
        y = block.ln_1(h)
        heads = []
        for head in range(2):  # q, k, v rows of this head in in_proj (q, k, v stacked), width 32 / 2 heads
            q, k, w = (y @ a.in_proj_weight[j * 32 + head * 16:j * 32 + head * 16 + 16].T
                       + a.in_proj_bias[j * 32 + head * 16:j * 32 + head * 16 + 16] for j in range(3))
            heads.append(((q @ k.transpose(1, 2)) / math.sqrt(16) + bias).softmax(-1) @ w)  # (B, L, 16)
        by_hand = a.out_proj(torch.cat(heads, -1))
        assert torch.allclose(a(y, v.attn_mask), by_hand, atol=1e-12)
        h = block(h.unsqueeze(1), v.attn_mask)[:, 0]
    logits_bias = model.class_attention(x)
    assert logits_bias.shape == (2, K, 16) and not torch.allclose(logits_bias, micro(branches=3).class_attention(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(micro(branches=3, official_mask=True, dtype=torch.float32).encode_image(x.float())).all()


# ----------------------------------------------------------------------------------------------------
# the two branch designs


def test_isolation_blocks_class_tokens_from_each_other():
    """Perturb class token 2; after ONE block (patches have not relayed it yet) class tokens 0 and 1
    are unchanged with isolation, changed without."""
    for isolate in (True, False):
        model, x = micro(branches=3, isolate_cls=isolate), images()
        v = model.visual
        first = v.transformer.resblocks[0]
        before = first(v.embed(x), v.attn_mask)[:, 0]  # (B, K+N, D), the one stream
        with torch.no_grad():  # random, not constant: ln_pre would remove a constant shift
            v.class_embedding[2] += torch.randn(MICRO["vision_width"], dtype=torch.float64)
        after = first(v.embed(x), v.attn_mask)[:, 0]
        other = (after[:, :2] - before[:, :2]).abs().max()
        assert (other < 1e-12) if isolate else (other > 1e-3)
        assert (after[:, 2:] - before[:, 2:]).abs().max() > 1e-3  # the token itself and the patches see it


def test_mlp_branches_are_independent():
    K, L = 3, MICRO["mlp_branch_layers"]
    model, x = micro(branches=K, branch_type="mlp"), images()
    blocks = model.visual.transformer.resblocks
    # blocks before the last L hold one plain c_proj; the last L hold K copies
    assert all(isinstance(b.mlp.c_proj, nn.Linear) for b in blocks[:-L])
    assert all(isinstance(b.mlp.c_proj, nn.ModuleList) and len(b.mlp.c_proj) == K for b in blocks[-L:])
    D = MICRO["vision_width"]
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in micro().parameters())
    assert extra == (K - 1) * L * (4 * D * D + D)
    base = model.encode_image(x)
    for block in (blocks[-L], blocks[-1]):  # the fork block and the last block
        for k in range(K):
            w = block.mlp.c_proj[k].weight
            with torch.no_grad():
                saved = w.clone()
                w.add_(torch.randn_like(w))  # random: LayerNorm would remove a constant shift
                changed = (model.encode_image(x) - base).abs().amax(dim=(0, 2)) > 1e-6  # (K,)
                w.copy_(saved)
            assert changed.tolist() == [j == k for j in range(K)]


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_every_branch_gets_gradient_from_its_own_output(design):
    K = 3
    model, x = micro(branches=K, branch_type=design), images()
    target = torch.randn(2, MICRO["embed_dim"], dtype=torch.float64)
    for k in range(K):
        model.zero_grad()
        (model.encode_image(x)[:, k] * target).sum().backward()
        if design == "cls":
            assert model.visual.class_embedding.grad[k].abs().sum() > 0
        else:  # branch k's copies get a gradient, the others none
            for block in model.visual.transformer.resblocks[-MICRO["mlp_branch_layers"]:]:
                got = [c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in block.mlp.c_proj]
                assert got == [j == k for j in range(K)]


# ----------------------------------------------------------------------------------------------------
# text tower


def test_tokens_after_eot_do_not_matter():
    model, t = micro(), texts(4, eot_at=5)
    u = t.clone()
    u[:, 6:] = torch.randint(1, EOT - 1, u[:, 6:].shape)
    assert torch.allclose(model.encode_text(t), model.encode_text(u), atol=1e-12)


def test_trimmed_text_equals_the_full_context():
    """encode_text drops the columns after the longest EOT, and forward each slot's: the same embeddings as the
    whole context written out here (float64), texts of different lengths in one batch and in different slots."""
    model, t = micro(), texts(3, 2)
    for b, m, eot in ((0, 0, 2), (1, 0, 5), (2, 1, 9)):  # slot 0 needs 6 columns, slot 1 needs 10 of 12
        t[b, m] = torch.where(t[b, m] == EOT, 1, t[b, m])
        t[b, m, eot] = EOT
    x = model.ln_final(model.transformer(model.token_embedding(t.flatten(0, 1)) + model.positional_embedding,
                                         is_causal=True))  # (6, T, D), all T = 12 columns
    full = F.normalize(x[torch.arange(6), t.flatten(0, 1).argmax(-1)] @ model.text_projection, dim=-1).view(3, 2, -1)
    assert torch.allclose(model.encode_text(t), full, atol=1e-12)
    assert torch.allclose(model(images(3), t)[1], full, atol=1e-12)


def test_text_is_causal():
    """Changing token p changes the hidden states at p and after, never before."""
    model, t, p = micro(), texts(2), 4

    def hidden(tokens):
        return model.transformer(model.token_embedding(tokens) + model.positional_embedding, is_causal=True)

    u = t.clone()
    u[:, p] = (u[:, p] % (EOT - 2)) + 1  # a different ordinary token
    diff = (hidden(t) - hidden(u)).abs().amax(dim=(0, 2))  # (T,)
    assert (diff[:p] < 1e-12).all() and (diff[p:] > 1e-6).all()


# ----------------------------------------------------------------------------------------------------
# parameters and names


def openai_clip_names(c):
    """openai/CLIP's ViT state-dict names (clip/model.py), written out independently of model.py."""
    block = ["attn.in_proj_weight", "attn.in_proj_bias"]
    for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj", "attn.out_proj"):
        block += [f"{m}.weight", f"{m}.bias"]
    names = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
             "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias", "visual.proj",
             "token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection", "logit_scale"}
    names |= {f"visual.transformer.resblocks.{i}.{n}" for i in range(c.vision_layers) for n in block}
    return names | {f"transformer.resblocks.{i}.{n}" for i in range(c.text_layers) for n in block}


def clip_param_count(c):
    """Single-CLS CLIP's parameter count from the config alone: each block has 12 D^2 + 13 D."""
    D, W, N = c.vision_width, c.text_width, (c.image_size // c.patch_size) ** 2
    vision = 3 * c.patch_size ** 2 * D + D + (1 + N) * D + 2 * D + c.vision_layers * (12 * D * D + 13 * D)
    vision += 2 * D + D * c.embed_dim
    text = c.vocab_size * W + c.context_length * W + c.text_layers * (12 * W * W + 13 * W) + 2 * W + W * c.embed_dim
    return vision, text + 1  # + logit_scale


@pytest.mark.parametrize("design", ["cls", "mlp"])
def test_k1_is_plain_clip(design):
    model = micro(branches=1, branch_type=design)
    vision, total = clip_param_count(model.config)
    assert sum(p.numel() for p in model.visual.parameters()) == vision
    assert sum(p.numel() for p in model.parameters()) == vision + total
    assert set(model.state_dict()) == openai_clip_names(model.config)


def test_base_matches_open_clip_vit_b_16():
    """open_clip's docs/model_profile.csv, ViT-B-16: 86.19 M image, 63.43 M text parameters;
    35.13 GFLOP image and 5.96 GFLOP text forward (torch.utils.flop_counter)."""
    c = ModelConfig(**{**PRESETS["base"], "vocab_size": 49408})
    with torch.device("meta"):
        model = HolisticCLIP(c)
    vision = sum(p.numel() for p in model.visual.parameters())
    text = sum(p.numel() for p in model.parameters()) - vision - 1
    assert (round(vision / 1e6, 2), round(text / 1e6, 2)) == (86.19, 63.43)
    f = flops_per_sample(c, M=5)
    assert abs(f["image"] / 35.13e9 - 1) < 0.05 and abs(f["text"] / 5.96e9 - 1) < 0.05
    assert f["total"] == f["image"] + 5 * f["text"]


# ----------------------------------------------------------------------------------------------------
# FLOPs against torch's counter on a real forward


@pytest.mark.parametrize("design,K,stem,layers", [("cls", 1, False, 3), ("cls", 3, False, 3), ("mlp", 3, False, 3),
                                                  ("cls", 3, True, 3), ("mlp", 1, True, 0)])
def test_flops_match_torch_flop_counter(design, K, stem, layers):
    """The convention counts the full towers: every token of the image, every position of the text (a text as
    long as the context: encode_text runs shorter ones shorter). layers 0: caption.py's tower, the stem alone."""
    model = micro(branches=K, branch_type=design, conv_stem=stem, vision_layers=layers, dtype=torch.float32)
    x, t = images(1, dtype=torch.float32), texts(1, eot_at=MICRO["context_length"] - 1)

    def count(fn):
        counter = FlopCounterMode(display=False)
        # the math backend spells attention out as matmuls, which the counter sees on every build
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            fn()
        return counter.get_total_flops()

    flops = flops_per_sample(model.config)
    assert flops["image"] == count(lambda: model.encode_image(x))
    assert flops["text"] == count(lambda: model.encode_text(t))
