"""prepare/world.py: the built-in synthetic world, a multi-caption dataset with exact ground truth that needs no
download. paper.md section 1: every image is seen from M = 6 perspectives, one text each, in the official slot order
[alt, detail, nouns, background, main, style]; slot m trains image branch m. Here every perspective is known exactly
because the image is drawn from its scene: 1-3 coloured shapes on a patterned background under one global style.
The alt-text (slot 0) is web-like noise, a file name or one word about any object, so CLIP trained on that single
caption is myopic, while the other five slots are exact. Every attribute the texts name is visible at 32 px (the
default) and at 64: the tests measure each one from the pixels (tests/test_world.py).

    python prepare/world.py                          # -> data/shapes: 20k train + 1k val, 32 px, seed 0, V = 1024
    python prepare/world.py --out DIR --train-size N --val-size N --image-size S --seed S --vocab-size V
    python prepare/world.py --out data/scenes --scenes      # scene types tie background, style and shapes
    python data.py --check data/shapes/train.jsonl --captions 6
    python -m pytest -q tests/test_world.py

`python train.py` writes data/shapes itself on first use (make_world). Output, as for prepare/debian.py:
images/*.png, val.jsonl, tokenizer.json and, last, train.jsonl; every record also keeps "scene" (enough to redraw
the image and its per-object masks, for eval.py's dense probe) and "labels" (the zero-shot classes of eval.py).
world.json names WORLD_VERSION and the arguments, so world_mismatch tells a world written by another version or
with other arguments. Same seed, same bytes. The command line refuses an --out that already holds a dataset.
Reading order: the vocabulary, a scene (sampled, drawn, masked, labelled), its six texts, writing a dataset (also
prepare/debian.py's), writing the world, the command line.
Letters: S image side in pixels, M texts per image, V vocabulary.
"""
import argparse
import contextlib
import inspect
import json
import math
import multiprocessing
import os
import random
import sys
import time

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: data.py
from data import DataError, Tokenizer, print_lengths, read_records, write_atomic  # noqa: E402

# Bump whenever generation changes a byte of the output (sampling, drawing, texts, tokenizer): train.py then knows
# that an existing data/shapes is not the world this version would write (world_mismatch).
WORLD_VERSION = 2  # 2: val records carry five held-out captions, "human"

# -----------------------------------------------------------------------------
# The vocabulary: the names a scene is built from, which its texts and eval.py's zero-shot classes use. Colours and
# sizes are spaced so that each name stays recoverable from the pixels after every style.

SLOTS = ["alt", "detail", "nouns", "background", "main", "style"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "ring"]
# Saturated colours at least 96 RGB units apart, so after every style (pastel and dark shrink the distances to
# about 50) each colour's nearest named colour is still itself. No grey or brown: they sit between the others.
COLOURS = {"red": (220, 30, 30), "orange": (250, 130, 10), "yellow": (245, 225, 25), "green": (30, 160, 50),
           "cyan": (30, 200, 220), "blue": (40, 70, 220), "purple": (140, 50, 200), "pink": (250, 130, 200),
           "white": (245, 245, 245), "black": (20, 20, 20)}
PATTERNS = ["plain", "stripes", "dots", "checker", "gradient"]
STYLES = ["vivid", "pastel", "dark", "noisy", "blurred"]
FEELINGS = {"vivid": ["bright", "bold", "lively"], "pastel": ["soft", "calm", "light"],
            "dark": ["gloomy", "moody", "dim"], "noisy": ["grainy", "rough", "speckled"],
            "blurred": ["hazy", "dreamy", "out of focus"]}
SIZES = ["small", "large"]  # ordered: the main object is the one with the largest index here
SIDE = {"small": (0.19, 0.24), "large": (0.38, 0.45)}  # box side as a fraction of S: 6-8 vs 12-14 px at 32
POSITIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
# The zero-shot classes of eval.py, and prompts for them in the captions' own phrasing (compare scene_texts).
LABEL_KINDS = {"main_shape": SHAPES, "main_colour": list(COLOURS), "bg_pattern": PATTERNS,
               "bg_colour": list(COLOURS), "style": STYLES}
