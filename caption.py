r"""The captioning stage: M texts per image from a small prompt-conditioned captioner (paper.md section 1).

The paper re-captions every image with large vision-language models, several prompts to one (gadget 1) or
"describe in detail" to several (gadget 2). None can be downloaded here, so this file trains a small one on
examples (e.g. the world's ground truth): model.py's vision tower turns the image into tokens, a small causal
decoder cross-attending to them writes the text, a learned prompt token in SOT's place picks the perspective.

    python prepare/world.py --out data/shapes5k --train-size 5000 --val-size 500 --image-size 64
    python caption.py train --data data/shapes5k/train.jsonl --out runs/cap --max-minutes 10
    python caption.py generate --ckpt runs/cap/captioner.pt --data data/shapes5k/val.jsonl \
        --prompts detail,nouns,background,main,style --out runs/cap/g1.jsonl            # gadget 1
    python caption.py generate --ckpt runs/cap/captioner.pt --ckpt runs/cap2/captioner.pt \
        --data data/shapes5k/val.jsonl --prompts detail --out runs/cap/g2.jsonl          # gadget 2
    torchrun --nproc_per_node=4 caption.py generate ...       # rank r writes OUT.part{r}, rank 0 merges
    python -m pytest -q tests/test_caption.py

How right and how diverse the written texts are: python bench/caption_score.py (results/captioner.md).
Reading order: the prompts, the captioner (DecoderBlock, Captioner), train, cleaning, generate, main.

Output records: {"image", "caption": [slot 0 = the input's first caption (its alt-text), then one text per
captioner and prompt], the input's other keys}, image paths relative to the output file. Cleaning: an empty,
looping or repeated text is sampled again (temperature 1) up to RETRIES times, then replaced by slot 0.
Resuming: images already in OUT are skipped; one line is appended and flushed per image. torchrun (only
RANK and WORLD_SIZE are read, no process group): rank r captions records r::W into OUT.part{r}, rank 0
waits for all parts and writes OUT in input order; after a crash, rerun the same command.

Letters: B images per batch, S image side, N patches per image, K image branches (1 here), D width, H heads,
L a sequence's length (1+N image tokens, or t text positions), T tokens, V vocabulary, M texts per image, W world size.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model
from prepare.world import SLOTS

# ----------------------------------------------------------------------------------------------------
# prompts: the official prompt set (paper.md section 1) and which caption slot holds which perspective

PROMPTS = {
    "detail": "Describe the image in detail.",
    "brief": "Briefly describe the image with just a few words.",
    "sentence": "Briefly describe the image in one sentence.",
    "nouns": "Briefly describe the image with few noun words separated by ','.",
    "style": "Describe the style or your feelings about this image, do not say anything about the objects "
             "in the image.",
    "background": "Describe only the background of this image, do not say anything about the foreground objects.",
    "main": "Describe only the one main object in the image, do not say anything about the other objects "
            "or background.",
}
# The synthetic world's slots: 0 is the alt-text (a record's original caption, not a prompt's answer),
# 1..5 the official merged order {1: "detail", 2: "nouns", 3: "background", 4: "main", 5: "style"}.
SLOT_PROMPTS = {m: name for m, name in enumerate(SLOTS) if name in PROMPTS}
PAD = 0  # data.Tokenizer: PAD = 0, SOT = V - 2, EOT = V - 1
RETRIES = 3  # generate: sampled retries (temperature 1) of an unacceptable text before the fallback

# ----------------------------------------------------------------------------------------------------
# the captioner: image tokens -> prompt-conditioned text

@dataclass
class CaptionerConfig:
    vision: dict              # model.ModelConfig kwargs of the image encoder (K = 1)
    prompts: list             # prompt names (keys of PROMPTS), one learned prompt token each
    vocab_size: int           # V, from the tokenizer
    context_length: int = 77  # prompt token + text + EOT; 77 tokens at most, as in paper.md section 1
    width: int = 128          # decoder D
    layers: int = 1
    heads: int = 4


class DecoderBlock(nn.Module):
    """Pre-LN: x + causal self-attention, x + cross-attention to the image tokens, x + MLP."""

    def __init__(self, width, heads, vision_width):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2, self.ln_3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)              # self-attention q, k, v from the text
        self.self_out = nn.Linear(width, width)
        self.cross_q = nn.Linear(width, width)              # cross-attention: queries from the text,
        self.cross_kv = nn.Linear(vision_width, 2 * width)  # keys and values from the image tokens
        self.cross_out = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def split(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, L, D) -> (B, H, L, D/H)

    def image_kv(self, image_tokens):
        """(B, 1+N, D_vision) -> the cross-attention keys and values, 2 x (B, H, 1+N, D/H)."""
        return [self.split(t) for t in self.cross_kv(image_tokens).chunk(2, -1)]

    def forward(self, x, image_kv, cache=None):
        """x (B, t, D) text positions -> (B, t, D). cache None: training, all positions at once under
        the causal mask. cache a dict: generation, one new position per call, attending to the keys
        and values of the earlier positions kept in the cache."""
        q, k, v = map(self.split, self.qkv(self.ln_1(x)).chunk(3, -1))  # (B, H, t, D/H) each
        if cache is not None:
            if "k" in cache:  # earlier positions: (B, H, t', D/H) + (B, H, 1, D/H)
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)  # one new query sees all
        x = x + self.self_out(y.transpose(1, 2).flatten(2))                    # (B, t, D)
        y = F.scaled_dot_product_attention(self.split(self.cross_q(self.ln_2(x))), *image_kv)  # (B, H, t, D/H)
        x = x + self.cross_out(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_3(x))


class Captioner(nn.Module):
    """images -> encode -> memory (the image tokens' keys and values) -> decode -> text, one prompt at a time."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        c = self.config = config
        # The image encoder is model.py's vision tower. HolisticCLIP's init_weights holds its
        # initialisation, so build a (K = 1) HolisticCLIP and keep only its `visual`.
        self.visual = model.HolisticCLIP(model.ModelConfig(**c.vision)).visual
        self.prompt_embedding = nn.Embedding(len(c.prompts), c.width)   # one learned token per prompt
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)      # also the output layer (tied)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.width))
        self.blocks = nn.ModuleList(DecoderBlock(c.width, c.heads, c.vision["vision_width"]) for _ in range(c.layers))
        self.ln_final = nn.LayerNorm(c.width)
        self.init_weights()

    def init_weights(self):
        """The decoder's initial values (GPT-2's: 0.02, residual outputs scaled by (2 layers)^-0.5)."""
        nn.init.normal_(self.prompt_embedding.weight, std=0.02)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.blocks:
            for name, linear in block.named_modules():
                if isinstance(linear, nn.Linear):
                    residual = name in ("self_out", "cross_out", "mlp.2")  # writes into the residual stream
                    nn.init.normal_(linear.weight, std=0.02 * (2 * self.config.layers) ** -0.5 if residual else 0.02)
                    nn.init.zeros_(linear.bias)

    def encode(self, images):
        """(B, 3, S, S) -> memory: every block's cross-attention keys and values of the image tokens
        (the vision tower's 1+N tokens after ln_post), computed once per image for all prompts and steps."""
        image_tokens = self.visual(images)  # (B, 1+N, D_vision)
        return [block.image_kv(image_tokens) for block in self.blocks]

    def decode(self, x, memory, start=0, caches=None):
        """x (B, t, D) input embeddings at positions start.. -> logits (B, t, V)."""
        x = x + self.positional_embedding[start:start + x.shape[1]]
        for i, block in enumerate(self.blocks):
            x = block(x, memory[i], None if caches is None else caches[i])
        return self.ln_final(x) @ self.token_embedding.weight.T  # (B, t, V)

    def forward(self, memory, prompt_ids, tokens):
        """Teacher-forced loss. memory from encode, prompt_ids (B,), tokens (B, T) = [SOT] text [EOT] PAD..
        The prompt token takes SOT's place: position 0 reads the prompt, position i predicts token i+1."""
        x = self.token_embedding(tokens[:, 1:-1])                            # (B, T-2, D)
        x = torch.cat([self.prompt_embedding(prompt_ids)[:, None], x], 1)    # (B, T-1, D)
        logits = self.decode(x, memory)                                      # (B, T-1, V)
        return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=PAD)

    @torch.no_grad()
    def generate(self, memory, prompt_ids, temperature=0.0, top_p=0.9):
        """memory from encode, prompt_ids (B,) -> token ids (B, t), each row ending at its first EOT or
        at the context (t <= context_length - 1). Greedy at temperature 0, else nucleus (top-p) sampling."""
        V, caches = self.config.vocab_size, [{} for _ in self.blocks]
        x = self.prompt_embedding(prompt_ids)[:, None]                 # (B, 1, D), position 0
        out, done = [], torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for t in range(self.config.context_length - 1):
            logits = self.decode(x, memory, t, caches)[:, -1].float()  # (B, V), the newest position
            logits[:, [PAD, V - 2]] = float("-inf")                    # never PAD or SOT
            if temperature == 0:
                token = logits.argmax(-1)                              # (B,)
            else:  # keep the most likely tokens until their mass reaches top_p, sample among them
                probs, order = F.softmax(logits / temperature, -1).sort(-1, descending=True)  # (B, V)
                probs[probs.cumsum(-1) - probs >= top_p] = 0
                token = order.gather(-1, torch.multinomial(probs, 1))[:, 0]
            out.append(token)
            done |= token == V - 1                                     # EOT
            if done.all():
                break
            x = self.token_embedding(token)[:, None]                   # (B, 1, D), the next input
        return torch.stack(out, 1)


