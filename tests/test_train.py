"""train.py end to end, as subprocesses on a tiny generated world: smoke, DDP == one process, exact resume,
SIGTERM and non-finite-loss safety; and nothing lost or silently wrong: non-finite updates, run folders that are
never overwritten, resume on changed data, a full disk, flags out of range (checked in-process: no data is read).

    python -m pytest -q tests/test_train.py
"""
import fcntl
import gc
import json
import os
import resource
import runpy
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import loss
from loss import m2m_loss
from prepare.world import SLOTS, make_world

M = len(SLOTS)  # texts per image in the world: K = M by default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), train_size=48, val_size=16, seed=1)
    return out


def train(world, logs, *flags, batch=8, check=True, background=False, cwd=None, preexec=None):
    """Run train.py on the tiny world: M texts per image, K = M by default, fp32 on the CPU."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--train-data", str(world / "train.jsonl"),
           "--logs-dir", str(logs), "--batch-size", str(batch), "--workers", "0", "--log-every", "1",
           "--warmup", "1", "--lr", "1e-3", "--device", "cpu", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own process group, as under a scheduler
    r = subprocess.run(cmd, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300,
                       preexec_fn=preexec)
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
    assert ckpt["step"] == 3 and ckpt["config"]["branches"] == M and ckpt["tokenizer"]
    assert sorted(losses(run)) == [1, 2, 3]
    params = json.load(open(run / "params.json"))
    assert params["K"] == M and params["M"] == M
    results = [json.loads(line) for line in open(run / "results.jsonl")]
    assert "i2t_R@1" in results[-1] and "t2i_R@1" in results[-1]


def test_ddp_two_ranks_equal_one_process_with_twice_the_batch(world, tmp_path):
    """2 gloo ranks x batch 4 see the same 8 samples per step as 1 process x batch 8 (DistributedSampler
    splits one permutation; augmentation depends on the sample, not the rank), and the gathered loss with
    rank-offset targets is the global-batch loss: losses and weights must agree to float32 round-off. The plain
    ViT (tiny): the default's conv stem has BatchNorm, which normalises over each rank's own batch."""
    common = ["--max-steps", "4", "--branch-diversity", "--seed", "3", "--model", "tiny"]
    train(world, tmp_path, "--name", "one", *common, batch=8)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(ROOT, "train.py"), "--train-data", str(world / "train.jsonl"),
           "--logs-dir", str(tmp_path), "--name", "two", "--batch-size", "4", "--workers", "0", "--log-every", "1",
           "--warmup", "1", "--lr", "1e-3", "--device", "cpu", *common]
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


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_saves_a_checkpoint_that_resumes(world, tmp_path, workers):
    """SIGTERM to the run's whole process group, as a scheduler sends it: the run finishes its step and saves. With
    loader processes, torch's own handler made them exit and the run crashed instead (they now ignore it)."""
    proc = train(world, tmp_path, "--name", "term", "--max-steps", "10000", "--workers", str(workers), background=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped (signal)" in out
    stopped_at = torch.load(tmp_path / "term" / "ckpt.pt", weights_only=True)["step"]
    assert stopped_at >= 2
    train(world, tmp_path, "--name", "term", "--resume", "latest", "--stop-at-step", str(stopped_at + 2))
    assert max(losses(tmp_path / "term")) == stopped_at + 2
    assert torch.load(tmp_path / "term" / "ckpt.pt", weights_only=True)["step"] == stopped_at + 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch, capsys):
    calls = []

    def nan_at_step_5(*a, **kw):  # the loss of step 5 (its 5th call) is NaN
        calls.append(1)
        return m2m_loss(*a, **kw) * (float("nan") if len(calls) == 5 else 1.0)
    monkeypatch.setattr(loss, "m2m_loss", nan_at_step_5)  # train.py imports it from loss.py when it starts
    assert train_here(monkeypatch, world, tmp_path, "--name", "nan", "--max-steps", "20", "--save-every", "2") == "1"
    assert "non-finite loss at step 5" in capsys.readouterr().err
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
    # no val.jsonl beside the train file (here a link to it, whose images and tokenizer are the real folder's):
    # the run says at the start that it will not be evaluated
    (tmp_path / "alone").mkdir()
    (tmp_path / "alone" / "train.jsonl").symlink_to(world / "train.jsonl")
    r = train(world, tmp_path / "runs", "--name", "alone", "--max-steps", "1",
              "--train-data", str(tmp_path / "alone" / "train.jsonl"))
    assert f"note: no {tmp_path / 'alone' / 'val.jsonl'} beside the train data" in r.stdout, r.stdout[-2000:]
    assert not (tmp_path / "runs" / "alone" / "results.jsonl").exists()


