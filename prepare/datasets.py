"""prepare/datasets.py: the datasets a training run opens, at any scale. train.py calls open_datasets once, on every
rank, after its flags are read: which tokenizer (the checkpoint's, --tokenizer, the data's own, or one trained on
the train captions), which train set (a jsonl/CSV file through its token cache, prepare/cache.py, or tar shards,
prepare/shards.py) and the val split. Rank 0 writes what is missing (the default synthetic world, a tokenizer, a
token cache) while the others wait at the barrier, then every rank opens the same files. With --synthetic-tensors
(throughput only) train.py calls synthetic_batches instead.

    python train.py --train-data d/train.jsonl --val-data d/val.jsonl       # a file: checked, cached, memory-mapped
    python train.py --train-data 'd/{00000..00019}.tar' --tokenizer d/tokenizer.json    # shards: streamed
    python train.py --model base --synthetic-tensors --max-steps 30                       # no data: random batches
    python -m pytest -q tests/test_train.py tests/test_scale.py
"""
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import DataError, ImageTextDataset, Tokenizer, check_images, read_records, tokenizer_path  # noqa: E402
from prepare.cache import cached_records  # noqa: E402
from prepare.shards import ShardDataset, expand_shards  # noqa: E402
from prepare.world import make_world, world_mismatch  # noqa: E402


def open_datasets(args, train_path, val_path, image_size, context_length, run_dir, rank, world, barrier,
                  tokenizer=None):
    """-> (tokenizer, train set, val set or None). args: train.py's flags (--train-data, the read options,
    --tokenizer, --vocab-size, --val-data, --batch-size, --seed, --workers); tokenizer: a resumed run's own. Bad
    input is a DataError naming FILE:LINE (or the shard and member), raised before the first step."""
    master = rank == 0
    if args.train_data is None:  # the default, the synthetic world: rank 0 writes it while the others wait (one copy,
        # on the shared disk); one written by another version of prepare/world.py, or with other arguments, is not
        # silently taken for the default
        if not os.path.exists(train_path):
            if master:
                print(f"generating the synthetic world in {os.path.dirname(train_path)} (first use)")
                make_world(os.path.dirname(train_path))
            barrier()
        elif why := world_mismatch(os.path.dirname(train_path)):
            raise DataError(f"{why}: move it away (the next run writes the default world) or train on it as it is "
                            f"with --train-data {train_path}")
    read = dict(captions=args.captions, on_count=args.caption_count, skip_bad=args.skip_bad, sep=args.csv_separator)
    shards = train_path.endswith(".tar")  # webdataset-style tar shards ('dir/{00000..00099}.tar'), else jsonl/CSV
    # the tokenizer: the data's own lives beside the real file (not a link to it); one trained here by rank 0 is
    # kept there too, or with the run when the data's folder is read-only
    tok_path, run_tok = tokenizer_path(train_path), os.path.join(run_dir, "tokenizer.json")
    train_records = None  # read here only when a tokenizer must be trained on them
    if tokenizer is None and args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    elif tokenizer is None and shards and not os.path.exists(tok_path):
        raise DataError(f"{train_path}: shards need a tokenizer: --tokenizer, or a tokenizer.json beside them")
    elif tokenizer is None:  # the data's own, or one trained here: every rank takes the barrier either way
        if master and not os.path.exists(tok_path):
            train_records = check_images(train_path, read_records(train_path, **read), args.skip_bad)
            tokenizer = Tokenizer.train([c for r in train_records for c in r["caption"]], args.vocab_size)
            try:
                tokenizer.save(tok_path)
            except OSError:
                tok_path = run_tok
                tokenizer.save(tok_path)
            print(f"trained a {args.vocab_size}-token BPE on the train captions -> {tok_path}")
        barrier()
        tokenizer = Tokenizer.load(tok_path if os.path.exists(tok_path) else run_tok)
        if master and train_records is None and tokenizer.vocab_size != args.vocab_size:
            print(f"note: {tok_path} has {tokenizer.vocab_size} ids; --vocab-size {args.vocab_size} sizes only a "
                  "tokenizer trained here (move that one away to train another)")
    # the train set. Shards are streamed (no index; each loader process reads whole shards, and the epoch length
    # comes from sizes.json); their bad samples stop the run when met, named by shard and member. A jsonl/CSV file:
    # bad input stops here, before the first step, with FILE:LINE and the reason (or is skipped and counted with
    # --skip-bad): rank 0 parses every record, opens and verifies every image and tokenises the captions into the
    # token cache beside the data (keyed by its bytes, so every later run finds it), or with the run when that
    # folder is read-only; the other ranks, and later runs on the same data, memory-map it
    if shards:
        train_set = ShardDataset(expand_shards(train_path), tokenizer, image_size, args.batch_size, args.captions,
                                 context_length, args.seed, rank, world, args.workers, args.caption_count,
                                 args.skip_bad)
    else:
        writable = os.access(os.path.dirname(os.path.realpath(train_path)), os.W_OK)
        cache = dict(cache=None if writable else os.path.join(run_dir, "train.cache"),
                     context_length=context_length, **read)
        if master:
            cached_records(train_path, tokenizer, records=train_records, **cache)
        barrier()
        train_set = ImageTextDataset(cached_records(train_path, tokenizer, build=False, **cache), tokenizer,
                                     image_size, train=True, seed=args.seed)
    # the val split must have the train set's M
    val_records = None  # --val-data none, or no val.jsonl beside the train data
    if args.val_data != "none" and os.path.exists(val_path):
        val_records = check_images(val_path, read_records(val_path, **{**read, "captions": train_set.M}),
                                   args.skip_bad)
    elif args.val_data not in (None, "none"):
        raise DataError(f"{val_path}: --val-data not found (give --val-data none to train without one)")
    elif args.val_data is None and master:  # said now, not discovered when the run ends without its table
        print(f"note: no {val_path} beside the train data: this run is not evaluated (give --val-data)")
    val_set = ImageTextDataset(val_records, tokenizer, image_size, context_length=context_length,
                               seed=args.seed) if val_records else None
    truncated = tokenizer.truncated + (0 if shards else train_set.records.truncated)
    if master and truncated:
        print(f"note: {truncated} captions were truncated to {context_length} tokens")
    return tokenizer, train_set, val_set


def synthetic_batches(args, image_size, context_length, rank, device, steps_per_epoch):
    """--synthetic-tensors, throughput without loading: -> (M, vocab, epoch_batches), where epoch_batches(epoch, skip)
    returns one random batch, made once on the device, for each remaining step of the epoch; nothing is read."""
    M, vocab = args.texts or args.branches or 1, 49408  # 49408: openai/CLIP's BPE vocabulary
    g = torch.Generator(device="cpu").manual_seed(args.seed + rank)
    images = torch.randn(args.batch_size, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, vocab - 2, (args.batch_size, M, context_length), generator=g)
    tokens[..., -1] = vocab - 1  # EOT (the largest id) at the end of every text
    batch = images.to(device), tokens.to(device)
    return M, vocab, lambda epoch, skip: itertools.repeat(batch, steps_per_epoch - skip)
