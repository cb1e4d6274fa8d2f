"""Tests of prepare/debian.py, the real offline datasets made from Debian packages: the helpers on hand-written
inputs (SVG metadata, filter rules, keywords, descriptions, near-duplicate groups, the split, skin tones, emoji
groups, square images), both preparations on small hand-made package trees (no packages needed; same inputs, same
bytes), the command line, and the real packages under -m slow (skipped when they are not installed).

    python -m pytest -q tests/test_prepare.py
    python -m pytest -q -m slow tests/test_prepare.py   # prepare openclipart and emoji from the installed packages
"""
import os
import sys

import numpy as np
import pytest
from PIL import Image, features

from data import DataError, read_records

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "prepare"))
import debian  # noqa: E402  (prepare/debian.py: a script folder, not a package)

# -----------------------------------------------------------------------------
# the helpers on hand-written inputs

NS = ('xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
      'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/" '
      'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"')


def svg(title="", keywords=(), creator="", description="", body=""):
    """An SVG laid out like openclipart's, with the publisher's dc:title first (a title that is not the Work's)."""
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<svg {NS}><metadata><rdf:RDF><cc:Work rdf:about="">'
            f'<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>'
            + (f"<dc:title>{title}</dc:title>" if title else "")
            + f"<dc:description>{description}</dc:description><dc:subject><rdf:Bag>"
            + "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
            + f"</rdf:Bag></dc:subject><dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
            f"</cc:Work></rdf:RDF></metadata>{body}</svg>")


def test_svg_metadata(tmp_path):
    path = tmp_path / "a.svg"
    path.write_text(svg("Apple &amp;amp; pear_2", [" fruit ", "", "food"], "Jane Doe", "Two  fruits.\nRipe.",
                        '<image xlink:href="photo.jpg"/><image xlink:href="data:image/png;base64,AAAA"/>'))
    assert debian.svg_metadata(path) == {"title": "Apple & pear 2", "description": "Two fruits. Ripe.",
                                         "keywords": ["fruit", "", "food"], "creator": "Jane Doe",
                                         "links": ["photo.jpg"]}  # the embedded bitmap is no link
    path.write_text(f"<svg {NS}><path d='M0 0'/></svg>")  # no metadata at all
    assert debian.svg_metadata(path) == {"title": "", "description": "", "keywords": [], "creator": "", "links": []}
    path.write_text("<svg><metadata></svg>")
    with pytest.raises(DataError, match="a.svg: malformed SVG"):
        debian.svg_metadata(path)


def test_openclipart_text_rules():
    meta = {"title": "Cat", "creator": "Jane Doe", "links": []}
    assert debian.openclipart_rule("animals/cat.png", meta) is None
    assert "icon theme" in debian.openclipart_rule("computer/icons/lemon-theme/apps/cat.png", meta)
    assert "generated" in debian.openclipart_rule("shapes/stars/star_05pt02step.png", meta)
    assert "bitmap" in debian.openclipart_rule("animals/cat.png", {**meta, "links": ["cat.jpg"]})
    assert "no title" in debian.openclipart_rule("animals/cat.png", {**meta, "title": ""})
    assert "author" in debian.openclipart_rule("animals/cat.png", {**meta, "creator": "cat"})
    # keywords: order kept, duplicates and `drop` left out ignoring case, at most 8 and at most 60 characters
    words = ["Cat", "pet", " PET", "", "jane_doe", "animal"]
    assert debian.clean_keywords(words, ("cat", "Jane Doe")) == ["pet", "animal"]
    assert debian.clean_keywords([f"k{i}" for i in range(12)]) == [f"k{i}" for i in range(8)]
    long = debian.clean_keywords(["a" * 50, "b" * 20, "c" * 5])  # "b" * 20 would pass 60 characters; "c" * 5 fits
    assert long == ["a" * 50, "c" * 5] and len(", ".join(long)) <= debian.MAX_KEYWORD_CHARS
    # descriptions: the first sentence, at most 12 words; None when it says nothing about the picture
    text = debian.description_text
    assert text("A red apple. Drawn in Inkscape.", ("Apple", ""), 1) == "A red apple."
    assert text(" ".join(["word"] * 20), ("x",), 1) == " ".join(["word"] * 12)
    for bad in ["", "Apple!", "jane.doe@example.org", "HASH(0x858b108)", "see http://x.org"]:
        assert text(bad, ("apple", "Jane Doe"), 1) is None, bad
    assert text("A red apple.", ("Apple",), debian.MAX_TITLE_SHARE + 1) is None  # describes a whole collection


