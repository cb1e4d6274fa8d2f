"""The ablation's tables and the README's claims table, from the runs' evaluations (eval.py's results.jsonl lines,
or train.py's final evaluation). The tables in results/ablation.md and README.md are its output.

    python results/compare.py runs/ablation/o2o-s* runs/ablation/m2m-cls-s*    # the table of these rows
    python results/compare.py runs/ablation/* --jsonl results/ablation.jsonl    # also keep their results in one file
    python results/compare.py results/ablation.jsonl --claims                   # the claims table, from that file

An input is a run folder, its results.jsonl, or a file of many runs' lines (each with a "run" key, as --jsonl
writes). Runs named alike but for a final "-s<seed>" are one row: the mean ± standard deviation over their seeds,
with the number of seeds in the "seeds" column. An evaluation with another branch aggregation (eval.py --aggregate)
is a row of its own, "name [aggregate]". A run without results yet (still training: no results.jsonl, or an empty
one) is left out with a note on stderr; an input that does not exist stops it. Columns: held-out retrieval R@1 both
ways, the best single branch (image->text R@1 on the training texts, read alone), zero-shot top-1 per label kind,
dense mIoU (all in %), the mean inter-branch cosine.
"""
import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

# the world's zero-shot label kinds (prepare/world.py's LABEL_KINDS, not imported: this script needs no torch);
# "zs mean" is their mean, so a user set evaluated later (eval.py --zeroshot-folder) does not move it
LABEL_KINDS = ("main_shape", "main_colour", "bg_pattern", "bg_colour", "style")


def load(inputs):
    """Run folders and jsonl files -> {row name: [each seed's latest evaluation]}, rows in the order first met."""
    latest = {}  # (run, aggregate) -> its newest line
    for given in inputs:
        if not Path(given).exists():  # a typo, not a run still training: stop rather than print a shorter table
            sys.exit(f"error: {given}: no such run folder or file")
        path = Path(given) / "results.jsonl" if Path(given).is_dir() else Path(given)
        lines = [json.loads(line) for line in open(path) if line.strip()] if path.exists() else []
        if not lines:  # a run just started has no file, or an empty one
            print(f"{path}: no results yet, left out", file=sys.stderr)
        for r in lines:
            run = r.get("run", path.parent.name)
            latest[run, r.get("aggregate", "mean")] = {**r, "run": run}
    rows = {}
    for (run, aggregate), r in latest.items():
        branches = [v for k, v in r.items() if re.fullmatch(r"branch\d+/i2t_R@1", k)]
        zs = [r[f"zs/{kind}/top1"] for kind in LABEL_KINDS if f"zs/{kind}/top1" in r]
        r = {**r, "best_branch/i2t_R@1": max(branches, default=None), "zs_mean": statistics.mean(zs) if zs else None}
        name = re.sub(r"-s\d+$", "", run) + ("" if aggregate == "mean" else f" [{aggregate}]")
        rows.setdefault(name, []).append(r)
    return rows


def spread(values, digits):
    """"mean", or "mean ± sample standard deviation" over seeds; "-" when absent."""
    v = [x for x in values if x is not None]
    sd = f" ± {statistics.stdev(v):.{digits}f}" if len(v) > 1 else ""
    return f"{statistics.mean(v):.{digits}f}{sd}" if v else "-"


def table(rows, file=None):
    """One markdown row per row name: fixed columns, then whatever label kinds the runs have."""
    file = file or sys.stdout
    every = {k for rs in rows.values() for r in rs for k in r}
    keys = ["i2t_R@1", "t2i_R@1", "best_branch/i2t_R@1"] + sorted(k for k in every if re.fullmatch(r"zs/\w+/top1", k))
    keys += ["dense_miou", "inter_branch_cos"]
    header = ["run", "seeds"] + [k.removesuffix("/top1").removesuffix("_R@1").replace("/", " ").replace("_", " ")
                                 for k in keys]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header), file=file)
    for name, rs in rows.items():
        cells = [spread([r.get(k) for r in rs], 3 if k == "inter_branch_cos" else 1) for k in keys]  # cosine vs %
        print(f"| {name} | {len(rs)} | " + " | ".join(cells) + " |", file=file)


