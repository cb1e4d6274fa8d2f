"""Train Holistic CLIP: K image branches matched to M texts per image (paper.md sections 3 and 5).

One file, read top to bottom: config, distributed/device, data, model, optimizer, resume, compile/DDP,
schedule, the loop's helpers, loop, final evaluation. The same script runs as one plain process or under torchrun:

    python train.py                                   # built-in synthetic world, tiny-conv preset, CPU, 10 min
    python train.py --train-data d/train.jsonl --val-data d/val.jsonl --model small --branches 6
    torchrun --nproc_per_node=8 train.py --model base --train-data cc3m/train.jsonl --batch-size 256 \
        --epochs 100 --lr 5e-4 --warmup 2000 --wd 0.2 --precision bf16 --compile
    python train.py --name NAME --resume latest       # continue exactly where NAME stopped
    python train.py --model base --synthetic-tensors --max-steps 30 --precision bf16 --compile  # throughput

Letters: B images per rank, W world size (global batch W*B = negatives per step), K image branches,
M texts per image, T tokens per text, E joint embedding dim.
--loss o2o: K = 1 on caption slot 0 only (myopic CLIP); o2m: K = 1 on all M slots; m2m: K branches
(default K = M) on M slots, K != M = the official free matching. The run folder runs/NAME/ holds
params.json, metrics.jsonl (one JSON line per log step), ckpt.pt and results.jsonl.
"""
import argparse
import copy
import fcntl
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DataError, Tokenizer, make_loader, write_atomic
from eval import evaluate, print_table
from loss import branch_diversity, m2m_loss
from model import PRESETS, HolisticCLIP, ModelConfig, flops_per_sample, read_checkpoint, write_checkpoint
from prepare.clip import load_clip
from prepare.datasets import open_datasets, synthetic_batches
from prepare.shards import ShardDataset

