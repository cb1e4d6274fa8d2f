"""How good the texts written by caption.py are, on the synthetic world (results/captioner.md).

Two measurements per generated jsonl:
- accuracy per perspective: each text is read with the world's own vocabulary (prepare/world.py) and compared with
  the scene it describes. main: the main object's shape and colour, and no other; background: its pattern
  and colour; style: the style word; nouns: the set of shapes; detail: the objects written as the world
  writes them ("SIZE COLOUR SHAPE at (the) POSITION"), the intersection over union of the true and the
  written objects. Each is the mean over images, in [0, 1]; the alt-text slot is not scored.
- diversity, the paper's figure (paper.md section 1): the mean pairwise similarity of an image's generated
  texts, lower = more diverse (the paper: 0.48 with several prompts, 0.58 with several captioners). Here the
  word-set Jaccard always, and with --ckpt the cosine of the texts in a HolisticCLIP text tower.

    python bench/caption_score.py --data runs/cap/g1.jsonl --truth data/shapes5k/val.jsonl [--ckpt runs/NAME/ckpt.pt]
    python bench/caption_score.py --data runs/cap/g2.jsonl --truth data/shapes5k/val.jsonl --slots alt,detail,detail
    python -m pytest -q tests/test_caption.py          # its tests are in the "caption_score" section

--slots names what each caption slot holds (default: alt, then the world's prompts, as caption.py writes
them). Letters: M texts per image, E joint embedding dim.
"""
import argparse
import os
import re
import sys

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import caption  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
from prepare import world  # noqa: E402


def mentioned(text, names):
    """The names of a vocabulary (world.SHAPES, ...) that `text` mentions, in order: whole words, longest
    name first ("top left" before "top"), plurals allowed ("circles", "crosses")."""
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    return re.findall(rf"\b({alternatives})(?:e?s)?\b", text.lower())


def correct(perspective, text, scene):
    """How right one text is about its scene, in [0, 1], read with the world's vocabulary (prepare/world.py)."""
    main, bg, objects = world.main_object(scene), scene["background"], scene["objects"]
    shapes, colours = set(mentioned(text, world.SHAPES)), set(mentioned(text, world.COLOURS))
    if perspective == "main":  # the main object's shape and colour, and no other
        return float(shapes == {main["shape"]} and colours == {main["colour"]})
    if perspective == "background":
        return float(set(mentioned(text, world.PATTERNS)) == {bg["pattern"]} and colours == {bg["colour"]})
    if perspective == "style":
        return float(set(mentioned(text, world.STYLES)) == {scene["style"]})
    if perspective == "nouns":  # the set of shapes (how many of each is not asked)
        return float(shapes == {o["shape"] for o in objects})
    assert perspective == "detail", f"no accuracy rule for perspective {perspective!r}"
    # the objects written as the world writes them, "SIZE COLOUR SHAPE at (the) POSITION"; each true object
    # may match one written object: the intersection over union of the true and the written objects
    size, colour, shape, position = [rf"({'|'.join(sorted(v, key=len, reverse=True))})" for v in
                                     (world.SIZES, world.COLOURS, world.SHAPES, world.POSITIONS)]
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
    """Print and return {"slot{m}/{perspective}": accuracy, "diversity/jaccard", ["diversity/text_cosine"]}."""
    generated = data.read_records(args.data)
    if not generated:  # nothing to average over
        raise data.DataError(f"{args.data}: no records")
    truth = {os.path.realpath(r["image"]): r for r in data.read_records(args.truth)}  # "a/../b" == "b"
    slots = args.slots.split(",") if args.slots else ["alt"] + list(caption.SLOT_PROMPTS.values())
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="generated jsonl")
    p.add_argument("--truth", required=True, help="the world's jsonl with the scenes")
    p.add_argument("--slots", default=None, help="what each caption slot holds (default: alt + the world's prompts)")
    p.add_argument("--ckpt", default=None, help="a HolisticCLIP checkpoint: also text-tower diversity")
    p.add_argument("--device", default="cpu", help="for the --ckpt text tower")
    try:
        return score(p.parse_args(argv))
    except data.DataError as e:  # an empty or bad file: its message names it (and the line), exit status 1
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
