"""prepare/clip.py: Holistic CLIP from an existing CLIP, and back (paper.md section 2: the K branches start as
copies of CLIP's one). CLIP's own tokenizer, read from the user's bpe_simple_vocab_16e6.txt.gz so that a pretrained
text tower sees the ids it was trained on; an openai/CLIP or open_clip ViT file loaded into K branches (train.py
--pretrained); a K = 1 checkpoint exported to open_clip. Nothing is downloaded: the user brings the files.

    python train.py --model base --pretrained ViT-B-16.bin --tokenizer bpe_simple_vocab_16e6.txt.gz
    python prepare/clip.py --export runs/NAME/ckpt.pt clip.pt   # a K = 1 run -> open_clip's clip.pt + clip.json
    python -m pytest -q tests/test_clip.py     # against the real open_clip (pip install open_clip_torch)

openai's released weights also need --force-quick-gelu. For K > 1 there is no CLIP to export:
model.encode_image(x, reduce="mean"), the renormalised branch mean, is the one vector per image that CLIP tooling
(retrieval, zero-shot, clip_benchmark) expects.
Reading order: the tokenizer, loading a CLIP, exporting one, the command line.
"""
import argparse
import gzip
import html
import json
import math
import os
import re
import sys
import unicodedata

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import DataError, Tokenizer  # noqa: E402
from model import HolisticCLIP, ModelConfig, read_checkpoint  # noqa: E402

# -----------------------------------------------------------------------------
# CLIP's own BPE, read from the user's copy of bpe_simple_vocab_16e6.txt.gz (it ships inside the openai `clip` and
# `open_clip` packages), so that a pretrained text tower sees the ids it was trained on. data.Tokenizer's
# machinery (ranks, _merge, PAD 0, SOT = V - 2, EOT = V - 1, truncation) with CLIP's conventions: ids 0..255 are
# the bytes in CLIP's order (printable Latin-1 first), 256..511 the same bytes ending a word ("</w>"), merge k makes
# id 512 + k; V = 49,408.

CLIP_BYTES = [*range(33, 127), *range(161, 173), *range(174, 256)]  # CLIP's byte order: these 188 first, then the rest
CLIP_BYTES += [b for b in range(256) if b not in CLIP_BYTES]
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _clip_words(chunk):
    r"""CLIP's pre-tokenisation of one space-free chunk, its regex
    's|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+ written out with unicodedata (no `regex` package):
    contractions, runs of letters, single digits, runs of anything else. (CLIP also matches its special-token
    strings; here they are plain text.)"""
    kind = [unicodedata.category(ch)[0] if unicodedata.category(ch)[0] in "LN" else "other" for ch in chunk]
    words, i = [], 0
    while i < len(chunk):
        j = i + next((len(c) for c in CONTRACTIONS if chunk.startswith(c, i)), 0)
        if j == i:  # not a contraction: a run of one kind, except that every digit is a word of its own
            j = i + 1
            while kind[i] != "N" and j < len(chunk) and kind[j] == kind[i]:
                j += 1
        words.append(chunk[i:j])
        i = j
    return words


