"""prepare/cache.py: the token cache, for jsonl/CSV datasets of millions of records. Read once, memory-mapped after:
train.py's rank 0 builds it on first use (every record parsed, every image verified, every caption tokenised in
parallel processes) beside the data, and every rank and loader worker of every later run memory-maps it, so a warm
start parses nothing and the token pages are shared. Build it ahead of a large multi-node job with the same options
train.py will use (otherwise the ranks wait for rank 0 up to --dist-timeout):

    python prepare/cache.py cc3m/train.jsonl --tokenizer cc3m/tokenizer.json --context-length 77
    python bench/data_path.py        # start-up time and memory per rank: 10k, 100k, 1M records
    python -m pytest -q tests/test_scale.py
"""
import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time

import numpy as np
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import DataError, Tokenizer, check_images, read_records, tokenizer_path  # noqa: E402

# -----------------------------------------------------------------------------
# The token cache: a large jsonl/CSV read once. FILE.cache holds its records as arrays (image paths, line numbers)
# and their tokens (n, M, T) as uint16 (int32 when V > 65,536). One process writes it after every record was parsed
# and every image verified; every rank and loader worker memory-maps it (the pages are shared), and a warm start
# parses nothing. It is keyed by the data file's bytes, the read options, the tokenizer and T, so a change rebuilds
# it, and a checksum over its arrays, verified at every start, turns a corrupt or truncated cache into a rebuilt one.

def _digest(f, start=0):
    """blake2b of an open binary file from `start` on, read in blocks of 16 MB."""
    h, _ = hashlib.blake2b(digest_size=16), f.seek(start)
    while block := f.read(1 << 24):
        h.update(block)
    return h.hexdigest()


def cache_key(path, tokenizer, context_length, read):
    """What a cache must have been built from: the data file's bytes and folder (image paths are absolute),
    read_records' options, the tokenizer and T."""
    try:
        with open(path, "rb") as f:
            data = _digest(f)
    except OSError as e:  # missing, a folder, unreadable: as read_records says it
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    vocab = hashlib.blake2b(json.dumps(tokenizer.to_dict()).encode(), digest_size=16).hexdigest()
    return {"version": 2, "data": data, "folder": os.path.dirname(os.path.realpath(path)), "read": read,
            "tokenizer": vocab, "T": context_length}


class CachedRecords:
    """An opened cache: len(), [i] -> {"image": path, "line": line}, tokens (n, M, T) memory-mapped, M, and
    truncated (captions cut to T when it was built). ValueError when the file is not a whole cache of `key`."""
    HEADER = 4096  # bytes of space-padded JSON header; the arrays follow, each at a multiple of 8 bytes

    def __init__(self, path, key):
        with open(path, "rb") as f:
            head = json.loads(f.read(self.HEADER))  # ValueError: not a cache, or a torn header
            if not isinstance(head, dict) or head.get("key") != key:
                raise ValueError("built from other data, options or tokenizer")
            if os.fstat(f.fileno()).st_size != head["size"] or _digest(f, self.HEADER) != head["digest"]:
                raise ValueError("truncated or corrupt (its checksum does not match)")
        n, self.M, T, self.truncated = head["n"], head["M"], head["T"], head["truncated"]
        at = head["at"]
        self.ends = np.memmap(path, np.int64, "r", offset=at["ends"], shape=(n,))  # where each path ends in paths
        self.lines = np.memmap(path, np.int32, "r", offset=at["lines"], shape=(n,))
        self.paths = np.memmap(path, np.uint8, "r", offset=at["paths"], shape=(head["blob"],))  # UTF-8, end to end
        # "c", copy-on-write: writable as torch wants, shared pages as long as nothing writes (nothing does)
        self.tokens = np.memmap(path, head["dtype"], "c", offset=at["tokens"], shape=(n, self.M, T))

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        start = self.ends[i - 1] if i else 0
        return {"image": self.paths[start:self.ends[i]].tobytes().decode(), "line": int(self.lines[i])}


