"""Tests for results/compare.py, the ablation tables: the seeds of one run are one row (mean ± standard
deviation, against Python's statistics module), a run without results is left out, the script's command line
prints the same table as the function, and the claims' verdicts follow their rule on hand-made rows.

    python -m pytest -q tests/test_compare.py
"""
import importlib.util
import json
import statistics
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest

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
    (tmp_path / "runs" / "started-s0").mkdir()  # a run just started: its folder, no results.jsonl yet
    runs = [str(run), *(str(tmp_path / "runs" / n) for n in ("abl-s1", "abl-s2", "started-s0"))]
    out = StringIO()
    compare.table(compare.load(runs), file=out)
    lines = out.getvalue().splitlines()
    header, rule, first, second = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert header[:5] == ["run", "seeds", "i2t", "t2i", "best branch i2t"] and len(first) == len(header)
    assert first[:3] == [run.name, "1", f"{RESULT['i2t_R@1']:.1f}"]  # the latest line of the run's file
    assert second[:3] == ["abl", "2", f"42.0 ± {statistics.stdev([40.0, 44.0]):.1f}"]
    # the command line: the same table on stdout, the run without results named on stderr
    p = subprocess.run([sys.executable, "results/compare.py", *runs], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout == out.getvalue() and "started-s0" in p.stderr, p.stderr


def test_zs_mean_is_the_worlds_label_kinds_only(tmp_path):
    """A user zero-shot set evaluated later (eval.py --zeroshot-folder adds zs/NAME/top1) does not enter the
    "zs mean" of claim 5: it is the mean over the world's label kinds."""
    lines = [{**RESULT, "run": "abl-s0"}, {**RESULT, "run": "abl-s1", "zs/pets/top1": 5.0}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert [r["zs_mean"] for r in compare.load([str(tmp_path / "r.jsonl")])["abl"]] == [25.0, 25.0]
    from prepare.world import LABEL_KINDS
    assert sorted(compare.LABEL_KINDS) == sorted(LABEL_KINDS)  # the copy in compare.py is the world's


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


def claim_rows(o2m, o2o, cos=(0.3, 0.4), wins=(5, 0)):
    """Rows as load() returns them: two seeds each of o2m and o2o (image->text R@1) and of m2m-cls."""
    return {"o2m": [{"i2t_R@1": v} for v in o2m], "o2o": [{"i2t_R@1": v} for v in o2o],
            "m2m-cls": [{"inter_branch_cos": c, "branch_wins": [w, 9]} for c, w in zip(cos, wins)]}


@pytest.mark.parametrize("o2m, o2o, verdict", [
    ((50.0, 52.0), (10.0, 12.0), "holds"),              # gap 40 > 2 * hypot(1.41, 1.41) = 4
    ((10.0, 12.0), (50.0, 52.0), "does not hold"),      # the same gap reversed
    ((50.0, 54.0), (48.0, 52.0), "inside the spread"),  # gap 2 < 2 * hypot(2.83, 2.83) = 8
    ((50.0,), (10.0, 12.0), "one seed, no spread"),
])
def test_claim_verdicts_follow_the_rule(o2m, o2o, verdict):
    out = StringIO()
    compare.claims(claim_rows(o2m, o2o), file=out)
    cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.getvalue().splitlines()[2:]}
    assert cells["1. several texts beat one (O2M > O2O)"][1] == verdict
    assert cells["2. the same, MLP design"][1] == "not run yet"   # no m2m-mlp rows
    assert cells["6. the branches do not collapse"][1] == "does not hold"    # seed 1: a branch that wins nothing
    out = StringIO()
    compare.claims(claim_rows(o2m, o2o, wins=(5, 1)), file=out)
    assert "| 6. the branches do not collapse | holds |" in out.getvalue()


def test_jsonl_round_trip_and_aggregations(tmp_path):
    """--jsonl keeps each seed's latest line per aggregation; read back, it gives the same table, and an
    evaluation with --aggregate std-max is a row of its own."""
    for seed in (0, 1):
        run = tmp_path / f"abl-s{seed}"
        run.mkdir()
        lines = [RESULT, {**RESULT, "i2t_R@1": 30.0 + seed, "aggregate": "std-max"}]
        (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    runs = [str(tmp_path / "abl-s0"), str(tmp_path / "abl-s1")]
    p = subprocess.run([sys.executable, "results/compare.py", *runs, "--jsonl", str(tmp_path / "all.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    q = subprocess.run([sys.executable, "results/compare.py", str(tmp_path / "all.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == q.returncode == 0 and p.stdout == q.stdout, p.stderr + q.stderr
    rows = [line.split(" | ")[:3] for line in p.stdout.splitlines()[2:]]
    assert rows == [["| abl", "2", "12.5 ± 0.0"],
                    ["| abl [std-max]", "2", f"30.5 ± {statistics.stdev([30, 31]):.1f}"]]


def test_curves_read_validations_and_the_final_evaluation(tmp_path):
    """results/curves.py: the validations of metrics.jsonl (training lines skipped) plus the final evaluation
    from results.jsonl (its last step, not its first line); the table pairs the validation nearest 4/5 of the run
    with the end, and a PNG is written. Runs with no validations, or validations without the world's zero-shot
    (real data), are skipped by name; a last line torn by a kill is not read."""
    runs = {name: tmp_path / name for name in ("abl-s0", "no-eval-every", "real-data")}
    train = {"step": 50, "loss": 3.0}
    validations = {"abl-s0": [{"step": s, "val/i2t_R@1": s / 10, "val/zs/main_shape/top1": s / 20}
                              for s in (100, 200, 300, 400)],
                   "no-eval-every": [], "real-data": [{"step": 100, "val/i2t_R@1": 1.0}]}
    for name, run in runs.items():
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [train, *validations[name]])
                                           + '{"step": 450, "val/i2')  # a last line torn by a kill: not read
        (run / "results.jsonl").write_text(json.dumps({**RESULT, "step": 300, "i2t_R@1": 1.0}) + "\n"  # eval.py
                                           + json.dumps({**RESULT, "step": 500, "i2t_R@1": 45.0}) + "\n")
    p = subprocess.run([sys.executable, "results/curves.py", *map(str, runs.values()), "--out",
                        str(tmp_path / "c.png")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert [line.split(":")[0] for line in p.stderr.splitlines()] == ["skipped no-eval-every", "skipped real-data"]
    assert [line.split(" |")[0] for line in p.stdout.splitlines()[2:-1]] == ["| abl-s0"]
    row = [line for line in p.stdout.splitlines() if line.startswith("| abl-s0")][0]
    assert row == "| abl-s0 | 40.0 (step 400) -> 45.0 | 20.0 (step 400) -> 25.0 |", row  # 4/5 of 500 = 400
    assert (tmp_path / "c.png").stat().st_size > 0


def test_a_missing_input_stops_both_scripts(tmp_path):
    """A run folder that does not exist is a typo, not a run still training: each script stops, named, instead of
    printing a shorter table (compare.py) or a traceback (curves.py)."""
    for script, message in [("compare.py", "no such run folder or file"), ("curves.py", "not a run folder")]:
        p = subprocess.run([sys.executable, f"results/{script}", str(tmp_path / "typo-s0")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 1 and p.stderr.startswith(f"error: {tmp_path / 'typo-s0'}: {message}"), p.stderr


def test_branches_against_evaluate_and_a_loop(tmp_path):
    """results/branches.py: its mean column is evaluate()'s held-out image->text R@1 (the number train.py prints),
    and branch k's is a plain loop: the image's best text under <v_k, t> is a hit when it is (a copy of) one of
    the image's own held-out captions. Branch k's embedding is made from the image's first held-out caption plus
    noise growing with k, so the recalls differ. The command line prints its numbers, the slots' names above (the
    branches' numbers beside a K = 4 run)."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    import data
    import eval as ev
    from model import PRESETS, HolisticCLIP, ModelConfig
    from prepare import world
    spec = importlib.util.spec_from_file_location("branches", ROOT / "results" / "branches.py")
    branches = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(branches)
    world.make_world(str(tmp_path / "w"), train_size=32, val_size=24)
    val, tok = str(tmp_path / "w" / "val.jsonl"), data.Tokenizer.load(str(tmp_path / "w" / "tokenizer.json"))
    torch.manual_seed(0)
    K = len(world.SLOTS)
    config = ModelConfig(**{**PRESETS["tiny-conv"], "vision_layers": 1, "mlp_branch_layers": 1, "text_layers": 1,
                            "branches": K, "vocab_size": tok.vocab_size})
    model = HolisticCLIP(config).eval()
    dataset = data.ImageTextDataset(data.read_records(val), tok, 32, context_length=config.context_length)
    txt, ids = ev.held_out(model, dataset, tok)  # (n, H, E), (n, H)
    noise = torch.linspace(0, 0.6, K)[None, :, None] * torch.randn(len(txt), K, txt.shape[-1])
    img = F.normalize(txt[:, :1] + noise, dim=-1)  # (n, K, E); embed_split reads the 24 images in one batch
    model.encode_image = lambda images: img
    got = branches.branch_recalls(model, tok, val)
    assert got[0] == ev.evaluate(model, dataset, tokenizer=tok, views=False)["i2t_R@1"]
    for k in range(K):
        best = ids.flatten()[(img[:, k] @ txt.flatten(0, 1).T).argmax(1)]  # (n,) the text id of each best text
        assert got[1 + k] == 100 * sum(best[i] in ids[i] for i in range(len(img))) / len(img), k
    assert got[1] == 100 and len(set(got)) > 2, got  # branch 0 is noiseless; the others differ

    (tmp_path / "run").mkdir()
    torch.save({"model": HolisticCLIP(config).state_dict(), "config": config.__dict__, "tokenizer": tok.to_dict()},
               tmp_path / "run" / "ckpt.pt")
    p = subprocess.run([sys.executable, "results/branches.py", str(tmp_path / "run"), "--data", val],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    header, _, row = p.stdout.splitlines()
    assert header.split(" | ")[2:4] == ["branch 0 alt", "branch 1 detail"]
    want = branches.branch_recalls(*ev.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"), "cpu")[1:], val)
    assert row == "| run | " + " | ".join(f"{x:.1f}" for x in want) + " |"
    (tmp_path / "k4").mkdir()  # a K = 4 run beside it: the columns are numbered, its last two cells empty
    config4 = ModelConfig(**{**config.__dict__, "branches": 4})
    torch.save({"model": HolisticCLIP(config4).state_dict(), "config": config4.__dict__, "tokenizer": tok.to_dict()},
               tmp_path / "k4" / "ckpt.pt")
    p = subprocess.run([sys.executable, "results/branches.py", str(tmp_path / "run"), str(tmp_path / "k4"), "--data",
                        val], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    header, _, _, row4 = p.stdout.splitlines()
    assert header.split(" | ")[2:] == [f"branch {k}" for k in range(K - 1)] + [f"branch {K - 1} |"], header
    assert row4.startswith("| k4 | ") and row4.endswith(" | - | - |"), row4
