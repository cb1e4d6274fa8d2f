"""The data stage: a synthetic multi-perspective world, two real offline datasets made from Debian packages, the
record format, a byte-level BPE tokenizer and the image-text loaders. Paper section 1: every image carries M texts
in the official slot order [alt, detail, nouns, background, main, style]; slot m trains image branch m (the real
datasets document their own slots, slot 0 always the alt-text-like name).

    python data.py                                   # the synthetic world -> data/shapes (20k/1k, 64 px, seed 0)
    python data.py --out DIR --train-size N --val-size N --image-size S --seed S
    python data.py --prepare emoji        # fonts-noto-color-emoji + unicode-cldr-core -> data/emoji (M = 3)
    python data.py --prepare openclipart  # openclipart-png + openclipart-svg -> data/openclipart (M = 4)
    python data.py --check data/shapes/train.jsonl --captions 6    # validate; exit 1 on bad records
    python data.py --check my.tsv --skip-bad                        # go on past bad records and count them
    python -m pytest -q tests/test_data.py

Record format (jsonl, one object per line, the official one): {"image": "path", "caption": ["c1", ..., "cM"]};
paths are relative to the jsonl's folder; a string caption means M = 1; other keys are kept. Also open_clip-style
CSV/TSV with `filepath` and `title` columns (one record per physical line, M = 1).
Letters: B images per rank, W world size, M texts per image, T tokens per text, S image side in pixels.
"""
import argparse
import csv
import glob
import hashlib
import html
import heapq
import json
import math
import multiprocessing
import os
import random
import re
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

# -----------------------------------------------------------------------------
# The synthetic world: 1-3 coloured shapes on a patterned background, one global style, six texts per image.

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
SIDE = {"small": (0.19, 0.24), "large": (0.38, 0.45)}  # box side as a fraction of S: 12-15 vs 24-29 px at 64
POSITIONS = ["top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right"]
LABEL_KINDS = {"main_shape": SHAPES, "main_colour": list(COLOURS), "bg_pattern": PATTERNS,
               "bg_colour": list(COLOURS), "style": STYLES}
# Zero-shot prompts in the captions' own phrasing (compare the templates in scene_texts).
LABEL_TEMPLATES = {"main_shape": ["a {}", "the main object is a {}", "one {}"],
                   "main_colour": ["a {} shape", "the main object is a {} shape", "a {} object"],
                   "bg_pattern": ["a background with a {} pattern", "{} pattern", "a {} background"],
                   "bg_colour": ["a {} background", "the background is {}", "{} background"],
                   "style": ["a {} style picture", "{} style", "the picture looks {}"]}


def sample_scene(rng, image_size=64):
    """A random scene as a JSON-serialisable dict; `rng` is a random.Random, so the scene is a function of it."""
    S = image_size
    bg = rng.choice(list(COLOURS))
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
        objects.append({"shape": rng.choice(SHAPES), "colour": rng.choice([c for c in COLOURS if c != bg]),
                        "size": size, "position": POSITIONS[cell], "box": [x0, y0, x0 + side, y0 + side]})
    return {"image_size": S, "background": {"colour": bg, "pattern": rng.choice(PATTERNS)},
            "style": rng.choice(STYLES), "seed": rng.getrandbits(31), "objects": objects}  # seed: the noise


def main_object(scene):
    """The largest object (by size name); among equal sizes the first drawn (max keeps the first maximum)."""
    return max(scene["objects"], key=lambda o: SIZES.index(o["size"]))


