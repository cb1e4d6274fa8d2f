"""The Holistic CLIP model: a hand-written ViT with K output branches, a causal text transformer, and
the pair of them as one CLIP. Implements paper.md section 2 (the multi-branch image encoder, CLS and
MLP designs); the loss is in loss.py.

    python model.py                  # parameters and forward GFLOPs per preset and design
    python model.py --branches 1 6   # the same table at other K
    python -m pytest -q tests/test_model.py

Letters: B images, K image branches, M texts per image, N patches, T text tokens, D width,
E joint embedding dim, S image side in pixels, L tokens in a sequence, H attention heads.

Parameter names follow openai/CLIP (clip/model.py) so a CLIP state dict maps onto K = 1 by name.
Two differences in shape and kind: class_embedding is (K, D) where openai's is (D,) (load it as
`w[None]`), and the MLP uses nn.GELU (open_clip's default for training from scratch) unless quick_gelu
is set, as openai's released weights expect; prepare/clip.py converts both ways. Our Attention mirrors
nn.MultiheadAttention's names (in_proj_weight, in_proj_bias, out_proj) with q, k, v stacked in that order.
"""
import argparse
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# config


# Keyword-only, and the sizes have no defaults: start from PRESETS below. asdict(config) goes into
# every checkpoint, so later stages rebuild the model from the checkpoint alone.
@dataclass(kw_only=True)
class ModelConfig:
    image_size: int            # S, the side of the square input images
    patch_size: int            # conv1 stride; N = (image_size / patch_size)^2 patches
    conv_stem: bool = False    # conv1 = a small VGG-style conv stem instead of one patchify conv (conv_stem)
    vision_width: int          # D of the image tower
    vision_layers: int         # ViT blocks; 0 = the patch tokens as conv1 makes them (caption.py)
    vision_heads: int
    branches: int = 1          # K image embeddings per image; K = 1 is plain CLIP
    branch_type: str = "cls"   # "cls": K class tokens | "mlp": K copies of the last L blocks' c_proj
    isolate_cls: bool = True   # CLS design: class tokens cannot see each other (the paper's intent)
    official_mask: bool = False  # CLS design: instead, the official code's mask as it runs (official_bias)
    mlp_branch_layers: int = 3  # L: MLP design, how many final blocks carry K copies (paper: 3 of 12)
    quick_gelu: bool = False   # x * sigmoid(1.702 x) in the MLPs, as openai's released weights were trained
    vocab_size: int            # from the tokenizer; its largest id is EOT
    context_length: int = 77   # T, the longest text (openai's 77)
    text_width: int
    text_layers: int
    text_heads: int
    embed_dim: int             # E, the joint space both towers project into

    def __post_init__(self):
        assert self.branch_type in ("cls", "mlp"), f"branch_type must be cls or mlp, got {self.branch_type}"
        assert self.branches >= 1, f"branches (K) must be >= 1, got {self.branches}"
        assert self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"
        assert not self.conv_stem or self.patch_size & (self.patch_size - 1) == 0, "conv_stem: patch_size 2^n"
        assert self.vision_width % self.vision_heads == 0, "vision_width must divide into vision_heads"
        assert self.text_width % self.text_heads == 0, "text_width must divide into text_heads"
        assert self.branches == 1 or 1 <= self.mlp_branch_layers <= self.vision_layers, \
            "K > 1 needs 1 <= mlp_branch_layers <= vision_layers"


# ModelConfig kwargs without branches/vocab_size: ModelConfig(**{**PRESETS["tiny-conv"], "branches": 4,
# "vocab_size": tok.vocab_size}). tiny-conv (train.py's default) is tiny with a conv stem in place of the patchify
# conv, at the world's 32 px (N = 16): it learns the world's shapes, which tiny barely does, and a step at 32 px
# costs about half one at 64 (results/presets.md). tiny is the plain ViT that openai/open_clip weights fit
# (prepare/clip.py). Context 32 holds the synthetic world's longest caption (31 tokens with SOT/EOT). base is the
# paper's ViT-B/16 (paper.md section 5) with its L = 3 of 12 branched blocks.
TINY = dict(image_size=64, patch_size=8, vision_width=96, vision_layers=4, vision_heads=2, mlp_branch_layers=2,
            text_width=64, text_layers=2, text_heads=2, context_length=32, embed_dim=64)