class ClipTokenizer(Tokenizer):
    """openai/CLIP's tokenizer (clip/simple_tokenizer.py, and open_clip's default): ftfy.fix_text when ftfy is
    installed, HTML unescaped twice, whitespace collapsed, lower case, _clip_words, BPE. tokenize() is inherited: it
    pads with 0 and truncates keeping EOT, as CLIP does; decode() gives CLIP's text, a space after every word."""

    def __init__(self, merges):
        # the vocabulary as CLIP writes it, a string per id (bytes as printable characters), to look the merges up
        names = [chr(b) if i < 188 else chr(256 + i - 188) for i, b in enumerate(CLIP_BYTES)]
        ids = {n: i for i, n in enumerate(names + [n + "</w>" for n in names])}
        self.pieces = [bytes([b]) for b in CLIP_BYTES] + [bytes([b]) + b" " for b in CLIP_BYTES]  # id -> its text
        self.ranks = {}
        for k, (a, b) in enumerate(merges):
            if a not in ids or b not in ids:
                raise DataError(f"not CLIP's BPE: merge {k} ({a} {b}) joins strings that no earlier id makes")
            self.ranks[ids[a], ids[b]] = ids[a + b] = 512 + k
            self.pieces.append(self.pieces[ids[a]] + self.pieces[ids[b]])
        self.merges, self.vocab_size = [list(p) for p in merges], 512 + len(merges) + 2
        self.pad, self.sot, self.eot = 0, self.vocab_size - 2, self.vocab_size - 1
        self.cache, self.truncated = {}, 0
        try:
            import ftfy
            self.fix_text = ftfy.fix_text
        except ImportError:
            print("note: ftfy is not installed (pip install ftfy): texts that CLIP's ftfy.fix_text would repair (curly "
                  "quotes, ligatures, mojibake) get other ids than CLIP gives them", file=sys.stderr)
            self.fix_text = str

    @classmethod
    def read(cls, path):
        """bpe_simple_vocab_16e6.txt.gz: a version line, then one merge per line; CLIP reads the first 48,894."""
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")[1:49152 - 256 - 2 + 1]
            return cls([line.split() for line in lines])
        except (OSError, EOFError, ValueError) as e:  # not gzip, truncated, not UTF-8, not pairs
            raise DataError(f"{path}: not CLIP's BPE vocabulary ({e})") from None

    def encode(self, text):
        """CLIP's ids of `text` (no SOT, EOT or PAD). The cache holds space-free chunks: no word spans a space."""
        text = html.unescape(html.unescape(self.fix_text(text))).strip()
        ids = []
        for chunk in text.lower().split():
            if chunk not in self.cache:
                self.cache[chunk] = [i for w in _clip_words(chunk) for i in self._bpe(self._bytes(w))]
            ids += self.cache[chunk]
        return ids

    def _bytes(self, word):
        """The ids of a word's bytes, the last one marking the word's end."""
        ids = [CLIP_BYTES.index(b) for b in word.encode()]
        return ids[:-1] + [ids[-1] + 256]

    def to_dict(self):  # the merges as CLIP's strings: the checkpoint rebuilds the tokenizer without the file
        return {"vocab_size": self.vocab_size, "clip_merges": self.merges}


# -----------------------------------------------------------------------------
# Loading a CLIP into K branches, and exporting a K = 1 model: model.py's names already follow openai/CLIP, so only
# the branched parameters need care