def test_near_duplicate_groups():
    keys = debian.near_duplicate_keys
    assert keys("Blueman 12", "people/blueman12.png") == ("title: blueman", "file: blueman")
    assert keys("Apple pie (B and W)", "food/pie_apple_bw.png")[1] == keys("Apple pie", "food/pie_apple.png")[1]
    assert keys("Буран", "x/01.png") == ("title: буран", "file: 01")  # non-Latin titles and bare numbers stay keys
    # a-b share "x", b-c share "y": one group, named by its smallest key; d is alone
    assert debian.join_groups([("x", "a"), ("x", "y"), ("z", "y"), ("w", "d")]) == ["a", "a", "a", "d"]


def test_split_is_a_stable_hash_of_the_group():
    # pinned values: a different hash would silently move images between train and val
    assert [debian.split_of(k) for k in ["j", "k", "l", "m", "👍"]] == ["train", "val", "train", "val", "train"]
    val = sum(debian.split_of(f"group {i}") == "val" for i in range(10000))
    assert 900 < val < 1100  # about VAL_PERCENT = 10 %


def test_skin_tone_base_and_emoji_groups(tmp_path):
    base = debian.skin_tone_base
    assert base("👍🏽") == base("👍🏿") == base("👍") == "👍"
    assert base("🧑🏻\u200d🤝\u200d🧑🏿") == "🧑\u200d🤝\u200d🧑"  # both tones of a couple go
    assert base("🫱🏻\u200d🫲🏿") == base("🤝🏼") == "🤝"  # the mixed-tone handshake is drawn like 🤝
    assert base("🏻") == "🏻" and base("👨\u200d👩\u200d👧") == "👨\u200d👩\u200d👧"
    path = tmp_path / "emoji-test.txt"
    path.write_text("# group: Smileys & Emotion\n# subgroup: face-smiling\n"
                    "263A FE0F ; fully-qualified # ☺️ E0.6 smiling face\n263A ; unqualified # ☺ E0.6 smiling face\n"
                    "# group: Flags\n# subgroup: country-flag\n1F1EB 1F1F7 ; fully-qualified # 🇫🇷 E2.0 flag: France\n",
                    encoding="utf-8")
    assert debian.emoji_groups(path) == {"☺": "smileys & emotion / face smiling", "🇫🇷": "flags / country flag"}


def test_square_rgb():
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent black, a red opaque block in the middle
    image.paste((255, 0, 0, 255), (15, 5, 25, 15))
    x = np.asarray(debian.square_rgb(image, 64)).astype(int)
    assert x.shape == (64, 64, 3) and (x[:14] == 255).all() and (x[-14:] == 255).all()  # white padding
    assert (x[32, 32] == [255, 0, 0]).all()
    assert (x[..., 0] >= 250).all()  # no dark fringe: transparent black never bleeds into the resized edges
    grey = np.asarray(debian.square_rgb(Image.new("L", (10, 30), 0), 64))
    assert (grey[:, :21] == 255).all() and (grey[:, 22:42] == 0).all()  # a tall image is centred


# -----------------------------------------------------------------------------
# both preparations on small hand-made package trees, and the command line

