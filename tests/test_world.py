"""Tests of prepare/world.py, the synthetic world: same seed, same bytes (also for a sample made in this process);
world.json and world_mismatch; the command line never overwrites a dataset; every attribute the texts name is
measured from the pixels (colours, background, pattern, style, masks, the main object's position and size); the
texts are consistent with the labels, and the alt-text is myopic.

    python -m pytest -q tests/test_world.py
"""
import json
import os
import random
import sys
from collections import Counter

import numpy as np
import pytest

from data import Tokenizer, load_image, read_records
import prepare.world
from prepare.world import (COLOURS, PATTERNS, POSITIONS, SHAPES, SLOTS, STYLES, human_captions, main_object, make_world,
                           render_scene, sample_scene, scene_labels, scene_masks, scene_texts)

M = len(SLOTS)  # texts per image: a new perspective changes it here only


both_sides = pytest.mark.parametrize("S", [32, 64])  # the default world's image side, and the earlier one


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
# the world on disk

def test_same_seed_same_bytes(world, tmp_path):
    make_world(str(tmp_path / "a"), train_size=24, val_size=8, seed=1)  # a second run, elsewhere
    make_world(str(tmp_path / "b"), train_size=24, val_size=8, seed=2)
    names = ["world.json", "train.jsonl", "val.jsonl", "tokenizer.json"] + [f"images/{i:06d}.png" for i in range(32)]
    for name in names:
        assert (world / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name
    assert (world / "train.jsonl").read_bytes() != (tmp_path / "b" / "train.jsonl").read_bytes()
    alone = prepare.world._make_sample((5, 1, 32, False, str(tmp_path / "b"), False))  # in this process, not a worker
    assert json.dumps(alone) + "\n" == (world / "train.jsonl").read_text().splitlines(keepends=True)[5]
    alone = prepare.world._make_sample((25, 1, 32, False, str(tmp_path / "b"), True))  # a val image: its held-out texts
    assert json.dumps(alone) + "\n" == (world / "val.jsonl").read_text().splitlines(keepends=True)[1]


def test_world_json_and_mismatch(world, tmp_path, monkeypatch):
    """world.json records the generator's version and arguments; world_mismatch says why a folder is not the world
    asked for, or None."""
    version, mismatch = prepare.world.WORLD_VERSION, prepare.world.world_mismatch
    assert json.loads((world / "world.json").read_text()) == {
        "version": version, "train_size": 24, "val_size": 8, "image_size": 32, "seed": 1, "vocab_size": 1024,
        "scenes": False}
    assert mismatch(str(world), train_size=24, val_size=8, seed=1) is None
    assert mismatch(str(world), train_size=24, val_size=8, seed=1, scenes=True) == (
        f"{world} was written with scenes False, not True")
    assert mismatch(str(world), train_size=24, val_size=8, seed=0) == f"{world} was written with seed 1, not 0"
    assert mismatch(str(world)) == f"{world} was written with train_size 24, not 20000"  # make_world's defaults
    provenance = json.loads((world / "world.json").read_text())
    del provenance["scenes"]  # a world.json from before an argument existed: the argument's default was used
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train.jsonl").write_text("")
    (tmp_path / "w" / "world.json").write_text(json.dumps(provenance))
    assert mismatch(str(tmp_path / "w"), train_size=24, val_size=8, seed=1) is None
    monkeypatch.setattr(prepare.world, "WORLD_VERSION", version + 1)  # the generator changed since
    assert mismatch(str(world), train_size=24, val_size=8, seed=1) == (
        f"{world} was written by world version {version}, not {version + 1}")
    old = tmp_path / "old"  # a world from before world.json
    old.mkdir()
    (old / "train.jsonl").write_text("")
    assert mismatch(str(old)) == f"{old} has no world.json (written by an older version)"
    (old / "world.json").write_text("{")
    assert mismatch(str(old)).startswith(f"{old / 'world.json'} is not valid JSON")
    with pytest.raises(TypeError):
        mismatch(str(world), size=3)  # a misspelt argument is an error, not a silent match


def test_scene_types_tie_background_style_and_shapes():
    """--scenes: every scene's pattern, style, background colour and shapes belong to one scene type, all four
    types occur; without it, 200 scenes break that tie (the default world's background is independent)."""
    def fits(scene, kind):
        return (scene["background"]["pattern"] == kind["pattern"] and scene["style"] == kind["style"]
                and scene["background"]["colour"] in kind["colours"]
                and all(o["shape"] in kind["shapes"] for o in scene["objects"]))
    types = prepare.world.SCENE_TYPES
    seen = [[i for i, kind in enumerate(types) if fits(sample_scene(random.Random(n), 64, scenes=True), kind)]
            for n in range(200)]
    assert all(len(s) == 1 for s in seen) and {s[0] for s in seen} == set(range(len(types)))
    assert sum(any(fits(sample_scene(random.Random(n), 64), kind) for kind in types) for n in range(200)) < 50


def test_world_json_before_train_jsonl(tmp_path, monkeypatch):
    """train.jsonl, the mark of a complete world, is written last; a stale one goes before anything is rewritten."""
    order = []
    real = prepare.world.write_splits
    monkeypatch.setattr(prepare.world, "write_splits", lambda out, *a: order.append(sorted(os.listdir(out)))
                        or real(out, *a))
    (tmp_path / "train.jsonl").write_text("stale\n")
    make_world(str(tmp_path), train_size=4, val_size=2, seed=3)
    assert order == [["images", "world.json"]]
    assert prepare.world.world_mismatch(str(tmp_path), train_size=4, val_size=2, seed=3) is None
    (tmp_path / "train.jsonl").unlink()  # as after an interrupted run
    assert prepare.world.world_mismatch(str(tmp_path), train_size=4, val_size=2, seed=3) == (
        f"{tmp_path} has no train.jsonl (no world yet, or an interrupted run)")


@pytest.mark.parametrize("existing", ["train.jsonl", "val.jsonl"])
def test_cli_refuses_an_existing_dataset(tmp_path, monkeypatch, capsys, existing):
    (tmp_path / existing).write_text("precious\n")
    monkeypatch.setattr(sys, "argv", ["world.py", "--out", str(tmp_path), "--train-size", "4", "--val-size", "2"])
    with pytest.raises(SystemExit) as e:
        prepare.world.main()
    assert e.value.code == (f"error: {tmp_path} already holds a dataset ({existing}): remove it or choose another "
                            "--out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]  # nothing written, nothing lost
    assert (tmp_path / existing).read_text() == "precious\n"


def test_records_on_disk_match_their_scenes(world):
    train, val = read_records(world / "train.jsonl", captions=M), read_records(world / "val.jsonl", captions=M)
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


@both_sides
def test_object_colours_visible(S):
    """Each object's mean colour is nearest to its own named colour, among all named colours rendered in the same
    style (a swatch: a plain background of that colour with no objects)."""
    hits = Counter()
    for scene in random_scenes(300, S=S):
        swatches = {c: pixels({**scene, "background": {"colour": c, "pattern": "plain"}, "objects": []}).mean((0, 1))
                    for c in COLOURS}
        x, masks = pixels(scene), scene_masks(scene)
        for i, obj in enumerate(scene["objects"]):
            mean = x[eroded(masks == i + 1)].mean(0)
            nearest = min(swatches, key=lambda c: np.linalg.norm(swatches[c] - mean))
            hits[scene["style"], nearest == obj["colour"]] += 1
    for style in STYLES:
        assert hits[style, False] == 0, (style, hits)


@both_sides
def test_background_colour_visible(S):
    for scene in random_scenes(200, S=S):
        if scene["background"]["pattern"] in ("plain", "dots"):
            swatches = {c: pixels({**scene, "background": {"colour": c, "pattern": "plain"}, "objects": []})
                        .mean((0, 1)) for c in COLOURS}
            median = np.median(pixels(scene)[scene_masks(scene) == 0], 0)  # the dots are a minority
            assert min(swatches, key=lambda c: np.linalg.norm(swatches[c] - median)) == scene["background"]["colour"]


@both_sides
def test_patterns_visible(S):
    """Without objects and in the vivid style: plain is flat, stripes vary only across x, the gradient only along y
    (in small steps), checker and dots along both (checker half second tone, dots a minority)."""
    for colour in COLOURS:
        for pattern in PATTERNS:
            scene = {"image_size": S, "background": {"colour": colour, "pattern": pattern}, "style": "vivid",
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


@both_sides
def test_styles_visible(S):
    for scene in random_scenes(30, S=S):
        x = {s: pixels({**scene, "style": s}) for s in STYLES}
        assert x["dark"].mean() < x["vivid"].mean() < x["pastel"].mean()
        assert high_freq(x["blurred"]) < high_freq(x["vivid"]) < high_freq(x["noisy"])


@both_sides
def test_masks_are_the_painted_pixels(S):
    for scene in random_scenes(100, S=S):
        scene = {**scene, "style": "vivid"}  # no style: the painted colours are exact
        x, masks = pixels(scene), scene_masks(scene)
        assert np.array_equal(x[masks == 0], np.rint(prepare.world.background(scene))[masks == 0])
        for i, obj in enumerate(scene["objects"]):
            assert (masks == i + 1).sum() > 20 * (S / 64) ** 2  # drawn, never hidden by the objects above it
            assert np.all(x[masks == i + 1] == COLOURS[obj["colour"]])


@both_sides
def test_main_object_position_and_size_visible(S):
    sides = {"small": [], "large": []}
    for scene in random_scenes(300, S=S):
        main = prepare.world.main_object(scene)
        ys, xs = np.nonzero(scene_masks(scene) == scene["objects"].index(main) + 1)
        cell = int(ys.mean() // (S / 3)) * 3 + int(xs.mean() // (S / 3))  # 3 x 3 grid cell of the centroid
        assert POSITIONS[cell] == main["position"]
        sides[main["size"]].append(max(np.ptp(ys), np.ptp(xs)) + 1)
    assert max(sides["small"]) + 5 * S / 64 < min(sides["large"]), sides  # a visible gap between the sizes


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
        text = dict(zip(SLOTS, texts))  # by name: a new slot leaves these checks as they are
        alt, detail, nouns, background, main, style = (text[s] for s in
                                                       ["alt", "detail", "nouns", "background", "main", "style"])
        assert len(alt.split()) <= 3
        alts[any(o["shape"] in alt for o in scene["objects"])] += 1
        for o in scene["objects"]:
            assert f"{o['size']} {o['colour']} {o['shape']} at {o['position']}" in detail
            assert o["shape"] in nouns
        assert len(nouns.split(",")) == len(scene["objects"])
        assert f"{labels['bg_colour']} {labels['bg_pattern']}" in detail and labels["style"] in detail
        assert labels["bg_colour"] in background and labels["bg_pattern"] in background
        assert f"{labels['main_colour']} {labels['main_shape']}" in main
        assert labels["style"] in style and not any(s in style for s in SHAPES)
    assert 0.2 < alts[True] / 500 < 0.6  # the alt-text names an object only sometimes: myopic


def test_held_out_captions_are_independent_and_fit():
    """The val images' five held-out captions: never a training text of any image (all six slots of 3,000 scenes,
    their own included), each naming its main object's shape and colour, none longer than the tiny preset's 32
    tokens with the world's tokenizer (trained without them); only val records carry them."""
    tok = Tokenizer.train([c for i in range(500) for c in scene_texts(*_scene(i))], 1024)
    training, held = set(), []
    for i in range(3000):
        scene, rng = _scene(i)
        training.update(scene_texts(scene, rng))
        held.append((scene, human_captions(scene, random.Random(f"0:{i}:human"))))
    assert all(len(captions) == 5 for _, captions in held)
    assert not {c for _, captions in held for c in captions} & training
    for scene, captions in held:
        main = main_object(scene)
        assert all(f"{main['colour']} {main['shape']}" in c or f"{main['size']} {main['colour']} {main['shape']}" in c
                   for c in captions), captions
    assert max(len(tok.encode(c)) + 2 for _, captions in held for c in captions) <= 32


def _scene(i):
    rng = random.Random(f"0:{i}")
    return sample_scene(rng, 64), rng


def test_only_val_records_have_held_out_captions(world):
    train = [json.loads(line) for line in open(world / "train.jsonl")]
    val = [json.loads(line) for line in open(world / "val.jsonl")]
    assert not any("human" in r for r in train) and all(len(r["human"]) == 5 for r in val)


def test_cli_names_an_out_it_cannot_write(tmp_path, monkeypatch):
    """An --out under a file: one line naming it, not a traceback."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sys, "argv", ["world.py", "--out", str(tmp_path / "file" / "w"), "--train-size", "4",
                                      "--val-size", "2"])
    with pytest.raises(SystemExit) as e:
        prepare.world.main()
    assert e.value.code == f"error: {tmp_path / 'file' / 'w'}: cannot write the world (Not a directory)"