def read_state_dict(path):
    """The weights in an open_clip file (.pt/.bin: a state dict, or a training checkpoint's "state_dict";
    .safetensors), or in one of openai's own .pt files (TorchScript archives); else ValueError."""
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError("reading .safetensors needs the safetensors package: pip install safetensors")
            return load_file(path)
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except RuntimeError as e:
            if "TorchScript" not in str(e):
                raise
            weights = torch.jit.load(path, map_location="cpu").state_dict()
        weights = weights.get("state_dict", weights) if isinstance(weights, dict) else weights
        assert isinstance(weights, dict) and all(torch.is_tensor(w) for w in weights.values()), "not a state dict"
        return weights
    except Exception as e:  # missing, truncated, not a torch file, not a dict of tensors
        raise ValueError(f"not a readable state dict ({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def load_clip(model, path, resize_positions=False):
    """Copy the K = 1 ViT CLIP in `path` (an openai/CLIP or open_clip file) into `model`: K branches that start as
    copies of CLIP's one. CLS design: the class token and its position row go into all K class tokens. MLP
    design: c_proj goes into every copy in the branched blocks. Everything else by name. Nothing breaks the
    copies' symmetry at load time: each branch is trained on its own caption slot, and that pulls them apart.
    A shape that does not fit stops with ValueError naming the parameter and both shapes; resize_positions:
    resample the patch positions to this model's image size (bicubic, as open_clip) instead."""
    source = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}  # DDP saves say module.
    for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):  # TorchScript archives carry
        source.pop(key, None)                                                     # these; no weights among them
    own, n_cls = model.state_dict(), len(model.visual.class_embedding)
    unused = set(source) - {re.sub(r"c_proj\.\d+\.", "c_proj.", k) for k in own}
    if unused:
        raise ValueError(f"not a ViT CLIP of this layout: {len(unused)} parameters have no place here, such as "
                         f"{sorted(unused)[:3]} (compare the model's presets and --model)")
    weights = {}
    for name, target in own.items():
        key = re.sub(r"c_proj\.\d+\.", "c_proj.", name)  # every MLP-design copy reads the one c_proj
        if key not in source:
            raise ValueError(f"{key}: missing from the checkpoint (a conv stem, or another architecture?)")
        w = source[key]
        if name == "visual.class_embedding":  # openai's (D,) -> (K, D), the same token K times
            w = w.reshape(1, -1).expand(n_cls, -1)
        if name == "visual.positional_embedding":  # class row K times, then the patch rows
            cls, grid = w[:1], w[1:]
            if resize_positions and len(grid) != len(target) - n_cls:
                g, S = math.isqrt(len(grid)), math.isqrt(len(target) - n_cls)  # sides of the square patch grids
                grid = grid.T.reshape(1, -1, g, g)
                grid = F.interpolate(grid.float(), size=(S, S), mode="bicubic", antialias=True, align_corners=False)
                grid = grid.reshape(-1, S * S).T.to(w.dtype)
            w = torch.cat([cls.expand(n_cls, -1), grid])
        if w.shape != target.shape:
            raise ValueError(f"{key}: the checkpoint's shape {tuple(source[key].shape)} does not fit this model's "
                             f"{tuple(target.shape)}")
        weights[name] = w
    model.load_state_dict(weights)
    return model


def to_open_clip(model):
    """A K = 1 model -> (state dict, model config) for open_clip: open_clip.model.CLIP(**config) then
    load_state_dict(state dict, strict=True) gives the same embeddings. For K > 1 there is no CLIP to export:
    encode_image(x, reduce="mean"), the renormalised branch mean, is the one vector per image that CLIP
    tooling (retrieval, zero-shot, clip_benchmark) expects."""
    c = model.config
    if c.branches != 1 or c.conv_stem:
        raise ValueError(f"only a K = 1 model with the patchify conv has an open_clip twin (K = {c.branches}"
                         f"{', a conv stem' if c.conv_stem else ''}); use encode_image(x, reduce='mean') for K > 1")
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights["visual.class_embedding"] = weights["visual.class_embedding"][0]  # (1, D) -> openai's (D,)
    config = dict(embed_dim=c.embed_dim, quick_gelu=c.quick_gelu,
                  vision_cfg=dict(image_size=c.image_size, patch_size=c.patch_size, width=c.vision_width,
                                  layers=c.vision_layers, head_width=c.vision_width // c.vision_heads),
                  text_cfg=dict(context_length=c.context_length, vocab_size=c.vocab_size, width=c.text_width,
                                heads=c.text_heads, layers=c.text_layers))
    return weights, config


# -----------------------------------------------------------------------------
# Command line: export a K = 1 checkpoint to open_clip

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--export", nargs=2, required=True, metavar=("CKPT", "OUT"),
                   help="a K = 1 checkpoint -> open_clip state dict OUT and its model config OUT.json")
    path, out = p.parse_args().export
    try:
        ckpt = read_checkpoint(path)
        model = HolisticCLIP(ModelConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
        weights, config = to_open_clip(model)
    except ValueError as e:
        sys.exit(f"error: {e}")
    torch.save(weights, out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(config, f, indent=1)
    print(f"{out} and {os.path.splitext(out)[0]}.json: open_clip.model.CLIP(**config).load_state_dict(weights)")


if __name__ == "__main__":
    main()