def test_missing_packages_name_the_apt_get_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(debian, "OPENCLIPART", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install -y openclipart-png openclipart-svg"):
        debian.prepare_openclipart(str(tmp_path / "out"))
    monkeypatch.setattr(debian, "NOTO_EMOJI", str(tmp_path / "nowhere.ttf"))
    monkeypatch.setattr(sys, "argv", ["debian.py", "emoji", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        debian.main()
    assert e.value.code == (f"error: {tmp_path / 'nowhere.ttf'} not found: install the emoji packages with "
                            "`sudo apt-get install -y fonts-noto-color-emoji unicode-cldr-core`")


def fake_openclipart(root):
    """A small tree laid out like the package, with one picture for each rule."""
    def add(rel, text=None, size=(30, 20)):
        (root / "png" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGBA", size, (0, 0, 255, 255)).save(root / "png" / rel)
        if text is not None:
            (root / "svg" / rel).with_suffix(".svg").parent.mkdir(parents=True, exist_ok=True)
            (root / "svg" / rel).with_suffix(".svg").write_text(text, encoding="utf-8")

    for name in ["dog", "cow", "pig", "hen", "fox", "owl", "bee", "elk"]:
        add(f"animals/{name}_01.png", svg(name.title(), ["animal", name, "hash", "12"], "Jane Doe"))
    add("animals/cat_01.png", svg("Cat", ["pet", "HASH(0x8a0a390)"], "Jane Doe", "A sleeping cat. Drawn by me."))
    add("animals/cat_bw_01.png", svg("Cat (B and W)", ["pet"], "Jane Doe"))  # a near-duplicate of cat_01
    add("computer/icons/lemon-theme/apps/cat.png", svg("Cat icon", ["icon"]))
    add("shapes/stars/star_05pt02step.png", svg("gramastar", ["star"]))
    add("food/photo.png", svg("Photo", ["food"], body='<image xlink:href="photo.jpg"/>'))
    add("food/untitled.png", svg("", ["food"]))
    add("food/signed.png", svg("Jane Doe", ["food"], "Jane Doe"))  # the author's name as the title
    add("food/nokeywords.png", svg("Pie", ["hash", "Jane Doe"], "Jane Doe"))
    add("food/broken.png", "<svg><metadata></svg>")
    add("food/orphan.png")  # no SVG
    for i in range(debian.MAX_TITLE_SHARE + 1):
        add(f"cards/card_{i}.png", svg("card", ["card"]))
    (root / "png" / "pets").mkdir()
    (root / "png" / "pets" / "cat_01.png").symlink_to("../animals/cat_01.png")  # filed under a second category


def test_prepare_openclipart_on_a_small_tree(tmp_path, monkeypatch):
    fake_openclipart(tmp_path / "pkg")
    monkeypatch.setattr(debian, "OPENCLIPART", str(tmp_path / "pkg"))
    counts = debian.prepare_openclipart(str(tmp_path / "a"), image_size=32)
    assert counts == {"PNG files": 29, "symlinks (a 2nd category): skipped": 1, "dropped: no SVG": 1,
                      "dropped: malformed SVG": 1, "dropped: icon theme (computer/icons/)": 1,
                      "dropped: generated stars, patterns, gradients": 1, "dropped: links a bitmap outside the SVG": 1,
                      "dropped: no title, or the author's name": 2, "dropped: title on > 10 files": 11,
                      "dropped: no keywords": 1,
                      "dropped: PNG over 89 Mpx (Pillow's bomb limit)": 0, "dropped: unreadable PNG": 0,
                      "note: description made of title + folder": 9, "kept": 10,
                      "train": counts["train"], "val": counts["val"]}
    splits = [s for s in ("train", "val") if counts[s]]  # an empty split is an empty file, which read_records refuses
    records = {r["source"]: r for split in splits for r in read_records(tmp_path / "a" / f"{split}.jsonl")}
    assert len(records) == 10 and counts["train"] + counts["val"] == 10
    cat, cat_bw = records["png/animals/cat_01.png"], records["png/animals/cat_bw_01.png"]
    assert cat["caption"] == ["Cat", "pet", "animals", "A sleeping cat."]
    assert records["png/animals/dog_01.png"]["caption"] == ["Dog", "animal", "animals", "Dog, clip art of animals"]
    assert cat["group"] == cat_bw["group"] == "file: cat"  # the B&W copy shares the group (and so the split)
    for split in splits:
        for r in read_records(tmp_path / "a" / f"{split}.jsonl", captions=4):
            assert debian.split_of(r["group"]) == split
            assert Image.open(r["image"]).mode == "RGB" and Image.open(r["image"]).size == (32, 32)
    debian.prepare_openclipart(str(tmp_path / "b"), image_size=32)  # same inputs, same bytes
    for path in sorted((tmp_path / "a").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path


def test_command_line_prints_the_counts_and_reads_back(tmp_path, monkeypatch, capsys):
    fake_openclipart(tmp_path / "pkg")
    monkeypatch.setattr(debian, "OPENCLIPART", str(tmp_path / "pkg"))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["debian.py", "openclipart", "--out", str(out), "--image-size", "32"])
    debian.main()
    printed = capsys.readouterr().out
    assert f"{'dropped: no keywords':<50}{1:>6}\n" in printed and f"{'kept':<50}{10:>6}\n" in printed
    assert f"wrote openclipart at 32 px to {out} in " in printed and "tokenizer: 1024 ids (" in printed
    assert "example record (train.jsonl line 1): image images/" in printed
    for slot in debian.OPENCLIPART_SLOTS:  # one row of caption lengths and one line of the example per slot
        assert f"\n{slot:<12}" in printed and f"\n  {slot:<11} " in printed
    assert f"\n  {'source':<11} \"png/" in printed and f"\n  {'group':<11} " in printed


def fake_cldr(root):
    """A small CLDR: three base names (one the font has no glyph for, one flag) and the five tones of 👍."""
    (root / "annotations").mkdir(parents=True)
    (root / "annotationsDerived").mkdir()

    def ldml(pairs):
        return "<ldml><annotations>" + "".join(
            f'<annotation cp="{cp}">{keywords}</annotation><annotation cp="{cp}" type="tts">{name}</annotation>'
            for cp, name, keywords in pairs) + "</annotations></ldml>"

    (root / "annotations" / "en.xml").write_text(ldml([
        ("👍", "thumbs up", "+1 | hand | thumb | thumbs up | up"), ("{", "open curly bracket", "brace | bracket"),
        ("🇫🇷", "flag: France", "flag")]), encoding="utf-8")
    tones = ["light", "medium-light", "medium", "medium-dark", "dark"]
    (root / "annotationsDerived" / "en.xml").write_text(ldml(
        [(chr(0x1F3FB + i), f"thumbs up: {t} skin tone", f"+1 | hand | {t} skin tone | thumb | thumbs up | up")
         for i, t in enumerate(tones)]).replace('cp="', 'cp="👍'), encoding="utf-8")


@pytest.mark.skipif(not os.path.exists(debian.NOTO_EMOJI), reason="needs fonts-noto-color-emoji")
def test_prepare_emoji_with_a_small_cldr(tmp_path, monkeypatch, capsys):
    fake_cldr(tmp_path / "cldr")
    (tmp_path / "emoji-test.txt").write_text(
        "# group: People & Body\n# subgroup: hand-fingers-closed\n1F44D ; fully-qualified # 👍 thumbs up\n",
        encoding="utf-8")
    monkeypatch.setattr(debian, "CLDR", str(tmp_path / "cldr"))
    monkeypatch.setattr(debian, "EMOJI_TEST", str(tmp_path / "emoji-test.txt"))
    counts = debian.prepare_emoji(str(tmp_path / "a"), image_size=32)
    raqm = features.check("raqm")  # without libraqm the two regional indicators of 🇫🇷 stay two glyphs
    assert counts["dropped: no glyph in the font"] == 1 and counts["dropped: drawn as several glyphs"] == (not raqm)
    assert counts["kept"] == 6 + raqm and counts["note: no group in emoji-test.txt"] == 5 + raqm
    splits = [tmp_path / "a" / f"{split}.jsonl" for split in ("train", "val")]  # two groups: val may be empty
    records = {r["source"]: r for path in splits if path.read_text().strip() for r in read_records(path)}
    assert len(records) == counts["kept"]
    assert records["U+1F44D U+1F3FD"]["caption"] == [
        "thumbs up: medium skin tone", "+1, hand, medium skin tone, thumb, up", "symbols"]
    assert records["U+1F44D"]["caption"] == ["thumbs up", "+1, hand, thumb, up", "people & body / hand fingers closed"]
    if raqm:
        assert records["U+1F1EB U+1F1F7"]["caption"] == ["flag: France", "flag: France", "symbols"]
    thumbs = {r["group"] for r in records.values() if r["source"].startswith("U+1F44D")}
    assert thumbs == {"👍"}  # all six tones in one group, so on one side of the split
    x = np.asarray(Image.open(records["U+1F44D"]["image"]))
    assert x.shape == (32, 32, 3) and x[0, 0].tolist() == [255, 255, 255] and x.min() < 128  # drawn on white
    monkeypatch.setattr(debian, "EMOJI_TEST", str(tmp_path / "nowhere.txt"))  # optional: without it M = 2
    debian.prepare_emoji(str(tmp_path / "b"), image_size=32)
    assert "no group slot, M = 2" in capsys.readouterr().out
    assert all(len(r["caption"]) == 2 for r in read_records(tmp_path / "b" / "train.jsonl"))
    for path in sorted((tmp_path / "a" / "images").iterdir()):  # same inputs, same pixels
        assert path.read_bytes() == (tmp_path / "b" / "images" / path.name).read_bytes()


# -----------------------------------------------------------------------------
# the real packages (-m slow), skipped when they are not installed

def check_prepared(out, M):
    """Every record has M texts and a readable 64 px RGB image; no group on both sides; about 10 % val."""
    train, val = read_records(out / "train.jsonl", captions=M), read_records(out / "val.jsonl", captions=M)
    assert not {r["group"] for r in train} & {r["group"] for r in val}
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    assert all(Image.open(r["image"]).size == (64, 64) for r in train[:50] + val[:50])
    return train, val


@pytest.mark.slow  # about 25 s
@pytest.mark.skipif(not os.path.isdir(os.path.join(debian.OPENCLIPART, "svg")), reason="needs openclipart-png/-svg")
def test_prepare_real_openclipart(tmp_path):
    counts = debian.prepare_openclipart(str(tmp_path))
    assert counts["PNG files"] > 6000 and counts["kept"] > 2000
    check_prepared(tmp_path, 4)


@pytest.mark.slow  # about 15 s
@pytest.mark.skipif(not (os.path.exists(debian.NOTO_EMOJI) and os.path.isdir(debian.CLDR)),
                    reason="needs fonts-noto-color-emoji and unicode-cldr-core")
def test_prepare_real_emoji(tmp_path):
    counts = debian.prepare_emoji(str(tmp_path))
    assert counts["kept"] > 3000 and counts["dropped: drawn as several glyphs"] == 0
    train, val = check_prepared(tmp_path, 3 if os.path.exists(debian.EMOJI_TEST) else 2)
    assert any(r["caption"][0] == "thumbs up: medium skin tone" for r in train + val)