def object_mask(obj, S):
    """bool (S, S): the pixels of one object's shape inside its box [x0, y0, x1, y1) (x1, y1 exclusive)."""
    m = Image.new("L", (S, S))
    d = ImageDraw.Draw(m)
    l, t, r, b = obj["box"][0], obj["box"][1], obj["box"][2] - 1, obj["box"][3] - 1  # PIL includes r and b
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
    u = max(2, S // 16)  # the pattern's unit: 4 px at 64 px
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
    t = np.broadcast_to(t, (S, S)).astype(np.float32)[..., None]  # (S, S, 1)
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
    if style == "blurred":  # radius 1 px at 64 px: stripes and small shapes soften but survive
        image = image.filter(ImageFilter.GaussianBlur(S / 64))
    return image  # "vivid": the saturated colours as they are


def render_scene(scene):
    """The scene as an RGB PIL image (S x S): background, objects in drawing order, then the global style."""
    x = background(scene)
    for obj in scene["objects"]:
        x[object_mask(obj, scene["image_size"])] = COLOURS[obj["colour"]]
    return apply_style(x, scene)


def scene_masks(scene):
    """int64 (S, S): 0 = background, i + 1 = object i; later objects on top, exactly as render_scene paints."""
    S = scene["image_size"]
    masks = np.zeros((S, S), np.int64)
    for i, obj in enumerate(scene["objects"]):
        masks[object_mask(obj, S)] = i + 1
    return masks


def scene_labels(scene):
    """The zero-shot class names of a scene, keyed like LABEL_KINDS."""
    main = main_object(scene)
    return {"main_shape": main["shape"], "main_colour": main["colour"], "bg_pattern": scene["background"]["pattern"],
            "bg_colour": scene["background"]["colour"], "style": scene["style"]}


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


def _make_sample(job):
    """Render and save sample `index`; everything comes from (seed, index), so any worker gives the same bytes."""
    index, seed, image_size, out = job
    rng = random.Random(f"{seed}:{index}")  # str seeds go through sha512: stable across processes and runs
    scene = sample_scene(rng, image_size)
    name = f"images/{index:06d}.png"
    render_scene(scene).save(os.path.join(out, name), compress_level=1)  # fast zlib: 2x quicker, ~10 % larger
    return {"image": name, "caption": scene_texts(scene, rng), "scene": scene, "labels": scene_labels(scene)}


def _write_atomic(path, text):
    """Write through a temporary file, so an interrupted run never leaves a half-written file behind."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def write_splits(out, train, val, vocab_size):
    """out/val.jsonl, out/tokenizer.json (trained on the train captions) and, last, out/train.jsonl: its presence
    marks a complete dataset."""
    _write_atomic(os.path.join(out, "val.jsonl"), "".join(json.dumps(r) + "\n" for r in val))
    Tokenizer.train([c for r in train for c in r["caption"]], vocab_size).save(os.path.join(out, "tokenizer.json"))
    _write_atomic(os.path.join(out, "train.jsonl"), "".join(json.dumps(r) + "\n" for r in train))


def make_world(out, train_size=20000, val_size=1000, image_size=64, seed=0, vocab_size=1024):
    """Write out/images/*.png, out/val.jsonl, out/tokenizer.json (trained on the train captions) and, last, so that
    its presence marks a complete world, out/train.jsonl. Val images are numbered after the train images."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    jobs = [(i, seed, image_size, out) for i in range(train_size + val_size)]
    # 2 processes, ~2x faster on 2 cores; imap keeps the order. fork (not spawn, the macOS default): the workers
    # must not re-run the calling script (train.py calls make_world from its top level)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        records = list(tqdm(pool.imap(_make_sample, jobs, chunksize=64), total=len(jobs), desc="rendering",
                            disable=None))
    write_splits(out, records[:train_size], records[train_size:], vocab_size)


# -----------------------------------------------------------------------------
# Real offline data: Debian packages -> jsonl in the world's format. The texts are the packages' metadata, written
# by people: slot 0 is the alt-text-like name, then one slot per perspective (keywords, a hierarchy, a sentence).

OPENCLIPART = "/usr/share/openclipart"  # png/ and svg/ mirror each other: png/a/b/x.png <-> svg/a/b/x.svg
NOTO_EMOJI = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR = "/usr/share/unicode/cldr/common"  # annotations/en.xml: base emoji; annotationsDerived/en.xml: skin tones etc.
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # optional: the group/subgroup slot
PACKAGES = {"openclipart": "openclipart-png openclipart-svg", "emoji": "fonts-noto-color-emoji unicode-cldr-core"}
OPENCLIPART_SLOTS = ["title", "keywords", "category", "description"]
EMOJI_SLOTS = ["name", "keywords", "hierarchy"]
MAX_KEYWORDS, MAX_KEYWORD_CHARS = 8, 60  # about 30 tokens: a keyword list fits the tiny preset's context of 32
VAL_PERCENT = 10
ICON_THEMES = "computer/icons/"  # flat, lemon, etiquette, gold, plastik...: UI icon sets, not pictures of something
GENERATED = ("shapes/stars/", "special/patterns/", "special/gradients/")  # gramastar stars, tilings, gradients
MAX_TITLE_SHARE = 10  # a title on more files names a collection ("Various Cliparts", "card"), not the picture
SKIN_TONES = re.compile("[\U0001F3FB-\U0001F3FF]")  # the five Fitzpatrick modifiers


def require(dataset, *paths):
    """DataError naming the missing file and the apt-get line that installs it."""
    for path in paths:
        if not os.path.exists(path):
            raise DataError(f"{path} not found: install the {dataset} packages with "
                            f"`sudo apt-get install -y {PACKAGES[dataset]}`")


def split_of(key):
    """The split of a group key: "val" for about VAL_PERCENT % of keys, else "train". A stable hash (Python's hash()
    is salted per run), so the split is the same on every machine, and everything sharing a key lands on one side."""
    return "val" if int(hashlib.sha256(key.encode()).hexdigest(), 16) % 100 < VAL_PERCENT else "train"


def square_rgb(image, size):
    """Any PIL image -> RGB (size, size): fitted into the square and centred, transparency composited on white.
    Resizing first is cheap and exact: Pillow resizes RGBA premultiplied, so transparent pixels leave no fringe."""
    image = image.convert("RGBA")
    w, h = (max(1, round(n * size / max(image.size))) for n in image.size)
    image = image.resize((w, h), Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new("RGBA", (size, size), "white")
    canvas.alpha_composite(image, ((size - w) // 2, (size - h) // 2))
    return canvas.convert("RGB")


def _clean(text):
    """One line: HTML entities decoded (some titles are escaped twice), underscores as spaces, one space between."""
    return " ".join(html.unescape(text).replace("_", " ").split())


def clean_keywords(words, drop=()):
    """Distinct non-empty keywords in their order, without those equal to a text in `drop`: at most MAX_KEYWORDS,
    and one that would make the list ", ".join(...) longer than MAX_KEYWORD_CHARS is left out."""
    seen, out = {_clean(t).casefold() for t in drop}, []
    for w in map(_clean, words):
        if w and w.casefold() not in seen and len(", ".join(out + [w])) <= MAX_KEYWORD_CHARS:
            seen.add(w.casefold())
            out.append(w)
    return out[:MAX_KEYWORDS]


SVG_NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#"}


def svg_metadata(path):
    """{"title", "description", "keywords", "creator", "links"} of an SVG: the RDF cc:Work's fields ("" or [] when
    absent) and the bitmaps it links from outside the file (<image href> not "data:"); DataError when the file is not
    well-formed XML. The Work is matched by its local name: later Inkscapes moved cc to creativecommons.org/ns#."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: malformed SVG ({e})") from None
    work = next((e for e in root.iter() if e.tag.endswith("}Work")), ET.Element("none"))

    def text(e):
        return _clean(e.text or "") if e is not None else ""

    links = [v for e in root.iter() if e.tag.endswith("}image") for k, v in e.attrib.items()
             if k.endswith("href") and not v.startswith("data:")]
    return {"title": text(work.find("dc:title", SVG_NS)), "description": text(work.find("dc:description", SVG_NS)),
            "keywords": [text(li) for li in work.findall("dc:subject/rdf:Bag/rdf:li", SVG_NS)],
            "creator": text(work.find("dc:creator//dc:title", SVG_NS)), "links": links}


def near_duplicate_keys(title, rel):
    """Two keys of an openclipart picture; pictures sharing either are near-duplicates (variants, B&W copies): the
    title's words without numbers ("Blueman 12" -> "blueman") and the file stem without trailing numbers and "bw"
    ("pie_apple_bw.png" -> "pie_apple")."""
    name = os.path.basename(rel)[:-4].lower()
    words = " ".join(re.findall(r"[^\W\d_]+", title.casefold())) or title.casefold()
    return "title: " + words, "file: " + (re.sub(r"[\d_\-]*(bw)?[\d_\-]*$", "", name) or name)


def join_groups(keys):
    """keys: for each item a tuple of keys. Items sharing any key, directly or through others, form one group ->
    for each item its group's smallest key (union-find; the root of every merge is the smaller key)."""
    parent = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    for first, *rest in keys:
        for k in rest:
            a, b = find(first), find(k)
            parent[max(a, b)] = min(a, b)
    return [find(ks[0]) for ks in keys]


def description_text(desc, names, shared):
    """An SVG description cut to its first sentence and 12 words (about 30 tokens), or None when it says nothing
    about this picture: empty, the title or the author's name (in `names`), on more than MAX_TITLE_SHARE files (it
    describes the collection), an e-mail or a link, or "HASH(0x...)" (a Perl exporter's artefact)."""
    bare = [re.sub(r"\W", "", t).casefold() for t in (desc, *names)]  # letters and digits only
    if not desc or shared > MAX_TITLE_SHARE or re.search(r"@|http|HASH\(", desc) or bare[0] in bare[1:]:
        return None
    return " ".join(re.split(r"(?<=[.!?])\s", desc)[0].split()[:12])


def openclipart_rule(rel, meta):
    """Why a picture is left out, the first rule that applies, or None to keep it. rel: its path under png/."""
    if rel.startswith(ICON_THEMES):
        return f"dropped: icon theme ({ICON_THEMES})"
    if rel.startswith(GENERATED):
        return "dropped: generated stars, patterns, gradients"
    if meta["links"]:  # the PNG was rendered without that file: often Inkscape's "Linked Image Not Found" placeholder
        return "dropped: links a bitmap outside the SVG"
    if not meta["title"] or meta["title"].casefold() == meta["creator"].casefold():
        return "dropped: no title, or the author's name"
    return None


def prepare_openclipart(out, image_size=64, vocab_size=1024):
    """openclipart-png + openclipart-svg -> out/ with M = 4 texts [title, keywords, category, description]. Returns
    the counts of every rule. Near-duplicates (same title words or same file stem) share a group and so a split."""
    png_root, svg_root = os.path.join(OPENCLIPART, "png"), os.path.join(OPENCLIPART, "svg")
    require("openclipart", png_root, svg_root)
    paths = sorted(glob.glob(os.path.join(png_root, "**", "*.png"), recursive=True))
    links = [p for p in paths if os.path.islink(p)]  # the same picture filed under a second category
    counts = dict.fromkeys(["PNG files", "symlinks (a 2nd category): skipped", "dropped: no SVG",
                            "dropped: malformed SVG", f"dropped: icon theme ({ICON_THEMES})",
                            "dropped: generated stars, patterns, gradients", "dropped: links a bitmap outside the SVG",
                            "dropped: no title, or the author's name", f"dropped: title on > {MAX_TITLE_SHARE} files",
                            "dropped: no keywords",
                            "dropped: PNG over 89 Mpx (Pillow's bomb limit)", "dropped: unreadable PNG",
                            "note: description made of title + folder"], 0)
    counts["PNG files"], counts["symlinks (a 2nd category): skipped"] = len(paths) - len(links), len(links)
    items = []
    for path in tqdm(sorted(set(paths) - set(links)), desc="svg metadata", disable=None):
        rel = os.path.relpath(path, png_root)
        svg = os.path.join(svg_root, rel[:-4] + ".svg")
        try:
            meta = svg_metadata(svg)
        except DataError:
            counts["dropped: malformed SVG" if os.path.exists(svg) else "dropped: no SVG"] += 1
            continue
        meta["title"] = re.sub(r"^clipart by [^-]*-\s*", "", meta["title"], flags=re.I)  # "Clipart by NAME - x"
        rule = openclipart_rule(rel, meta)
        if rule:
            counts[rule] += 1
        else:
            items.append({"rel": rel, **meta})
    share = Counter(it["title"].casefold() for it in items)
    counts[f"dropped: title on > {MAX_TITLE_SHARE} files"] = sum(share[it["title"].casefold()] > MAX_TITLE_SHARE
                                                               for it in items)
    items = [it for it in items if share[it["title"].casefold()] <= MAX_TITLE_SHARE]
    share = Counter(it["description"].casefold() for it in items)

    records = []
    for it in items:
        # keywords: not the title, not the author, no bare numbers, no "hash", "HASH(0x8a0a390)" or "0x98554a4" (a
        # Perl exporter's artefacts)
        junk = r"\d+|hash|(hash\()?0x[0-9a-f]+\)?"
        keywords = clean_keywords([k for k in it["keywords"] if not re.fullmatch(junk, k.strip(), re.I)],
                                  (it["title"], it["creator"]))
        if not keywords:
            counts["dropped: no keywords"] += 1
            continue
        folders = [_clean(f) for f in os.path.dirname(it["rel"]).split("/")]
        desc = description_text(it["description"], (it["title"], it["creator"]), share[it["description"].casefold()])
        if desc is None:  # a sentence from the other fields, so that every record has M = 4 texts
            counts["note: description made of title + folder"] += 1
            desc = f"{it['title']}, clip art of {folders[-1]}"
        records.append({"caption": [it["title"], ", ".join(keywords), " / ".join(folders), desc],
                        "source": "png/" + it["rel"], "keys": near_duplicate_keys(it["title"], it["rel"])})
    for r, group in zip(records, join_groups([r.pop("keys") for r in records])):
        r["group"] = group

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    kept = []
    for r in tqdm(records, desc="images", disable=None):
        file = f"images/{len(kept):04d}.png"
        try:
            with warnings.catch_warnings():  # > 89 Mpx: gigabytes to decode (15 posters here, up to 623 Mpx)
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(os.path.join(OPENCLIPART, r["source"])) as image:
                    image = image.convert("RGBA")
                    image = image.crop(image.getchannel("A").getbbox())  # many have wide transparent margins
                    square_rgb(image, image_size).save(os.path.join(out, file))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            counts["dropped: PNG over 89 Mpx (Pillow's bomb limit)"] += 1
            continue
        except (OSError, SyntaxError, ValueError) as e:
            print(f"{r['source']}: unreadable PNG ({e})", file=sys.stderr)
            counts["dropped: unreadable PNG"] += 1
            continue
        kept.append({"image": file, **r})
    train, val = ([r for r in kept if split_of(r["group"]) == s] for s in ("train", "val"))
    write_splits(out, train, val, vocab_size)
    return {**counts, "kept": len(kept), "train": len(train), "val": len(val)}


def emoji_groups(path):
    """{emoji without U+FE0F (CLDR's spelling): "group / subgroup"} from Unicode's emoji-test.txt."""
    groups, group = {}, ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(("# group:", "# subgroup:")):
                name = line.split(":", 1)[1].strip().replace("-", " ").lower()
                group = name if line.startswith("# group:") else f"{group.split(' / ')[0]} / {name}"
            elif line.strip() and not line.startswith("#"):
                seq = "".join(chr(int(c, 16)) for c in line.split(";")[0].split() if c != "FE0F")
                groups.setdefault(seq, group)
    return groups


def skin_tone_base(seq):
    """The emoji without skin-tone modifiers: every tone of one emoji shares it (a lone modifier keeps itself). The
    two-handed handshake 🫱‍🫲 of mixed tones is drawn like 🤝, so it joins that group."""
    return SKIN_TONES.sub("", seq).replace("\U0001FAF1\u200d\U0001FAF2", "\U0001F91D") or seq


def prepare_emoji(out, image_size=64, vocab_size=1024):
    """fonts-noto-color-emoji + unicode-cldr-core -> out/ with M = 3 texts [name, keywords, "group / subgroup"] (M = 2
    without emoji-test.txt). Every emoji CLDR names in English and the font draws as one glyph. Returns the counts."""
    require("emoji", NOTO_EMOJI, os.path.join(CLDR, "annotations", "en.xml"))
    names, keywords = {}, {}  # CLDR writes sequences without U+FE0F
    for file in ("annotations", "annotationsDerived"):
        for a in ET.parse(os.path.join(CLDR, file, "en.xml")).getroot().iter("annotation"):
            if a.get("type") == "tts":
                names[a.get("cp")] = _clean(a.text)
            else:
                keywords[a.get("cp")] = a.text.split("|")
    groups = emoji_groups(EMOJI_TEST) if os.path.exists(EMOJI_TEST) else None
    if groups is None:
        print(f"note: {EMOJI_TEST} not found (sudo apt-get install -y unicode-data): no group slot, M = 2")
    font = ImageFont.truetype(NOTO_EMOJI, 109)  # a colour bitmap font: 109 px is its only strike (136 x 128 px)
    glyph = font.getlength("\U0001F600")  # the advance of one emoji
    counts = dict.fromkeys(["CLDR names (annotations + annotationsDerived)", "dropped: no glyph in the font",
                            "dropped: drawn as several glyphs", "note: no group in emoji-test.txt"], 0)
    counts["CLDR names (annotations + annotationsDerived)"] = len(names)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    train, val = [], []
    for seq, name in tqdm(names.items(), desc="emoji", disable=None):
        left, top, right, bottom = font.getbbox(seq)
        if bottom <= top:  # letters, arrows, currency signs: CLDR names them, the font has no glyph
            counts["dropped: no glyph in the font"] += 1
            continue
        if font.getlength(seq) > 1.5 * glyph:  # a sequence drawn as several glyphs (Pillow without libraqm)
            counts["dropped: drawn as several glyphs"] += 1
            continue
        image = Image.new("RGBA", (right - left, bottom - top))
        ImageDraw.Draw(image).text((-left, -top), seq, font=font, embedded_color=True)
        file = "images/emoji_u" + "_".join(f"{ord(c):x}" for c in seq) + ".png"  # Noto's own file names
        square_rgb(image, image_size).save(os.path.join(out, file))
        # keywords other than the name ("thumbs up: light skin tone") and its base ("thumbs up"); when CLDR gives
        # no other keyword (flags: only "flag"), the name again
        words = clean_keywords(keywords.get(seq, []), (name, name.split(":")[0])) or [name]
        if groups is not None and seq not in groups:  # "#" and "*" alone: emoji-test.txt has only their keycaps
            counts["note: no group in emoji-test.txt"] += 1
        caption = [name, ", ".join(words)] + ([groups.get(seq, "symbols")] if groups is not None else [])
        base = skin_tone_base(seq)
        (val if split_of(base) == "val" else train).append(
            {"image": file, "caption": caption, "source": " ".join(f"U+{ord(c):04X}" for c in seq), "group": base})
    write_splits(out, train, val, vocab_size)
    return {**counts, "kept": len(train) + len(val), "train": len(train), "val": len(val)}


# -----------------------------------------------------------------------------
# Records: jsonl or CSV/TSV -> list of dicts; every bad line is a DataError that names FILE:LINE.

class DataError(ValueError):
    """Bad input. The message starts with "FILE:LINE: " (records) or with the image path (images)."""


def _record(text, sep, header, folder):
    """One line -> {"image": absolute path, "caption": [str, ...], other keys}; DataError (without the location)
    when the line is not a good record."""
    if sep:  # CSV/TSV: quoted fields may hold the separator (not a newline)
        cells = next(csv.reader([text], delimiter=sep))
        if len(cells) != len(header):
            raise DataError(f"{len(cells)} fields, the header has {len(header)}")
        rec = dict(zip(header, cells))
        rec["image"], rec["caption"] = rec.pop("filepath"), rec.pop("title")
    else:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e})") from None
        if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
            raise DataError("a record needs 'image' and 'caption' keys")
    caption = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
    if not isinstance(caption, list) or not all(isinstance(c, str) for c in caption):
        raise DataError("'caption' must be a string or a list of strings")
    if not caption or not all(c.strip() for c in caption):
        raise DataError("empty caption")
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise DataError("'image' must be a non-empty path")
    return {**rec, "image": os.path.join(folder, rec["image"]), "caption": caption}


def _parse_records(path, sep=None):
    """Yield (line, record or DataError naming FILE:LINE) for every non-blank line; the caller raises or counts."""
    sep = sep or {".csv": ",", ".tsv": "\t"}.get(os.path.splitext(path)[1].lower())  # None: jsonl
    folder, header = os.path.dirname(os.path.abspath(path)), None
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is an error of that line, not of the whole file
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")  # a byte-order mark is fine
            except UnicodeDecodeError as e:
                yield line, DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#x} at column {e.start + 1})")
                continue
            if not text.strip():
                continue
            if sep and header is None:  # the first line of a CSV/TSV names the columns
                header = next(csv.reader([text], delimiter=sep))
                if "filepath" not in header or "title" not in header:
                    raise DataError(f"{path}:{line}: the header needs 'filepath' and 'title' columns, got {header}")
                continue
            try:
                rec = {**_record(text, sep, header, folder), "line": line}
            except DataError as e:
                rec = DataError(f"{path}:{line}: {e}")
            yield line, rec


def read_records(path, captions=None, on_count="error", skip_bad=False, sep=None):
    """Records with absolute "image", "caption" (list of M str) and "line". captions = expected M (None: any);
    a count other than M is an error, or with on_count="pad" repeats the captions cyclically up to M (and cuts
    longer lists), or with on_count="drop" drops the record. skip_bad: skip and count bad records instead."""
    assert on_count in ("error", "pad", "drop"), on_count
    records, bad, dropped, padded = [], 0, 0, 0
    for line, rec in _parse_records(path, sep):
        if isinstance(rec, dict) and captions is not None and len(rec["caption"]) != captions:
            n = len(rec["caption"])
            if on_count == "drop":
                dropped += 1
                continue
            if on_count == "pad":
                rec["caption"] = [rec["caption"][m % n] for m in range(captions)]
                padded += 1
            else:
                rec = DataError(f"{path}:{line}: {n} captions, expected {captions} (see on_count: pad or drop)")
        if isinstance(rec, DataError):
            if not skip_bad:
                raise rec
            bad += 1
            continue
        records.append(rec)
    if bad or dropped or padded:  # nothing silent: one summary line
        print(f"{path}: {len(records)} records kept, {bad} bad skipped, {dropped} dropped and {padded} padded "
              f"for caption count {captions}", file=sys.stderr)
    return records


def load_image(path):
    """An RGB PIL image; DataError naming the path when the file is missing or cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE (GPT-2 style) learned on word counts. Ids: PAD 0, bytes 1..256, merges 257.., SOT and
# EOT the two largest ids, so `tokens.argmax(-1)` finds each text's EOT as in openai/CLIP.

# Pre-tokenisation: words keep their leading space; every character falls in exactly one class (letters, digits,
# other symbols incl. "_" and combining marks, whitespace), so nothing is dropped and decode(encode(s)) == s.
SPLIT = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def _merge(ids, pair, new):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class Tokenizer:
    def __init__(self, merges, vocab_size=1024):
        assert len(merges) <= vocab_size - 259, "vocab = PAD + 256 bytes + merges + SOT + EOT"
        self.merges, self.vocab_size = [tuple(p) for p in merges], vocab_size
        self.pad, self.sot, self.eot = 0, vocab_size - 2, vocab_size - 1
        self.ranks = {p: 257 + i for i, p in enumerate(self.merges)}  # pair -> its new id (lower = learned first)
        self.pieces = [b""] + [bytes([b]) for b in range(256)]  # id -> bytes (PAD decodes to nothing)
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self.cache = {}  # word -> ids: captions reuse few words, so encoding is mostly dict lookups
        self.truncated = 0  # texts cut by tokenize() so far

    @classmethod
    def train(cls, texts, vocab_size=1024):
        """Learn vocab_size - 259 merges (fewer if the pairs run out). Works on the counts of distinct words,
        updates pair counts only in the words that hold the merged pair, and finds the most frequent pair with a
        heap (entries go stale when a count changes and are skipped), so 100k captions take seconds."""
        counts = Counter(w for t in texts for w in SPLIT.findall(t))
        words, freq = [[b + 1 for b in w.encode()] for w in counts], list(counts.values())
        pairs, where = Counter(), defaultdict(set)  # pair -> weighted count; pair -> words that may hold it
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
        # min-heap of (-count, -a, -b): pops the most frequent pair; ties -> the larger ids (deterministic)
        heap = [(-n, -a, -b) for (a, b), n in pairs.items()]
        heapq.heapify(heap)
        merges = []
        while heap and len(merges) < vocab_size - 259:
            n, a, b = heapq.heappop(heap)
            best = (-a, -b)
            if pairs.get(best) != -n:
                continue  # stale: this pair's count changed after the entry was pushed
            merges.append(best)
            touched = set()
            for i in where.pop(best):
                old = words[i]
                words[i] = new = _merge(old, best, 256 + len(merges))
                for p in zip(old, old[1:]):
                    pairs[p] -= freq[i]
                    touched.add(p)
                for p in zip(new, new[1:]):
                    pairs[p] += freq[i]
                    where[p].add(i)
                    touched.add(p)
            for p in touched:  # re-push the changed counts; forget pairs that no longer occur
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], -p[0], -p[1]))
                else:
                    del pairs[p]
        return cls(merges, vocab_size)

    def _bpe(self, word):
        ids = [b + 1 for b in word.encode()]
        while len(ids) > 1:  # apply the earliest-learned merge present, as in training
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, self.ranks[pair])
        return ids

    def encode(self, text):
        ids = []
        for word in SPLIT.findall(text):
            if word not in self.cache:
                self.cache[word] = self._bpe(word)
            ids += self.cache[word]
        return ids

    def decode(self, ids):
        """Text of `ids`; PAD, SOT and EOT decode to nothing; a cut multi-byte character becomes U+FFFD."""
        return b"".join(self.pieces[i] for i in ids if i < len(self.pieces)).decode("utf-8", errors="replace")

    def tokenize(self, texts, context_length=77):
        """LongTensor (n, T): [SOT] ids [EOT] PAD...; a text that does not fit is cut to T keeping EOT, counted."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eot]
                self.truncated += 1
            rows.append(ids + [self.pad] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(texts), context_length)

    def to_dict(self):  # plain ints and lists: survives torch.load(weights_only=True) inside checkpoints
        return {"vocab_size": self.vocab_size, "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_dict(cls, d):
        return cls(d["merges"], d["vocab_size"])

    def save(self, path):
        _write_atomic(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def beside(cls, data_path, records, vocab_size=1024):
        """The tokenizer.json beside a dataset file (the data's own), else a new one trained on its captions."""
        path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "tokenizer.json")
        return (cls.load(path) if os.path.exists(path)
                else cls.train([c for r in records for c in r["caption"]], vocab_size))


# -----------------------------------------------------------------------------
# Images and loaders

MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP's normalisation constants
STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size, train):
    """PIL -> float (3, S, S). train: RandomResizedCrop with scale (0.9, 1.0) as in the paper; eval: resize the
    short side + centre crop. Bicubic, as CLIP."""
    bicubic = v2.InterpolationMode.BICUBIC
    resize = (v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=bicubic, antialias=True) if train
              else v2.Compose([v2.Resize(image_size, interpolation=bicubic, antialias=True), v2.CenterCrop(image_size)]))
    return v2.Compose([v2.ToImage(), resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class ImageTextDataset(Dataset):
    """(image float (3, S, S), tokens long (M, T)) per record. All captions are tokenised once here; the images
    are read lazily. Training augmentation of sample i depends only on (seed, epoch, i), so a resumed run, any
    number of workers and any rank replay exactly the same crops."""

    def __init__(self, records, tokenizer, image_size, train=False, context_length=77, seed=0):
        assert records, "no records"
        M = len(records[0]["caption"])
        assert all(len(r["caption"]) == M for r in records), \
            f"records must share M = {M} captions: read them with captions=M and on_count='pad' or 'drop'"
        self.records, self.train, self.seed, self.epoch = records, train, seed, 0
        self.transform = image_transform(image_size, train)
        flat = [c for r in records for c in r["caption"]]
        self.tokens = tokenizer.tokenize(flat, context_length).view(len(records), M, context_length)  # (n, M, T)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        image = load_image(self.records[i]["image"])
        if not self.train:
            return self.transform(image), self.tokens[i]
        with torch.random.fork_rng(devices=[]):  # a private CPU generator state, restored afterwards
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
            return self.transform(image), self.tokens[i]


def make_loader(dataset, batch_size, train, workers=0, pin_memory=False, seed=0, epoch=0, skip_batches=0):
    """A DataLoader over ONE epoch of this rank's share, starting at batch `skip_batches` (for resuming: the
    skipped samples are never loaded). Order: DistributedSampler(seed, epoch), shuffled and drop_last when
    training, and the same on 1 process (W = 1, r = 0) as on many. Evaluating with W > 1, DistributedSampler
    repeats a few samples so that every rank gets as many."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    W, r = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if dist else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=W, rank=r, shuffle=train, drop_last=train, seed=seed)
    sampler.set_epoch(epoch)
    dataset.epoch = epoch  # read by __getitem__ (and copied into the worker processes when they start)
    order = list(sampler)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if train and batches and len(batches[-1]) < batch_size:
        batches.pop()  # drop_last: every training step sees a full batch of B negatives
    return DataLoader(dataset, batch_sampler=batches[skip_batches:], num_workers=workers, pin_memory=pin_memory)


# -----------------------------------------------------------------------------
# Command line: write the world, or check a dataset

def print_lengths(records, tok, slots=SLOTS):
    """Per slot: mean / max tokens (with SOT and EOT) and how many exceed 32 (the tiny preset) and 77 tokens."""
    M = max(len(r["caption"]) for r in records)
    print(f"{'slot':<12}{'mean':>7}{'max':>6}{'>32':>7}{'>77':>7}   (tokens incl. SOT/EOT)")
    for m in range(M):
        lens = np.array([len(tok.encode(r["caption"][m])) + 2 for r in records if len(r["caption"]) > m])
        name = slots[m] if M == len(slots) else f"slot{m}"
        print(f"{name:<12}{lens.mean():>7.1f}{lens.max():>6}{(lens > 32).sum():>7}{(lens > 77).sum():>7}")


def check(args):
    """Parse every record and open every image; exit status 1 when anything is bad."""
    bad, records = 0, []
    for line, rec in tqdm(_parse_records(args.check, args.sep), desc="records", disable=None):
        if isinstance(rec, dict) and args.captions is not None and len(rec["caption"]) != args.captions:
            rec = DataError(f"{args.check}:{line}: {len(rec['caption'])} captions, expected {args.captions}")
        if isinstance(rec, dict):
            try:
                load_image(rec["image"])
                records.append(rec)
                continue
            except DataError as e:
                rec = DataError(f"{args.check}:{line}: {e}")
        if not args.skip_bad:
            raise rec
        bad += 1
        if bad <= 10:
            print(rec, file=sys.stderr)
    print(f"{args.check}: {len(records)} good records, {bad} bad")
    if records:
        print_lengths(records, Tokenizer.beside(args.check, records))
    return 1 if bad else 0


def main():
    p = argparse.ArgumentParser(description="Write the synthetic multi-caption world (PNG images, train/val jsonl "
                                "with 6 texts per image, a BPE tokenizer), or --prepare a real offline dataset from "
                                "Debian packages, or --check an existing dataset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", help="output folder (default: data/shapes, or data/NAME with --prepare NAME)")
    p.add_argument("--prepare", choices=list(PACKAGES), help="write this dataset from its Debian packages instead")
    p.add_argument("--train-size", type=int, default=20000, help="training images")
    p.add_argument("--val-size", type=int, default=1000, help="validation images")
    p.add_argument("--image-size", type=int, default=64, help="image side S in pixels")
    p.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary incl. PAD/SOT/EOT")
    p.add_argument("--check", metavar="FILE", help="validate a jsonl/csv/tsv dataset instead of writing one")
    p.add_argument("--captions", type=int, help="with --check: the expected number of texts per image M")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, default=False,
                   help="with --check: count bad records (first 10 printed) instead of stopping at the first")
    p.add_argument("--sep", help="CSV/TSV separator (default: ',' for .csv, tab for .tsv)")
    args = p.parse_args()
    try:
        if args.check:
            sys.exit(check(args))
        t0 = time.time()
        if args.prepare:
            out = args.out or os.path.join("data", args.prepare)
            prepare = {"openclipart": prepare_openclipart, "emoji": prepare_emoji}[args.prepare]
            for rule, n in prepare(out, args.image_size, args.vocab_size).items():
                print(f"{rule:<50}{n:>6}")
            print(f"wrote {args.prepare} at {args.image_size} px to {out} in {time.time() - t0:.1f} s")
        else:
            out = args.out or os.path.join("data", "shapes")
            make_world(out, args.train_size, args.val_size, args.image_size, args.seed, args.vocab_size)
            print(f"wrote {args.train_size} train + {args.val_size} val images of {args.image_size} px to {out} "
                  f"in {time.time() - t0:.1f} s")
        # read everything back through the real loading path
        train = read_records(os.path.join(out, "train.jsonl"))
        slots = {"openclipart": OPENCLIPART_SLOTS, "emoji": EMOJI_SLOTS}.get(args.prepare, SLOTS)
        slots = slots[:len(train[0]["caption"])]  # emoji: M = 2 without emoji-test.txt
        tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
        print(f"tokenizer: {tok.vocab_size} ids ({len(tok.merges)} merges); train caption lengths:")
        print_lengths(train, tok, slots)
        print(f"example record (train.jsonl line 1): image {os.path.relpath(train[0]['image'], out)}")
        for slot, text in zip(slots, train[0]["caption"]):
            print(f"  {slot:<11} {text}")
        for key, value in train[0].items():
            if key not in ("image", "caption", "line"):
                print(f"  {key:<11} {json.dumps(value)}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
