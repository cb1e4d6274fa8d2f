"""The captioning stage: M texts per image from a small prompt-conditioned captioner (paper.md section 1).

The paper re-captions every image with large vision-language models and makes the texts diverse with
two gadgets: one captioner asked several prompts (gadget 1), several captioners asked one prompt,
"describe in detail" (gadget 2). No such model can be downloaded here, so this file trains a small one:
model.py's vision tower turns the image into tokens, a small causal transformer decoder with
cross-attention to those tokens writes the text, and a learned prompt token (in SOT's place) says which
perspective to write. It learns each perspective from examples, e.g. the synthetic world's ground truth.

    python data.py --out data/shapes5k --train-size 5000 --val-size 500
    python caption.py train --data data/shapes5k/train.jsonl --out runs/cap --max-minutes 10
    python caption.py generate --ckpt runs/cap/captioner.pt --data data/shapes5k/val.jsonl \
        --prompts detail,nouns,background,main,style --out runs/cap/g1.jsonl            # gadget 1
    python caption.py generate --ckpt runs/cap/captioner.pt --ckpt runs/cap2/captioner.pt \
        --data data/shapes5k/val.jsonl --prompts detail --out runs/cap/g2.jsonl          # gadget 2
    torchrun --nproc_per_node=4 caption.py generate ...       # rank r writes OUT.part{r}, rank 0 merges
    python caption.py score --data runs/cap/g1.jsonl --truth data/shapes5k/val.jsonl [--ckpt runs/x/ckpt.pt]
    python caption.py score --data runs/cap/g2.jsonl --truth data/shapes5k/val.jsonl --slots alt,detail,detail

Output records: {"image", "caption": [slot 0 = the input's first caption (its alt-text), then one text per
captioner and prompt], the input's other keys (scene, labels)}, image paths relative to the output file.
Cleaning: whitespace is collapsed; an empty text, a repetition loop or a repeat of an earlier text of the
same image is sampled again (temperature 1) up to RETRIES times, then replaced by the image's first caption.
Resuming: images already in OUT are skipped; one line is appended and flushed per image. torchrun (only
RANK and WORLD_SIZE are read, no process group): rank r captions records r::W into OUT.part{r}, rank 0
waits for all parts and writes OUT in input order; after a crash, rerun the same command.
Letters: B images per batch, N patches, D width, T tokens, V vocabulary, M texts per image, W world size.
"""
import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import model

# ----------------------------------------------------------------------------------------------------
# prompts: the official prompt set (paper.md section 1) and which caption slot holds which perspective

PROMPTS = {
    "detail": "Describe the image in detail.",
    "brief": "Briefly describe the image with just a few words.",
    "sentence": "Briefly describe the image in one sentence.",
    "nouns": "Briefly describe the image with few noun words separated by ','.",
    "style": "Describe the style or your feelings about this image, do not say anything about the objects "
             "in the image.",
    "background": "Describe only the background of this image, do not say anything about the foreground "
                  "objects.",
    "main": "Describe only the one main object in the image, do not say anything about the other objects "
            "or background.",
}
# The synthetic world's slots: 0 is the alt-text (a record's original caption, not a prompt's answer),
# 1..5 the official merged order {1: "detail", 2: "nouns", 3: "background", 4: "main", 5: "style"}.
SLOT_PROMPTS = {m: name for m, name in enumerate(data.SLOTS) if name in PROMPTS}
PAD = 0  # data.Tokenizer: PAD = 0, SOT = V - 2, EOT = V - 1

# ----------------------------------------------------------------------------------------------------
# the captioner: image tokens -> prompt-conditioned text


@dataclass
class CaptionerConfig:
    vision: dict              # model.ModelConfig kwargs of the image encoder (K = 1)
    prompts: list             # prompt names (keys of PROMPTS), one learned prompt token each
    vocab_size: int           # V, from the tokenizer
    context_length: int = 77  # prompt token + text + EOT; the paper caps captions at 77 tokens
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
        """(B, 3, H, W) -> memory: every block's cross-attention keys and values of the image tokens
        (the vision tower's 1+N tokens after ln_post), computed once per image for all prompts and steps."""
        image_tokens = self.visual.forward_tokens(images)  # (B, 1+N, D_vision)
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


def load_captioner(path, device):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    net = Captioner(CaptionerConfig(**ckpt["config"]))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval(), data.Tokenizer.from_dict(ckpt["tokenizer"])


# ----------------------------------------------------------------------------------------------------
# train: (image, prompt, text) triples from the records' slots


