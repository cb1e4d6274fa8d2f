"""Tests of caption.py, the captioning stage, and of its scorer bench/caption_score.py, on a toy world
(about 30 s on 2 CPU cores):

    python -m pytest -q tests/test_caption.py

A micro captioner is trained to write one fixed text per prompt, so what it must write is known; the
resumed, the two-rank and the single-process generation runs are compared with each other; cleaning
and scoring are checked on hand-made strings and records with known answers; bad flags, checkpoints and
records, and a diverging run, stop with a message naming them.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import caption  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
from prepare import world  # noqa: E402

spec = importlib.util.spec_from_file_location("caption_score", os.path.join(ROOT, "bench", "caption_score.py"))
caption_score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caption_score)

# one fixed text per slot, in the world's own words (so caption_score can read them); slot 0 keeps the alt-text
FIXED = {"detail": "a small red circle at the top left on a blue plain background, vivid style",
         "nouns": "star, ring", "background": "a green dots background", "main": "a large pink heart",
         "style": "a pastel style picture"}
DETAIL2 = "a large blue ring at the centre on a red stripes background, dark style"
PROMPTS = ",".join(caption.SLOT_PROMPTS.values())  # detail,nouns,background,main,style
MICRO = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
             text_layers=1, text_heads=2, context_length=32, embed_dim=32, mlp_branch_layers=1)  # costs nothing


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models on a shared CPU: a second thread only adds waiting. Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 24 + 8 image world whose training texts are FIXED per slot, and two micro captioners trained on
    it: cap (FIXED) and cap2 (FIXED with another detail text, for gadget 2)."""
    root = tmp_path_factory.mktemp("toy")
    world.make_world(str(root), train_size=24, val_size=8, image_size=32, seed=1, vocab_size=300)
    records = [json.loads(line) for line in open(root / "train.jsonl")]
    vision_layers = {"cap": "0", "cap2": "1"}  # the default tower (the conv stem alone) and one ViT block
    for name, texts in (("cap", FIXED), ("cap2", {**FIXED, "detail": DETAIL2})):
        with open(root / f"{name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps({**r, "caption": r["caption"][:1] + list(texts.values())}) + "\n")
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(model.PRESETS, "micro", MICRO)
            caption.main(["train", "--data", str(root / f"{name}.jsonl"), "--out", str(root / name), "--model",
                          "micro", "--vision-layers", vision_layers[name], "--width", "64", "--heads", "2",
                          "--max-steps", "150", "--batch-size", "8", "--lr", "3e-3"])
    return root


def generate(root, out, *extra):
    caption.main(["generate", "--ckpt", str(root / "cap" / "captioner.pt"), "--data", str(root / "val.jsonl"),
                  "--prompts", PROMPTS, "--out", str(out), "--batch-size", "3", *extra])
    return open(out).read() if os.path.exists(out) else None  # ranks > 0 write only their part


# ----------------------------------------------------------------------------------------------------
# the captioner follows its prompt


def test_prompt_conditioning(toy, tmp_path):
    """Every prompt gets its own learned text (the image alone cannot tell them apart); slot 0 is the
    input's alt-text and the other keys of the record are kept."""
    out = [json.loads(line) for line in generate(toy, tmp_path / "g1.jsonl").splitlines()]
    val = [json.loads(line) for line in open(toy / "val.jsonl")]
    assert len(out) == len(val)
    for o, v in zip(out, val):
        assert o["caption"] == [v["caption"][0]] + list(FIXED.values())
        assert o["scene"] == v["scene"] and o["labels"] == v["labels"]
        assert os.path.samefile(tmp_path / o["image"], toy / v["image"])  # relative to the output file


def test_generate_through_a_symlinked_folder(toy, tmp_path):
    """--out in a folder reached through a link (at another depth than its target): the image paths are relative
    to the real folder, the one data.py reads them from, so the output reads back through either path."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b", target_is_directory=True)
    generate(toy, tmp_path / "link" / "g.jsonl")
    val = data.read_records(toy / "val.jsonl")
    for path in (tmp_path / "link" / "g.jsonl", tmp_path / "a" / "b" / "g.jsonl"):
        assert all(os.path.samefile(o["image"], v["image"]) for o, v in zip(data.read_records(path), val))


def test_gadget2_one_text_per_captioner(toy, tmp_path):
    out = generate(toy, tmp_path / "g2.jsonl", "--prompts", "detail", "--ckpt", str(toy / "cap2" / "captioner.pt"))
    val = [json.loads(line) for line in open(toy / "val.jsonl")]
    assert [json.loads(line)["caption"] for line in out.splitlines()] == [[v["caption"][0], FIXED["detail"], DETAIL2]
                                                                          for v in val]


def test_top_p_sampling(toy, tmp_path):
    """Sampling with a nucleus of one token is greedy decoding (a known special case)."""
    greedy = generate(toy, tmp_path / "greedy.jsonl")
    assert generate(toy, tmp_path / "sampled.jsonl", "--temperature", "1", "--top-p", "1e-6") == greedy


def test_checkpoint_loads_weights_only(toy):
    ckpt = torch.load(toy / "cap" / "captioner.pt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["prompts"] == list(FIXED)
    assert data.Tokenizer.from_dict(ckpt["tokenizer"]).vocab_size == ckpt["config"]["vocab_size"] == 300


# ----------------------------------------------------------------------------------------------------
# resumable, per-rank parts, merge in input order, valid records


def test_resume_appends_nothing_twice(toy, tmp_path):
    full = generate(toy, tmp_path / "full.jsonl")
    # a run killed after 3 images, in the middle of writing the 4th line
    lines = full.splitlines(keepends=True)
    (tmp_path / "cut.jsonl").write_text("".join(lines[:3]) + lines[3][:25])
    assert generate(toy, tmp_path / "cut.jsonl") == full
    assert generate(toy, tmp_path / "cut.jsonl") == full  # a finished output: nothing to do


def test_two_ranks_merge_in_input_order(toy, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "single")
    os.makedirs(tmp_path / "ranks")  # the same depth: the same relative image paths
    single = generate(toy, tmp_path / "single" / "out.jsonl")
    out = tmp_path / "ranks" / "out.jsonl"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")  # rank 1 first: it writes its part and leaves
    generate(toy, out)
    assert not out.exists() and len(open(f"{out}.part1").readlines()) == 4  # images 1, 3, 5, 7
    monkeypatch.setenv("RANK", "0")  # rank 0 writes its part, finds rank 1's complete, merges
    assert generate(toy, out) == single
    assert not os.path.exists(f"{out}.part0") and not os.path.exists(f"{out}.part1")


def test_output_passes_data_check(toy, tmp_path):
    generate(toy, tmp_path / "g.jsonl")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "--check", str(tmp_path / "g.jsonl"),
                          "--captions", str(len(world.SLOTS))], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "8 good records, 0 bad" in run.stdout


def test_learning_rate_schedules():
    """Known points: the warm-up ramp, const-cooldown's plateau up to 70 % and its linear fall (half the peak at
    85 %, zero at the end), cosine's half at mid-run."""
    const = SimpleNamespace(lr=1e-3, lr_scheduler="const-cooldown", cooldown=0.3)
    cosine = SimpleNamespace(lr=1e-3, lr_scheduler="cosine", cooldown=0.3)
    assert caption.learning_rate(const, 4, 10, 0.0) == pytest.approx(5e-4)      # step 5 of a 10-step warm-up
    for progress in (0.01, 0.3, 0.7):
        assert caption.learning_rate(const, 500, 10, progress) == pytest.approx(1e-3)
    assert caption.learning_rate(const, 500, 10, 0.85) == pytest.approx(5e-4)
    assert caption.learning_rate(const, 500, 10, 1.0) == pytest.approx(0, abs=1e-12)
    assert caption.learning_rate(cosine, 500, 10, 0.5) == pytest.approx(5e-4)
    assert caption.learning_rate(cosine, 500, 10, 0.3) < 1e-3


