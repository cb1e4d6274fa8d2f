"""train.py end to end, as subprocesses on a tiny generated world: smoke, DDP == one process, exact resume,
SIGTERM and non-finite-loss safety.

    python -m pytest -q tests/test_train.py
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from prepare.world import make_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), train_size=48, val_size=16, seed=1)
    return out


def train(world, logs, *flags, batch=8, check=True, background=False):
    """Run train.py on the tiny world: 6 texts per image, K = M = 6 by default, fp32 on the CPU."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--train-data", str(world / "train.jsonl"),
           "--logs-dir", str(logs), "--batch-size", str(batch), "--workers", "0", "--log-every", "1",
           "--warmup", "2", "--lr", "1e-3", "--device", "cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def losses(run):
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(run):
    return torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    assert worst <= atol, f"largest weight difference {worst:.2e} > {atol:.0e}"


def test_smoke_writes_checkpoint_metrics_and_results(world, tmp_path):
    train(world, tmp_path, "--name", "smoke", "--max-steps", "3")
    run = tmp_path / "smoke"
    ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["config"]["branches"] == 6 and ckpt["tokenizer"]
    assert sorted(losses(run)) == [1, 2, 3]
    params = json.load(open(run / "params.json"))
    assert params["K"] == 6 and params["M"] == 6
    results = [json.loads(line) for line in open(run / "results.jsonl")]
    assert "i2t_R@1" in results[-1] and "t2i_R@1" in results[-1]


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(world, tmp_path):
    """2 gloo ranks x batch 4 see the same 8 samples per step as 1 process x batch 8 (DistributedSampler
    splits one permutation; augmentation depends on the sample, not the rank), and the gathered loss with
    rank-offset targets is the global-batch loss: losses and weights must agree to float32 round-off."""
    common = ["--max-steps", "4", "--branch-diversity", "--seed", "3"]
    train(world, tmp_path, "--name", "one", *common, batch=8)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(ROOT, "train.py"), "--train-data", str(world / "train.jsonl"),
           "--logs-dir", str(tmp_path), "--name", "two", "--batch-size", "4", "--workers", "0", "--log-every", "1",
           "--warmup", "2", "--lr", "1e-3", "--device", "cpu", *common]
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for s in one:
        assert abs(one[s] - two[s]) < 1e-4, (s, one[s], two[s])
    # Adam divides by sqrt(v): float32 round-off in near-zero gradients can move a weight by a few percent of
    # one step (lr 1e-3); a real mismatch (lost negatives, wrong targets) moves weights by whole steps
    assert_same_weights(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-4)


def test_resume_replays_the_straight_run(world, tmp_path):
    """6 steps straight == 3 steps, stop, resume, 3 more steps (same data order, schedule, weights)."""
    train(world, tmp_path, "--name", "straight", "--max-steps", "6")
    train(world, tmp_path, "--name", "split", "--max-steps", "6", "--stop-at-step", "3")
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["step"] == 3
    train(world, tmp_path, "--name", "split", "--resume", "latest")
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"), atol=1e-6)


def test_sigterm_saves_a_checkpoint_that_resumes(world, tmp_path):
    proc = train(world, tmp_path, "--name", "term", "--max-steps", "10000", background=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped (signal)" in out
    stopped_at = torch.load(tmp_path / "term" / "ckpt.pt", weights_only=True)["step"]
    assert stopped_at >= 2
    train(world, tmp_path, "--name", "term", "--resume", "latest", "--stop-at-step", str(stopped_at + 2))
    assert max(losses(tmp_path / "term")) == stopped_at + 2
    assert torch.load(tmp_path / "term" / "ckpt.pt", weights_only=True)["step"] == stopped_at + 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(world, tmp_path):
    r = train(world, tmp_path, "--name", "nan", "--max-steps", "20", "--save-every", "2",
              "--fault-nan-step", "5", check=False)
    assert r.returncode == 1
    assert "non-finite loss" in r.stderr and "at step 5" in r.stderr
    ckpt = torch.load(tmp_path / "nan" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_bad_record_stops_with_file_and_line(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"image": "a.png", "caption": ["a red circle"]}\n{"image": "b.png", "caption": []}\n')
    r = train(tmp_path, tmp_path / "runs", "--name", "bad", "--max-steps", "1", check=False)
    assert r.returncode == 1
    assert f"{bad}:2:" in r.stderr, r.stderr[-2000:]


def test_missing_val_data_is_an_error_and_none_means_no_evaluation(world, tmp_path):
    r = train(world, tmp_path / "runs", "--name", "typo", "--max-steps", "1", "--val-data", "no/such.jsonl",
              check=False)
    assert r.returncode == 1 and "no/such.jsonl: --val-data not found" in r.stderr, r.stderr[-2000:]
    train(world, tmp_path / "runs", "--name", "none", "--max-steps", "1", "--val-data", "none")
    assert (tmp_path / "runs" / "none" / "ckpt.pt").exists()
    assert not (tmp_path / "runs" / "none" / "results.jsonl").exists()  # the final evaluation was skipped