# The claims (paper.md section 6), claim 2 on the scene-type world, claims 1 and 2 on the two real datasets
# (retrieval of their val images' own texts: they have no held-out captions), and the two ideas beyond the paper,
# as comparisons between rows, fixed before the runs. World rows run on the 32-px world for 2,500 steps (o2o-6x for
# 15,000: as many texts as O2M's six a step; rows named w64-...: the 64-px world for 1,000, results/ablation64.md,
# the earlier protocol). "above": row A's mean exceeds row B's by more than twice the spread of one run's difference,
# sqrt(sd_A^2 + sd_B^2) over the seeds (a reversed gap as large: "does not hold"; smaller: "inside the spread");
# "level": the gap is inside twice that spread. Retrieval is held-out image->text R@1; zero-shot the mean top-1 over
# the label kinds.
CLAIMS = [  # claim, row A, row B, metric, test, the command that tells A from B
    ("1. several texts beat one (O2M > O2O)", "o2m", "o2o", "i2t_R@1", "above", "`--loss o2m` vs `--loss o2o`"),
    ("1. the same at equal text compute (O2O with 6x the steps)", "o2m", "o2o-6x", "i2t_R@1", "above",
     "`--loss o2o --max-steps 15000`"),
    ("2. part-to-part beats one-to-many (M2M > O2M), CLS design", "m2m-cls", "o2m", "i2t_R@1", "above",
     "`--loss m2m` vs `--loss o2m`"),
    ("2. the same, MLP design", "m2m-mlp", "o2m", "i2t_R@1", "above", "`--branch-type mlp` vs `--loss o2m`"),
    ("2. the same on the scene-type world (a controlled variant)", "m2m-cls-scenes", "o2m-scenes", "i2t_R@1", "above",
     "`prepare/world.py --scenes`, then the runs of 2"),
    ("3. the CLS and MLP designs are level", "m2m-cls", "m2m-mlp", "i2t_R@1", "level", "`--branch-type cls` vs `mlp`"),
    ("4. several captioners ≥ several prompts", "m2m-cls-g2", "m2m-cls-g1", "i2t_R@1", "above",
     "`caption.py generate`, then `train.py`"),
    ("5. holistic beats myopic zero-shot: M2M > O2O", "m2m-cls", "o2o", "zs_mean", "above", "the runs of 1"),
    ("5. the same against O2M", "m2m-cls", "o2m", "zs_mean", "above", "the runs of 2"),
    ("6. the branches do not collapse", "m2m-cls", None, "inter_branch_cos", "below 0.7", "`--loss m2m`"),
    ("1. the same on emoji (real texts: name, keywords, hierarchy)", "emoji-o2m", "emoji-o2o", "i2t_R@1", "above",
     "`prepare/debian.py emoji`, then the runs of 1"),
    ("2. the same on emoji, CLS design", "emoji-m2m-cls", "emoji-o2m", "i2t_R@1", "above", "the runs of 2 on emoji"),
    ("1. the same on openclipart (real texts: title, keywords, category, description)", "openclipart-o2m",
     "openclipart-o2o", "i2t_R@1", "above", "`prepare/debian.py openclipart`, then the runs of 1"),
    ("2. the same on openclipart, CLS design", "openclipart-m2m-cls", "openclipart-o2m", "i2t_R@1", "above",
     "the runs of 2 on openclipart"),
    ("idea: multi-positive targets beat the official one-hot", "m2m-cls-multipos", "m2m-cls", "i2t_R@1", "above",
     "`--multi-positive --no-fused-loss`"),
    ("idea: calibrated branch aggregation beats the mean", "m2m-cls [std-max]", "m2m-cls", "i2t_R@1", "above",
     "`eval.py --aggregate std-max`"),
]
NAMES = {"i2t_R@1": "image→text R@1", "zs_mean": "zero-shot mean top-1", "inter_branch_cos": "inter-branch cosine"}


def verdict(a, b, test):
    """Two rows' values over seeds -> the verdict by CLAIMS' rule."""
    if min(len(a), len(b)) < 2:
        return "one seed, no spread"
    gap, s = statistics.mean(a) - statistics.mean(b), math.hypot(statistics.stdev(a), statistics.stdev(b))
    if test == "level":
        return "holds" if abs(gap) <= 2 * s else "does not hold"
    return "holds" if gap > 2 * s else "does not hold" if gap < -2 * s else "inside the spread"


def claims(rows, file=None):
    """The claims table: claim | verdict | key numbers (mean ± sd, seeds) | command."""
    file = file or sys.stdout
    print("| claim | verdict | key numbers (mean ± sd over seeds) | command |\n|---|---|---|---|", file=file)
    for claim, a, b, key, test, command in CLAIMS:
        values = {row: [r[key] for r in rows.get(row, []) if r.get(key) is not None] for row in (a, b) if row}
        if not all(values.values()):
            print(f"| {claim} | not run yet | | {command} |", file=file)
            continue
        digits = 3 if key == "inter_branch_cos" else 1
        numbers = " vs ".join(f"{row} {spread(v, digits)} (n={len(v)})" for row, v in values.items())
        if b is None:  # claim 6: every seed's cosine under the hinge, and every branch wins some samples
            wins = min(min(r["branch_wins"]) for r in rows[a])
            numbers += f"; fewest samples won by a branch: {wins}"
            held = "holds" if max(values[a]) < 0.7 and wins > 0 else "does not hold"
        else:
            held = verdict(values[a], values[b], test)
        print(f"| {claim} | {held} | {NAMES[key]}: {numbers} | {command} |", file=file)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="RUN", help="run folders, their results.jsonl, or a --jsonl file")
    p.add_argument("--claims", action="store_true", help="the claims table instead of the rows table")
    p.add_argument("--jsonl", help="also write every seed's latest evaluation to this file, one line each")
    args = p.parse_args()
    rows = load(args.inputs)
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            f.writelines(json.dumps(r) + "\n" for rs in rows.values() for r in rs)
    (claims if args.claims else table)(rows)
