"""Each image branch alone on the held-out captions. The official score averages the K branch cosines; here each
branch k also scores alone (eval.py's score with an int), so a table shows whether one branch knows what a caption
written apart from the training texts says, and how much the mean over K loses against it. One row per run:
held-out image->text R@1 (%) with the mean, then with each branch, named by the world's slots when every run has
K = 6, numbered otherwise.

    python results/branches.py runs/ablation32/m2m-cls-s* runs/ablation32/o2m-s0
    python results/branches.py runs/ablation32/m2m-cls-scenes-s* --data data/scenes/val.jsonl
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: data.py, eval.py
import data  # noqa: E402
import eval as ev  # noqa: E402
from prepare.world import SLOTS  # noqa: E402


def branch_recalls(model, tok, val, device="cpu"):
    """A HolisticCLIP, its tokenizer and a split with held-out captions -> [mean, branch 0, ..., branch K-1], each
    the held-out image->text R@1 (%) under eval.py's protocol (the duplicate rule included)."""
    dataset = data.ImageTextDataset(data.read_records(val), tok, model.config.image_size,
                                    context_length=model.config.context_length)
    img, _ = ev.embed_split(model, dataset, device=device)  # (n, K, E)
    held = ev.held_out(model, dataset, tok, device=device)  # (n, H, E) and their text ids
    if held is None:
        raise data.DataError(f"{val}: not every record has held-out captions (prepare/world.py writes them)")
    txt, ids = held
    return [ev.retrieval_metrics(img, txt, how, ks=(1,), text_ids=ids)["i2t_R@1"]
            for how in ["mean", *range(img.shape[1])]]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders holding ckpt.pt")
    p.add_argument("--data", default="data/shapes/val.jsonl", help="the split to rank, with its held-out captions")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    try:
        rows = {run: branch_recalls(*ev.load_checkpoint(str(Path(run) / "ckpt.pt"), args.device)[1:], args.data,
                                    args.device) for run in args.runs}
    except data.DataError as e:
        sys.exit(f"error: {e}")
    K = max(len(r) for r in rows.values()) - 1
    named = all(len(r) == len(SLOTS) + 1 for r in rows.values())  # with a K = 4 run beside, slot 2 is not "nouns"
    names = [f"{k} {SLOTS[k]}" if named else str(k) for k in range(K)]
    print("| run | mean | " + " | ".join(f"branch {n}" for n in names) + " |")
    print("|---" * (K + 2) + "|")
    for run, r in rows.items():
        print(f"| {Path(run).name} | " + " | ".join(f"{x:.1f}" for x in r) + " |" + " - |" * (K + 1 - len(r)))