# ----------------------------------------------------------------------------------------------------
# nothing lost, nothing silently wrong. These run train.py in this process (a subprocess costs seconds of
# imports); the flag checks come before any data is read.

def run_in_process(monkeypatch, *argv):
    """train.py with these flags in this process: its exit message (or status), None when it ends normally.
    The signal handlers it installs are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    except SystemExit as e:
        return str(e.code)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        gc.collect()  # the run's globals (its lock on the run folder among them) sit in reference cycles
    return None


def train_here(monkeypatch, world, logs, *flags):
    """run_in_process with train()'s flags: the tiny world, batch 8, fp32 on the CPU."""
    return run_in_process(monkeypatch, "--train-data", str(world / "train.jsonl"), "--logs-dir", str(logs),
                          "--batch-size", "8", "--workers", "0", "--log-every", "1", "--warmup", "1", "--device", "cpu",
                          *flags)


def test_non_finite_update_is_never_saved(world, tmp_path, monkeypatch, capsys):
    """An update that overflows the weights while the loss it came from was finite (the health check sees the
    loss, computed before the update): no checkpoint may follow it."""
    class Overflowing(torch.optim.AdamW):
        def step(self, closure=None):
            super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
    monkeypatch.setattr(torch.optim, "AdamW", Overflowing)
    code = train_here(monkeypatch, world, tmp_path, "--name", "inf", "--max-steps", "3", "--save-every", "1",
                      "--val-data", "none")
    assert code == "1" and "non-finite weights after step 1" in capsys.readouterr().err
    assert not (tmp_path / "inf" / "ckpt.pt").exists()


def test_a_run_folder_is_never_overwritten(world, tmp_path, monkeypatch):
    """A second run with the same name is refused; --name NEW --resume OLD continues in NEW, OLD untouched;
    a folder locked by a live train.py is refused."""
    assert train_here(monkeypatch, world, tmp_path, "--name", "old", "--max-steps", "2", "--val-data", "none") is None
    before = (tmp_path / "old" / "ckpt.pt").read_bytes()
    message = train_here(monkeypatch, world, tmp_path, "--name", "old", "--max-steps", "2", "--val-data", "none")
    assert "already holds a run" in message and "--resume latest" in message
    assert train_here(monkeypatch, world, tmp_path, "--name", "new", "--resume", str(tmp_path / "old" / "ckpt.pt"),
                      "--max-steps", "3", "--val-data", "none") is None
    assert (tmp_path / "old" / "ckpt.pt").read_bytes() == before
    assert torch.load(tmp_path / "new" / "ckpt.pt", weights_only=True)["step"] == 3
    (tmp_path / "busy").mkdir()
    with open(tmp_path / "busy" / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        message = train_here(monkeypatch, world, tmp_path, "--name", "busy", "--max-steps", "1")
    assert message == f"error: {tmp_path / 'busy'} is in use by another train.py"


def test_resume_refuses_other_data_and_takes_flags_given_at_their_default(world, tmp_path, monkeypatch):
    train_here(monkeypatch, world, tmp_path, "--name", "r", "--max-steps", "4", "--stop-at-step", "2", "--lr", "5e-4")
    fewer = tmp_path / "fewer.jsonl"  # the same records with half the captions
    fewer.write_text("".join(json.dumps({**json.loads(line), "caption": json.loads(line)["caption"][:M // 2],
                                         "image": str(world / json.loads(line)["image"])}) + "\n"
                             for line in open(world / "train.jsonl")))
    message = train_here(monkeypatch, world, tmp_path, "--name", "r", "--resume", "latest", "--train-data", str(fewer))
    assert f"M {M} -> {M // 2}" in message and "would not continue exactly" in message
    train_here(monkeypatch, world, tmp_path, "--name", "r", "--resume", "latest", "--lr", "1e-3")  # 1e-3: the default
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["args"]["lr"] == 1e-3


def test_resume_drops_metrics_logged_after_the_checkpoint(world, tmp_path, monkeypatch):
    """A run killed after logging steps 3-4 but before saving them: the resumed run logs them again, once."""
    train_here(monkeypatch, world, tmp_path, "--name", "k", "--max-steps", "4", "--stop-at-step", "2")
    with open(tmp_path / "k" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 0.0}) + "\n" + json.dumps({"step": 4, "loss": 0.0}) + "\n")
        f.write('{"step": 5, "lo')  # torn by the kill
    train_here(monkeypatch, world, tmp_path, "--name", "k", "--resume", "latest")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "k" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4] and losses(tmp_path / "k")[3] != 0.0