# -----------------------------------------------------------------------------
# config: open_clip-familiar flag names. Every flag lands in params.json and in the checkpoint, so a run can
# always be told apart from another, and resumed, from its folder alone.
p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
add, flag = p.add_argument, argparse.BooleanOptionalAction
# data: what a sample is (data.py), and what to do with records that do not fit
add("--train-data", help="training jsonl/csv/tsv; none given: the synthetic world in data/shapes")
add("--val-data", help="validation jsonl/csv/tsv; none given: val.jsonl beside the train data, if any; 'none': no eval")
add("--csv-separator", help="separator of a .csv/.tsv file; none given: by the extension")
add("--captions", type=int, help="expected M per record; none given: that of the first record")
add("--caption-count", choices=["error", "pad", "drop"], default="error", help="records of other than M captions")
add("--skip-bad", action="store_true", help="skip and count bad records and images instead of stopping")
add("--vocab-size", type=int, default=1024, help="BPE vocabulary when a tokenizer must be trained")
add("--tokenizer", help="a tokenizer.json, or CLIP's bpe_simple_vocab_16e6.txt.gz; none given: the data's own")
# model: a preset of model.py, and the paper's design choices and ablations (paper.md sections 2 and 3)
add("--model", default="tiny-conv", choices=list(PRESETS), help="architecture preset (model.py)")
add("--branches", type=int, help="K image branches for --loss m2m; none given: M")
add("--branch-type", default="cls", choices=["cls", "mlp"], help="K class tokens or K MLP heads")
add("--isolate-cls", action=flag, default=True, help="class token i does not see class token j (CLS design)")
add("--official-cls-mask", action="store_true", help="the official code's mask as it runs: +1 between class tokens")
add("--loss", default="m2m", choices=["m2m", "o2m", "o2o"], help="multi-to-multi, one-to-many, CLIP")
add("--branch-diversity", action=flag, default=True, help="the 0.7 hinge on the inter-branch cosine when K > 1")
add("--fused-loss", action=flag, default=True, help="tiled loss that never holds the K x B x B logits (loss.py)")
add("--multi-positive", action="store_true", help="identical texts in a batch are positives (with --no-fused-loss)")
# starting from an existing CLIP (prepare/clip.py): its weights, and what its architecture needs
add("--pretrained", help="an openai/CLIP or open_clip ViT file (.pt, .bin, .safetensors), copied into the K branches")
add("--force-quick-gelu", action="store_true", help="QuickGELU in the MLPs, as openai's released weights need")
add("--force-image-size", type=int, help="image side other than the preset's; --pretrained positions are resampled")
# optimisation: the paper's recipe (paper.md section 5), with defaults sized for the tiny-conv preset on a CPU
add("--batch-size", type=int, default=128, help="images per rank (B)")
add("--lr", type=float, default=1e-3, help="peak learning rate")
add("--wd", type=float, default=0.2, help="AdamW weight decay on >= 2-D weights")
add("--warmup", type=int, help="linear warm-up steps; none given: 100, or half a shorter run")
add("--epochs", type=int, default=7, help="passes over the training data")
add("--max-steps", type=int, help="total optimizer steps (overrides --epochs)")
add("--stop-at-step", type=int, help="save and stop after this step, keeping the full run's schedule (split long runs)")
add("--grad-clip-norm", type=float, help="clip the gradient norm")
# hardware: precision, compilation, devices, loader processes, how long ranks wait for each other
add("--precision", choices=["fp32", "bf16"], help="none given: bf16 on CUDA, fp32 on CPU")
add("--compile", action=flag, help="torch.compile the model and the loss tiles; none given: on for CUDA")
add("--device", help="cpu, cuda, cuda:1; none given: cuda if available")
add("--workers", type=int, default=2, help="data loader processes per rank")
add("--dist-timeout", type=float, default=10, help="minutes a rank waits for the others (a step, a validation)")
add("--seed", type=int, default=0, help="model init, data order and augmentation")
# bookkeeping: where the run lives, how often it logs, evaluates and saves
# open_clip calls this --logs; torchrun (argparse on Python 3.11) rejects that as an abbreviation of its --logs-specs
add("--logs-dir", default="runs", help="folder of run folders")
add("--name", help="run folder name; none given: from the flags")
add("--resume", help="checkpoint path, or 'latest' for runs/NAME/ckpt.pt")
add("--log-every", type=int, default=20, help="steps between log lines")
add("--eval-every", type=int, default=0, help="steps between validations (0: only at the end)")
add("--save-every", type=int, default=200, help="steps between checkpoints")
# measurement: MFU and a throughput mode without data loading
add("--peak-tflops", type=float, help="device peak for MFU; none given: from the device's name")
add("--synthetic-tensors", action="store_true", help="random batches made on the device: throughput without loading")
add("--texts", type=int, help="M for --synthetic-tensors; none given: K")
args = p.parse_args()


def fail(message):
    """Stop with the message on stderr and exit status 1 (nothing written yet, or nothing lost)."""
    sys.exit(f"error: {message}")


def check_flags(args):
    """Every flag's range in one place: a nonsense value stops here, named, instead of a traceback later or a
    silent fallback (a 0 read as "the default", a run that never ends, a K that is dropped)."""
    at_least = dict(batch_size=1, epochs=1, max_steps=1, stop_at_step=1, log_every=1, save_every=1, warmup=0,
                    eval_every=0, workers=0, branches=1, texts=1, vocab_size=259)  # 259: PAD, 256 bytes, SOT, EOT
    for key, low in at_least.items():
        if getattr(args, key) is not None and getattr(args, key) < low:
            fail(f"--{key.replace('_', '-')} {getattr(args, key)}: must be at least {low}")
    for key in ("lr", "wd", "grad_clip_norm", "peak_tflops", "dist_timeout"):  # finite, above 0 (wd: or 0)
        value, floor = getattr(args, key), "at least 0" if key == "wd" else "above 0"
        if value is not None and not (math.isfinite(value) and (value >= 0 if key == "wd" else value > 0)):
            fail(f"--{key.replace('_', '-')} {value}: must be a finite number {floor}")
    if args.multi_positive and args.fused_loss:
        fail("--multi-positive is computed by the reference loss only: add --no-fused-loss")
    if args.loss != "m2m" and args.branches not in (None, 1):
        fail(f"--branches {args.branches} sets K for --loss m2m; --loss {args.loss} has one branch (K = 1)")
    if args.csv_separator is not None and len(args.csv_separator) != 1:
        fail(f"--csv-separator {args.csv_separator!r}: one character, such as ',' or $'\\t'")
    if args.pretrained and PRESETS[args.model].get("conv_stem"):
        fail(f"--pretrained fits a patchify ViT: --model {args.model} has a conv stem, which CLIP weights lack "
             "(use --model tiny, small or base)")
    patch = PRESETS[args.model]["patch_size"]
    if args.force_image_size is not None and (args.force_image_size < patch or args.force_image_size % patch):
        fail(f"--force-image-size {args.force_image_size}: a multiple of --model {args.model}'s patch size {patch}")


