"""From and to an existing CLIP, checked against the real open_clip (a test-only dependency: pip install
open_clip_torch; these tests skip without it): CLIP's tokenizer gives open_clip's ids, an open_clip ViT loads
into K branches with open_clip's embeddings (float64), a K = 1 model exports back and loads strictly.

    python -m pytest -q tests/test_clip.py
"""
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from data import DataError, Tokenizer
from model import PRESETS, HolisticCLIP, ModelConfig, write_checkpoint
from prepare.clip import ClipTokenizer, load_clip, to_open_clip

open_clip = pytest.importorskip("open_clip", reason="a test-only dependency: pip install open_clip_torch")
from open_clip.tokenizer import SimpleTokenizer, default_bpe  # noqa: E402 (after the skip)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a small custom config on both sides: 32 px, patch 8 (16 patches), 2 + 2 layers, QuickGELU as openai's weights
SMALL = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2, mlp_branch_layers=1,
             text_width=32, text_layers=2, text_heads=2, context_length=16, embed_dim=24, quick_gelu=True,
             vocab_size=100)


def open_clip_model(c):
    """open_clip's CLIP for our config dict, with weights drawn away from the init (biases and gains included)."""
    config = to_open_clip(HolisticCLIP(ModelConfig(**c)))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights loaded": random weights are the point here
        model = open_clip.model.CLIP(**config).double().eval()
    with torch.no_grad():
        for w in model.parameters():
            w.add_(0.02 * torch.randn_like(w))
    return model


def ours(c, path, **kw):
    return load_clip(HolisticCLIP(ModelConfig(**{**c, **kw})).double().eval(), str(path))


def inputs(c, n=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, c["image_size"], c["image_size"], generator=g, dtype=torch.float64)
    tokens = torch.randint(1, c["vocab_size"] - 2, (n, c["context_length"]), generator=g)
    tokens[:, 5:] = 0
    tokens[:, 4] = c["vocab_size"] - 1  # EOT, the largest id, where open_clip and we read each text
    return images, tokens


TEXTS = ["a photo of a cat.", "It's   the café's  “best” naïve résumé!!", "O'Neil'll say 'hello' 123,456 km² ½ 一二三",
         "日本語のテキスト", "&amp;lt;b&amp;gt; HTML &quot;quoted&quot;", "ﬁne ligature ＦＵＬＬＷＩＤＴＨ", "CafÃ© mojibake",
         "emoji 🐈‍⬛ 👍🏽 tabs\tand\nnewlines", "Ünïcödé İstanbul ß straße ǅ", "a_b-c--d...e!?'s 'S 'LL don't",
         "it's they're we've i'm you'll he'd", "", "   ", "word " * 100]


def test_clip_tokenizer_gives_open_clips_ids():
    ref, tok = SimpleTokenizer(), Tokenizer.load(default_bpe())
    assert isinstance(tok, ClipTokenizer) and tok.vocab_size == 49408 == ref.vocab_size
    assert torch.equal(tok.tokenize(TEXTS, 77), ref(TEXTS, 77))  # truncation of the long text included
    assert tok.decode(tok.encode(TEXTS[1])) == ref.decode(ref.encode(TEXTS[1]))
    again = Tokenizer.from_dict(tok.to_dict())  # as a checkpoint rebuilds it, without the file
    assert torch.equal(again.tokenize(TEXTS, 77), ref(TEXTS, 77))


def test_a_broken_vocabulary_file_is_named(tmp_path):
    (tmp_path / "cut.txt.gz").write_bytes(open(default_bpe(), "rb").read()[:1000])
    with gzip.open(tmp_path / "bad.txt.gz", "wt") as f:
        f.write("#version\nzz yy\n")
    for name in ("cut.txt.gz", "bad.txt.gz", "missing.txt.gz"):
        with pytest.raises(DataError, match=f"{name}: not CLIP's BPE vocabulary"):
            Tokenizer.load(str(tmp_path / name))