def write_cache(path, key, records, tokenizer, context_length, workers=2):
    """records (read and checked) -> the cache at `path`, tokenised by `workers` forked processes that each fill
    their rows of the token array in place. Written as path.tmpPID, then renamed: whole or absent, and two runs
    building it at once each rename a whole one."""
    n, M, T, tmp = len(records), len(records[0]["caption"]), context_length, f"{path}.tmp{os.getpid()}"
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32)
    paths = [r["image"].encode() for r in records]  # UTF-8, once: the blob and where each path ends in it
    blob = b"".join(paths)
    at, size = {}, CachedRecords.HEADER
    for name, nbytes in ("ends", 8 * n), ("lines", 4 * n), ("paths", len(blob)), ("tokens", n * M * T * dtype.itemsize):
        at[name], size = size, size + -(-nbytes // 8) * 8
    with open(tmp, "wb") as f:
        f.truncate(size)
    np.memmap(tmp, np.int64, "r+", offset=at["ends"], shape=(n,))[:] = np.cumsum([len(p) for p in paths])
    np.memmap(tmp, np.int32, "r+", offset=at["lines"], shape=(n,))[:] = [r["line"] for r in records]
    np.memmap(tmp, np.uint8, "r+", offset=at["paths"], shape=(len(blob),))[:] = np.frombuffer(blob, np.uint8)
    context = multiprocessing.get_context("fork")
    done, cut = context.Value("q", 0), context.Value("q", 0)  # records tokenised, captions truncated: all workers

    def fill(lo, hi):  # rows lo..hi-1, 1,024 records at a time
        tokens, before = np.memmap(tmp, dtype, "r+", offset=at["tokens"], shape=(n, M, T)), tokenizer.truncated
        for a in range(lo, hi, 1024):
            b = min(a + 1024, hi)
            tokens[a:b] = tokenizer.tokenize([c for r in records[a:b] for c in r["caption"]], T).view(b - a, M, T)
            with done.get_lock():
                done.value += b - a
        tokens.flush()
        with cut.get_lock():
            cut.value += tokenizer.truncated - before

    procs = [context.Process(target=fill, args=(n * k // workers, n * (k + 1) // workers)) for k in range(workers)]
    for proc in procs:
        proc.start()
    with tqdm(total=n, desc=f"tokenising ({workers} processes)", disable=None) as bar:
        while any(proc.is_alive() for proc in procs):
            time.sleep(0.2)
            bar.update(done.value - bar.n)
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"{path}: a tokenising process failed (exit codes {[p.exitcode for p in procs]})")
    head = dict(key=key, n=n, M=M, T=T, dtype=dtype.name, at=at, blob=len(blob), size=size, truncated=cut.value)
    with open(tmp, "r+b") as f:
        head["digest"] = _digest(f, CachedRecords.HEADER)
        header = json.dumps(head).encode()
        if len(header) > CachedRecords.HEADER:  # a folder path thousands of characters long
            raise DataError(f"{path}: the cache's header needs {len(header)} bytes, more than {CachedRecords.HEADER}")
        f.seek(0)
        f.write(header.ljust(CachedRecords.HEADER))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def cached_records(path, tokenizer, context_length=77, cache=None, records=None, build=True, workers=2, **read):
    """The records of `path`, read with read_records' options `read`, as CachedRecords: from `cache` (default:
    FILE.cache beside the real file) when it holds this key, else built first from `records` (already read and
    checked with the same options) or by reading and checking the file. build=False: DataError instead of
    building (DDP: rank 0 builds, the others open)."""
    cache = cache or os.path.realpath(path) + ".cache"
    key = cache_key(path, tokenizer, context_length, read)
    try:
        return CachedRecords(cache, key)
    except (OSError, ValueError) as e:  # missing, another key, truncated or corrupt: rebuilt
        if not build:
            raise DataError(f"{cache}: no usable token cache ({e})") from None
        if os.path.exists(cache):
            print(f"{cache}: {e}: building it again", file=sys.stderr)
    if records is None:
        records = check_images(path, read_records(path, **read), read.get("skip_bad", False), workers)
    write_cache(cache, key, records, tokenizer, context_length, workers)
    return CachedRecords(cache, key)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="the jsonl/csv/tsv dataset")
    p.add_argument("--tokenizer", help="tokenizer.json or CLIP's .txt.gz; none given: the one beside the data")
    p.add_argument("--context-length", type=int, default=77, help="T: the model preset's (tiny: 32)")
    p.add_argument("--captions", type=int, help="as train.py's --captions")
    p.add_argument("--caption-count", choices=["error", "pad", "drop"], default="error", help="as train.py's")
    p.add_argument("--skip-bad", action="store_true", help="as train.py's")
    p.add_argument("--csv-separator", help="as train.py's")
    p.add_argument("--workers", type=int, default=2, help="tokenising processes")
    args = p.parse_args()
    try:
        tok = Tokenizer.load(args.tokenizer or tokenizer_path(args.data))
        cache = cached_records(args.data, tok, args.context_length, workers=args.workers, captions=args.captions,
                               on_count=args.caption_count, skip_bad=args.skip_bad, sep=args.csv_separator)
    except DataError as e:
        sys.exit(f"error: {e}")
    print(f"{os.path.realpath(args.data)}.cache: {len(cache)} records, M = {cache.M}, T = {args.context_length}, "
          f"{cache.tokens.dtype}, {cache.truncated} captions truncated")


if __name__ == "__main__":
    main()
