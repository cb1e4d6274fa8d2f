"""Tests of data.py: records with every bad-input case (empty files and mixed caption counts too), every kind of bad
image (none may hang: a FIFO runs under a deadline), the --check command line, the BPE tokenizer (against a naive
reference, on the synthetic world's captions; a corrupt tokenizer.json; a symlinked dataset), the dataset and the
loaders (on a small synthetic world). The world itself is tested in tests/test_world.py, the real offline datasets
of prepare/debian.py in tests/test_prepare.py.

    python -m pytest -q tests/test_data.py
"""
import contextlib
import json
import os
import random
import signal
import sys
from collections import Counter

import pytest
import torch
from PIL import Image

import data
from data import DataError, ImageTextDataset, Tokenizer, load_image, make_loader, read_records
from prepare.world import SLOTS, make_world, sample_scene, scene_texts

M = len(SLOTS)  # the world's texts per image: a new perspective changes it here only


def random_scenes(n, seed=0, S=64):
    rng = random.Random(seed)
    return [sample_scene(rng, S) for _ in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), train_size=24, val_size=8, seed=1)
    return out


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
    ('{"image": "a.png", "caption": ["x", "\\ud800"]}', "caption 2 cannot be encoded as UTF-8"),  # lone surrogate
    ('{"image": "a\\udfff.png", "caption": ["x", "y"]}', "'image' cannot be encoded as UTF-8"),
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
    first, *_ = read_records(path, on_count="drop")
    assert first == {"image": str(tmp_path / "a.png"), "caption": ["one", "two"], "extra": 7, "line": 1}
    padded = read_records(path, captions=2, on_count="pad")  # cycle up to M, cut longer lists
    assert [r["caption"] for r in padded] == [["one", "two"], ["p", "q"], ["solo", "solo"]]
    assert padded[1]["image"] == "/abs/b.png"
    assert [r["line"] for r in read_records(path, captions=2, on_count="drop")] == [1]
    assert "2 dropped" in capsys.readouterr().err


def test_mixed_counts_without_expected_m(tmp_path, capsys):
    """captions=None: the first good record's count is M, and on_count applies to every later record."""
    path = write(tmp_path / "r.jsonl", ['{"image": "a.png"}', GOOD, '{"image": "b.png", "caption": ["p", "q", "r"]}',
                                        '{"image": "c.png", "caption": "solo"}'])  # line 1 bad, M = 2 from line 2
    with pytest.raises(DataError, match=f"^{path}:1: "):
        read_records(path)
    assert [r["line"] for r in read_records(path, skip_bad=True)] == [2]  # the other counts are bad records
    assert "3 bad skipped" in capsys.readouterr().err
    two = write(tmp_path / "two.jsonl", ["", GOOD, '{"image": "b.png", "caption": ["p", "q", "r"]}'])
    with pytest.raises(DataError, match=f"^{two}:3: 3 captions, expected 2 \\(the count of line 2; see on_count"):
        read_records(two)
    padded = read_records(path, on_count="pad", skip_bad=True)
    assert [r["caption"] for r in padded] == [["one", "two"], ["p", "q"], ["solo", "solo"]]
    assert [r["line"] for r in read_records(path, on_count="drop", skip_bad=True)] == [2]
    assert "1 bad skipped, 2 dropped" in capsys.readouterr().err


THREE = '{"image": "b.png", "caption": ["p", "q", "r"]}'


@pytest.mark.parametrize("name, lines, kwargs, message", [
    ("r.jsonl", [], {}, "no records"),
    ("r.jsonl", ["", "  ", "\t"], {}, "no records"),
    ("r.jsonl", ["\ufeff"], {}, "no records"),  # a byte-order mark alone
    ("r.csv", ["filepath,title"], {}, "no records"),  # a header alone
    ("r.tsv", ["filepath\ttitle", ""], {}, "no records"),
    ("r.jsonl", ['{"image": "a.png"}', "", '{"caption": "x"}'], {"skip_bad": True}, "no records left: 2 bad skipped"),
    ("r.jsonl", [THREE, THREE], {"captions": 2, "on_count": "drop"}, "no records left: 0 bad skipped, 2 dropped"),
])
def test_empty_inputs(tmp_path, name, lines, kwargs, message):
    path = write(tmp_path / name, lines)
    with pytest.raises(DataError, match=f"^{path}: {message}"):
        read_records(path, **kwargs)