def load_captioner(path, device, prompts):
    """captioner.pt (written by train) -> (the Captioner in eval mode on `device`, its tokenizer). Any other file
    (text, a truncated copy, train.py's ckpt.pt) or a captioner not trained on all of `prompts`: a DataError
    naming the file, whose message the command line prints (exit 1)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net, tok = Captioner(CaptionerConfig(**ckpt["config"])), data.Tokenizer.from_dict(ckpt["tokenizer"])
        net.load_state_dict(ckpt["model"])
    except Exception as e:  # unpickling, zip, missing key, config or weights of another model: its first sentence
        raise data.DataError(f"{path}: not a captioner checkpoint ({type(e).__name__}: {str(e).split('. ')[0][:160]})")
    if missing := [p for p in prompts if p not in net.config.prompts]:
        raise data.DataError(f"{path}: trained on prompts {net.config.prompts}, not {missing}: see --prompts")
    return net.to(device).eval(), tok


# ----------------------------------------------------------------------------------------------------
# train: (image, prompt, text) triples from the records' slots

def vision_config(preset_name, vision_layers, vocab_size, conv_stem=True):
    """The captioner's image encoder: a preset's tower (K = 1) with vision_layers ViT blocks; with 0 the
    decoder cross-attends to the conv stem's tokens (plus positions, layer-normed) directly, and the class
    token, which then sees no patch, is one constant token beside them."""
    return {**model.PRESETS[preset_name], "vision_layers": vision_layers, "branches": 1, "vocab_size": vocab_size,
            "conv_stem": conv_stem}


def prompts_loss(net, images, tokens, columns):
    """The teacher-forced loss of one batch, the mean over the prompts: images (B, 3, S, S), tokens (B, M, T),
    prompt j's texts at caption slot columns[j]. The image is encoded once for all prompts."""
    memory, loss = net.encode(images), 0  # the image's keys and values, once; the loss summed over the prompts
    for j, column in enumerate(columns):
        t = tokens[:, column]                # (B, T), this prompt's texts
        t = t[:, :(t != PAD).sum(1).max()]   # drop the all-PAD tail
        loss = loss + net(memory, torch.full_like(t[:, 0], j), t) / len(columns)
    return loss