# ----------------------------------------------------------------------------------------------------
# what the command line refuses: a message naming the flag or the file (and line), exit status 1


def refused(*argv):
    """caption.main on a command line it must refuse -> its message. sys.exit(text) exits with status 1."""
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as stop:
        mp.setitem(model.PRESETS, "micro", MICRO)
        caption.main([str(a) for a in argv])
    assert isinstance(stop.value.code, str), stop.value.code
    return stop.value.code


def train_micro(toy, out, *extra):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(model.PRESETS, "micro", MICRO)
        caption.main(["train", "--data", str(toy / "cap.jsonl"), "--out", str(out), "--model", "micro",
                      "--width", "32", "--heads", "2", "--batch-size", "8", *extra])


@pytest.mark.parametrize("flags, named", [(["--max-steps", "0"], "--max-steps"), (["--max-steps", "-1"], "--max-steps"),
                                          (["--max-minutes", "0"], "--max-minutes"),
                                          (["--max-minutes", "-1"], "--max-minutes"),
                                          (["--cooldown", "0"], "--cooldown"), (["--cooldown", "1.5"], "--cooldown"),
                                          (["--batch-size", "0"], "--batch-size"),
                                          (["--prompts", "main,poem"], "--prompts")])
def test_train_flag_layer(tmp_path, flags, named):
    """Each flag that cannot work (0 steps became 3,000, -1 never ended) stops before anything is read."""
    msg = refused("train", "--data", tmp_path / "absent.jsonl", "--out", tmp_path / "cap", *flags)
    assert msg.startswith("error: ") and named in msg, msg