def vision_config(preset_name, vision_layers, vocab_size, conv_stem=True):
    """The captioner's image encoder: a preset's tower (K = 1) with vision_layers ViT blocks; with 0 the
    decoder cross-attends to the conv stem's tokens (plus positions, layer-normed) directly, and the class
    token, which then sees no patch, is one constant token beside them."""
    return {**model.PRESETS[preset_name], "vision_layers": vision_layers, "branches": 1, "vocab_size": vocab_size,
            "conv_stem": conv_stem}


def prompts_loss(net, images, tokens, columns):
    """The teacher-forced loss of one batch, the mean over the prompts: images (B, 3, H, W), tokens (B, M, T),
    prompt j's texts at caption slot columns[j]. The image is encoded once for all prompts."""
    memory = net.encode(images)  # the image's keys and values
    loss = 0
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
    torch.manual_seed(args.seed)
    records = data.read_records(args.data)
    slots, prompts = args.slots.split(","), args.prompts.split(",")
    assert 0 < args.cooldown <= 1, f"--cooldown is a fraction of the run in (0, 1], got {args.cooldown}"
    for p in prompts:
        assert p in PROMPTS and p in slots, f"prompt {p!r} must be in PROMPTS and in --slots {slots}"
    tok = data.Tokenizer.beside(args.data, records, args.vocab_size)  # the world writes its tokenizer.json
    vision = vision_config(args.model, args.vision_layers, tok.vocab_size, args.conv_stem)
    config = CaptionerConfig(vision, prompts, tok.vocab_size, args.context_length, args.width, args.layers,
                             args.heads)
    net = Captioner(config).to(args.device)
    # no augmentation: a crop could move an object across a position boundary ("top left")
    dataset = data.ImageTextDataset(records, tok, vision["image_size"], train=False,
                                    context_length=args.context_length, seed=args.seed)
    M = dataset.tokens.shape[1]
    assert M == len(slots), f"{args.data}: records have {M} captions, --slots names {len(slots)}"
    columns = [slots.index(p) for p in prompts]  # caption slot of each prompt
    decay = [p for p in net.parameters() if p.dim() >= 2]
    rest = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": rest, "weight_decay": 0}],
                            lr=args.lr, betas=(0.9, 0.98), fused=True)  # fused: one kernel, also on the CPU
    # the schedule's length: --max-steps, else the clock alone when --max-minutes is given, else 3,000 steps
    max_steps = args.max_steps or (math.inf if args.max_minutes else 3000)
    print(f"captioner: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(records)} images, "
          f"prompts {prompts} at slots {columns}, B = {args.batch_size}, at most {max_steps} steps"
          + (f" or {args.max_minutes} minutes" if args.max_minutes else ""))
    warmup = min(100, max_steps // 10)
    # progress in [0, 1]: the step fraction, or the time fraction when --max-minutes ends the run first,
    # so a run cut by the clock still ends with its learning rate annealed
    step, epoch, progress, start = 0, 0, 0.0, time.time()
    bar = tqdm(total=max_steps if max_steps < math.inf else None, disable=None)
    while progress < 1:
        for images, tokens in data.make_loader(dataset, args.batch_size, train=True, seed=args.seed, epoch=epoch):
            lr = learning_rate(args, step, warmup, progress)
            for group in opt.param_groups:
                group["lr"] = lr
            images, tokens = images.to(args.device), tokens.to(args.device)  # (B, 3, H, W), (B, M, T)
            loss = prompts_loss(net, images, tokens, columns)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            step += 1
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
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "captioner.pt")
    torch.save({"config": asdict(config), "model": net.state_dict(), "tokenizer": tok.to_dict(),
                "step": step, "args": vars(args)}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a killed run never leaves half a checkpoint
    print(f"step {step} | loss {loss.item():.4f} | {time.time() - start:.0f} s | wrote {path}")


# ----------------------------------------------------------------------------------------------------
# cleaning: every text is stripped; empty, degenerate or duplicate texts are replaced (see generate)


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


# ----------------------------------------------------------------------------------------------------
# generate: resumable jsonl writing, one part per rank, merged in input order


RETRIES = 3  # sampled retries (temperature 1) of an unacceptable text before the fallback


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
    B = len(earlier)
    ids = torch.full((B,), net.config.prompts.index(prompt), device=args.device)  # (B,)

    def texts(rows, temperature):  # the images `rows` -> token ids cut at EOT -> stripped strings
        rows_memory = [[kv[rows] for kv in block] for block in memory]
        out = net.generate(rows_memory, ids[rows], temperature, args.top_p).tolist()
        return [" ".join(tok.decode(t[:t.index(tok.eot)] if tok.eot in t else t).split()) for t in out]

    result = texts(list(range(B)), args.temperature)
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


@torch.no_grad()
def generate(args):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun's env
    if args.device == "cuda":  # one GPU per rank on a node
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    torch.manual_seed(args.seed + rank)
    nets = [load_captioner(path, args.device) for path in args.ckpt]
    prompts = args.prompts.split(",")
    for path, (net, _) in zip(args.ckpt, nets):
        for p in prompts:
            assert p in net.config.prompts, f"{path} was trained on prompts {net.config.prompts}, not {p!r}"
    transforms = [data.image_transform(net.config.vision["image_size"], train=False) for net, _ in nets]
    records = data.read_records(args.data)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    for r in records:  # image paths relative to the output file, so it reads from anywhere
        r["image_path"], r["image"] = r["image"], os.path.relpath(r["image"], out_dir)
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
    seconds = time.time() - start
    n_texts = len(todo) * len(nets) * len(prompts)
    print(f"rank {rank}: {len(todo)} images in {seconds:.1f} s = {n_texts / max(seconds, 1e-9):.2f} images/s "
          f"per prompt | retried {counts['retried']}, fallback {counts['fallback']} of {n_texts} texts")
    if world > 1 and rank == 0:
        merge(args.out, [r["image"] for r in records], world)


def merge(out, images, world):
    """Rank 0: wait until the parts (and any earlier OUT) hold every image, write OUT in input order
    (temporary file + os.replace), remove the parts. Rerunning after a crash resumes and merges again."""
    while True:
        done = read_done(out)
        for r in range(world):
            done.update(read_done(f"{out}.part{r}"))
        missing = sum(image not in done for image in images)
        if not missing:
            break
        print(f"merge: waiting for {missing} images from the other ranks")
        time.sleep(10)
    with open(out + ".tmp", "w") as f:
        f.writelines(done[image] for image in images)
    os.replace(out + ".tmp", out)
    for r in range(world):
        if os.path.exists(f"{out}.part{r}"):
            os.remove(f"{out}.part{r}")
    print(f"merged {len(images)} images from {world} parts into {out}")


# ----------------------------------------------------------------------------------------------------
# score: per-perspective accuracy against the synthetic world's scenes, and text diversity


def mentioned(text, names):
    """The names of a vocabulary (data.SHAPES, ...) that `text` mentions, in order: whole words, longest
    name first ("top left" before "top"), plurals allowed ("circles", "crosses")."""
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.findall(rf"\b({alternatives})(?:e?s)?\b", text.lower())


def correct(perspective, text, scene):
    """How right one text is about its scene, in [0, 1], read with the world's vocabulary (data.py)."""
    main, bg, objects = data.main_object(scene), scene["background"], scene["objects"]
    shapes, colours = set(mentioned(text, data.SHAPES)), set(mentioned(text, data.COLOURS))
    if perspective == "main":  # the main object's shape and colour, and no other
        return float(shapes == {main["shape"]} and colours == {main["colour"]})
    if perspective == "background":
        return float(set(mentioned(text, data.PATTERNS)) == {bg["pattern"]} and colours == {bg["colour"]})
    if perspective == "style":
        return float(set(mentioned(text, data.STYLES)) == {scene["style"]})
    if perspective == "nouns":  # the set of shapes (how many of each is not asked)
        return float(shapes == {o["shape"] for o in objects})
    assert perspective == "detail", f"no accuracy rule for perspective {perspective!r}"
    # the objects written as the world writes them, "SIZE COLOUR SHAPE at (the) POSITION"; each true object
    # may match one written object: the intersection over union of the true and the written objects
    size, colour, shape, position = [rf"({'|'.join(sorted(v, key=len, reverse=True))})" for v in
                                     (data.SIZES, data.COLOURS, data.SHAPES, data.POSITIONS)]
    written = re.findall(rf"\b{size} {colour} {shape} at (?:the )?{position}\b", text.lower())
    right = 0
    for o in objects:
        key = (o["size"], o["colour"], o["shape"], o["position"])
        if key in written:
            written.remove(key)
            right += 1
    return right / (len(objects) + len(written))  # written now holds the unmatched ones


def words(text):
    return set(re.findall(r"\w+", text.lower()))


def mean_pairwise(x):
    """x (M, M) similarities -> the mean over the M (M - 1) off-diagonal pairs."""
    M = len(x)
    return float((x.sum() - x.diagonal().sum()) / (M * (M - 1)))


@torch.no_grad()
def score(args):
    generated = data.read_records(args.data)
    truth = {os.path.realpath(r["image"]): r for r in data.read_records(args.truth)}  # "a/../b" == "b"
    slots = args.slots.split(",") if args.slots else ["alt"] + list(SLOT_PROMPTS.values())
    clip = None
    if args.ckpt:  # a HolisticCLIP checkpoint of train.py: its text tower
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        clip = model.HolisticCLIP(model.ModelConfig(**ckpt["config"]))
        clip.load_state_dict(ckpt["model"])
        clip, tok = clip.to(args.device).eval(), data.Tokenizer.from_dict(ckpt["tokenizer"])
    accuracy = {f"slot{m}/{name}": [] for m, name in enumerate(slots) if name != "alt"}
    jaccard, cosine = [], []
    for r in tqdm(generated, disable=None):
        assert len(r["caption"]) == len(slots), f"{args.data}:{r['line']}: {len(r['caption'])} texts, --slots {slots}"
        scene = truth[os.path.realpath(r["image"])]["scene"]
        texts = [t for t, name in zip(r["caption"], slots) if name != "alt"]  # the generated texts only
        for m, (t, name) in enumerate(zip(r["caption"], slots)):
            if name != "alt":
                accuracy[f"slot{m}/{name}"].append(correct(name, t, scene))
        sets = [words(t) for t in texts]
        jaccard.append(mean_pairwise(torch.tensor([[len(a & b) / len(a | b) for b in sets] for a in sets])))
        if clip is not None:
            txt = clip.encode_text(tok.tokenize(texts, clip.config.context_length).to(args.device))  # (M, E)
            cosine.append(mean_pairwise(txt @ txt.T))
    results = {k: sum(v) / len(v) for k, v in accuracy.items()}
    results["diversity/jaccard"] = sum(jaccard) / len(jaccard)
    if cosine:
        results["diversity/text_cosine"] = sum(cosine) / len(cosine)
    print(f"{args.data}: {len(generated)} images; accuracy per perspective against the scene, then the mean\n"
          f"pairwise similarity of an image's generated texts (lower = more diverse; paper: 0.48 / 0.58)")
    for k, v in results.items():
        print(f"{k:<24}{v:8.3f}")
    return results


# ----------------------------------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    default_prompts = ",".join(SLOT_PROMPTS.values())
    t = sub.add_parser("train", **defaults, help="train a captioner on the texts of a jsonl's slots")
    t.add_argument("--data", required=True, help="training jsonl (records with one text per slot)")
    t.add_argument("--out", required=True, help="folder for captioner.pt")
    t.add_argument("--slots", default=",".join(data.SLOTS), help="what each caption slot of --data holds")
    t.add_argument("--prompts", default=default_prompts, help="the prompts to learn, comma-separated")
    t.add_argument("--model", default="tiny", choices=list(model.PRESETS), help="vision tower preset (model.py)")
    t.add_argument("--conv-stem", action=argparse.BooleanOptionalAction, default=True,
                   help="VGG-style conv stem in the vision tower (model.conv_stem): shapes are learned sooner")
    t.add_argument("--vision-layers", type=int, default=0,
                   help="ViT blocks of the tower, in place of the preset's (tiny: 4); 0: the conv stem's tokens alone")
    t.add_argument("--width", type=int, default=128, help="decoder width D")
    t.add_argument("--layers", type=int, default=1, help="decoder blocks")
    t.add_argument("--heads", type=int, default=4, help="decoder attention heads")
    t.add_argument("--context-length", type=int, default=77, help="prompt token + text tokens + EOT")
    t.add_argument("--vocab-size", type=int, default=1024, help="BPE size when --data has no tokenizer.json")
    t.add_argument("--max-steps", type=int, default=None,
                   help="optimizer steps (the schedule's length); default 3000, or no step limit with --max-minutes")
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
    s = sub.add_parser("score", **defaults, help="per-perspective accuracy (synthetic world) and text diversity")
    s.add_argument("--data", required=True, help="generated jsonl")
    s.add_argument("--truth", required=True, help="the world's jsonl with the scenes")
    s.add_argument("--slots", default=None, help="what each caption slot holds (default: alt + the world's prompts)")
    s.add_argument("--ckpt", default=None, help="a HolisticCLIP checkpoint: also text-tower diversity")
    s.add_argument("--device", default="cpu", help="for the --ckpt text tower")
    args = parser.parse_args(argv)
    return {"train": train, "generate": generate, "score": score}[args.command](args)


if __name__ == "__main__":
    main()