def learning_rate(args, step, warmup, progress):
    """A linear warm-up over `warmup` steps, then by progress (the run's fraction done, 0..1): const-cooldown
    stays at args.lr and falls linearly to zero over the last args.cooldown; cosine falls from the start."""
    anneal = ((1 - progress) / args.cooldown if args.lr_scheduler == "const-cooldown" else
              0.5 * (1 + math.cos(math.pi * progress)))
    return args.lr * min((step + 1) / warmup, 1, anneal)


def train(args):
    """Teach a Captioner the --prompts from the texts in their --slots of --data, every prompt on every
    image of a batch; write OUT/captioner.pt (config, weights, tokenizer) at the end."""
    torch.manual_seed(args.seed)
    records = data.check_images(args.data, data.read_records(args.data))  # a bad image stops here, not midway
    slots, prompts = args.slots.split(","), args.prompts.split(",")
    if len(records) < args.batch_size:  # make_loader drops the last partial batch: no step would ever run
        sys.exit(f"error: {args.data}: {len(records)} images, fewer than --batch-size {args.batch_size}: lower it")
    tok = data.Tokenizer.beside(args.data, records, args.vocab_size)  # the world writes its tokenizer.json
    vision = vision_config(args.model, args.vision_layers, tok.vocab_size, args.conv_stem)
    config = CaptionerConfig(vision, prompts, tok.vocab_size, args.context_length, args.width, args.layers, args.heads)
    net = Captioner(config).to(args.device)
    # the data: each record's M texts, prompt j's in caption slot columns[j]. No augmentation: a crop
    # could move an object across a position boundary ("top left")
    dataset = data.ImageTextDataset(records, tok, vision["image_size"], train=False, context_length=args.context_length)
    if dataset.tokens.shape[1] != len(slots):
        sys.exit(f"error: {args.data}: records have {dataset.tokens.shape[1]} captions, --slots names {len(slots)}")
    columns = [slots.index(p) for p in prompts]  # caption slot of each prompt
    # AdamW, weight decay on matrices and embeddings only (not on gains and biases), as in train.py
    decay, rest = [p for p in net.parameters() if p.dim() >= 2], [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0}],
                            lr=args.lr, betas=(0.9, 0.98), fused=True)  # fused: one kernel, also on the CPU
    # the schedule's length: --max-steps, else the clock alone when --max-minutes is given, else 3,000 steps
    max_steps = args.max_steps or (math.inf if args.max_minutes else 3000)
    print(f"captioner: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(records)} images, "
          f"prompts {prompts} at slots {columns}, B = {args.batch_size}, at most {max_steps} steps"
          + (f" or {args.max_minutes} minutes" if args.max_minutes else ""))
    warmup = max(1, min(100, max_steps // 10))  # at least one step: runs of 1..9 steps
    # progress in [0, 1]: the step fraction, or the time fraction when --max-minutes ends the run first,
    # so a run cut by the clock still ends with its learning rate annealed
    step, epoch, progress, start = 0, 0, 0.0, time.time()
    bar = tqdm(total=max_steps if max_steps < math.inf else None, disable=None)
    # the loop: every prompt's loss on every image of the batch, gradients clipped at norm 1, epoch after epoch
    while progress < 1:
        for images, tokens in data.make_loader(dataset, args.batch_size, train=True, seed=args.seed, epoch=epoch):
            lr = learning_rate(args, step, warmup, progress)
            for group in opt.param_groups:
                group["lr"] = lr
            images, tokens = images.to(args.device), tokens.to(args.device)  # (B, 3, S, S), (B, M, T)
            loss = prompts_loss(net, images, tokens, columns)
            if not loss.isfinite():  # a diverged run stops at once: nothing written, nothing to resume from
                sys.exit(f"error: non-finite loss at step {step + 1} ({loss.item()}): lower --lr (now {args.lr:g})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1  # then progress, the bar and a log line every 100 steps
            minutes = (time.time() - start) / 60
            progress = max(step / max_steps, minutes / args.max_minutes if args.max_minutes else 0)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=epoch, min=f"{minutes:.1f}")
            if step % 100 == 0:  # a log line also when the bar is off (not a TTY)
                tqdm.write(f"step {step} | epoch {epoch} | loss {loss.item():.4f} | lr {lr:.2e} | {minutes:.1f} min")
            if progress >= 1:
                break
        epoch += 1
    bar.close()
    # the checkpoint: everything generate needs to rebuild the captioner and its tokenizer; never a broken one
    if bad := [k for k, v in net.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]:
        sys.exit(f"error: {len(bad)} non-finite tensors after step {step} (e.g. {bad[0]}): not written; lower --lr")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "captioner.pt")
    try:  # atomic (model.write_checkpoint): a killed run never leaves half a checkpoint
        model.write_checkpoint({"config": asdict(config), "model": net.state_dict(), "tokenizer": tok.to_dict(),
                                "step": step, "args": vars(args)}, path)
    except OSError as e:  # a full disk, say: the temporary file is removed
        sys.exit(f"error: {e}")
    print(f"step {step} | loss {loss.item():.4f} | {time.time() - start:.0f} s | wrote {path}")


# ----------------------------------------------------------------------------------------------------
# generate: cleaning the texts, resumable jsonl writing, one part per rank, merged in input order

def degenerate(text, repeats=4):
    """A repetition loop: some n-gram of words `repeats` times in a row ("a b a b a b a b"). Three is
    legal here: the nouns text of three circles is "circle, circle, circle"."""
    w = re.findall(r"\w+", text.lower())
    for n in range(1, len(w) // repeats + 1):
        for i in range(len(w) - repeats * n + 1):
            if all(w[i:i + n] == w[i + r * n:i + (r + 1) * n] for r in range(1, repeats)):
                return True
    return False


def acceptable(text, earlier):
    """A non-empty, non-degenerate text that no earlier text of the same image already says."""
    return bool(text) and not degenerate(text) and text.lower() not in {e.lower() for e in earlier}


def read_done(path):
    """image -> its output line, for every finished line (ending in a newline) of a jsonl being written."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {json.loads(line)["image"]: line for line in f if line.endswith("\n")}


def drop_torn_line(path):
    """A run killed mid-write may leave a last line without its newline: cut it before appending."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)


def caption_texts(net, tok, memory, prompt, earlier, args, counts):
    """One text per image for one prompt: greedy (or as --temperature says); an unacceptable text is
    sampled again up to RETRIES times, then replaced by the image's first caption (read_records
    guarantees every record one)."""
    ids = torch.full((len(earlier),), net.config.prompts.index(prompt), device=args.device)  # (B,) prompt ids

    def texts(rows, temperature):  # the images `rows` -> token ids cut at EOT -> stripped strings
        rows_memory = [[kv[rows] for kv in block] for block in memory]
        out = net.generate(rows_memory, ids[rows], temperature, args.top_p).tolist()
        return [" ".join(tok.decode(t[:t.index(tok.eot)] if tok.eot in t else t).split()) for t in out]

    result = texts(list(range(len(ids))), args.temperature)  # every image, then the bad ones again
    for _ in range(RETRIES):
        bad = [i for i, t in enumerate(result) if not acceptable(t, earlier[i])]
        counts["retried"] += len(bad)
        for i, t in zip(bad, texts(bad, 1.0) if bad else []):
            result[i] = t
    for i, t in enumerate(result):
        if not acceptable(t, earlier[i]):
            counts["fallback"] += 1
            result[i] = earlier[i][0]
    return result


def merge(out, images, world):
    """Rank 0, its own part written: wait until OUT and the W parts hold every image between them, write
    OUT in input order, remove the parts. OUT is whole or absent at any moment (data.write_atomic), so after a
    crash the same command resumes and merges again."""
    parts = [f"{out}.part{r}" for r in range(world)]
    while True:  # the other ranks may still be writing
        done = {image: line for path in [out, *parts] for image, line in read_done(path).items()}
        missing = sum(image not in done for image in images)
        if not missing:
            break
        print(f"merge: waiting for {missing} images from the other ranks")
        time.sleep(10)
    data.write_atomic(out, "".join(done[image] for image in images))
    for part in filter(os.path.exists, parts):  # a rank with nothing left to write opened no part
        os.remove(part)
    print(f"merged {len(images)} images from {world} parts into {out}")


@torch.no_grad()
def generate(args):
    """Write M texts per image of --data into --out: slot 0 the input's first caption, then one text per
    --ckpt and --prompt. Resumable, one part per rank under torchrun (see the module docstring)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's env
    args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else args.device  # a GPU per rank
    torch.manual_seed(args.seed + rank)  # the ranks sample differently
    # the captioners, each with the image transform of its own tower
    prompts = args.prompts.split(",")
    nets = [load_captioner(path, args.device, prompts) for path in args.ckpt]
    transforms = [data.image_transform(net.config.vision["image_size"], train=False) for net, _ in nets]
    records = data.check_images(args.data, data.read_records(args.data))  # a bad image stops here, not midway
    out_dir = os.path.dirname(os.path.realpath(args.out))  # the folder data.py reads relative paths from
    for r in records:  # image paths relative to the output file, so it reads from anywhere
        r["image_path"], r["image"] = r["image"], os.path.relpath(r["image"], out_dir)
    # this rank's share, records r::W, less the images already written (in OUT, or in its part)
    part = args.out if world == 1 else f"{args.out}.part{rank}"
    done = {**read_done(args.out), **read_done(part)}
    todo = [r for r in records[rank::world] if r["image"] not in done]
    counts, start = {"retried": 0, "fallback": 0}, time.time()
    print(f"rank {rank}/{world}: {len(todo)} images to caption ({len(records[rank::world]) - len(todo)} done), "
          f"{len(nets)} captioner(s) x {len(prompts)} prompt(s)")
    if todo:
        drop_torn_line(part)
        with open(part, "a") as f:
            for i in tqdm(range(0, len(todo), args.batch_size), disable=None if rank == 0 else True):
                batch = todo[i:i + args.batch_size]
                pil = [data.load_image(r["image_path"]) for r in batch]
                captions = [r["caption"][:1] for r in batch]  # slot 0: the input's first caption
                for (net, tok), transform in zip(nets, transforms):
                    memory = net.encode(torch.stack([transform(p) for p in pil]).to(args.device))
                    for p in prompts:
                        for c, t in zip(captions, caption_texts(net, tok, memory, p, captions, args, counts)):
                            c.append(t)
                for r, c in zip(batch, captions):
                    keep = {k: v for k, v in r.items() if k not in ("line", "image_path")}
                    f.write(json.dumps({**keep, "caption": c}) + "\n")
                    f.flush()  # one finished line per image: a killed run resumes after it
    seconds, n_texts = time.time() - start, len(todo) * len(nets) * len(prompts)  # speed, and cleaning's counts
    print(f"rank {rank}: {len(todo)} images in {seconds:.1f} s = {n_texts / max(seconds, 1e-9):.2f} images/s "
          f"per prompt | retried {counts['retried']}, fallback {counts['fallback']} of {n_texts} texts")
    if world > 1 and rank == 0:
        merge(args.out, [r["image"] for r in records], world)


# ----------------------------------------------------------------------------------------------------
# command line: the flags, their checks (exit 1 with a message, like every bad input)

def check_flags(args):
    """The flag-validation layer, right after parsing: {problem: whether it holds}; every value that cannot work
    stops here with all the problems, before any work (0 steps or minutes would run 3,000 steps, -1 forever).
    What needs the data is checked where it is read: --batch-size against the images, --slots against the captions."""
    problems = {f"--batch-size {args.batch_size}: must be >= 1": args.batch_size < 1}
    if args.command == "train":
        problems |= {f"--max-steps {args.max_steps}: must be >= 1": args.max_steps is not None and args.max_steps < 1,
                     f"--max-minutes {args.max_minutes}: must be > 0":
                         args.max_minutes is not None and not args.max_minutes > 0,
                     f"--cooldown {args.cooldown}: must be a fraction of the run in (0, 1]": not 0 < args.cooldown <= 1,
                     f"--prompts {args.prompts}: each must be in PROMPTS {list(PROMPTS)} and in --slots {args.slots}":
                         any(p not in PROMPTS or p not in args.slots.split(",") for p in args.prompts.split(",")),
                     f"--out {args.out}: already holds a captioner.pt, or is a file: choose another --out":
                         os.path.exists(os.path.join(args.out, "captioner.pt")) or os.path.isfile(args.out)}
    else:  # generate appends to --out: --data itself (any spelling of its path) would lose its ground truth
        problems["--out is --data: choose another --out"] = os.path.realpath(args.out) == os.path.realpath(args.data)
        problems[f"--top-p {args.top_p}: must be in (0, 1]"] = not 0 < args.top_p <= 1
    if any(problems.values()):
        sys.exit("error: " + "; ".join(message for message, bad in problems.items() if bad))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    default_prompts = ",".join(SLOT_PROMPTS.values())
    t = sub.add_parser("train", **defaults, help="train a captioner on the texts of a jsonl's slots")
    t.add_argument("--data", required=True, help="training jsonl (records with one text per slot)")
    t.add_argument("--out", required=True, help="folder for captioner.pt")
    t.add_argument("--slots", default=",".join(SLOTS), help="what each caption slot of --data holds")
    t.add_argument("--prompts", default=default_prompts, help="the prompts to learn, comma-separated")
    t.add_argument("--model", default="tiny", choices=list(model.PRESETS), help="vision tower preset (model.py)")
    t.add_argument("--conv-stem", action=argparse.BooleanOptionalAction, default=True,
                   help="VGG-style conv stem in the vision tower (model.conv_stem): shapes are learned sooner")
    t.add_argument("--vision-layers", type=int, default=0, help="ViT blocks (tiny preset: 4); 0: the stem tokens alone")
    t.add_argument("--width", type=int, default=128, help="decoder width D")
    t.add_argument("--layers", type=int, default=1, help="decoder blocks")
    t.add_argument("--heads", type=int, default=4, help="decoder attention heads")
    t.add_argument("--context-length", type=int, default=77, help="prompt token + text tokens + EOT")
    t.add_argument("--vocab-size", type=int, default=1024, help="BPE size when --data has no tokenizer.json")
    t.add_argument("--max-steps", type=int, help="schedule length in steps; default 3000, none with --max-minutes")
    t.add_argument("--max-minutes", type=float, default=None, help="also stop after this wall time")
    t.add_argument("--batch-size", type=int, default=16, help="images per step (each with all prompts)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--lr-scheduler", default="const-cooldown", choices=["const-cooldown", "cosine"],
                   help="after the warm-up: constant, then linear to 0 over the last --cooldown; or cosine to 0")
    t.add_argument("--cooldown", type=float, default=0.3, help="const-cooldown: fraction of the run spent cooling")
    t.add_argument("--wd", type=float, default=0.05, help="AdamW weight decay on >= 2-D weights")
    t.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    g = sub.add_parser("generate", **defaults, help="write M texts per image (resumable; torchrun: one part per rank)")
    g.add_argument("--ckpt", action="append", required=True, help="captioner.pt; repeat for gadget 2")
    g.add_argument("--data", required=True, help="jsonl of the images to caption")
    g.add_argument("--prompts", default=default_prompts, help="comma-separated; 'detail' for gadget 2")
    g.add_argument("--out", required=True, help="output jsonl (appended to: resumes)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling")
    g.add_argument("--batch-size", type=int, default=64, help="images per batch")
    g.add_argument("--seed", type=int, default=0, help="sampling (temperature > 0 and the retries)")
    g.add_argument("--device", default="cpu", help="cpu, cuda (= cuda:LOCAL_RANK under torchrun), cuda:1")
    args = parser.parse_args(argv)
    check_flags(args)
    try:
        return {"train": train, "generate": generate}[args.command](args)
    except data.DataError as e:  # a bad input file: its message names it (and the line), no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