def test_a_full_disk_keeps_the_old_checkpoint(world, tmp_path, monkeypatch):
    """Files may grow to 64 KiB (RLIMIT_FSIZE; SIGXFSZ ignored, so writes fail with EFBIG as on a full disk):
    the log lines fit, the checkpoint does not."""
    train_here(monkeypatch, world, tmp_path, "--name", "full", "--max-steps", "4", "--stop-at-step", "2")
    before = (tmp_path / "full" / "ckpt.pt").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))
    r = train(world, tmp_path, "--name", "full", "--resume", "latest", check=False, preexec=small_files)
    assert r.returncode == 1 and "could not write" in r.stderr and "still holds step 2" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "full" / "ckpt.pt").read_bytes() == before
    assert not (tmp_path / "full" / "ckpt.pt.tmp").exists()


def test_default_world_of_other_arguments_is_not_reused(tmp_path, monkeypatch):
    """data/shapes written by other arguments (here a 24-image world) is not taken for the default world."""
    make_world(str(tmp_path / "data" / "shapes"), train_size=24, val_size=8, seed=1)
    monkeypatch.chdir(tmp_path)
    message = run_in_process(monkeypatch, "--batch-size", "8", "--max-steps", "1", "--workers", "0")
    assert "data/shapes was written with train_size 24" in message and "--train-data" in message, message


def test_data_problems_stop_before_the_first_step(world, tmp_path, monkeypatch, capsys):
    """A missing image (named with FILE:LINE before any step), an empty val file, a missing train file, tokenizer
    or shards, a --logs-dir that is a file, a symlinked jsonl (its data's own tokenizer is used, none is trained
    beside the link)."""
    records = [line.replace('"images/', f'"{world}/images/') for line in open(world / "train.jsonl")]
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(records[:3] + [records[3].replace("/images/", "/missing/")] + records[4:]))
    (tmp_path / "tokenizer.json").write_bytes((world / "tokenizer.json").read_bytes())
    message = train_here(monkeypatch, world, tmp_path / "runs", "--name", "img", "--train-data", str(broken),
                         "--val-data", "none")
    assert message.startswith(f"error: {broken}:4: ") and "step" not in capsys.readouterr().out
    (tmp_path / "empty.jsonl").write_text("")
    message = train_here(monkeypatch, world, tmp_path / "runs", "--name", "val", "--val-data", str(tmp_path / "empty.jsonl"))
    assert "empty.jsonl: no records" in message
    for flags, named in [(["--train-data", str(tmp_path / "none.jsonl")], f"{tmp_path / 'none.jsonl'}: cannot read"),
                         (["--tokenizer", str(tmp_path / "none.json")], f"{tmp_path / 'none.json'}: cannot read"),
                         (["--train-data", str(tmp_path / "{0..1}.tar"), "--tokenizer", str(world / "tokenizer.json")],
                          f"{tmp_path / '0.tar'}: no such shard (2 of the 2 shards are missing)")]:
        message = train_here(monkeypatch, world, tmp_path / "runs", "--name", "none", *flags)  # were tracebacks
        assert message == f"error: {named}" + (" (No such file or directory)" if "cannot" in named else ""), message
    message = train_here(monkeypatch, world, tmp_path / "empty.jsonl", "--name", "file")  # --logs-dir a file
    assert message == f"error: {tmp_path / 'empty.jsonl' / 'file'}: cannot make the run folder (Not a directory)"
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "train.jsonl").symlink_to(world / "train.jsonl")
    assert train_here(monkeypatch, world, tmp_path / "runs", "--name", "link", "--max-steps", "1", "--val-data", "none",
                      "--train-data", str(tmp_path / "link" / "train.jsonl")) is None
    assert not (tmp_path / "link" / "tokenizer.json").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "--max-steps 0: must be at least 1"),
    (["--max-steps", "-1"], "--max-steps -1: must be at least 1"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--epochs", "-2"], "--epochs -2: must be at least 1"),
    (["--branches", "0"], "--branches 0: must be at least 1"),
    (["--loss", "o2o", "--branches", "4"], "--loss o2o has one branch"),
    (["--loss", "o2m", "--branches", "4"], "--loss o2m has one branch"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--log-every", "0"], "--log-every 0: must be at least 1"),
    (["--save-every", "0"], "--save-every 0: must be at least 1"),
    (["--vocab-size", "100"], "--vocab-size 100: must be at least 259"),
    (["--csv-separator", "ab"], "--csv-separator 'ab': one character"),
    (["--lr", "inf"], "--lr inf: must be a finite number above 0"),
    (["--lr", "0"], "--lr 0.0: must be a finite number above 0"),
    (["--force-image-size", "60"], "--force-image-size 60: a multiple of --model tiny-conv's patch size 8"),
    (["--multi-positive"], "--multi-positive is computed by the reference loss only: add --no-fused-loss"),
    (["--pretrained", "clip.pt"], "--pretrained fits a patchify ViT: --model tiny-conv has a conv stem"),
])
def test_flags_out_of_range_stop_with_their_name(monkeypatch, tmp_path, flags, message):
    result = run_in_process(monkeypatch, "--logs-dir", str(tmp_path), *flags)
    assert result.startswith("error: --") and message in result, result
    assert not any(tmp_path.iterdir())  # nothing was written