# resume: the run's own flags come back from the checkpoint; flags given now win, even at their default value.
# A run continues in its checkpoint's folder; with --name it continues in that new folder, the old one untouched.
# The default name spells out the ablation row (loss, preset, design, K, seed), so two rows never share a folder.
ckpt = None
name = args.name or f"{args.loss}-{args.model}-{args.branch_type}-k{args.branches or 'M'}-s{args.seed}"
run_dir = os.path.join(args.logs_dir, name)
continuing = False  # True: run_dir is the folder the checkpoint was written in
if args.resume:
    path = os.path.join(run_dir, "ckpt.pt") if args.resume == "latest" else args.resume
    try:
        ckpt = read_checkpoint(path, ("model", "config", "optimizer", "tokenizer", "step", "args", "rng"))
    except ValueError as e:  # missing, corrupt, or not one of this script's
        fail(e)
    run_dir = run_dir if args.name else os.path.dirname(os.path.abspath(path))
    continuing = os.path.realpath(os.path.dirname(path)) == os.path.realpath(run_dir)
    given = copy.deepcopy(p)  # a parser without defaults: the flags on the command line, even at their default
    for action in given._actions:
        action.default = argparse.SUPPRESS
    now = vars(given.parse_args())
    if started := [f for f in ("pretrained", "tokenizer", "force_quick_gelu", "force_image_size") if f in now]:
        fail(f"--{started[0].replace('_', '-')} sets up a new run; a resumed run keeps its checkpoint's")
    args = argparse.Namespace(**{**vars(p.parse_args([])), **ckpt["args"], **now})  # defaults: flags added since
check_flags(args)

# -----------------------------------------------------------------------------
# distributed / device: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain run has none of them.
# gloo on CPUs, nccl on GPUs (one per process, LOCAL_RANK picks it); the same code path otherwise.
ddp = "RANK" in os.environ
if ddp:
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    # a rank that stops (killed, stuck) stops the others after --dist-timeout, not torch's 30 minutes
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=args.dist_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
else:
    rank, world = 0, 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
master = rank == 0  # rank 0 logs, evaluates and writes checkpoints
torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
use_compile = args.compile if args.compile is not None else device.type == "cuda"
# precision in three lines: one autocast context, TF32 on for the fp32 matmuls
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
barrier = dist.barrier if ddp else lambda: None  # every rank waits for the others (after rank 0 alone wrote a file)

# the run folder: rank 0 takes it before anything is read or written. A new run needs an absent or empty folder,
# so no run is ever overwritten; a lock held while this process lives keeps a second train.py out of it.
if master:
    files = sorted(set(os.listdir(run_dir)) - {"lock"}) if os.path.isdir(run_dir) else []
    if files and not continuing:
        fail(f"{run_dir} already holds a run ({', '.join(files[:4])}): continue it with --name {name} --resume "
             f"latest, or remove it, or choose another --name")
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = open(os.path.join(run_dir, "lock"), "w")
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the OS when the process ends, even on kill -9
    except BlockingIOError:
        fail(f"{run_dir} is in use by another train.py")
    except OSError as e:  # --logs-dir a file, say
        fail(f"{run_dir}: cannot make the run folder ({e.strerror})")