def test_train_short_runs_work(toy, tmp_path):
    """1..9 steps: the warm-up (a tenth of the run) is at least one step, not a division by zero. The same command
    again is refused before any step and the captioner is kept (a second run wrote over it); so is a file as --out."""
    train_micro(toy, tmp_path / "cap", "--max-steps", "5")
    kept = (tmp_path / "cap" / "captioner.pt").read_bytes()
    assert torch.load(tmp_path / "cap" / "captioner.pt", weights_only=True)["step"] == 5
    for out in (tmp_path / "cap", toy / "cap.jsonl"):
        msg = refused("train", "--data", toy / "cap.jsonl", "--out", out, "--max-steps", "1")
        assert msg.startswith(f"error: --out {out}: already holds a captioner.pt, or is a file"), msg
    assert (tmp_path / "cap" / "captioner.pt").read_bytes() == kept


def test_train_batch_larger_than_data(toy, tmp_path):
    """No full batch in the data looped forever without a word: a second process, so a hang is a failure."""
    run = subprocess.run([sys.executable, "caption.py", "train", "--data", str(toy / "cap.jsonl"), "--out",
                          str(tmp_path / "cap"), "--batch-size", "25", "--max-steps", "3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "error: " in run.stderr and "24 images" in run.stderr and "--batch-size 25" in run.stderr, run.stderr


def test_train_stops_on_non_finite_loss(toy, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train_micro(toy, tmp_path / "cap", "--max-steps", "12", "--lr", "inf")
    assert "non-finite loss at step" in str(stop.value.code), stop.value.code
    assert not os.path.exists(tmp_path / "cap" / "captioner.pt")


def test_train_never_writes_non_finite_weights(toy, tmp_path):
    """One step at an infinite learning rate: the loss was finite, the weights it leaves are not."""
    with pytest.raises(SystemExit) as stop:
        train_micro(toy, tmp_path / "cap", "--max-steps", "1", "--lr", "inf")
    assert "non-finite tensors" in str(stop.value.code), stop.value.code
    assert not os.path.exists(tmp_path / "cap" / "captioner.pt")


def test_generate_refuses_out_equal_to_data(toy, tmp_path):
    """Appending to the input itself would destroy its ground truth: refused whatever the spelling."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "val.jsonl").write_bytes((toy / "val.jsonl").read_bytes())
    os.symlink(tmp_path / "val.jsonl", tmp_path / "link.jsonl")
    for out in (tmp_path / "sub" / ".." / "val.jsonl", tmp_path / "link.jsonl"):
        msg = refused("generate", "--ckpt", toy / "cap" / "captioner.pt", "--data", tmp_path / "val.jsonl",
                      "--out", out)
        assert msg.startswith("error: ") and "--out" in msg and "--data" in msg, msg
    assert (tmp_path / "val.jsonl").read_bytes() == (toy / "val.jsonl").read_bytes()
    for top_p in ("0", "1.5"):  # no nucleus at all, or more than all of the mass
        msg = refused("generate", "--ckpt", toy / "cap" / "captioner.pt", "--data", tmp_path / "val.jsonl",
                      "--out", tmp_path / "g.jsonl", "--top-p", top_p)
        assert msg == f"error: --top-p {float(top_p)}: must be in (0, 1]", msg


@pytest.mark.parametrize("kind", ["text", "truncated", "clip"])
def test_generate_refuses_other_files_as_checkpoints(toy, tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "text":
        path.write_text("step 7\n")
    elif kind == "truncated":  # half of a real captioner.pt, as a copy cut short leaves it
        real = (toy / "cap" / "captioner.pt").read_bytes()
        path.write_bytes(real[:len(real) // 2])
    else:  # a train.py checkpoint: a real file of the wrong kind
        config = model.ModelConfig(**{**MICRO, "vocab_size": 300})
        torch.save({"model": model.HolisticCLIP(config).state_dict(), "config": asdict(config), "step": 1}, path)
    msg = refused("generate", "--ckpt", path, "--data", toy / "val.jsonl", "--out", tmp_path / "g.jsonl")
    assert msg.startswith(f"error: {path}: not a captioner checkpoint ("), msg
    assert not os.path.exists(tmp_path / "g.jsonl")


def copy_records(toy, name, path, change):
    """toy/name with absolute image paths, the third record changed by `change`, written to path."""
    records = [json.loads(line) for line in open(toy / name)]
    for r in records:
        r["image"] = str(toy / r["image"])
    change(records[2])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_records_stop_up_front(toy, tmp_path):
    """A record whose image cannot be read (a text file, a FIFO that would block a reader forever) or whose
    caption count differs: train and generate stop with FILE:LINE before the long part."""
    (tmp_path / "text.png").write_text("not an image")
    os.mkfifo(tmp_path / "fifo.png")
    for image in ("text.png", "fifo.png"):
        bad = copy_records(toy, "cap.jsonl", tmp_path / "bad.jsonl", lambda r: r.update(image=str(tmp_path / image)))
        msg = refused("train", "--data", bad, "--out", tmp_path / "cap", "--model", "micro", "--max-steps", "2")
        assert msg.startswith(f"error: {bad}:3: ") and image in msg, msg
        bad = copy_records(toy, "val.jsonl", tmp_path / "bad.jsonl", lambda r: r.update(image=str(tmp_path / image)))
        msg = refused("generate", "--ckpt", toy / "cap" / "captioner.pt", "--data", bad, "--out", tmp_path / "g.jsonl")
        assert msg.startswith(f"error: {bad}:3: ") and image in msg, msg
    mixed = copy_records(toy, "val.jsonl", tmp_path / "mixed.jsonl", lambda r: r.update(caption=r["caption"][:2]))
    msg = refused("generate", "--ckpt", toy / "cap" / "captioner.pt", "--data", mixed, "--out", tmp_path / "g.jsonl")
    assert msg.startswith(f"error: {mixed}:3: "), msg
    assert not os.path.exists(tmp_path / "cap") and not os.path.exists(tmp_path / "g.jsonl")


# ----------------------------------------------------------------------------------------------------
# cleaning


def test_cleaning_rules():
    assert caption.degenerate("a red a red a red a red")
    assert caption.degenerate("stripes stripes stripes stripes background")
    assert not caption.degenerate("circle, circle, circle")  # three circles: a legal nouns text
    assert not caption.degenerate("a small red circle at the top and a small red star at the left")
    assert not caption.acceptable("", [])
    assert not caption.acceptable("Red Circle", ["an alt", "red circle"])  # duplicate, ignoring case
    assert caption.acceptable("a red circle", ["red circle"])


def test_ground_truth_texts_are_never_degenerate():
    rng = random.Random(0)
    for _ in range(300):
        assert not any(caption.degenerate(t) for t in world.scene_texts(world.sample_scene(rng), rng))


class Scripted:
    """Stands in for a Captioner: returns scripted texts, the greedy call first, then each sampled retry."""

    def __init__(self, tok, script):
        self.tok, self.script, self.calls = tok, script, []
        self.config = caption.CaptionerConfig({}, ["main"], tok.vocab_size)

    def generate(self, memory, prompt_ids, temperature, top_p):
        self.calls.append(temperature)
        texts = self.script.pop(0)
        assert len(texts) == len(prompt_ids)  # only the images that still need a text are asked again
        ids = [self.tok.encode(t) + [self.tok.eot] for t in texts]
        return torch.tensor([i + [self.tok.pad] * (40 - len(i)) for i in ids])


def test_fallback_chain():
    """Greedy first; empty, looping or duplicate texts are sampled again (temperature 1) up to RETRIES
    times; what is still bad becomes the image's first caption."""
    tok = data.Tokenizer.train(["a red circle and a blue star"], 300)
    earlier = [["alt zero"], ["alt one"], ["alt two"], ["alt three"]]
    script = [["a red circle", "", "star star star star", "Alt Three"],  # greedy: 3 bad
              ["a blue star", "", "star star star star"],                # retry 1 of images 1, 2, 3
              ["", "red"],                                               # retry 2 of images 1, 2
              ["star"]]                                                  # retry 3 of image 2
    net = Scripted(tok, script)
    counts = {"retried": 0, "fallback": 0}
    args = SimpleNamespace(device="cpu", temperature=0.0, top_p=0.9)
    memory = [[torch.zeros(4, 1, 1, 1)] * 2]
    out = caption.caption_texts(net, tok, memory, "main", earlier, args, counts)
    assert out == ["a red circle", "a blue star", "star", "red"]
    assert net.calls == [0.0, 1.0, 1.0, 1.0] and counts == {"retried": 6, "fallback": 0}
    net = Scripted(tok, [["", "alt one"]] + [["", "alt one"]] * caption.RETRIES)
    counts = {"retried": 0, "fallback": 0}
    out = caption.caption_texts(net, tok, [[torch.zeros(2, 1, 1, 1)] * 2], "main", earlier[:2], args, counts)
    assert out == ["alt zero", "alt one"] and counts["fallback"] == 2  # the first caption (a duplicate: last resort)


# ----------------------------------------------------------------------------------------------------
# caption_score: bench/caption_score.py, the scorer of generated texts


def test_score_known_accuracy(tmp_path):
    """Two hand-made scenes: every perspective right on one image and wrong on the other (detail: the
    objects' intersection over union, 1 right of 2 true and 3 written: 1 / 4)."""
    scene = {"image_size": 64, "background": {"colour": "blue", "pattern": "dots"}, "style": "pastel",
             "objects": [{"shape": "heart", "colour": "red", "size": "large", "position": "top left"},
                         {"shape": "ring", "colour": "white", "size": "small", "position": "centre"}]}
    right = ["IMG_0001.png", "a large red heart at the top left and a small white ring at the centre",
             "rings, heart", "the background is blue with a dots pattern", "the main object is a red heart",
             "the picture looks pastel, soft"]
    wrong = ["art", "a large red heart at the top left, a small white ring at the bottom and a small red star at "
             "the top", "heart", "a blue stripes background", "a red ring", "a vivid style picture"]
    results = score(tmp_path, scene, [right, wrong])
    assert results["slot1/detail"] == pytest.approx((1 + 1 / 4) / 2)
    for m, name in enumerate(["nouns", "background", "main", "style"], 2):
        assert results[f"slot{m}/{name}"] == 0.5, name


def test_score_diversity(tmp_path):
    """Word-set Jaccard of the generated texts (slot 0, the alt-text, left out): {a, vivid, style} and
    {a, dark, style} share 2 of 4 words."""
    scene = {"image_size": 64, "background": {"colour": "blue", "pattern": "dots"}, "style": "vivid",
             "objects": [{"shape": "heart", "colour": "red", "size": "large", "position": "top left"}]}
    results = score(tmp_path, scene, [["heart", "a vivid style", "A dark style."]], "alt,style,style")
    assert results == {"slot1/style": 1.0, "slot2/style": 0.0, "diversity/jaccard": 0.5}


def score(folder, scene, captions, *slots):
    """bench/caption_score.py on generated records with `captions`, against truth records with `scene`."""
    for name, records in (("truth.jsonl", [{"image": f"{i}.png", "caption": "x", "scene": scene} for i in
                                           range(len(captions))]),
                          ("gen.jsonl", [{"image": f"{i}.png", "caption": c} for i, c in enumerate(captions)])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return caption_score.main(["--data", str(folder / "gen.jsonl"), "--truth", str(folder / "truth.jsonl")]
                              + (["--slots", *slots] if slots else []))


def test_score_no_records(tmp_path):
    """An empty generated file (or only blank lines) divided by zero: now one line and exit status 1."""
    (tmp_path / "gen.jsonl").write_text("\n\n")
    (tmp_path / "truth.jsonl").write_text("")
    with pytest.raises(SystemExit) as stop:
        caption_score.main(["--data", str(tmp_path / "gen.jsonl"), "--truth", str(tmp_path / "truth.jsonl")])
    assert stop.value.code.startswith(f"error: {tmp_path / 'gen.jsonl'}: no records"), stop.value.code


def test_score_of_ground_truth_is_perfect(toy):
    results = caption_score.main(["--data", str(toy / "val.jsonl"), "--truth", str(toy / "val.jsonl")])
    assert all(v == 1.0 for k, v in results.items() if k.startswith("slot"))


def test_help_names_train_and_generate_only(capsys):
    """The scorer lives in bench/caption_score.py: caption.py's --help points there and has no score command."""
    with pytest.raises(SystemExit) as stop:
        caption.main(["--help"])
    help_text = capsys.readouterr().out
    assert stop.value.code == 0 and "{train,generate}" in help_text and "bench/caption_score.py" in help_text
