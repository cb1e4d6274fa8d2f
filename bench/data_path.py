"""The data path at scale (results/data_path.md): start-up time and memory of one rank against the number of
records, before (data.py as of commit f25a751: every record a dict, every caption tokenised into int64 at every
start) and after (the token cache: built once in 2 processes, then memory-mapped); and the loader alone, images/s
from tar shards against jsonl.

    python bench/data_path.py                         # 10k, 100k and 1M records, then the loader table
    python bench/data_path.py --records 10000 --loader-batches 0

Records are the synthetic world's train records repeated (M = 6, T = 77; images need not exist, so the image
check is left out of "cold"). Every measurement is its own fresh process. Memory: the rise over the process after
its imports, as RSS (resident, file pages included) and anonymous memory (private: what each extra rank adds; the
token cache's pages are file pages, shared by every rank and loader worker on a machine).
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BEFORE = "f25a751"  # the last commit before the token cache


def memory():
    """(RSS, anonymous) of this process in bytes, from /proc/self/smaps_rollup. Anonymous memory is what a rank
    adds on its own; the rest of RSS is file pages (the page cache), shared by every process that maps them."""
    fields = dict(line.split(":") for line in open("/proc/self/smaps_rollup").read().splitlines()[1:])
    return int(fields["Rss"].split()[0]) * 1024, int(fields["Anonymous"].split()[0]) * 1024


def measure(mode, path, tokenizer):
    """One rank's start-up in this process: the seconds, and the memory it added; printed as JSON."""
    import numpy as np
    import data
    from prepare.cache import cached_records
    tok = data.Tokenizer.load(tokenizer)
    if mode == "before":  # the old ImageTextDataset: records as dicts, every caption tokenised, int64
        spec = importlib.util.spec_from_loader("old_data", loader=None)
        old = importlib.util.module_from_spec(spec)
        exec(subprocess.run(["git", "show", f"{BEFORE}:data.py"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout, old.__dict__)
        tok = old.Tokenizer.load(tokenizer)
    base, t0 = memory(), time.perf_counter()
    if mode == "before":
        records = old.read_records(path)
        t1 = time.perf_counter()
        tokens = tok.tokenize([c for r in records for c in r["caption"]], 77).view(len(records), -1, 77)
    else:
        records = data.read_records(path) if mode == "cold" else None  # cold: parsed, then cached
        t1 = time.perf_counter()
        tokens = cached_records(path, tok, 77, records=records, workers=2).tokens
    t2, (rss, anon) = time.perf_counter(), memory()
    if mode != "before":
        np.add.reduce(tokens, axis=None)  # touch every page, as an epoch of training does: shared, not private
    print(json.dumps(dict(seconds=t2 - t0, tokenise=t2 - t1, rss=rss - base[0], anon=anon - base[1],
                          touched=memory()[1] - base[1], n=len(tokens))))


def startup_table(counts, tokenizer, folder):
    lines = open(os.path.join(ROOT, "data", "shapes", "train.jsonl")).readlines()
    print(f"{'records':>9} {'path':<7} {'start s':>8} {'tokens s':>9} {'captions/s':>11} {'RSS MB':>8} "
          f"{'anon MB':>8} {'anon B/rec':>10} {'after an epoch':>14}")
    for n in counts:
        path = os.path.join(folder, f"r{n}.jsonl")
        with open(path, "w") as f:
            f.writelines(lines[i % len(lines)] for i in range(n))
        for mode in ("before", "cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--measure", mode, path, tokenizer], capture_output=True,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.splitlines()[-1])
            rate = f"{6 * n / r['tokenise']:11,.0f}" if mode != "warm" else f"{'-':>11}"
            epoch = f"{r['touched'] / n:8.0f} B/rec" if mode != "before" else f"{'-':>14}"
            print(f"{n:>9,} {mode:<7} {r['seconds']:8.2f} {r['tokenise']:9.2f} {rate} {r['rss'] / 2**20:8.1f} "
                  f"{r['anon'] / 2**20:8.1f} {r['anon'] / n:10.0f} {epoch}", flush=True)
        os.remove(path)
        os.remove(path + ".cache")


def loader_table(batches, folder):
    """Images/s of the training loader alone (2 workers, batch 128, the tiny preset's 64 px): the world from its
    jsonl (token cache) against the same records as tar shards of 1,000."""
    import data
    from prepare.cache import cached_records
    from prepare.shards import ShardDataset, expand_shards, write_shards
    train = os.path.join(ROOT, "data", "shapes", "train.jsonl")
    tok = data.Tokenizer.load(data.tokenizer_path(train))
    pattern = write_shards(train, os.path.join(folder, "shards"), shard_size=1000)
    jsonl = data.ImageTextDataset(cached_records(train, tok, 32), tok, 64, train=True)
    shards = ShardDataset(expand_shards(pattern), tok, 64, 128, None, 32, workers=2)
    print(f"\nloader alone, {batches} batches of 128 after one of warm-up, 2 workers")
    for name, loader in (("jsonl", data.make_loader(jsonl, 128, True, workers=2)), ("shards", shards.loader(0))):
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        print(f"{name:<7} {batches * 128 / (time.perf_counter() - t0):8.0f} images/s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--loader-batches", type=int, default=40, help="0: no loader table")
    p.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # one measurement, in its own process
    args = p.parse_args()
    if args.measure:
        return measure(*args.measure)
    tokenizer = os.path.join(ROOT, "data", "shapes", "tokenizer.json")
    with tempfile.TemporaryDirectory() as folder:
        startup_table(args.records, tokenizer, folder)
        if args.loader_batches:
            loader_table(args.loader_batches, folder)


if __name__ == "__main__":
    main()