def test_vit_b16_loads_with_open_clips_embeddings_and_exports_back(tmp_path):
    """The paper's ViT-B/16 at K = 1 (float64): image and text embeddings equal open_clip's; exported back, open_clip
    loads it with strict=True and gives the same embeddings again."""
    c = {**PRESETS["base"], "vocab_size": 49408}
    ref = open_clip_model(c)
    torch.save(ref.state_dict(), tmp_path / "b16.pt")
    images, tokens = inputs(c, n=2)
    with torch.no_grad():
        want = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
        model = ours(c, tmp_path / "b16.pt")
        assert torch.allclose(model.encode_image(images)[:, 0], want[0], atol=1e-12)
        assert torch.allclose(model.encode_text(tokens), want[1], atol=1e-12)
        del ref
        back = open_clip.model.CLIP(**to_open_clip(model)[1]).double().eval()
        back.load_state_dict(to_open_clip(model)[0], strict=True)
        assert torch.allclose(back.encode_image(images, normalize=True), want[0], atol=1e-12)
        assert torch.allclose(back.encode_text(tokens, normalize=True), want[1], atol=1e-12)


def test_k_branches_start_as_copies_of_clips_one(tmp_path):
    """MLP design, K = 3: every branch equals CLIP's embedding. CLS design, K = 3: the three branches equal each
    other, but not CLIP's: the patch tokens now attend to three copies of the class token instead of one,
    so CLIP's embedding is only approximated (a known, documented difference)."""
    ref = open_clip_model(SMALL)
    torch.save(ref.state_dict(), tmp_path / "small.pt")
    images, tokens = inputs(SMALL)
    with torch.no_grad():
        want, want_text = ref.encode_image(images, normalize=True), ref.encode_text(tokens, normalize=True)
        for design in ("cls", "mlp"):
            one = ours(SMALL, tmp_path / "small.pt", branch_type=design)
            assert torch.allclose(one.encode_image(images)[:, 0], want, atol=1e-12), design
            assert torch.allclose(one.encode_text(tokens), want_text, atol=1e-12), design
        img = ours(SMALL, tmp_path / "small.pt", branch_type="mlp", branches=3).encode_image(images)  # (B, 3, E)
        assert torch.allclose(img, want[:, None].expand_as(img), atol=1e-12)
        img = ours(SMALL, tmp_path / "small.pt", branch_type="cls", branches=3).encode_image(images)
        assert torch.allclose(img, img[:, :1].expand_as(img), atol=1e-12)
        assert not torch.allclose(img[:, 0], want, atol=1e-6)


def test_positions_for_another_image_size_only_when_asked(tmp_path):
    """A 48 px model from a 32 px CLIP: refused, naming the parameter and both shapes; with resize_positions the
    patch positions equal open_clip's own resize_pos_embed."""
    ref = open_clip_model(SMALL)
    torch.save(ref.state_dict(), tmp_path / "small.pt")
    big = {**SMALL, "image_size": 48}
    with pytest.raises(ValueError, match=r"visual.positional_embedding: the checkpoint's shape \(17, 64\) does not "
                                         r"fit this model's \(37, 64\)"):
        ours(big, tmp_path / "small.pt")
    model = load_clip(HolisticCLIP(ModelConfig(**big, branches=2)).double(), str(tmp_path / "small.pt"),
                      resize_positions=True)
    state = ref.state_dict()
    open_clip.model.resize_pos_embed(state, open_clip_model(big))  # resamples state's table in place
    want = state["visual.positional_embedding"]  # (1 + 36, D)
    got = model.visual.positional_embedding.detach()  # (2 + 36, D): the class row twice
    assert torch.allclose(got[2:], want[1:], atol=1e-6) and torch.equal(got[0], got[1]) and torch.equal(got[0], want[0])


