"""Tests for results/compare.py, the ablation tables: the seeds of one run are one row (mean ± standard
deviation, against Python's statistics module), a run without results is left out, and the script's
command line prints the same table as the function.

    python -m pytest -q tests/test_compare.py
"""
import importlib.util
import json
import statistics
import subprocess
import sys
from io import StringIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare", ROOT / "results" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

# one results.jsonl line as eval.py writes it (K = 2 branches, M = 2 slots, one label kind), values in %
RESULT = {"ckpt": "runs/tiny/ckpt.pt", "step": 7, "K": 2, "M": 2, "N": 16, "i2t_R@1": 12.5, "t2i_R@1": 9.375,
          "slot0/i2t_R@1": 6.25, "slot1/i2t_R@1": 18.75, "slot0/t2i_R@1": 12.5, "slot1/t2i_R@1": 6.25,
          "branch0/i2t_R@1": 6.25, "branch1/i2t_R@1": 12.5, "branch0/t2i_R@1": 6.25, "branch1/t2i_R@1": 3.125,
          "zs/main_shape/top1": 25.0, "zs/main_shape/top5": 75.0, "dense_miou": 7.02, "inter_branch_cos": 0.321}


def test_seeds_are_one_row(tmp_path):
    run = tmp_path / "runs" / "tiny"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text(json.dumps({**RESULT, "i2t_R@1": 1.0}) + "\n" + json.dumps(RESULT) + "\n")
    for seed, value in ((1, 40.0), (2, 44.0)):
        (tmp_path / "runs" / f"abl-s{seed}").mkdir()
        (tmp_path / "runs" / f"abl-s{seed}" / "results.jsonl").write_text(
            json.dumps({**RESULT, "i2t_R@1": value}) + "\n")
    runs = [str(run), *(str(tmp_path / "runs" / n) for n in ("abl-s1", "abl-s2", "missing-s0"))]
    out = StringIO()
    compare.compare(runs, file=out)
    lines = out.getvalue().splitlines()
    header, rule, first, second = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert header[:5] == ["run", "seeds", "i2t", "t2i", "best branch i2t"] and len(first) == len(header)
    assert first[:3] == [run.name, "1", f"{RESULT['i2t_R@1']:.1f}"]  # the latest line of the run's file
    assert second[:3] == ["abl", "2", f"42.0 ± {statistics.stdev([40.0, 44.0]):.1f}"]
    # the command line: the same table on stdout, the missing run named on stderr
    p = subprocess.run([sys.executable, "results/compare.py", *runs], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout == out.getvalue() and "missing-s0" in p.stderr, p.stderr


def test_empty_results_are_left_out(tmp_path):
    """A results.jsonl just created (empty, or blank lines only) is a run without results, as a missing file."""
    for name, text in (("empty", ""), ("blank", "\n \n"), ("done", json.dumps(RESULT) + "\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text(text)
    p = subprocess.run([sys.executable, "results/compare.py", *(str(tmp_path / n) for n in ("empty", "blank", "done"))],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [line.split("|")[1].strip() for line in p.stdout.splitlines()[2:]] == ["done"]
    for name in ("empty", "blank"):
        assert f"{tmp_path / name / 'results.jsonl'}: no results yet, left out" in p.stderr, p.stderr