PRESETS = {
    "tiny": TINY,
    "tiny-conv": {**TINY, "conv_stem": True, "image_size": 32},
    "small": dict(image_size=64, patch_size=8, vision_width=384, vision_layers=6, vision_heads=6, mlp_branch_layers=2,
                  text_width=256, text_layers=6, text_heads=4, context_length=77, embed_dim=256),
    "base": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 text_width=512, text_layers=12, text_heads=8, context_length=77, embed_dim=512),
}


# ----------------------------------------------------------------------------------------------------
# the transformer block, shared by both towers


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v rows stacked
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def qkv(self, x):
        """(..., L, D) -> q, k, v, each (..., H, L, D/H), from one matmul."""
        y = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (..., L, 3D)
        y = y.unflatten(-1, (3, self.heads, -1))                  # (..., L, 3, H, D/H)
        return y.movedim(-3, 0).transpose(-3, -2).unbind(0)       # 3 x (..., H, L, D/H)

    def forward(self, x, attn_mask=None, is_causal=False):
        """(..., L, D) -> (..., L, D). attn_mask: bool (L, L), True = may attend; or float, added to the logits."""
        shape = x.shape
        q, k, v = self.qkv(x.reshape(-1, *shape[-2:]))  # (B', H, L, D/H) each, B' = all leading dims
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(q.dtype)  # SDPA wants a float mask in the queries' dtype (bf16 under autocast)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(o.transpose(1, 2).reshape(shape))  # heads concatenated, (..., L, D)


