"""The ablation tables: runs side by side as one markdown table, from each run's latest results.jsonl line
(written by eval.py, or by train.py's final evaluation). The tables in results/ablation.md are its output.

    python results/compare.py runs/ablation/o2o-s* runs/ablation/m2m-cls-s*
    python results/compare.py runs/A/results.jsonl runs/B            # a run folder or its results file

Runs named alike but for a final "-s<seed>" are one row: the mean ± standard deviation over their seeds,
with the number of seeds in the "seeds" column. A run without results yet (still training: no results.jsonl,
or an empty one) is left out with a note on stderr. Columns: retrieval R@1 both ways, the best single branch
read alone, image->text R@1 per caption slot, zero-shot top-1 per label kind, dense mIoU (all in %), the mean
inter-branch cosine.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch


def compare(runs, file=sys.stdout):
    """Run folders or results.jsonl files -> the markdown table on `file`, one row per run (seeds merged)."""
    groups = {}  # row name -> the latest results of each of its seeds
    for run in runs:
        path = Path(run) / "results.jsonl" if Path(run).is_dir() else Path(run)
        lines = [line for line in open(path) if line.strip()] if path.exists() else []  # just created: empty
        if not lines:
            print(f"{path}: no results yet, left out", file=sys.stderr)
            continue
        latest = json.loads(lines[-1])  # the newest evaluation
        latest["best_branch/i2t_R@1"] = max((v for k, v in latest.items()
                                             if k.startswith("branch") and k.endswith("/i2t_R@1")), default=None)
        groups.setdefault(re.sub(r"-s\d+$", "", path.parent.name), []).append(latest)
    # the columns: fixed ones, then whatever slots (in slot order) and label kinds the runs have
    every = {k for rs in groups.values() for r in rs for k in r}
    keys = ["i2t_R@1", "t2i_R@1", "best_branch/i2t_R@1"]
    keys += sorted((k for k in every if k.startswith("slot") and k.endswith("/i2t_R@1")), key=lambda k: int(k[4:-8]))
    keys += sorted(k for k in every if k.startswith("zs/") and k.endswith("/top1"))
    keys += ["dense_miou", "inter_branch_cos"]

    def cell(values, digits):  # "mean", or "mean ± sample standard deviation" over seeds; "-" when absent
        v = torch.tensor([x for x in values if x is not None], dtype=torch.float64)
        return "-" if not len(v) else f"{v.mean():.{digits}f}" + (f" ± {v.std():.{digits}f}" if len(v) > 1 else "")
    header = ["run", "seeds"] + [k.removesuffix("/top1").removesuffix("_R@1").replace("/", " ").replace("_", " ")
                                 for k in keys]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), file=file)
    for name, rs in groups.items():
        cells = [cell([r.get(k) for r in rs], 3 if k == "inter_branch_cos" else 1) for k in keys]  # cosine vs %
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |", file=file)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (runs/NAME) or their results.jsonl files")
    compare(p.parse_args().runs)
