"""Tests of data.py: the synthetic world (same seed same bytes; every attribute measurable from the pixels; texts
consistent with the labels), records with every bad-input case, the BPE tokenizer, the dataset and the loaders, and
the real offline datasets (their helpers; both preparations on small hand-made package trees; the real packages
under -m slow, skipped when they are not installed).

    python -m pytest -q tests/test_data.py
    python -m pytest -q -m slow tests/test_data.py   # prepare openclipart and emoji from the installed packages
"""
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, features

import data
from data import (COLOURS, PATTERNS, POSITIONS, SLOTS, STYLES, DataError, ImageTextDataset, Tokenizer, load_image,
                  make_loader, make_world, read_records, render_scene, sample_scene, scene_labels, scene_masks,
                  scene_texts)


def random_scenes(n, seed=0, S=64):
    rng = random.Random(seed)
    return [sample_scene(rng, S) for _ in range(n)]


def pixels(scene):
    return np.asarray(render_scene(scene), np.float64)  # (S, S, 3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), train_size=24, val_size=8, seed=1)
    return out


# -----------------------------------------------------------------------------
# the world

def test_same_seed_same_bytes(world, tmp_path):
    make_world(str(tmp_path / "a"), train_size=24, val_size=8, seed=1)  # a second run, elsewhere
    make_world(str(tmp_path / "b"), train_size=24, val_size=8, seed=2)
    for name in ["train.jsonl", "val.jsonl", "tokenizer.json"] + [f"images/{i:06d}.png" for i in range(32)]:
        assert (world / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert (world / "train.jsonl").read_bytes() != (tmp_path / "b" / "train.jsonl").read_bytes()
    alone = data._make_sample((5, 1, 64, str(tmp_path / "b")))  # sample 5 made in this process, not in a worker
    assert json.dumps(alone) + "\n" == (world / "train.jsonl").read_text().splitlines(keepends=True)[5]


def test_records_on_disk_match_their_scenes(world):
    train, val = read_records(world / "train.jsonl", captions=6), read_records(world / "val.jsonl", captions=6)
    assert (len(train), len(val)) == (24, 8)
    for r in train + val:
        assert np.array_equal(np.asarray(load_image(r["image"])), np.asarray(render_scene(r["scene"])))  # lossless
        assert r["labels"] == scene_labels(r["scene"])


def eroded(mask):
    """The mask minus its 1-pixel rim (blur mixes the rim with the neighbours); the mask itself if nothing is left."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return inner if inner.any() else mask


def test_object_colours_visible():
    """Each object's mean colour is nearest to its own named colour, among all named colours rendered in the same
    style (a swatch: a plain background of that colour with no objects)."""
    hits = Counter()
    for scene in random_scenes(300):
        swatches = {c: pixels({**scene, "background": {"colour": c, "pattern": "plain"}, "objects": []}).mean((0, 1))
                    for c in COLOURS}
        x, masks = pixels(scene), scene_masks(scene)
        for i, obj in enumerate(scene["objects"]):
            mean = x[eroded(masks == i + 1)].mean(0)
            nearest = min(swatches, key=lambda c: np.linalg.norm(swatches[c] - mean))
            hits[scene["style"], nearest == obj["colour"]] += 1
    for style in STYLES:
        assert hits[style, False] == 0, (style, hits)


def test_background_colour_visible():
    for scene in random_scenes(200):
        if scene["background"]["pattern"] in ("plain", "dots"):
            swatches = {c: pixels({**scene, "background": {"colour": c, "pattern": "plain"}, "objects": []})
                        .mean((0, 1)) for c in COLOURS}
            median = np.median(pixels(scene)[scene_masks(scene) == 0], 0)  # the dots are a minority
            assert min(swatches, key=lambda c: np.linalg.norm(swatches[c] - median)) == scene["background"]["colour"]


def test_patterns_visible():
    """Without objects and in the vivid style: plain is flat, stripes vary only across x, the gradient only along y
    (in small steps), checker and dots along both (checker half second tone, dots a minority)."""
    for colour in COLOURS:
        for pattern in PATTERNS:
            scene = {"image_size": 64, "background": {"colour": colour, "pattern": pattern}, "style": "vivid",
                     "seed": 0, "objects": []}
            x = pixels(scene)
            flat_x, flat_y = np.all(x == x[:, :1]), np.all(x == x[:1])  # constant along x / along y
            other = np.any(x != x[0, 0], axis=-1).mean()  # share of pixels in the second tone
            if pattern == "plain":
                assert x.std((0, 1)).max() == 0
            elif pattern == "stripes":
                assert flat_y and not flat_x and x.std((0, 1)).max() > 20
            elif pattern == "gradient":
                assert flat_x and not flat_y and np.abs(np.diff(x, axis=0)).max() < 10
            else:
                assert not flat_x and not flat_y and x.std((0, 1)).max() > 20
                assert 0.4 < other < 0.6 if pattern == "checker" else 0.05 < other < 0.35, (pattern, other)


def high_freq(x):
    return np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean()


def test_styles_visible():
    for scene in random_scenes(30):
        x = {s: pixels({**scene, "style": s}) for s in STYLES}
        assert x["dark"].mean() < x["vivid"].mean() < x["pastel"].mean()
        assert high_freq(x["blurred"]) < high_freq(x["vivid"]) < high_freq(x["noisy"])


def test_masks_are_the_painted_pixels():
    for scene in random_scenes(100):
        scene = {**scene, "style": "vivid"}  # no style: the painted colours are exact
        x, masks = pixels(scene), scene_masks(scene)
        assert np.array_equal(x[masks == 0], np.rint(data.background(scene))[masks == 0])
        for i, obj in enumerate(scene["objects"]):
            assert (masks == i + 1).sum() > 20  # drawn and never hidden by the objects above it
            assert np.all(x[masks == i + 1] == COLOURS[obj["colour"]])


def test_main_object_position_and_size_visible():
    sides = {"small": [], "large": []}
    for scene in random_scenes(300):
        main = data.main_object(scene)
        ys, xs = np.nonzero(scene_masks(scene) == scene["objects"].index(main) + 1)
        cell = int(ys.mean() // (64 / 3)) * 3 + int(xs.mean() // (64 / 3))  # 3 x 3 grid cell of the centroid
        assert POSITIONS[cell] == main["position"]
        sides[main["size"]].append(max(np.ptp(ys), np.ptp(xs)) + 1)
    assert max(sides["small"]) + 5 < min(sides["large"]), sides  # a visible gap between the two sizes


def test_main_object_tie_rule():
    objects = [{"shape": s, "colour": c, "size": z, "position": "centre", "box": [20, 20, 40, 40]}
               for s, c, z in [("star", "red", "small"), ("ring", "blue", "large"), ("cross", "pink", "large")]]
    scene = {"image_size": 64, "background": {"colour": "white", "pattern": "plain"}, "style": "vivid", "seed": 0,
             "objects": objects}
    assert scene_labels(scene)["main_shape"] == "ring"  # the largest; among equals the first drawn


def test_texts_consistent_with_labels():
    rng = random.Random(0)
    alts = Counter()
    for scene in random_scenes(500):
        texts, labels = scene_texts(scene, rng), scene_labels(scene)
        assert len(texts) == len(SLOTS) and all(t.strip() for t in texts)
        alt, detail, nouns, background, main, style = texts
        assert len(alt.split()) <= 3
        alts[any(o["shape"] in alt for o in scene["objects"])] += 1
        for o in scene["objects"]:
            assert f"{o['size']} {o['colour']} {o['shape']} at {o['position']}" in detail
            assert o["shape"] in nouns
        assert len(nouns.split(",")) == len(scene["objects"])
        assert f"{labels['bg_colour']} {labels['bg_pattern']}" in detail and labels["style"] in detail
        assert labels["bg_colour"] in background and labels["bg_pattern"] in background
        assert f"{labels['main_colour']} {labels['main_shape']}" in main
        assert labels["style"] in style and not any(s in style for s in data.SHAPES)
    assert 0.2 < alts[True] / 500 < 0.6  # the alt-text names an object only sometimes: myopic


# -----------------------------------------------------------------------------
# records

def write(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


GOOD = json.dumps({"image": "a.png", "caption": ["one", "two"], "extra": 7})


@pytest.mark.parametrize("bad, message", [
    ('{"image": "a.png", "caption": ["x"', "malformed JSON"),
    ('{"caption": ["x", "y"]}', "'image' and 'caption'"),
    ('{"image": "a.png"}', "'image' and 'caption'"),
    ('{"image": "a.png", "caption": ["x", " "]}', "empty caption"),
    ('{"image": "a.png", "caption": ""}', "empty caption"),
    ('{"image": "a.png", "caption": ["x", 3]}', "list of strings"),
    ('{"image": "a.png", "caption": ["x", "y", "z"]}', "3 captions, expected 2"),
    ('{"image": "a.png", "caption": "x"}', "1 captions, expected 2"),
    (b'{"image": "a.png", "caption": ["caf\xe9", "y"]}', "not UTF-8"),
])
def test_bad_records_name_file_and_line(tmp_path, capsys, bad, message):
    path = write(tmp_path / "r.jsonl", [GOOD, "", bad, GOOD])  # the bad record is on line 3
    with pytest.raises(DataError, match=message) as e:
        read_records(path, captions=2)
    assert str(e.value).startswith(f"{path}:3: ")
    kept = read_records(path, captions=2, skip_bad=True)
    assert [r["line"] for r in kept] == [1, 4] and "1 bad skipped" in capsys.readouterr().err


def test_good_records_and_count_policy(tmp_path, capsys):
    path = write(tmp_path / "r.jsonl", [GOOD, '{"image": "/abs/b.png", "caption": ["p", "q", "r"]}',
                                        '{"image": "c.png", "caption": "solo"}'])
    first, *_ = read_records(path)
    assert first == {"image": str(tmp_path / "a.png"), "caption": ["one", "two"], "extra": 7, "line": 1}
    padded = read_records(path, captions=2, on_count="pad")  # cycle up to M, cut longer lists
    assert [r["caption"] for r in padded] == [["one", "two"], ["p", "q"], ["solo", "solo"]]
    assert padded[1]["image"] == "/abs/b.png"
    assert [r["line"] for r in read_records(path, captions=2, on_count="drop")] == [1]
    assert "2 dropped" in capsys.readouterr().err


def test_csv_and_tsv(tmp_path):
    tsv = write(tmp_path / "r.tsv", ["filepath\ttitle\tsource", "x.png\ta cat, sitting\tweb", "y.png\t\tweb"])
    with pytest.raises(DataError, match=f"^{tsv}:3: empty caption"):
        read_records(tsv)
    first, = read_records(tsv, skip_bad=True)
    assert first == {"image": str(tmp_path / "x.png"), "caption": ["a cat, sitting"], "source": "web", "line": 2}
    csv = write(tmp_path / "r.txt", ["title;filepath", '"a dog; running";d.png', "too;many;fields"])
    assert read_records(csv, sep=";", skip_bad=True)[0]["caption"] == ["a dog; running"]  # quoted separator
    with pytest.raises(DataError, match=f"^{csv}:3: 3 fields"):
        read_records(csv, sep=";")
    with pytest.raises(DataError, match=f"^{tmp_path / 'h.csv'}:1: the header"):
        read_records(write(tmp_path / "h.csv", ["path,caption", "a.png,x"]))


def test_bad_images_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'missing.png'}: cannot read"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"^{tmp_path / 'junk.png'}: cannot read"):
        load_image(tmp_path / "junk.png")
    Image.new("L", (5, 3)).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"


def test_check_cli(world, tmp_path, monkeypatch, capsys):
    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["data.py", *argv])
        with pytest.raises(SystemExit) as e:
            data.main()
        return e.value.code, capsys.readouterr()

    code, out = run("--check", str(world / "val.jsonl"), "--captions", "6")
    assert code == 0 and "8 good records, 0 bad" in out.out and "detail" in out.out
    bad = write(tmp_path / "bad.jsonl", ['{"image": "nowhere.png", "caption": "x"}', GOOD])
    code, out = run("--check", str(bad))
    assert code.startswith(f"error: {bad}:1: {tmp_path / 'nowhere.png'}: cannot read image")
    code, out = run("--check", str(bad), "--skip-bad")
    assert code == 1 and "0 good records, 2 bad" in out.out


# -----------------------------------------------------------------------------
# tokenizer

def world_captions(n=300):
    rng = random.Random(0)
    return [t for scene in random_scenes(n) for t in scene_texts(scene, rng)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(world_captions(), vocab_size=400)


def naive_bpe(texts, n_merges):
    """Reference: recount every pair of every word occurrence before each merge."""
    words = [[b + 1 for b in w.encode()] for t in texts for w in data.SPLIT.findall(t)]
    merges = []
    for new in range(257, 257 + n_merges):
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        words = [data._merge(w, best, new) for w in words]
    return merges


def test_bpe_training_matches_naive_reference():
    texts = world_captions(40) + ["aaaa aaa banana bandana", "IMG_0042.png IMG_0042.png"]
    assert Tokenizer.train(texts, vocab_size=259 + 150).merges == naive_bpe(texts, 150)


def test_round_trip_any_unicode(tok):
    rng = random.Random(0)
    texts = ["", " ", "a red circle", "IMG_4821.png", "café naïve", "e\u0301 combining", "日本語のテキスト",
             "emoji 🎉👍🏽 family 👨‍👩‍👧", "tabs\tand\nnewlines\r\n  double  spaces ", "snake_case __dunder__ 1,234.5"]
    for _ in range(200):  # random code points anywhere in Unicode except the surrogates (not encodable)
        texts.append("".join(chr(rng.choice([rng.randrange(0x80), rng.randrange(0xD800), rng.randrange(0xE000,
                                                                                                       0x110000)]))
                             for _ in range(rng.randrange(1, 20))))
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(0 < i < tok.sot for i in ids)
    assert len(tok.encode("a large red circle at the top left")) <= 8  # world words are single tokens


def test_tokenize_truncation_and_eot(tok):
    texts = ["a red circle", "x" * 500, "a large blue star at the centre on a white stripes background"]
    before = tok.truncated
    t = tok.tokenize(texts, context_length=16)
    too_long = sum(len(tok.encode(text)) + 2 > 16 for text in texts)
    assert t.shape == (3, 16) and t.dtype == torch.long and tok.truncated == before + too_long == before + 2
    assert torch.all(t[:, 0] == tok.sot)
    for row, text in zip(t, texts):
        n = len(tok.encode(text))
        eot = min(n + 1, 15)
        assert row.argmax().item() == eot and row[eot] == tok.eot == tok.vocab_size - 1
        assert torch.all(row[eot + 1:] == tok.pad)
        assert tok.decode(row.tolist()) == (text if n + 2 <= 16 else tok.decode(tok.encode(text)[:14]))
    assert tok.tokenize("one text").shape == (1, 77)


def test_detail_captions_fit_32_tokens():
    """The worst case (three objects at two-word positions) fits the tiny preset's context of 32 tokens."""
    tok = Tokenizer.train(world_captions(), vocab_size=1024)
    objects = [{"shape": "triangle", "colour": "yellow", "size": size, "position": position, "box": [0, 0, 9, 9]}
               for size, position in [("large", "bottom right"), ("small", "bottom left"), ("small", "top right")]]
    worst = {"image_size": 64, "background": {"colour": "purple", "pattern": "gradient"}, "style": "blurred",
             "seed": 0, "objects": objects}
    rng = random.Random(0)
    assert max(len(tok.encode(scene_texts(worst, rng)[1])) + 2 for _ in range(50)) <= 32


def test_tokenizer_save_load(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    torch.save({"tokenizer": tok.to_dict()}, tmp_path / "ckpt.pt")
    restored = Tokenizer.from_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"])
    for other in (Tokenizer.load(tmp_path / "tok.json"), restored):
        assert other.vocab_size == 400 and other.merges == tok.merges
        assert torch.equal(other.tokenize(world_captions(5)), tok.tokenize(world_captions(5)))


# -----------------------------------------------------------------------------
# dataset and loaders

@pytest.fixture(scope="module")
def dataset(world):
    records = read_records(world / "train.jsonl", captions=6)
    return ImageTextDataset(records, Tokenizer.load(world / "tokenizer.json"), 64, train=True, context_length=48)


def test_loader_shapes(dataset):
    batches = list(make_loader(dataset, 5, train=True))
    assert len(batches) == 4  # 24 // 5: drop_last
    images, tokens = batches[0]
    assert images.shape == (5, 3, 64, 64) and images.dtype == torch.float32
    assert tokens.shape == (5, 6, 48) and tokens.dtype == torch.long
    assert len(list(make_loader(dataset, 5, train=False))) == 5  # eval keeps the last partial batch


def test_distributed_partition_covers_data_once(dataset, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    for train in (True, False):
        seen = []
        for rank in (0, 1):
            monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)
            loader = make_loader(dataset, 4, train=train, seed=5)
            order = [i for batch in loader.batch_sampler for i in batch]
            tokens = torch.cat([t for _, t in loader])
            assert torch.equal(tokens, dataset.tokens[order])  # the loader yields what its sampler says
            seen += order
        assert sorted(seen) == list(range(24)), (train, seen)


def test_skip_batches_equals_slicing_and_loads_nothing_skipped(dataset, monkeypatch):
    full = list(make_loader(dataset, 4, train=True, seed=3, epoch=2))
    loads = []
    monkeypatch.setattr(data, "load_image", lambda path: loads.append(path) or load_image(path))
    part = list(make_loader(dataset, 4, train=True, seed=3, epoch=2, skip_batches=2))
    assert len(part) == len(full) - 2 and len(loads) == 4 * len(part)
    for (a, b), (c, d) in zip(full[2:], part):
        assert torch.equal(a, c) and torch.equal(b, d)  # same samples, same augmentation


def test_augmentation_is_a_function_of_seed_epoch_index(dataset, world):
    torch.manual_seed(0)
    dataset.epoch = 0
    first = dataset[3][0]
    torch.rand(5)  # the global generator state must not matter
    assert torch.equal(dataset[3][0], first)
    dataset.epoch = 1
    assert not torch.equal(dataset[3][0], first)
    one = list(make_loader(dataset, 8, train=True, epoch=4))
    two = list(make_loader(dataset, 8, train=True, epoch=4, workers=2))
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(one, two))
    evaluation = ImageTextDataset(dataset.records, Tokenizer.load(world / "tokenizer.json"), 64, context_length=48)
    image = evaluation[3][0]
    assert torch.equal(image, evaluation[3][0]) and image.shape == (3, 64, 64)


# -----------------------------------------------------------------------------
# real offline data from Debian packages: the helpers on hand-written inputs (no packages needed), both preparations
# on small hand-made package trees, and the real packages under `-m slow` when they are installed

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
    assert data.svg_metadata(path) == {"title": "Apple & pear 2", "description": "Two fruits. Ripe.",
                                       "keywords": ["fruit", "", "food"], "creator": "Jane Doe",
                                       "links": ["photo.jpg"]}  # the embedded bitmap is no link
    path.write_text(f"<svg {NS}><path d='M0 0'/></svg>")  # no metadata at all
    assert data.svg_metadata(path) == {"title": "", "description": "", "keywords": [], "creator": "", "links": []}
    path.write_text("<svg><metadata></svg>")
    with pytest.raises(DataError, match="a.svg: malformed SVG"):
        data.svg_metadata(path)


def test_openclipart_text_rules():
    meta = {"title": "Cat", "creator": "Jane Doe", "links": []}
    assert data.openclipart_rule("animals/cat.png", meta) is None
    assert "icon theme" in data.openclipart_rule("computer/icons/lemon-theme/apps/cat.png", meta)
    assert "generated" in data.openclipart_rule("shapes/stars/star_05pt02step.png", meta)
    assert "bitmap" in data.openclipart_rule("animals/cat.png", {**meta, "links": ["cat.jpg"]})
    assert "no title" in data.openclipart_rule("animals/cat.png", {**meta, "title": ""})
    assert "author" in data.openclipart_rule("animals/cat.png", {**meta, "creator": "cat"})
    # keywords: order kept, duplicates and `drop` left out ignoring case, at most 8 and at most 60 characters
    words = ["Cat", "pet", " PET", "", "jane_doe", "animal"]
    assert data.clean_keywords(words, ("cat", "Jane Doe")) == ["pet", "animal"]
    assert data.clean_keywords([f"k{i}" for i in range(12)]) == [f"k{i}" for i in range(8)]
    long = data.clean_keywords(["a" * 50, "b" * 20, "c" * 5])  # "b" * 20 would pass 60 characters; "c" * 5 fits
    assert long == ["a" * 50, "c" * 5] and len(", ".join(long)) <= data.MAX_KEYWORD_CHARS
    # descriptions: the first sentence, at most 12 words; None when it says nothing about the picture
    text = data.description_text
    assert text("A red apple. Drawn in Inkscape.", ("Apple", ""), 1) == "A red apple."
    assert text(" ".join(["word"] * 20), ("x",), 1) == " ".join(["word"] * 12)
    for bad in ["", "Apple!", "jane.doe@example.org", "HASH(0x858b108)", "see http://x.org"]:
        assert text(bad, ("apple", "Jane Doe"), 1) is None, bad
    assert text("A red apple.", ("Apple",), data.MAX_TITLE_SHARE + 1) is None  # describes a whole collection


def test_near_duplicate_groups():
    keys = data.near_duplicate_keys
    assert keys("Blueman 12", "people/blueman12.png") == ("title: blueman", "file: blueman")
    assert keys("Apple pie (B and W)", "food/pie_apple_bw.png")[1] == keys("Apple pie", "food/pie_apple.png")[1]
    assert keys("Буран", "x/01.png") == ("title: буран", "file: 01")  # non-Latin titles and bare numbers stay keys
    # a-b share "x", b-c share "y": one group, named by its smallest key; d is alone
    assert data.join_groups([("x", "a"), ("x", "y"), ("z", "y"), ("w", "d")]) == ["a", "a", "a", "d"]


def test_split_is_a_stable_hash_of_the_group():
    # pinned values: a different hash would silently move images between train and val
    assert [data.split_of(k) for k in ["j", "k", "l", "m", "👍"]] == ["train", "val", "train", "val", "train"]
    val = sum(data.split_of(f"group {i}") == "val" for i in range(10000))
    assert 900 < val < 1100  # about VAL_PERCENT = 10 %


def test_skin_tone_base_and_emoji_groups(tmp_path):
    base = data.skin_tone_base
    assert base("👍🏽") == base("👍🏿") == base("👍") == "👍"
    assert base("🧑🏻\u200d🤝\u200d🧑🏿") == "🧑\u200d🤝\u200d🧑"  # both tones of a couple go
    assert base("🫱🏻\u200d🫲🏿") == base("🤝🏼") == "🤝"  # the mixed-tone handshake is drawn like 🤝
    assert base("🏻") == "🏻" and base("👨\u200d👩\u200d👧") == "👨\u200d👩\u200d👧"
    path = tmp_path / "emoji-test.txt"
    path.write_text("# group: Smileys & Emotion\n# subgroup: face-smiling\n"
                    "263A FE0F ; fully-qualified # ☺️ E0.6 smiling face\n263A ; unqualified # ☺ E0.6 smiling face\n"
                    "# group: Flags\n# subgroup: country-flag\n1F1EB 1F1F7 ; fully-qualified # 🇫🇷 E2.0 flag: France\n",
                    encoding="utf-8")
    assert data.emoji_groups(path) == {"☺": "smileys & emotion / face smiling", "🇫🇷": "flags / country flag"}


def test_square_rgb():
    image = Image.new("RGBA", (40, 20), (0, 0, 0, 0))  # transparent black, a red opaque block in the middle
    image.paste((255, 0, 0, 255), (15, 5, 25, 15))
    x = np.asarray(data.square_rgb(image, 64)).astype(int)
    assert x.shape == (64, 64, 3) and (x[:14] == 255).all() and (x[-14:] == 255).all()  # white padding
    assert (x[32, 32] == [255, 0, 0]).all()
    assert (x[..., 0] >= 250).all()  # no dark fringe: transparent black never bleeds into the resized edges
    grey = np.asarray(data.square_rgb(Image.new("L", (10, 30), 0), 64))
    assert (grey[:, :21] == 255).all() and (grey[:, 22:42] == 0).all()  # a tall image is centred


def test_missing_packages_name_the_apt_get_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "OPENCLIPART", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install -y openclipart-png openclipart-svg"):
        data.prepare_openclipart(str(tmp_path / "out"))
    monkeypatch.setattr(data, "NOTO_EMOJI", str(tmp_path / "nowhere.ttf"))
    monkeypatch.setattr(sys, "argv", ["data.py", "--prepare", "emoji", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        data.main()
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
    for i in range(data.MAX_TITLE_SHARE + 1):
        add(f"cards/card_{i}.png", svg("card", ["card"]))
    (root / "png" / "pets").mkdir()
    (root / "png" / "pets" / "cat_01.png").symlink_to("../animals/cat_01.png")  # filed under a second category


def test_prepare_openclipart_on_a_small_tree(tmp_path, monkeypatch):
    fake_openclipart(tmp_path / "pkg")
    monkeypatch.setattr(data, "OPENCLIPART", str(tmp_path / "pkg"))
    counts = data.prepare_openclipart(str(tmp_path / "a"), image_size=32)
    assert counts == {"PNG files": 29, "symlinks (a 2nd category): skipped": 1, "dropped: no SVG": 1,
                      "dropped: malformed SVG": 1, "dropped: icon theme (computer/icons/)": 1,
                      "dropped: generated stars, patterns, gradients": 1, "dropped: links a bitmap outside the SVG": 1,
                      "dropped: no title, or the author's name": 2, "dropped: title on > 10 files": 11,
                      "dropped: no keywords": 1,
                      "dropped: PNG over 89 Mpx (Pillow's bomb limit)": 0, "dropped: unreadable PNG": 0,
                      "note: description made of title + folder": 9, "kept": 10,
                      "train": counts["train"], "val": counts["val"]}
    records = {r["source"]: r for split in ("train", "val") for r in read_records(tmp_path / "a" / f"{split}.jsonl")}
    assert len(records) == 10 and counts["train"] + counts["val"] == 10
    cat, cat_bw = records["png/animals/cat_01.png"], records["png/animals/cat_bw_01.png"]
    assert cat["caption"] == ["Cat", "pet", "animals", "A sleeping cat."]
    assert records["png/animals/dog_01.png"]["caption"] == ["Dog", "animal", "animals", "Dog, clip art of animals"]
    assert cat["group"] == cat_bw["group"] == "file: cat"  # the B&W copy shares the group (and so the split)
    for split in ("train", "val"):
        for r in read_records(tmp_path / "a" / f"{split}.jsonl", captions=4):
            assert data.split_of(r["group"]) == split
            assert Image.open(r["image"]).mode == "RGB" and Image.open(r["image"]).size == (32, 32)
    data.prepare_openclipart(str(tmp_path / "b"), image_size=32)  # same inputs, same bytes
    for path in sorted((tmp_path / "a").rglob("*.*")):
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes(), path


def fake_cldr(root):
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


@pytest.mark.skipif(not os.path.exists(data.NOTO_EMOJI), reason="needs fonts-noto-color-emoji")
def test_prepare_emoji_with_a_small_cldr(tmp_path, monkeypatch, capsys):
    fake_cldr(tmp_path / "cldr")
    (tmp_path / "emoji-test.txt").write_text(
        "# group: People & Body\n# subgroup: hand-fingers-closed\n1F44D ; fully-qualified # 👍 thumbs up\n",
        encoding="utf-8")
    monkeypatch.setattr(data, "CLDR", str(tmp_path / "cldr"))
    monkeypatch.setattr(data, "EMOJI_TEST", str(tmp_path / "emoji-test.txt"))
    counts = data.prepare_emoji(str(tmp_path / "a"), image_size=32)
    raqm = features.check("raqm")  # without libraqm the two regional indicators of 🇫🇷 stay two glyphs
    assert counts["dropped: no glyph in the font"] == 1 and counts["dropped: drawn as several glyphs"] == (not raqm)
    assert counts["kept"] == 6 + raqm and counts["note: no group in emoji-test.txt"] == 5 + raqm
    records = {r["source"]: r for split in ("train", "val") for r in read_records(tmp_path / "a" / f"{split}.jsonl")}
    assert records["U+1F44D U+1F3FD"]["caption"] == [
        "thumbs up: medium skin tone", "+1, hand, medium skin tone, thumb, up", "symbols"]
    assert records["U+1F44D"]["caption"] == ["thumbs up", "+1, hand, thumb, up", "people & body / hand fingers closed"]
    if raqm:
        assert records["U+1F1EB U+1F1F7"]["caption"] == ["flag: France", "flag: France", "symbols"]
    thumbs = {r["group"] for r in records.values() if r["source"].startswith("U+1F44D")}
    assert thumbs == {"👍"}  # all six tones in one group, so on one side of the split
    x = np.asarray(Image.open(records["U+1F44D"]["image"]))
    assert x.shape == (32, 32, 3) and x[0, 0].tolist() == [255, 255, 255] and x.min() < 128  # drawn on white
    monkeypatch.setattr(data, "EMOJI_TEST", str(tmp_path / "nowhere.txt"))  # optional: without it M = 2
    data.prepare_emoji(str(tmp_path / "b"), image_size=32)
    assert "no group slot, M = 2" in capsys.readouterr().out
    assert all(len(r["caption"]) == 2 for r in read_records(tmp_path / "b" / "train.jsonl"))
    for path in sorted((tmp_path / "a" / "images").iterdir()):  # same inputs, same pixels
        assert path.read_bytes() == (tmp_path / "b" / "images" / path.name).read_bytes()


def check_prepared(out, M):
    """Every record has M texts and a readable 64 px RGB image; no group on both sides; about 10 % val."""
    train, val = read_records(out / "train.jsonl", captions=M), read_records(out / "val.jsonl", captions=M)
    assert not {r["group"] for r in train} & {r["group"] for r in val}
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    assert all(Image.open(r["image"]).size == (64, 64) for r in train[:50] + val[:50])
    return train, val


@pytest.mark.slow  # about 25 s
@pytest.mark.skipif(not os.path.isdir(os.path.join(data.OPENCLIPART, "svg")), reason="needs openclipart-png/-svg")
def test_prepare_real_openclipart(tmp_path):
    counts = data.prepare_openclipart(str(tmp_path))
    assert counts["PNG files"] > 6000 and counts["kept"] > 2000
    check_prepared(tmp_path, 4)


@pytest.mark.slow  # about 15 s
@pytest.mark.skipif(not (os.path.exists(data.NOTO_EMOJI) and os.path.isdir(data.CLDR)),
                    reason="needs fonts-noto-color-emoji and unicode-cldr-core")
def test_prepare_real_emoji(tmp_path):
    counts = data.prepare_emoji(str(tmp_path))
    assert counts["kept"] > 3000 and counts["dropped: drawn as several glyphs"] == 0
    train, val = check_prepared(tmp_path, 3 if os.path.exists(data.EMOJI_TEST) else 2)
    assert any(r["caption"][0] == "thumbs up: medium skin tone" for r in train + val)