# -----------------------------------------------------------------------------
# data: records -> tokenizer -> datasets -> epoch_batches(epoch, skip), one epoch of this rank's share at a
# time. The default is the synthetic world, generated on first use. The image size and context length come
# from the architecture (the checkpoint's when resuming), so the datasets exist before the model does.
preset = PRESETS[args.model]
arch = ckpt["config"] if ckpt is not None else {**preset, "quick_gelu": args.force_quick_gelu,
                                                  "image_size": args.force_image_size or preset["image_size"]}
if args.synthetic_tensors:  # throughput only: one random batch, made on the device, every step (prepare/datasets.py)
    steps_per_epoch = 1000  # there are no epochs; this only numbers the steps
    M, vocab, epoch_batches = synthetic_batches(args, arch["image_size"], arch["context_length"], rank, device,
                                                steps_per_epoch)
    tokenizer = train_set = val_set = None
else:  # a jsonl/CSV file or tar shards; none given: the synthetic world, written on first use (prepare/datasets.py)
    train_path = args.train_data or os.path.join("data", "shapes", "train.jsonl")
    val_path = args.val_data or os.path.join(os.path.dirname(train_path), "val.jsonl")
    try:  # the tokenizer (a resumed run's own), the train set and the val split (prepare/datasets.py)
        tokenizer, train_set, val_set = open_datasets(
            args, train_path, val_path, arch["image_size"], arch["context_length"], run_dir, rank, world, barrier,
            tokenizer=Tokenizer.from_dict(ckpt["tokenizer"]) if ckpt is not None else None)
    except DataError as e:
        fail(e)
    M, vocab = train_set.M, tokenizer.vocab_size
    shards = isinstance(train_set, ShardDataset)  # webdataset-style tar shards, streamed (prepare/shards.py)
    steps_per_epoch = (train_set.batches * train_set.workers if shards else
                       len(train_set) // (args.batch_size * world))  # drop_last: full global batches only
    if steps_per_epoch == 0:
        fail(f"{train_path}: {len(train_set)} records are fewer than one global batch of {args.batch_size * world}")

    def epoch_batches(epoch, skip):
        # the order is a function of (seed, epoch) and the skipped batches are never used: exact resume
        if shards:
            return train_set.loader(epoch, skip, pin_memory=device.type == "cuda")
        return make_loader(train_set, args.batch_size, train=True, workers=args.workers, seed=args.seed,
                           epoch=epoch, skip_batches=skip, pin_memory=device.type == "cuda")

# K and the slots trained on follow from the loss: the three rows of the paper's main comparison
K = ckpt["config"]["branches"] if ckpt is not None else 1 if args.loss in ("o2o", "o2m") else (args.branches or M)
slots = 1 if args.loss == "o2o" else M  # o2o trains on caption slot 0 (the alt-text) only
max_steps = args.max_steps or args.epochs * steps_per_epoch
warmup = min(100, max_steps // 2) if args.warmup is None else args.warmup
if warmup > max_steps:
    fail(f"--warmup {warmup} is longer than the run ({max_steps} steps): the rate would never reach --lr")

# -----------------------------------------------------------------------------
# model: the architecture is a preset plus the flags; asdict(config) goes into every checkpoint
if ckpt is not None:
    config = ModelConfig(**ckpt["config"])
else:
    config = ModelConfig(**{**arch, "branches": K, "branch_type": args.branch_type,
                            "isolate_cls": args.isolate_cls, "official_mask": args.official_cls_mask,
                            "vocab_size": vocab})
model = HolisticCLIP(config)  # init_weights runs here, after torch.manual_seed above
# or a CLIP's weights, its one image branch copied into the K (prepare/clip.py); a resumed run has its own
if args.pretrained and ckpt is None:
    try:
        load_clip(model, args.pretrained, resize_positions=args.force_image_size is not None)
    except ValueError as e:
        fail(f"--pretrained {args.pretrained}: {e}" + (" (a text tower needs the tokenizer it was trained with: "
                                                       "--tokenizer)" if str(e).startswith("token_embedding") else ""))
model = model.to(device)
raw_model = model  # unwrapped: saved, evaluated and clamped

# -----------------------------------------------------------------------------
# optimizer: AdamW (CLIP's betas and eps); weight decay as open_clip and the official code apply it: on every
# parameter of two or more dimensions (the class and position embeddings included) unless its name says it is a
# norm's, a bias or the temperature
params = [(n, q) for n, q in raw_model.named_parameters() if q.requires_grad]
decays = {n: q.ndim >= 2 and not any(word in n for word in ("ln", "bn", "bias", "logit_scale")) for n, q in params}
decay = [q for n, q in params if decays[n]]
other = [q for n, q in params if not decays[n]]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": other, "weight_decay": 0.0}],
                              lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def data_key():
    """What a checkpoint must share with the run that resumes it: the training set's size and M, and W."""
    key = {"records": len(train_set) if train_set else 0, "M": M, "ranks": world}
    return {**key, "workers": args.workers} if isinstance(train_set, ShardDataset) else key


# -----------------------------------------------------------------------------
# resume: weights, optimizer, step and RNG states; the data order is a function of (seed, epoch), so
# skipping the batches already seen in the current epoch replays the straight run exactly
step = 0
if ckpt is not None:
    raw_model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    step = ckpt["step"]
    torch.set_rng_state(ckpt["rng"]["cpu"])  # no dropout today; kept so that any added randomness resumes
    # "continues exactly" holds only on the same data and number of ranks: say what changed and stop
    now, then = data_key(), ckpt.get("data") or data_key()  # a checkpoint older than this check carries none
    if now != then:
        fail("--resume: " + ", ".join(f"{k} {then[k]} -> {now[k]}" for k in now if now[k] != then[k]) +
             " since the checkpoint was written, so the run would not continue exactly: resume with the same "
             "data and number of ranks (a run on other data starts without --resume)")
    # metrics.jsonl loses the lines of steps after `step` (logged by a run killed before its next save, and about
    # to be logged again) and a last line torn by that kill (it has no newline)
    if master and continuing and os.path.exists(log := os.path.join(run_dir, "metrics.jsonl")):
        write_atomic(log, "".join(x for x in open(log) if x.endswith("\n") and json.loads(x)["step"] <= step))
    if master:
        print(f"resumed from step {step} of {max_steps}")

# -----------------------------------------------------------------------------
# compile / DDP: compile the model first, then wrap it; raw_model stays the plain module. DDP averages the
# gradients over ranks in backward; the loss itself already sees every rank's features (loss.gather).
if use_compile:
    model = torch.compile(model)
if ddp:
    model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


# -----------------------------------------------------------------------------
# schedule: linear warm-up then cosine to 0, computed from the step alone (so resume needs no state)
def lr_at(step):
    """The learning rate of (0-based) step `step`: linear to args.lr over `warmup` steps, then cosine."""
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -----------------------------------------------------------------------------
# start-up summary: the derived quantities a reader should check before a long run
n_params = sum(q.numel() for q in raw_model.parameters())
flops = flops_per_sample(config, slots)["total"] * 3  # forward + backward = 3 x forward, per image
# MFU = model FLOPs per second over the device's peak: the convention of open_clip's profile (model.py)
peaks = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "A10G": 70, "L4": 121}  # dense bf16 TFLOP/s
peak = args.peak_tflops or next((v for k, v in peaks.items()
                                 if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)
if master:
    with open(os.path.join(run_dir, "params.json"), "w") as f:
        json.dump({**vars(args), "K": K, "M": M, "slots": slots, "world": world, "max_steps": max_steps,
                   "config": asdict(config)}, f, indent=2)
    print(f"run {run_dir} | params {n_params / 1e6:.2f}M | K {K} | M {slots} of {M} | global batch "
          f"{args.batch_size * world} (= negatives per step) | device {device} x {world} | {precision} | "
          f"compile {use_compile} | steps {max_steps} ({steps_per_epoch}/epoch)")

# -----------------------------------------------------------------------------
# the loop's helpers: stop signals, the health check, checkpoints
stop_signal = []  # SIGTERM / SIGINT: finish the current step, save, exit cleanly
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop_signal.append(signum))
pending = []  # (step, flags on the host, CUDA event): health checks still on their way to the host


def health_check(loss, n, due):
    """Whether to stop after step n's backward: None, "signal", or "non-finite loss at step S". Every rank
    must agree, or the next step's collectives hang, so one tiny all-reduce carries (non-finite loss on any
    rank, a signal on any rank). Reading it at once would make the CPU wait for the GPU every step, so it
    is read one step later, and at once when step n is `due` (it logs, saves, evaluates or ends) or a stop
    is decided: no checkpoint ever follows a non-finite step."""
    flags = torch.stack([~torch.isfinite(loss.detach()), torch.full((), bool(stop_signal), device=device)])
    if ddp:
        flags = flags.float()  # NCCL and gloo reduce numbers, not booleans
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    host = flags.to("cpu", non_blocking=True)  # from CUDA: a pinned copy, there once `arrived` has passed
    arrived = torch.cuda.Event() if device.type == "cuda" else None  # on the CPU the copy is already done
    if arrived is not None:
        arrived.record()
    pending.append((n, host, arrived))
    verdict = None
    while pending and (due or verdict or pending[0][0] < n):  # earlier steps always; step n when due or stopping
        checked, host, arrived = pending.pop(0)
        if arrived is not None:
            arrived.synchronize()  # waits for that step's flags only, not for the work queued since
        if host[0]:
            return f"non-finite loss at step {checked}"
        if host[1]:
            verdict = "signal"
    return verdict


def save_checkpoint(step):
    """Write runs/NAME/ckpt.pt atomically (model.write_checkpoint): a crash or a power cut at any moment leaves
    the old or the new file; a failed write (a full disk) keeps the old checkpoint and stops the run."""
    state = {"model": raw_model.state_dict(), "config": asdict(config), "optimizer": optimizer.state_dict(),
             "tokenizer": tokenizer.to_dict() if tokenizer else None, "step": step, "data": data_key(),
             "epoch": step // steps_per_epoch, "args": vars(args), "rng": {"cpu": torch.get_rng_state()}}
    try:
        write_checkpoint(state, os.path.join(run_dir, "ckpt.pt"))
    except OSError as e:
        fail(f"{e}; " + (f"it still holds step {last_saved}" if last_saved is not None else "there is none yet"))


# -----------------------------------------------------------------------------
# loop: one epoch of batches at a time; a step is forward, loss, backward, health check, update, log, save
stopped, last_saved = None, (step if ckpt is not None else None)  # the step ckpt.pt holds
bar = tqdm(total=max_steps, initial=step, disable=None if master else True, dynamic_ncols=True)
metrics_file = open(os.path.join(run_dir, "metrics.jsonl"), "a") if master else None
t_log = time.time()
while step < max_steps and stopped is None:
    epoch, skip = divmod(step, steps_per_epoch)
    for images, tokens in epoch_batches(epoch, skip):
        # forward (autocast), the loss on fp32 unit vectors, backward. o2o keeps only caption slot 0.
        lr = lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images, tokens = images.to(device, non_blocking=True), tokens[:, :slots].to(device, non_blocking=True)
        with autocast:
            img, txt, scale = model(images, tokens)  # (B, K, E), (B, M, E), ()
        img, txt = img.float(), txt.float()
        contrastive = m2m_loss(img, txt, scale.float(), fused=args.fused_loss, compile=use_compile,
                               tokens=tokens if args.multi_positive else None)
        diversity = branch_diversity(img) if (K > 1 and args.branch_diversity) else torch.zeros((), device=device)
        loss = contrastive + diversity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        n = step + 1  # this step's number once done
        # due: a step whose end is observed (a log line, a checkpoint, an evaluation, the end of the run)
        due = (n % args.log_every == 0 or n % args.save_every == 0 or n == max_steps or n == args.stop_at_step
               or (args.eval_every and n % args.eval_every == 0))
        stopped = health_check(loss, n, due)
        if stopped and stopped.startswith("non-finite"):
            break  # before this step's update (the bad one itself when due): ckpt.pt keeps the last good state
        if n == args.stop_at_step and not stopped:
            stopped = f"--stop-at-step {n}"
        # the update: clip, AdamW, and CLIP's clamp (the temperature never goes below 1/100)
        if args.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip_norm)
        optimizer.step()
        with torch.no_grad():
            raw_model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1)

        if step % args.log_every == 0 or step == max_steps:
            # the logged loss is the mean over ranks = the loss of the global batch
            parts = torch.stack([loss, contrastive, diversity]).detach().float()
            if ddp:
                dist.all_reduce(parts)  # sum (gloo has no AVG)
                parts /= world
            # the wall time per step since the last log line (the first window includes start-up)
            dt = (time.time() - t_log) / (step % args.log_every or args.log_every)
            t_log = time.time()
            ips = args.batch_size * world / dt
            mfu = f"{100 * flops * ips / (peak * 1e12):.0f}%" if peak else "-"
            row = {"step": step, "epoch": epoch, "loss": parts[0].item(), "contrastive": parts[1].item(),
                   "diversity": parts[2].item(), "lr": lr, "scale": scale.item(), "ms": 1000 * dt, "img_s": ips}
            if device.type == "cuda":  # the peak so far, this rank
                row["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if master:
                bar.write(f"step {step:>6}/{max_steps} | loss {row['loss']:.4f} (div {row['diversity']:.3f}) | lr "
                          f"{lr:.2e} | scale {row['scale']:5.1f} | {1000 * dt:6.1f} ms | {ips:8,.0f} img/s | mfu {mfu}"
                          + (f" | {row['mem_gib']:.1f} GiB" if "mem_gib" in row else ""))
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
        if args.eval_every and step % args.eval_every == 0 and step < max_steps:
            # the headline retrieval and zero-shot on the val split, by rank 0 while the others wait at the barrier
            if master and val_set is not None:
                results = evaluate(raw_model, val_set, device=device, tokenizer=tokenizer, views=False)  # train() after
                val = {k: v for k, v in results.items() if isinstance(v, float)}
                bar.write("  val " + " | ".join(f"{k} {v:.1f}" for k, v in val.items()))
                metrics_file.write(json.dumps({"step": step, **{f"val/{k}": v for k, v in val.items()}}) + "\n")
            barrier()
        # a throughput run (--synthetic-tensors) writes no checkpoint: there is nothing to resume from
        saving = not args.synthetic_tensors and (stopped or step % args.save_every == 0 or step == max_steps)
        # the health check saw the loss, computed before the update; an update can still overflow. Every rank
        # holds the same weights (DDP), so every rank comes to the same answer, and no checkpoint holds them
        if saving and not all(bool(torch.isfinite(q).all()) for q in raw_model.parameters()):
            stopped = f"non-finite weights after step {step}"
            break
        if master and saving:
            save_checkpoint(step)
            last_saved = step
        if stopped or step >= max_steps:
            break
bar.close()

# -----------------------------------------------------------------------------
# cleanup: every rank is done with its steps, and rank 0 evaluates alone, needing no other rank. A clean stop
# says where it stopped; a non-finite loss or update exits non-zero with the step named; a finished run ends
# with the full evaluation table, appended to results.jsonl
if ddp:
    dist.barrier()
    dist.destroy_process_group()
if stopped and stopped.startswith("non-finite"):
    kept = f"{run_dir}/ckpt.pt still holds step {last_saved}" if last_saved is not None else "no checkpoint yet"
    print(f"stopping: {stopped}; {kept}", file=sys.stderr)
    sys.exit(1)
if stopped:
    if master:
        print(f"stopped ({stopped}) at step {step}; resume with --name {os.path.basename(run_dir)} --resume latest")
elif master and val_set is not None:
    # ckpt.pt is complete: a signal now stops the evaluation (minutes on a large split) at once
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.default_int_handler)
    raw_model.eval()
    try:
        results = {"step": step, "K": K, "M": slots,  # M = the slots trained on (1 for o2o)
                   **evaluate(raw_model, val_set, device=device, tokenizer=tokenizer)}
    except KeyboardInterrupt:
        fail(f"interrupted during the final evaluation; {run_dir}/ckpt.pt holds step {step}: evaluate it with "
             f"python eval.py --ckpt {run_dir}/ckpt.pt --data {val_path}")
    print_table(results)
    with open(os.path.join(run_dir, "results.jsonl"), "a") as f:
        f.write(json.dumps(results) + "\n")