class QuickGELU(nn.Module):
    """openai/CLIP's sigmoid approximation of GELU: its released weights need it (ModelConfig.quick_gelu)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    """c_fc -> GELU -> c_proj, called part by part from the block (the MLP design steps in between).
    With branches K > 1, c_proj is K separate Linear layers in a ModuleList (mlp.c_proj.{k}.weight):
    each copy looks exactly like openai's c_proj, and the loop over copies reads plainly."""

    def __init__(self, width, branches=1, quick_gelu=False):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = (nn.Linear(4 * width, width) if branches == 1 else
                       nn.ModuleList(nn.Linear(4 * width, width) for _ in range(branches)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)). Inputs may carry any leading dims."""

    def __init__(self, width, heads, branches=1, quick_gelu=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, branches, quick_gelu)

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal)
        h = self.mlp.gelu(self.mlp.c_fc(self.ln_2(x)))  # (..., L, 4D)
        if isinstance(self.mlp.c_proj, nn.Linear):
            return x + self.mlp.c_proj(h)
        # MLP design, x (B, 1 or K streams, L, D). The first branched block forks: one stream comes in,
        # every copy reads it (expand is a free view) and K streams go out. Later branched blocks get K
        # streams: attention, LNs and c_fc above ran on all K as one batch of B*K, and stream k now
        # goes through copy k only.
        K = len(self.mlp.c_proj)
        h = h.expand(-1, K, -1, -1)                                                # (B, K, L, 4D)
        out = torch.stack([c_proj(h[:, k]) for k, c_proj in enumerate(self.mlp.c_proj)], 1)  # (B, K, L, D)
        return x + out  # x (B, 1 or K, L, D) broadcasts over the K streams


class Transformer(nn.Module):
    """`layers` blocks; the last `branch_layers` of them carry `branches` copies of c_proj."""

    def __init__(self, width, layers, heads, branches=1, branch_layers=0, quick_gelu=False):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, branches if i >= layers - branch_layers else 1, quick_gelu)
            for i in range(layers))

    def forward(self, x, attn_mask=None, is_causal=False):
        for block in self.resblocks:  # none at all: caption.py's tower, the conv stem's tokens as they are
            x = block(x, attn_mask, is_causal)
        return x


# ----------------------------------------------------------------------------------------------------
# the image tower: K branches


def stem_widths(D, patch_size):
    """The channels along a conv stem: [3, D/4, D/2, D] for patch 8."""
    n = int(math.log2(patch_size))
    return [3] + [D >> (n - 1 - i) for i in range(n)]


def conv_stem(D, patch_size):
    """A small VGG-style stem in place of the one patchify conv (compare Xiao et al. 2021, "Early
    convolutions help transformers see better"): log2(patch_size) stages of 3x3 convolution at full
    resolution, a 2x2 max-pool, BatchNorm and ReLU (widths D/4, D/2, D for patch 8), then a 1x1 to D.
    Pooling before the norm runs BatchNorm and ReLU on a quarter of the pixels; with the input in channels-last
    (patchify) caption.py's CPU training step is 1.2-1.4x faster than conv-norm-ReLU-pool (bench/caption_step.py).
    Same patch grid, (B, 3, S, S) -> (B, D, S/p, S/p). A ViT trained from scratch on a few thousand images
    learns shapes much sooner with it (caption.py and the tiny-conv preset use it). Stride-2 convolutions without
    the max-pool and the norm learned shapes about as slowly as the patchify conv (results/captioner.md).
    BatchNorm uses each process's own batch (under DDP the running statistics of rank 0 are broadcast);
    inference needs .eval()."""
    widths, layers = stem_widths(D, patch_size), []
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c_out),
                   nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(widths[-1], D, 1))


def isolation_mask(K, N):
    """Boolean (K+N, K+N), True = may attend. Class token i sees itself and every patch but no
    other class token; patches see everything. Used in every layer (paper.md section 2).

    The official code builds the opposite, "blocked" mask (nn.MultiheadAttention's convention) and
    casts it to float; a float mask is *added* to the logits, so blocked pairs get +1 instead of -inf
    and the class tokens still see each other. This is the intended mask; official_mask=True runs that bug,
    official_bias(K, N), as an ablation."""
    mask = torch.ones(K + N, K + N, dtype=torch.bool)
    mask[:K, :K] = torch.eye(K, dtype=torch.bool)
    return mask


def official_bias(K, N):
    """Float (K+N, K+N), added to the logits: +1 between two different class tokens, 0 elsewhere. What the
    official code's mask computes (its blocked pairs cast to float), as opposed to what it means."""
    return (~isolation_mask(K, N)).float()


class VisionTransformer(nn.Module):
    """conv1 patches, the class tokens (K in the CLS design, 1 in the MLP design), ln_pre, blocks,
    ln_post; proj is applied by HolisticCLIP."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        D, K, N = c.vision_width, c.branches, (c.image_size // c.patch_size) ** 2
        cls_design = c.branch_type == "cls"
        self.conv1 = (conv_stem(D, c.patch_size) if c.conv_stem else
                      nn.Conv2d(3, D, kernel_size=c.patch_size, stride=c.patch_size, bias=False))
        self.class_embedding = nn.Parameter(torch.empty(K if cls_design else 1, D))  # (K or 1, D)
        self.positional_embedding = nn.Parameter(torch.empty(len(self.class_embedding) + N, D))  # (K+N or 1+N, D)
        self.ln_pre = nn.LayerNorm(D)
        self.transformer = Transformer(D, c.vision_layers, c.vision_heads, branches=1 if cls_design else K,
                                       branch_layers=c.mlp_branch_layers, quick_gelu=c.quick_gelu)
        self.ln_post = nn.LayerNorm(D)
        self.proj = nn.Parameter(torch.empty(D, c.embed_dim))
        # a mask only when it masks something, so SDPA keeps its fast kernels otherwise
        mask = (None if not cls_design or K == 1 else official_bias(K, N) if c.official_mask
                else isolation_mask(K, N) if c.isolate_cls else None)
        self.register_buffer("attn_mask", mask, persistent=False)

    def patchify(self, images):
        """(B, 3, S, S) -> (B, N, D), patches row by row. The patchify conv is computed as what it is, one
        matmul over the flattened p x p patches: the same sums, and on an H100 about 10x faster than
        cuDNN's strided convolution (results/benchmarks.md). A conv stem runs as convolutions."""
        if not isinstance(self.conv1, nn.Conv2d):  # channels-last: oneDNN's fast layout for the stem on the CPU
            return self.conv1(images.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)
        p = self.conv1.stride[0]
        x = images.unflatten(2, (-1, p)).unflatten(4, (-1, p))   # (B, 3, S/p, p, S/p, p)
        x = x.permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)  # (B, N, 3 p p), ordered like conv1.weight
        return F.linear(x, self.conv1.weight.flatten(1))          # (B, N, D)

    def embed(self, images):
        """(B, 3, S, S) -> (B, 1, L, D), one stream of L = K+N tokens (1+N in the MLP design): patchify,
        prepend the class tokens, add positions, ln_pre."""
        x = self.patchify(images)                                         # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(len(x), -1, -1)     # (B, K or 1, D)
        x = torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype)  # (B, L, D)
        return self.ln_pre(x).unsqueeze(1)

    def forward(self, images):
        """(B, 3, S, S) -> (B, K+N, D) after ln_post: the K class tokens, then the N patch tokens.
        CLS design: one stream holding K class tokens. MLP design: K streams of one class token each
        after the fork; their patch tokens are averaged over the streams."""
        x = self.ln_post(self.transformer(self.embed(images), self.attn_mask))  # (B, 1 or K, L, D)
        n_cls = len(self.class_embedding)
        return torch.cat([x[:, :, :n_cls].flatten(1, 2), x[:, :, n_cls:].mean(1)], 1)  # (B, K+N, D)