def test_a_file_that_cannot_be_read_is_named(tmp_path):
    """A missing file or a folder given as records or as a tokenizer: a DataError naming it (were tracebacks)."""
    for path in (tmp_path / "missing.jsonl", tmp_path):
        why = "No such file or directory" if path != tmp_path else "Is a directory"
        with pytest.raises(DataError, match=f"^{path}: cannot read \\({why}\\)$"):
            read_records(path)
        with pytest.raises(DataError, match=f"^{path}: cannot read \\({why}\\)$"):
            Tokenizer.load(path)


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
    # a separator given for a TSV train file (train.py --csv-separator) leaves the val.jsonl beside it JSON lines
    jsonl = write(tmp_path / "val.jsonl", [json.dumps({"image": "x.png", "caption": ["a cat"]})])
    assert read_records(jsonl, sep="\t") == read_records(jsonl)


def test_bad_images_name_the_path(tmp_path):
    with pytest.raises(DataError, match=f"^{tmp_path / 'missing.png'}: cannot read"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=f"^{tmp_path / 'junk.png'}: cannot read"):
        load_image(tmp_path / "junk.png")
    Image.new("L", (5, 3)).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").mode == "RGB"


@contextlib.contextmanager
def deadline(seconds=10):
    """Fail instead of hanging (a FIFO blocks open() until a writer comes): SIGALRM fails the test from the main
    thread (pytest's Failed, not an OSError that the code under test might catch)."""
    def fail(*_):
        pytest.fail(f"still blocked after {seconds} s")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


BAD_KINDS = {"missing": "No such file", "truncated": "[Tt]runcated", "truncated jpeg": "truncated",
             "zero-byte": "empty file", "directory": "a directory", "dangling link": "dangling symbolic link",
             "fifo": "a FIFO", "not an image": "UnidentifiedImageError", "bomb": "decompression bomb"}


def make_bad_image(kind, folder, monkeypatch):
    """One image of each bad kind; "bomb": over the warning limit (not the error limit, 2x) of Pillow, made small."""
    path = folder / f"{kind}.{'jpg' if 'jpeg' in kind else 'png'}"
    noise = Image.effect_noise((40, 40), 50)  # noise: a PNG of a few kB, so a cut lands inside the pixel data
    if kind.startswith("truncated"):  # the JPEG: Pillow's verify() checks nothing of it, so it must be decoded
        noise.save(path)
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(folder / "nowhere.png")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "not an image":
        path.write_text("hello")
    elif kind == "bomb":
        noise.save(path)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: a warning, not yet Pillow's error
    return path


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_load_image_refuses_every_bad_kind(tmp_path, monkeypatch, kind):
    path = make_bad_image(kind, tmp_path, monkeypatch)
    with deadline(), pytest.raises(DataError, match=f"^{path}: cannot read image.*{BAD_KINDS[kind]}"):
        load_image(path)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_check_images_every_bad_kind(tmp_path, monkeypatch, capsys, kind, workers):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    bad = make_bad_image(kind, tmp_path, monkeypatch)
    good = json.dumps({"image": "good.png", "caption": "x"})
    path = write(tmp_path / "r.jsonl", [good, "", json.dumps({"image": bad.name, "caption": "y"}), good])
    records = read_records(path)
    with deadline(), pytest.raises(DataError, match=f"^{path}:3: {bad}: cannot read image.*{BAD_KINDS[kind]}"):
        data.check_images(path, records, workers=workers)
    with deadline():
        kept = data.check_images(path, records, skip_bad=True, workers=workers)
    assert [r["line"] for r in kept] == [1, 4]
    summary, = capsys.readouterr().err.strip().splitlines()  # one line, naming the first bad image
    assert summary.startswith(f"{path}: 2 records kept, 1 with a bad image skipped (the first: {path}:3: {bad}: ")
    with deadline(), pytest.raises(DataError, match=f"^{path}: no records left: 1 with a bad image skipped"):
        data.check_images(path, records[1:2], skip_bad=True, workers=workers)


def test_check_images_keeps_order(world):
    records = read_records(world / "train.jsonl", captions=M)
    assert data.check_images(world / "train.jsonl", records, workers=2) == records
    assert data.check_images(world / "train.jsonl", records, workers=1) == records


