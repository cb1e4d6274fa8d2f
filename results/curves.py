"""Convergence curves: the held-out image->text R@1 and the main-shape zero-shot top-1 against the step, from the
validations a run logs with --eval-every (its metrics.jsonl) and its final evaluation (results.jsonl). One panel
per metric, one line per run (results/pictures.py's line_chart), and a table of each metric's change over the last
fifth. A run without validations (no --eval-every) or without these metrics (real data: no world labels) is
skipped, with a line saying so.

    python results/curves.py runs/ablation32/*-s0 --out results/curves.png   # the world's rows
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: data.py, results/
from results.pictures import line_chart, tile  # noqa: E402

METRICS = {"i2t_R@1": "held-out image->text R@1 (%)", "zs/main_shape/top1": "zero-shot main shape top-1 (%)"}


def curve(run):
    """A run folder -> (steps, {metric: values}) over its validations, the final evaluation (if any) last."""
    lines = [json.loads(line) for line in open(run / "metrics.jsonl") if line.endswith("\n")]  # not a torn last one
    lines = [r for r in lines if all(f"val/{k}" in r for k in METRICS)]
    if not lines:
        return None
    points = [(r["step"], {k: r[f"val/{k}"] for k in METRICS}) for r in lines]
    done = run / "results.jsonl"  # none yet: a run still training, or stopped
    final = [json.loads(line) for line in open(done) if line.strip()] if done.exists() else []
    final = max((r for r in final if r.get("aggregate", "mean") == "mean"), key=lambda r: r["step"], default=None)
    if final and (not points or final["step"] > points[-1][0]):  # the evaluation at the end (a later eval.py's)
        points.append((final["step"], {k: final[k] for k in METRICS}))
    return [s for s, _ in points], {k: [v[k] for _, v in points] for k in METRICS}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders trained with --eval-every")
    p.add_argument("--out", default="curves.png", help="the PNG to write")
    args = p.parse_args()
    if missing := [run for run in args.runs if not (run / "metrics.jsonl").exists()]:
        sys.exit(f"error: {missing[0]}: not a run folder (no metrics.jsonl)")
    curves = {run.name: curve(run) for run in args.runs}
    for run in [run for run, c in curves.items() if c is None]:
        print(f"skipped {run}: no validation with {' and '.join(METRICS)} in its metrics.jsonl", file=sys.stderr)
        del curves[run]
    if not curves:
        sys.exit("error: no run to draw")
    print("| run | " + " | ".join(f"{k}: at 4/5 of the run -> end" for k in METRICS) + " |\n|---|---|---|")
    for run, (steps, values) in curves.items():  # the validation nearest 4/5 of the run, against the last
        i = min(range(len(steps)), key=lambda j: abs(steps[j] - 0.8 * steps[-1]))
        print(f"| {run} | " + " | ".join(f"{values[k][i]:.1f} (step {steps[i]}) -> {values[k][-1]:.1f}"
                                          for k in METRICS) + " |")
    panels = [line_chart(title, {run: (steps, values[k]) for run, (steps, values) in curves.items()}, (480, 320))
              for k, title in METRICS.items()]
    tile(panels, len(panels)).save(args.out)
    print(f"wrote {args.out}")