# ----------------------------------------------------------------------------------------------------
# the whole model


class HolisticCLIP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = self.config = config
        self.visual = VisionTransformer(c)
        # the text tower lives at the top level, as in openai/CLIP
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, quick_gelu=c.quick_gelu)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))  # (T, D)
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.empty(()))
        self.init_weights()

    def init_weights(self):
        """Every initial value in one place, as open_clip (and openai/CLIP) start, which the official code
        uses. Linear, Conv2d and LayerNorm already hold PyTorch's defaults from their constructors (uniform
        weights and biases, gains 1): the image tower keeps them in conv1 and every block, the text tower's
        weights get CLIP's stds (biases keep theirs). Attention gets what nn.MultiheadAttention gives itself:
        xavier-uniform q, k, v, zero biases. Each copy of c_proj (MLP design) is drawn on its own, so the
        branches start apart."""
        c, v, D = self.config, self.visual, self.config.vision_width
        for block in [*v.transformer.resblocks, *self.transformer.resblocks]:
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(v.class_embedding, std=D ** -0.5)
        nn.init.normal_(v.positional_embedding, std=D ** -0.5)
        nn.init.normal_(v.proj, std=D ** -0.5)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = c.text_width, c.text_layers
        for block in self.transformer.resblocks:  # residual branches shrink with depth
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=width ** -0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))  # CLIP's temperature 0.07

    def encode_image(self, images, reduce=None):
        """(B, 3, S, S) -> unit (B, K, E); reduce="mean" -> unit (B, E), the renormalised branch mean."""
        x = self.visual(images)[:, :self.config.branches] @ self.visual.proj  # (B, K, E), shared proj
        x = F.normalize(x, dim=-1)
        if reduce == "mean":
            return F.normalize(x.mean(1), dim=-1)  # (B, E)
        assert reduce is None, f"reduce must be None or 'mean', got {reduce!r}"
        return x

    def encode_text(self, tokens):
        """(..., T) token ids -> unit (..., E), read at each text's EOT (its largest id). The columns after the
        longest text's EOT are dropped first: under the causal mask no token up to an EOT sees them, so every
        embedding is the same and a batch of short texts costs what it holds."""
        shape, T = tokens.shape, tokens.shape[-1]
        assert T <= self.config.context_length, f"{T} tokens > context_length {self.config.context_length}"
        tokens = tokens.reshape(-1, T)                                          # (B*M, T)
        eot = tokens.argmax(-1)                                                 # (B*M,) each EOT's position
        tokens = tokens[:, :int(eot.max()) + 1]                                 # (B*M, T'), T' <= T
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]  # (B*M, T', D)
        x = self.ln_final(self.transformer(x, is_causal=True))                  # (B*M, T', D), causal
        x = x[torch.arange(len(x), device=x.device), eot]                       # (B*M, D) at each EOT
        x = F.normalize(x @ self.text_projection, dim=-1)                       # (B*M, E)
        return x.reshape(*shape[:-1], -1)                                       # (..., E)

    def forward(self, images, tokens):
        """images (B, 3, S, S), tokens (B, M, T) -> img (B, K, E), txt (B, M, E), scale (0-dim). The texts go
        slot by slot, each slot trimmed to its own longest text: in the world a batch's longest detail holds 31
        tokens, its other slots' about 10, so 40 % of the (B, M, T = 32) tokens are run."""
        txt = torch.stack([self.encode_text(tokens[:, m]) for m in range(tokens.shape[1])], 1)  # (B, M, E)
        return self.encode_image(images), txt, self.logit_scale.exp()

    def encode_patches(self, images):
        """(B, 3, S, S) -> unit (B, N, E): the last layer's patch tokens through ln_post and proj,
        in the joint space (the dense probe compares them with text embeddings)."""
        x = self.visual(images)[:, self.config.branches:]  # (B, N, D)
        return F.normalize(x @ self.visual.proj, dim=-1)                   # (B, N, E)

    def class_attention(self, images):
        """(B, 3, S, S) -> (B, K, N): the last block's attention of each class token over the patches,
        averaged over heads and renormalised over the N patches (class-token columns dropped)."""
        v = self.visual
        n_cls = len(v.class_embedding)  # K (CLS design) or 1 (MLP design)
        x = v.embed(images)  # (B, 1, L, D)
        for block in v.transformer.resblocks[:-1]:
            x = block(x, v.attn_mask)     # (B, 1 or K streams, L, D)
        last = v.transformer.resblocks[-1]
        q, k, _ = last.attn.qkv(last.ln_1(x))  # each (B, streams, H, L, D/H)
        logits = q[..., :n_cls, :] @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, streams, H, n_cls, L)
        if v.attn_mask is not None and v.attn_mask.is_floating_point():
            logits = logits + v.attn_mask[:n_cls]
        elif v.attn_mask is not None:
            logits = logits.masked_fill(~v.attn_mask[:n_cls], float("-inf"))
        attn = logits.softmax(-1).mean(2)[..., n_cls:]  # (B, streams, n_cls, N) head mean, patch columns
        attn = attn / attn.sum(-1, keepdim=True)
        # streams x n_cls = K, except the MLP design with one branched block: the last block is the fork,
        # one stream, and its attention (computed before the fork) is every branch's
        return attn.expand(-1, self.config.branches // n_cls, -1, -1).flatten(1, 2)  # (B, K, N)


# ----------------------------------------------------------------------------------------------------
# cost


def flops_per_sample(config: ModelConfig, M=1):
    """Forward FLOPs (2 per multiply-add) per image, per text, and image + M texts; training ~ 3x.

    Counts what torch.utils.flop_counter counts, the convention of open_clip's model_profile.csv
    (ViT-B-16: 35.13 image, 5.96 text GFLOP): matmuls (q/k/v/out projections, q k^T and attn @ v over
    all L^2 pairs, even under a causal mask, MLP), conv1 and the final projections, taken at the
    class tokens / EOT only, every text as long as the context (encode_text runs shorter ones shorter).
    LayerNorm, softmax, GELU and adds are left out (under 1%)."""
    c = config

    def block(L, D, streams=1, c_proj_copies=1):
        # q, k, v, out and c_fc: 8 L D^2 per stream; q k^T and attn @ v: 2 L^2 D; c_proj: 4 L D^2 per copy
        return 2 * (streams * (8 * L * D * D + 2 * L * L * D) + c_proj_copies * 4 * L * D * D)

    K, D, N = c.branches, c.vision_width, (c.image_size // c.patch_size) ** 2
    image = 2 * K * D * c.embed_dim  # proj of the K class tokens
    if c.conv_stem:  # stage i: 3x3 convs (9 c_in c_out per pixel) at S / 2^i, then the 1x1 on the N patches
        widths = stem_widths(D, c.patch_size)
        image += 2 * N * widths[-1] * D
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            image += 2 * (c.image_size >> i) ** 2 * 9 * c_in * c_out
    else:  # conv1: one D-vector per patch from 3 p^2 pixels
        image += 2 * N * D * 3 * c.patch_size ** 2
    # (streams, c_proj copies) of each block, and the sequence length L
    if c.branch_type == "cls":
        L, layers = K + N, [(1, 1)] * c.vision_layers
    else:  # shared blocks, the fork block (one stream in, K copies of c_proj), then K streams
        fork = c.mlp_branch_layers if K > 1 else 0
        L, layers = 1 + N, [(1, 1)] * (c.vision_layers - fork) + [(1, K)] * (fork > 0) + [(K, K)] * max(fork - 1, 0)
    image += sum(block(L, D, *sc) for sc in layers)
    T, W = c.context_length, c.text_width
    text = c.text_layers * block(T, W) + 2 * W * c.embed_dim  # text_projection at EOT only
    return dict(image=float(image), text=float(text), total=float(image + M * text))


# ----------------------------------------------------------------------------------------------------
# checkpoints: one file holds what a later stage needs to rebuild the model (asdict(config), the weights, ...)


def write_checkpoint(state, path):
    """torch.save(state) to `path` atomically: a temporary file flushed to the disk (fsync), renamed over the
    old one, then the folder flushed. A crash or a power cut leaves the old file or the new one; a failed write
    (a full disk) removes the temporary file, keeps the old one, and raises OSError naming the path."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(folder)  # the rename itself
        os.close(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(f"could not write {path} ({str(e).splitlines()[0]})") from e


def read_checkpoint(path, keys=("config", "model")):
    """torch.load(path, weights_only=True): a dict holding `keys`, else ValueError naming the file (missing,
    truncated, not a torch file, or a checkpoint of another kind, such as a captioner's given to eval.py)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # FileNotFoundError, a truncated zip, a pickle that weights_only refuses, ...
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    missing = sorted(set(keys) - set(ckpt)) if isinstance(ckpt, dict) else sorted(keys)
    if missing:
        raise ValueError(f"{path}: not the checkpoint expected here (it has no {', '.join(missing)})")
    return ckpt


# ----------------------------------------------------------------------------------------------------
# python model.py: the cost table


def count(module):
    return sum(p.numel() for p in module.parameters())


def main():
    parser = argparse.ArgumentParser(description="Parameters and forward FLOPs of each preset and design.")
    parser.add_argument("--branches", type=int, nargs="+", default=[1, 4], help="values of K to tabulate")
    parser.add_argument("--texts", type=int, default=6, help="M texts per image for the last column")
    args = parser.parse_args()
    print(f"{'preset':6} {'design':6} {'K':>2} | {'vision M':>8} {'text M':>7} {'total M':>7} {'+/branch':>9} | "
          f"{'GF image':>8} {'GF text':>7} {f'GF 1+{args.texts}':>7}")
    for name, preset in PRESETS.items():
        vocab = 49408 if name == "base" else 1024  # openai's BPE for base, the synthetic world's tokenizer else
        with torch.device("meta"):  # shapes only, no memory: instant even for base
            plain = count(HolisticCLIP(ModelConfig(**preset, vocab_size=vocab)))  # K = 1, plain CLIP
        for design in ("cls", "mlp"):
            for K in args.branches:
                c = ModelConfig(**preset, branches=K, branch_type=design, vocab_size=vocab)
                with torch.device("meta"):
                    model = HolisticCLIP(c)
                vision, total = count(model.visual), count(model)
                extra = f"{(total - plain) // (K - 1):9,d}" if K > 1 else f"{'-':>9}"
                f = flops_per_sample(c, args.texts)
                print(f"{name:6} {design:6} {K:2d} | {vision / 1e6:8.2f} {(total - vision - 1) / 1e6:7.2f} "
                      f"{total / 1e6:7.2f} {extra} | {f['image'] / 1e9:8.3f} {f['text'] / 1e9:7.3f} "
                      f"{f['total'] / 1e9:7.3f}")


if __name__ == "__main__":
    main()