LABEL_TEMPLATES = {"main_shape": ["a {}", "the main object is a {}", "one {}"],
                   "main_colour": ["a {} shape", "the main object is a {} shape", "a {} object"],
                   "bg_pattern": ["a background with a {} pattern", "{} pattern", "a {} background"],
                   "bg_colour": ["a {} background", "the background is {}", "{} background"],
                   "style": ["a {} style picture", "{} style", "the picture looks {}"]}
# --scenes, a controlled variant: in photographs places tie content and setting together (beaches have sand and
# sky); in the default world the background and the style are independent of the objects. A scene type i ties them:
# pattern PATTERNS[i], style STYLES[i], a background colour among every fourth colour from i, shapes of its own two.
SCENE_TYPES = [dict(pattern=PATTERNS[i], style=STYLES[i], colours=list(COLOURS)[i::4], shapes=SHAPES[2 * i:2 * i + 2])
               for i in range(4)]


# -----------------------------------------------------------------------------
# A scene: sampled from an rng, drawn into pixels, its per-object masks and its zero-shot labels

def sample_scene(rng, image_size=32, scenes=False):
    """A random scene as a JSON-serialisable dict; `rng` is a random.Random, so the scene is a function of it.
    Boxes are [x0, y0, x1, y1) in pixels; "seed" drives the noise of the noisy style. scenes: first draw a scene
    type (SCENE_TYPES), which fixes the pattern and the style and narrows the background colour and the shapes."""
    # every draw comes from rng in a fixed order: changing that order changes every image of a seed
    S, kind = image_size, SCENE_TYPES[rng.randrange(len(SCENE_TYPES))] if scenes else None
    bg = rng.choice(kind["colours"] if kind else list(COLOURS))
    n = rng.randint(1, 3)
    # At most one large object, drawn first: the main object is unambiguous in the pixels, and the small objects
    # drawn over it stay whole (they may hide a corner of it, never all of it).
    sizes = [rng.choice(SIZES)] if n == 1 else ["large"] + ["small"] * (n - 1)
    objects = []
    for size, cell in zip(sizes, rng.sample(range(9), n)):  # distinct grid cells
        side = round(S * rng.uniform(*SIDE[size]))
        # cell centres at 20/50/80 % of the side (not 1/6, 1/2, 5/6) so large objects fit; jitter of S/32
        cx, cy = (S * (0.2 + 0.3 * c) + rng.uniform(-S / 32, S / 32) for c in (cell % 3, cell // 3))
        x0, y0 = (min(max(round(c - side / 2), 0), S - side) for c in (cx, cy))
        objects.append({"shape": rng.choice(kind["shapes"] if kind else SHAPES),
                        "colour": rng.choice([c for c in COLOURS if c != bg]), "size": size,
                        "position": POSITIONS[cell], "box": [x0, y0, x0 + side, y0 + side]})
    return {"image_size": S, "background": {"colour": bg, "pattern": kind["pattern"] if kind else rng.choice(PATTERNS)},
            "style": kind["style"] if kind else rng.choice(STYLES), "seed": rng.getrandbits(31), "objects": objects}


def object_mask(obj, S):
    """bool (S, S): the pixels of one object's shape inside its box [x0, y0, x1, y1) (x1, y1 exclusive)."""
    m = Image.new("L", (S, S))
    d = ImageDraw.Draw(m)
    l, t, r, b = obj["box"][0], obj["box"][1], obj["box"][2] - 1, obj["box"][3] - 1  # PIL includes r and b
    # w: the span from the first to the last pixel of the box (side - 1); (cx, cy): the box's centre
    w, cx, cy = r - l, (l + r) / 2, (t + b) / 2
    shape = obj["shape"]
    if shape == "circle":
        d.ellipse((l, t, r, b), fill=255)
    elif shape == "ring":  # a thick outline, so the hole is visible even on a 12 px ring
        d.ellipse((l, t, r, b), outline=255, width=max(2, round(w * 0.22)))
    elif shape == "square":
        d.rectangle((l, t, r, b), fill=255)
    elif shape == "triangle":
        d.polygon([(cx, t), (r, b), (l, b)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, t), (r, cy), (cx, b), (l, cy)], fill=255)
    elif shape == "cross":  # a plus sign with arms one third of the side thick
        d.rectangle((l + w / 3, t, r - w / 3, b), fill=255)
        d.rectangle((l, t + w / 3, r, b - w / 3), fill=255)
    elif shape == "star":  # five points; inner radius 0.45 (fatter than the classic 0.38) so it survives 12 px
        d.polygon([(cx + w / 2 * (1 if k % 2 == 0 else 0.45) * math.cos(math.pi * (k / 5 - 0.5)),
                    cy + w / 2 * (1 if k % 2 == 0 else 0.45) * math.sin(math.pi * (k / 5 - 0.5)))
                   for k in range(10)], fill=255)
    elif shape == "heart":  # two round lobes on top of a downward triangle
        d.ellipse((l, t, cx, t + w / 2), fill=255)
        d.ellipse((cx, t, r, t + w / 2), fill=255)
        d.polygon([(l + w * 0.03, t + w * 0.35), (r - w * 0.03, t + w * 0.35), (cx, b)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(m) > 0


def background(scene):
    """float32 (S, S, 3): the background colour and a second tone laid out by the pattern."""
    S, pattern = scene["image_size"], scene["background"]["pattern"]
    c = np.array(COLOURS[scene["background"]["colour"]], np.float32)
    # The second tone: lighter for dark colours, darker for light ones, so every pattern shows on every colour.
    tone = c * 0.6 if sum(COLOURS[scene["background"]["colour"]]) > 450 else c + (255 - c) * 0.45
    y, x = np.arange(S)[:, None], np.arange(S)[None, :]  # (S, 1) and (1, S): patterns broadcast to (S, S)
    u = max(2, S // 16)  # the pattern's unit: 2 px at 32 px, 4 at 64
    if pattern == "plain":
        t = np.zeros((S, 1))
    elif pattern == "stripes":  # vertical stripes u px wide
        t = (x // u) % 2
    elif pattern == "dots":  # dots of radius 0.6 u on a 2u grid
        t = ((x % (2 * u) - u + 0.5) ** 2 + (y % (2 * u) - u + 0.5) ** 2) <= (0.6 * u) ** 2
    elif pattern == "checker":  # squares 2u wide
        t = (x // (2 * u) + y // (2 * u)) % 2
    elif pattern == "gradient":  # the colour at the top fading to the second tone at the bottom
        t = y / (S - 1)
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    t = np.broadcast_to(t, (S, S)).astype(np.float32)[..., None]  # (S, S, 1): the share of the second tone
    return c * (1 - t) + tone * t


def apply_style(x, scene):
    """float (S, S, 3) in 0..255 -> the styled PIL image. Moderate strengths: colour names stay recoverable."""
    style, S = scene["style"], scene["image_size"]
    if style == "pastel":  # 45 % of the way to white
        x = x + (255 - x) * 0.45
    elif style == "dark":  # half the brightness
        x = x * 0.5
    elif style == "noisy":  # gaussian noise, std 20 of 255, from the scene's own seed (reproducible)
        x = x + np.random.default_rng(scene["seed"]).normal(0, 20, x.shape)
    image = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    if style == "blurred":  # radius 0.5 px at 32 px, 1 at 64: stripes and small shapes soften but survive
        image = image.filter(ImageFilter.GaussianBlur(S / 64))
    return image  # "vivid": the saturated colours as they are


def render_scene(scene):
    """The scene as an RGB PIL image (S x S): background, objects in drawing order, then the global style."""
    x = background(scene)  # float32 (S, S, 3)
    # each object paints its mask in its flat colour; later objects cover earlier ones
    for obj in scene["objects"]:
        x[object_mask(obj, scene["image_size"])] = COLOURS[obj["colour"]]
    return apply_style(x, scene)


def scene_masks(scene):
    """int64 (S, S): 0 = background, i + 1 = object i; later objects on top, exactly as render_scene paints.
    For eval.py's dense probe."""
    S = scene["image_size"]
    masks = np.zeros((S, S), np.int64)
    for i, obj in enumerate(scene["objects"]):
        masks[object_mask(obj, S)] = i + 1
    return masks


def main_object(scene):
    """The largest object (by size name); among equal sizes the first drawn (max keeps the first maximum)."""
    return max(scene["objects"], key=lambda o: SIZES.index(o["size"]))


def scene_labels(scene):
    """The zero-shot class names of a scene, keyed like LABEL_KINDS."""
    main = main_object(scene)
    return {"main_shape": main["shape"], "main_colour": main["colour"], "bg_pattern": scene["background"]["pattern"],
            "bg_colour": scene["background"]["colour"], "style": scene["style"]}


# -----------------------------------------------------------------------------
# The six texts of a scene, in SLOTS order: slot 0 noisy, slots 1-5 exact

def alt_text(scene, rng):
    """Web-like alt-text: often a file name or filler (no content), otherwise one noun or a fragment about ANY
    object (not necessarily the main one). This is what makes single-caption CLIP myopic here."""
    o, n = rng.choice(scene["objects"]), rng.randrange(10000)
    return rng.choice([f"IMG_{n:04d}.png", f"DSC{n:04d}.jpg", f"image ({n % 100}).png", f"untitled-{n % 1000}",
                       "my drawing", "new post", "shapes", "free download", "art", o["shape"], f"{o['shape']}s",
                       f"{o['colour']} {o['shape']}", f"{o['shape']} clipart", f"cute {o['shape']} icon",
                       f"{scene['background']['colour']} wallpaper"])


def scene_texts(scene, rng):
    """Six texts in SLOTS order, each from one of a few paraphrase templates chosen with `rng`."""
    main, bg, style = main_object(scene), scene["background"], scene["style"]
    # terse object phrases (no articles) keep every detail caption within 32 tokens incl. SOT/EOT at vocabulary
    # 1024, so even a context of 32 holds it whole (the worst case, 3 objects, is tested)
    phrases = ["{size} {colour} {shape} at {position}".format(**o) for o in scene["objects"]]
    rng.shuffle(phrases)  # any order describes the same scene: a paraphrase that costs no tokens
    objects = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    feeling = rng.choice(FEELINGS[style])
    nouns = [o["shape"] for o in scene["objects"]]
    rng.shuffle(nouns)
    detail = rng.choice(["{o} on a {c} {p} background, {s} style", "a {s} picture: {o}, {c} {p} background",
                         "{o}. background: {c} {p}. style: {s}"])
    # the list is built left to right, so the rng calls keep one order: reordering them changes every text of a seed
    return [alt_text(scene, rng),
            detail.format(o=objects, c=bg["colour"], p=bg["pattern"], s=style),
            rng.choice(["{}", "shapes: {}"]).format(", ".join(nouns)),
            rng.choice(["a {c} {p} background", "the background is {c} with a {p} pattern",
                        "{p} pattern, {c} background"]).format(c=bg["colour"], p=bg["pattern"]),
            rng.choice(["a {size} {colour} {shape}", "the main object is a {colour} {shape}",
                        "a {colour} {shape} at the {position}", "one {size} {colour} {shape} at the {position}"])
            .format(**main),
            rng.choice(["a {s} style picture", "{s} style, {f}", "the picture looks {s}, {f}", "{f} and {s}"])
            .format(s=style, f=feeling)]


def human_captions(scene, rng, n=5):
    """n held-out captions of a val image, standing in for human annotators (COCO's five per image): a separate
    writer with sentence shapes and phrasings the six templates above never use, over the same names. Each one
    names the main object, and at random its size and place, another object, and the background or the style.
    Never trained on: eval.py's headline retrieval ranks them (paper.md section 4)."""
    main, bg, style = main_object(scene), scene["background"], scene["style"]
    others = [o for o in scene["objects"] if o is not main]
    captions = []
    for _ in range(n):
        words = rng.choice(["{colour} {shape}", "{size} {colour} {shape}"]).format(**main)
        if rng.random() < 0.5:
            words += " in the {position}".format(**main)
        if others and rng.random() < 0.5:
            words += " and a {colour} {shape}".format(**rng.choice(others))
        if rng.random() < 0.6:  # the background or the style, not both: every caption fits 32 tokens
            words += rng.choice([" on {c} {p}", " over {p} {c}", ", {s} look", ", {s} colours"]).format(
                c=bg["colour"], p=bg["pattern"], s=style)
        captions.append(rng.choice(["there is a {}.", "a drawing of a {}.", "the picture has a {}.",
                                    "just a {}."]).format(words))
    return captions


# -----------------------------------------------------------------------------
# Writing a dataset and reading it back: this world's and prepare/debian.py's

def write_splits(out, train, val, vocab_size):
    """out/val.jsonl, out/tokenizer.json (trained on the train captions) and, last, out/train.jsonl: its presence
    marks a complete dataset."""
    write_atomic(os.path.join(out, "val.jsonl"), "".join(json.dumps(r) + "\n" for r in val))
    Tokenizer.train([c for r in train for c in r["caption"]], vocab_size).save(os.path.join(out, "tokenizer.json"))
    write_atomic(os.path.join(out, "train.jsonl"), "".join(json.dumps(r) + "\n" for r in train))


def print_summary(out, slots):
    """Read a written dataset back through the real loading path (data.py): the tokenizer's size, the train caption
    lengths per slot and the first train record. slots: the names of the slots, cut to this dataset's M."""
    train = read_records(os.path.join(out, "train.jsonl"))
    slots = slots[:len(train[0]["caption"])]  # emoji: M = 2 without emoji-test.txt
    tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
    print(f"tokenizer: {tok.vocab_size} ids ({len(tok.merges)} merges); train caption lengths:")
    print_lengths(train, tok, slots)
    print(f"example record (train.jsonl line 1): image {os.path.relpath(train[0]['image'], out)}")
    extra = [(key, json.dumps(value)) for key, value in train[0].items() if key not in ("image", "caption", "line")]
    for name, text in [*zip(slots, train[0]["caption"]), *extra]:  # the texts by slot, then the other keys
        print(f"  {name:<11} {text}")


# -----------------------------------------------------------------------------
# Writing the world: one sample per (seed, index), rendered by two processes

def _make_sample(job):
    """Render and save sample `index`; everything comes from (seed, index), so any worker gives the same bytes.
    job: (index, seed, image_size, scenes, out, val), one tuple because Pool.imap passes a single argument. A val
    image also gets its held-out captions, "human", from a random stream of their own (the rest is as without them)."""
    index, seed, image_size, scenes, out, val = job
    rng = random.Random(f"{seed}:{index}")  # str seeds go through sha512: stable across processes and runs
    scene = sample_scene(rng, image_size, scenes)
    name = f"images/{index:06d}.png"
    render_scene(scene).save(os.path.join(out, name), compress_level=1)  # fast zlib: 2x quicker, ~10 % larger
    record = {"image": name, "caption": scene_texts(scene, rng), "scene": scene, "labels": scene_labels(scene)}
    return {**record, "human": human_captions(scene, random.Random(f"{seed}:{index}:human"))} if val else record


def make_world(out, train_size=20000, val_size=1000, image_size=32, seed=0, vocab_size=1024, scenes=False):
    """Write out/world.json (WORLD_VERSION and these arguments), out/images/*.png and, through write_splits, the
    jsonl files and the tokenizer (trained on the train captions), train.jsonl last. Val images are numbered after
    the train images. Overwrites what is there: the command line refuses an existing dataset."""
    # a train.jsonl left from an earlier world would mark the half-rewritten folder as complete: it goes first
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "train.jsonl"))
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    jobs = [(i, seed, image_size, scenes, out, i >= train_size) for i in range(train_size + val_size)]
    # 2 processes, ~2x faster on 2 cores; imap keeps the order. fork (not spawn, the macOS default): the workers
    # must not re-run the calling script (train.py calls make_world from its top level)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        records = list(tqdm(pool.imap(_make_sample, jobs, chunksize=64), total=len(jobs), desc="rendering",
                            disable=None))
    # fixed key order and no time stamp: same arguments, same bytes
    provenance = dict(version=WORLD_VERSION, train_size=train_size, val_size=val_size, image_size=image_size,
                      seed=seed, vocab_size=vocab_size, scenes=scenes)
    with open(os.path.join(out, "world.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(provenance) + "\n")
    write_splits(out, records[:train_size], records[train_size:], vocab_size)


def world_mismatch(out, **kwargs):
    """None when `out` holds the complete world that make_world(out, **kwargs) would write now (train.jsonl, and a
    world.json naming WORLD_VERSION and the same arguments), else a one-line reason, e.g. "data/shapes was written
    with seed 3, not 0". An unknown argument is a TypeError, as for make_world."""
    want = inspect.signature(make_world).bind(out, **kwargs)  # make_world's defaults for the arguments not given
    want.apply_defaults()
    path = os.path.join(out, "world.json")
    if not os.path.exists(os.path.join(out, "train.jsonl")):  # written last: without it the world is incomplete
        return f"{out} has no train.jsonl (no world yet, or an interrupted run)"
    if not os.path.exists(path):
        return f"{out} has no world.json (written by an older version)"
    try:
        with open(path, encoding="utf-8") as f:
            have = json.load(f)
    except ValueError as e:
        return f"{path} is not valid JSON ({e})"
    if not isinstance(have, dict):
        return f"{path} is not a world.json"
    if have.get("version") != WORLD_VERSION:
        return f"{out} was written by world version {have.get('version')}, not {WORLD_VERSION}"
    defaults = inspect.signature(make_world).parameters  # an argument newer than the file: its default was used
    for key, value in want.arguments.items():  # in make_world's order: the first difference
        if key != "out" and (had := have.get(key, defaults[key].default)) != value:
            return f"{out} was written with {key} {had}, not {value}"
    return None


# -----------------------------------------------------------------------------
# Command line: write the world, then read it back through data.py's loading path

def main():
    """Write the world, then print the tokenizer's size, the caption lengths per slot and the first train record."""
    p = argparse.ArgumentParser(description="Write the synthetic multi-caption world (PNG images, train/val jsonl "
                                f"with {len(SLOTS)} texts per image, a BPE tokenizer).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("data", "shapes"), help="output folder")
    p.add_argument("--train-size", type=int, default=20000, help="training images")
    p.add_argument("--val-size", type=int, default=1000, help="validation images")
    p.add_argument("--image-size", type=int, default=32, help="image side S in pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary V incl. PAD/SOT/EOT")
    p.add_argument("--scenes", action="store_true", help="scene types tie background, style and shapes (SCENE_TYPES)")
    args = p.parse_args()
    for name in ("train.jsonl", "val.jsonl"):  # make_world would overwrite them: never silently
        if os.path.exists(os.path.join(args.out, name)):
            sys.exit(f"error: {args.out} already holds a dataset ({name}): remove it or choose another --out")
    try:
        t0 = time.time()
        make_world(args.out, args.train_size, args.val_size, args.image_size, args.seed, args.vocab_size, args.scenes)
        print(f"wrote {args.train_size} train + {args.val_size} val images of {args.image_size} px to {args.out} "
              f"in {time.time() - t0:.1f} s")
        print_summary(args.out, SLOTS)
    except DataError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # an --out under a file, a full disk
        sys.exit(f"error: {args.out}: cannot write the world ({e.strerror})")


if __name__ == "__main__":
    main()
