"""Two real offline datasets with several human-written texts per image, made from Debian packages and written in
data.py's record format (paper.md section 1: every image carries M texts, slot m trains image branch m):

    openclipart  openclipart-png + openclipart-svg           M = 4: title, keywords, category, description
    emoji        fonts-noto-color-emoji + unicode-cldr-core  M = 3: name, keywords, hierarchy (group / subgroup)

Slot 0 is always the alt-text-like name. Output: images/*.png (RGB, S x S), val.jsonl, tokenizer.json (BPE, V ids,
trained on the train captions) and, last, train.jsonl; every record also keeps `source` (the package file, or the
emoji's code points) and `group` (its split key). Same packages in, same bytes out. The rules, their counts and the
caption lengths are in prepare/README.md.

    sudo apt-get install -y openclipart-png openclipart-svg fonts-noto-color-emoji unicode-cldr-core unicode-data
    python prepare/debian.py emoji                   # -> data/emoji, about 15 s
    python prepare/debian.py openclipart             # -> data/openclipart, about 20-30 s
    python prepare/debian.py emoji --out DIR --image-size 64 --vocab-size 1024   # the defaults
    python data.py --check data/emoji/train.jsonl --captions 3
    python -m pytest -q tests/test_prepare.py        # -m slow: both datasets from the installed packages

unicode-data is optional: it holds emoji-test.txt, the source of the hierarchy slot (without it emoji has M = 2).
Letters: M texts per image, S image side in pixels, V vocabulary.
"""
import argparse
import glob
import hashlib
import html
import os
import re
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections import Counter

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root: data.py
from data import DataError  # noqa: E402
from prepare.world import print_summary, write_splits  # noqa: E402

# -----------------------------------------------------------------------------
# Shared by both datasets: the apt-get hint, the split, the square RGB image, the keyword list

PACKAGES = {"openclipart": "openclipart-png openclipart-svg", "emoji": "fonts-noto-color-emoji unicode-cldr-core"}
VAL_PERCENT = 10
MAX_KEYWORDS, MAX_KEYWORD_CHARS = 8, 60  # about 30 tokens: a keyword list fits the tiny preset's context of 32


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


# -----------------------------------------------------------------------------
# openclipart: the SVG's RDF metadata gives the texts, the PNG beside it the image; filter rules, near-duplicate groups

OPENCLIPART = "/usr/share/openclipart"  # png/ and svg/ mirror each other: png/a/b/x.png <-> svg/a/b/x.svg
OPENCLIPART_SLOTS = ["title", "keywords", "category", "description"]
ICON_THEMES = "computer/icons/"  # flat, lemon, etiquette, gold, plastik...: UI icon sets, not pictures of something
GENERATED = ("shapes/stars/", "special/patterns/", "special/gradients/")  # gramastar stars, tilings, gradients
MAX_TITLE_SHARE = 10  # a title on more files names a collection ("Various Cliparts", "card"), not the picture
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


# -----------------------------------------------------------------------------
# emoji: CLDR's English names and keywords, Unicode's group / subgroup, the glyphs drawn from the colour font

NOTO_EMOJI = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
CLDR = "/usr/share/unicode/cldr/common"  # annotations/en.xml: base emoji; annotationsDerived/en.xml: skin tones etc.
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"  # optional: the group/subgroup slot
EMOJI_SLOTS = ["name", "keywords", "hierarchy"]
SKIN_TONES = re.compile("[\U0001F3FB-\U0001F3FF]")  # the five Fitzpatrick modifiers


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
# Command line: write one dataset, print every rule's count, then read it back

def main():
    p = argparse.ArgumentParser(description="Write a real offline dataset (PNG images, train/val jsonl with M texts "
                                "per image, a BPE tokenizer) from its Debian packages.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", choices=list(PACKAGES), help="the dataset to write")
    p.add_argument("--out", help="output folder (when %(default)s: data/DATASET)")
    p.add_argument("--image-size", type=int, default=64, help="image side S in pixels")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary V incl. PAD/SOT/EOT")
    args = p.parse_args()
    try:
        t0 = time.time()
        out = args.out or os.path.join("data", args.dataset)
        prepare = {"openclipart": prepare_openclipart, "emoji": prepare_emoji}[args.dataset]
        for rule, n in prepare(out, args.image_size, args.vocab_size).items():
            print(f"{rule:<50}{n:>6}")
        print(f"wrote {args.dataset} at {args.image_size} px to {out} in {time.time() - t0:.1f} s")
        print_summary(out, {"openclipart": OPENCLIPART_SLOTS, "emoji": EMOJI_SLOTS}[args.dataset])
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