def test_warmup_longer_than_the_run_is_refused(world, tmp_path, monkeypatch):
    message = train_here(monkeypatch, world, tmp_path, "--max-steps", "10", "--warmup", "50")
    assert message == "error: --warmup 50 is longer than the run (10 steps): the rate would never reach --lr"


def test_a_signal_stops_the_final_evaluation(world, tmp_path, monkeypatch):
    """SIGTERM while the final evaluation runs: it stops at once, says where the checkpoint is, exit 1."""
    import eval

    def slow_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # interrupted by the signal, or the test fails on the message below
        return {}
    monkeypatch.setattr(eval, "evaluate", slow_evaluate)
    message = train_here(monkeypatch, world, tmp_path, "--max-steps", "1")
    assert message and message.startswith("error: interrupted during the final evaluation"), message


@pytest.mark.slow
def test_a_stopped_rank_stops_the_job(world, tmp_path):
    """2 gloo ranks, rank 1 stopped (SIGSTOP) mid-run: rank 0's next collective gives up after --dist-timeout
    (0.1 min here) and torchrun ends the job, instead of torch's default 30 minutes. ~1 minute."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(ROOT, "train.py"), "--train-data", str(world / "train.jsonl"),
           "--logs-dir", str(tmp_path), "--name", "stuck", "--batch-size", "4", "--workers", "0", "--log-every", "1",
           "--device", "cpu", "--max-steps", "100000", "--dist-timeout", "0.1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics, deadline = tmp_path / "stuck" / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.2)
    def is_rank1(pid):  # one of this test's train.py processes, with RANK=1 in its environment
        try:
            return (str(tmp_path).encode() in open(f"/proc/{pid}/cmdline", "rb").read()
                    and b"\0RANK=1\0" in b"\0" + open(f"/proc/{pid}/environ", "rb").read())
        except OSError:  # a process that ended meanwhile
            return False
    rank1 = [int(p) for p in os.listdir("/proc") if p.isdigit() and is_rank1(p)]
    assert len(rank1) == 1, rank1
    os.kill(rank1[0], signal.SIGSTOP)
    try:
        proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            os.kill(rank1[0], signal.SIGKILL)
    assert proc.returncode != 0


def test_pretrained_clip_starts_every_branch(world, tmp_path, monkeypatch):
    """--pretrained: an open_clip-layout file (a K = 1 model here, exported by to_open_clip) becomes the start of
    a K = M run: at a learning rate of 1e-12 the first checkpoint holds its weights, the class token K times. A
    file for another preset stops before training, naming the parameter and both shapes."""
    from data import Tokenizer
    from model import PRESETS, HolisticCLIP, ModelConfig
    from prepare.clip import to_open_clip
    vocab = Tokenizer.load(str(world / "tokenizer.json")).vocab_size
    clip, _ = to_open_clip(HolisticCLIP(ModelConfig(**PRESETS["tiny"], vocab_size=vocab)))
    torch.save(clip, tmp_path / "clip.pt")
    assert train_here(monkeypatch, world, tmp_path / "runs", "--name", "ft", "--model", "tiny", "--pretrained",
                      str(tmp_path / "clip.pt"), "--max-steps", "1", "--lr", "1e-12", "--wd", "0",
                      "--val-data", "none") is None
    got = weights(tmp_path / "runs" / "ft")
    assert got["visual.class_embedding"].shape == (M, PRESETS["tiny"]["vision_width"])
    for name, w in got.items():
        assert torch.allclose(w, clip[name].reshape(-1, *w.shape[1:])[:1].expand_as(w) if "visual.class_emb" in name
                              else w if name == "visual.positional_embedding" else clip[name], atol=1e-9), name
    assert torch.allclose(got["visual.positional_embedding"][:M], clip["visual.positional_embedding"][:1], atol=1e-9)
    os.remove(tmp_path / "clip.pt")  # a resumed run needs its checkpoint only, and takes no new start
    assert train_here(monkeypatch, world, tmp_path / "runs", "--name", "ft", "--resume", "latest", "--max-steps",
                      "2", "--val-data", "none") is None
    message = train_here(monkeypatch, world, tmp_path / "runs", "--name", "ft", "--resume", "latest",
                         "--force-quick-gelu")
    assert message == "error: --force-quick-gelu sets up a new run; a resumed run keeps its checkpoint's", message
    torch.save(clip, tmp_path / "clip.pt")
    message = train_here(monkeypatch, world, tmp_path / "runs", "--name", "small", "--model", "small",
                         "--pretrained", str(tmp_path / "clip.pt"), "--max-steps", "1")
    assert message == (f"error: --pretrained {tmp_path / 'clip.pt'}: positional_embedding: the checkpoint's shape "
                       "(32, 64) does not fit this model's (77, 256)"), message


def test_shards_train_and_resume_exactly(world, tmp_path):
    """--train-data 'DIR/{00000..00007}.tar' with 2 loader processes: a run stopped after step 3 and resumed
    logs the same losses as a straight run (the resumed epoch skips 3 batches, an odd number of them)."""
    from prepare.shards import write_shards
    pattern = write_shards(str(world / "train.jsonl"), str(tmp_path / "shards"), shard_size=6)
    flags = ("--train-data", pattern, "--val-data", "none", "--workers", "2", "--max-steps", "5")
    train(world, tmp_path / "runs", *flags, "--name", "straight")
    train(world, tmp_path / "runs", *flags, "--name", "split", "--stop-at-step", "3")
    train(world, tmp_path / "runs", *flags, "--name", "split", "--resume", "latest")
    assert losses(tmp_path / "runs" / "split") == losses(tmp_path / "runs" / "straight")
    assert sorted(losses(tmp_path / "runs" / "straight")) == [1, 2, 3, 4, 5]


def test_weight_decay_as_the_official_code(world, tmp_path, monkeypatch):
    """Weight decay on every parameter of two or more dimensions, the class and position embeddings included (as
    open_clip and the official code), and on nothing else: gains, biases and the temperature are 1-D or 0-D."""
    from model import PRESETS
    groups = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            groups.extend(params)
            super().__init__(params, **kw)
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    assert train_here(monkeypatch, world, tmp_path, "--name", "wd", "--max-steps", "1", "--val-data", "none") is None
    decay, other = groups
    assert decay["weight_decay"] == 0.2 and other["weight_decay"] == 0.0
    t = PRESETS["tiny-conv"]  # train.py's default
    N = (t["image_size"] // t["patch_size"]) ** 2
    shapes = [tuple(q.shape) for q in decay["params"]]
    assert (M, t["vision_width"]) in shapes and (M + N, t["vision_width"]) in shapes  # class and positions
    assert (t["context_length"], t["text_width"]) in shapes                          # text positions
    assert all(q.ndim >= 2 for q in decay["params"]) and all(q.ndim < 2 for q in other["params"])


def test_resume_a_checkpoint_older_than_a_flag(world, tmp_path, monkeypatch):
    """A checkpoint written before a flag existed (its args lack it) resumes with that flag's default."""
    assert train_here(monkeypatch, world, tmp_path, "--name", "old", "--max-steps", "2", "--stop-at-step", "1",
                      "--val-data", "none") is None
    path = tmp_path / "old" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    for flag in ("multi_positive", "official_cls_mask", "pretrained", "tokenizer"):
        del ckpt["args"][flag]
    torch.save(ckpt, path)
    assert train_here(monkeypatch, world, tmp_path, "--name", "old", "--resume", "latest") is None
    assert sorted(losses(tmp_path / "old")) == [1, 2]