def test_check_cli(world, tmp_path, monkeypatch, capsys):
    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["data.py", *argv])
        with deadline(), pytest.raises(SystemExit) as e:
            data.main()
        return e.value.code, capsys.readouterr()

    code, out = run("--check", str(world / "val.jsonl"), "--captions", str(M))
    assert code == 0 and "8 good records, 0 bad" in out.out and "slot1" in out.out  # numbered slots
    bad = write(tmp_path / "bad.jsonl", ['{"image": "nowhere.png", "caption": "x"}',
                                         '{"image": "a.png", "caption": "y"}'])
    code, out = run("--check", str(bad))
    assert code.startswith(f"error: {bad}:1: {tmp_path / 'nowhere.png'}: cannot read image")
    code, out = run("--check", str(bad), "--skip-bad")
    assert code.startswith(f"error: {bad}: no records left: 2 with a bad image skipped (the first: {bad}:1: ")
    bad = write(tmp_path / "bad.jsonl", ['{"image": "nowhere.png", "caption": ["x", "y"]}', "{", GOOD.replace(
        "a.png", str(world / "images" / "000000.png")), '{"image": "a.png", "caption": "y"}'])  # bad: 1, 2 and 4
    code, out = run("--check", str(bad), "--skip-bad", "--captions", "2")
    assert code == 1 and "1 good records, 3 bad" in out.out and out.err.startswith(f"{bad}:2: malformed JSON")
    assert f"1 with a bad image skipped (the first: {bad}:1: " in out.err
    code, out = run("--check", str(write(tmp_path / "empty.jsonl", [""])))
    assert code == f"error: {tmp_path / 'empty.jsonl'}: no records (an empty file, blank lines or a header only)"
    mixed = write(tmp_path / "mixed.jsonl", [json.dumps({"image": str(world / "images" / "000000.png"),
                                                         "caption": ["a"] * n}) for n in (2, 2, 3)])
    code, out = run("--check", str(mixed))
    assert code == f"error: {mixed}: mixed caption counts (2 records with 2, 1 with 3); give --captions M"
    for kind in BAD_KINDS:  # every bad kind is counted, none hangs
        make_bad_image(kind, tmp_path, monkeypatch)
    kinds = write(tmp_path / "kinds.jsonl", [json.dumps({"image": f"{k}.png", "caption": "x"}) for k in BAD_KINDS])
    code, out = run("--check", str(kinds), "--skip-bad")
    assert code.startswith(f"error: {kinds}: no records left: {len(BAD_KINDS)} with a bad image skipped")


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
    assert max(len(tok.encode(scene_texts(worst, rng)[SLOTS.index("detail")])) + 2 for _ in range(50)) <= 32


def test_tokenizer_save_load(tok, tmp_path):
    tok.save(tmp_path / "tok.json")
    torch.save({"tokenizer": tok.to_dict()}, tmp_path / "ckpt.pt")
    restored = Tokenizer.from_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"])
    for other in (Tokenizer.load(tmp_path / "tok.json"), restored):
        assert other.vocab_size == 400 and other.merges == tok.merges
        assert torch.equal(other.tokenize(world_captions(5)), tok.tokenize(world_captions(5)))


@pytest.mark.parametrize("text, message", [
    ("{not json", "not JSON"),
    ("[257, 258]", "needs 'vocab_size' and 'merges'"),
    ('{"merges": []}', "needs 'vocab_size' and 'merges'"),
    ('{"vocab_size": 400, "merges": [[1]]}', "merges must be pairs of earlier ids: merge 0 is \\[1\\]"),
    ('{"vocab_size": 400, "merges": [[1, 2], ["a", "b"]]}', "merge 1 is \\['a', 'b'\\]"),
    ('{"vocab_size": 400, "merges": [[1, 258]]}', "merge 0 is \\[1, 258\\]"),  # id 258 is made by merge 1
    ('{"vocab_size": 260, "merges": [[1, 2], [3, 4]]}', "vocab_size 260 is too small for 2 merges"),
    ('{"vocab_size": "big", "merges": []}', "vocab_size must be an integer, got 'big'"),
])
def test_tokenizer_load_names_the_file(tmp_path, text, message):
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(DataError, match=f"^{tmp_path / 'tokenizer.json'}: not a tokenizer: .*{message}"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_symlinked_data_uses_its_own_tokenizer_and_images(world, tmp_path):
    (tmp_path / "link.jsonl").symlink_to(world / "train.jsonl")
    assert data.tokenizer_path(tmp_path / "link.jsonl") == os.path.realpath(world / "tokenizer.json")
    records = read_records(tmp_path / "link.jsonl")
    assert records == read_records(world / "train.jsonl")  # the images beside the data, not beside the link
    beside = Tokenizer.beside(tmp_path / "link.jsonl", records, vocab_size=300)
    assert beside.to_dict() == Tokenizer.load(world / "tokenizer.json").to_dict()


# -----------------------------------------------------------------------------
# dataset and loaders

@pytest.fixture(scope="module")
def dataset(world):
    records = read_records(world / "train.jsonl", captions=M)
    return ImageTextDataset(records, Tokenizer.load(world / "tokenizer.json"), 64, train=True, context_length=48)


def test_loader_shapes(dataset):
    batches = list(make_loader(dataset, 5, train=True))
    assert len(batches) == 4  # 24 // 5: drop_last
    images, tokens = batches[0]
    assert images.shape == (5, 3, 64, 64) and images.dtype == torch.float32
    assert tokens.shape == (5, M, 48) and tokens.dtype == torch.long
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