def test_every_file_kind_loads_and_misfits_are_named(tmp_path):
    """open_clip's training checkpoint (state_dict, module. prefixes), safetensors and a TorchScript archive (as
    openai ships its .pt files) give the same model; other architectures stop with the parameter named."""
    safetensors = pytest.importorskip("safetensors.torch")
    ref = open_clip_model(SMALL).float()
    state = ref.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pt")
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated; openai's released files are such archives
        images, tokens = inputs(SMALL, n=1)
        torch.jit.save(torch.jit.trace(ref, (images.float(), tokens), check_trace=False), str(tmp_path / "jit.pt"))
    want = HolisticCLIP(ModelConfig(**SMALL)).state_dict()
    for name in ("train.pt", "w.safetensors", "jit.pt"):
        got = load_clip(HolisticCLIP(ModelConfig(**SMALL)), str(tmp_path / name)).state_dict()
        assert all(torch.equal(got[k], state[k].reshape(got[k].shape)) for k in want), name
    with pytest.raises(ValueError, match=r"visual.class_embedding: the checkpoint's shape \(64,\) does not fit "
                                         r"this model's \(1, 96\)"):
        load_clip(HolisticCLIP(ModelConfig(**{**SMALL, "vision_width": 96})), str(tmp_path / "train.pt"))
    torch.save({**state, "visual.attnpool.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="1 parameters have no place here"):
        load_clip(HolisticCLIP(ModelConfig(**SMALL)), str(tmp_path / "extra.pt"))
    with pytest.raises(ValueError, match="not a readable state dict"):
        load_clip(HolisticCLIP(ModelConfig(**SMALL)), str(tmp_path / "nothing.pt"))


def test_export_command_gives_an_open_clip_model(tmp_path):
    """python prepare/clip.py --export on a K = 1 tiny-preset checkpoint: open_clip builds the custom config from the
    .json, loads the weights with strict=True, and gives our embeddings (float64); K > 1 is refused."""
    c = {**PRESETS["tiny"], "vocab_size": 1024}
    model = HolisticCLIP(ModelConfig(**c)).double().eval()
    write_checkpoint({"config": dataclasses.asdict(model.config), "model": model.state_dict()}, str(tmp_path / "k1.pt"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare", "clip.py"), "--export", str(tmp_path / "k1.pt"),
                        str(tmp_path / "clip.bin")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = open_clip.model.CLIP(**json.load(open(tmp_path / "clip.json"))).double().eval()
    back.load_state_dict(torch.load(tmp_path / "clip.bin", weights_only=True), strict=True)
    images, tokens = inputs(c)
    with torch.no_grad():
        assert torch.allclose(back.encode_image(images, normalize=True), model.encode_image(images, reduce="mean"),
                              atol=1e-12)
        assert torch.allclose(back.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-12)
    k4 = HolisticCLIP(ModelConfig(**c, branches=4))
    write_checkpoint({"config": dataclasses.asdict(k4.config), "model": k4.state_dict()}, str(tmp_path / "k4.pt"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "prepare", "clip.py"), "--export", str(tmp_path / "k4.pt"),
                        str(tmp_path / "no.bin")], capture_output=True, text=True)
    assert r.returncode == 1 and "reduce='mean'" in r.stderr and not (tmp_path / "no.bin").exists()


def test_initialisation_is_open_clips():
    """The official code starts as open_clip does; K = 1 at ViT-B/16's widths with 2 + 2 blocks: every parameter
    has open_clip's initial spread (std within 5 %) and the same biases at zero, the vision blocks' PyTorch
    defaults (uniform biases included) and the text tower's CLIP stds alike."""
    c = {**PRESETS["base"], "vision_layers": 2, "text_layers": 2, "vocab_size": 49408}
    torch.manual_seed(0)
    ours = HolisticCLIP(ModelConfig(**c)).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = open_clip.model.CLIP(**to_open_clip(HolisticCLIP(ModelConfig(**c)))[1]).state_dict()
    for name, w in theirs.items():
        mine = ours[name].reshape(w.shape)
        assert (mine.unique().numel() == 1) == (w.unique().numel() == 1), name  # constant in both or neither
        assert bool((mine == 0).all()) == bool((w == 0).all()), name
        if w.numel() > 1000 and w.std() > 0:
            assert abs(mine.std() / w.std() - 1) < 0.05, (name, mine.std().item(), w.std().item())
