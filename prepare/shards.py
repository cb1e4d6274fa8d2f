"""prepare/shards.py: webdataset-style tar shards, the layout img2dataset writes and CLIP trainers read at scale.
write_shards turns a jsonl/CSV dataset into shards; ShardDataset streams them into train.py
(`--train-data 'DIR/{00000..00019}.tar'`), split over ranks and loader processes.

    python prepare/shards.py data/shapes/train.jsonl --out data/shapes-shards --shard-size 1000
    python train.py --train-data 'data/shapes-shards/{00000..00019}.tar' --val-data data/shapes/val.jsonl
    python -m pytest -q tests/test_scale.py

Why the standard library's tarfile and not the webdataset package: the format is a plain tar, a reader is some
sixty lines here (nothing to install, nothing hidden), and exact resume needs to know which process read which
sample, which is simplest when the splitting is written out. Choose the shard size so that every rank x loader
process gets a few shards: each gets whole shards, and an epoch ends when the smallest share is used up.
"""
import argparse
import io
import json
import os
import re
import sys
import tarfile

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from data import (DataError, Tokenizer, ignore_sigterm, image_transform, read_records, tokenizer_path,  # noqa: E402
                  write_atomic)

# -----------------------------------------------------------------------------
# Tar shards, the webdataset layout that img2dataset writes and CLIP trainers read at scale: per sample KEY.jpg
# (.jpeg, .png or .webp) and KEY.json {"caption": [M texts], ...} (or KEY.txt for M = 1), as consecutive members.
# Read as streams with the standard library's tarfile: nothing to install, no index in memory. sizes.json beside the
# shards (open_clip's convention; write_shards writes it) holds each shard's sample count.

def expand_shards(pattern):
    """'dir/{00000..00002}.tar' -> [dir/00000.tar, dir/00001.tar, dir/00002.tar], zero padding kept; several
    {a..b} multiply; a pattern without braces is one path."""
    hit = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not hit:
        return [pattern]
    a, b = hit.groups()
    return [path for i in range(int(a), int(b) + 1)
            for path in expand_shards(pattern[:hit.start()] + str(i).zfill(len(a)) + pattern[hit.end():])]


def key_and_extension(name):
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the sample's key ends at the first dot of the file name."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def shard_sizes(shards):
    """Samples per shard: from sizes.json beside them, else by reading every shard's member names once. Every
    shard must be there, so a wrong pattern stops before the first step."""
    if missing := [s for s in shards if not os.path.isfile(s)]:
        raise DataError(f"{missing[0]}: no such shard ({len(missing)} of the {len(shards)} shards are missing)")
    sizes = os.path.join(os.path.dirname(shards[0]), "sizes.json")
    known = json.load(open(sizes)) if os.path.exists(sizes) else {}
    return [known.get(os.path.basename(s)) or
            len({key_and_extension(m.name)[0] for m in tarfile.open(s) if m.isfile()}) for s in shards]


def read_shard(path):
    """Yield (key, {extension: bytes}) for each sample of a tar: its consecutive members with that key."""
    try:
        with tarfile.open(path, "r|*") as tar:  # a stream: one pass, nothing seeks
            key, parts = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = key_and_extension(member.name)
                if key is not None and k != key:
                    yield key, parts
                    parts = {}
                key, parts[ext] = k, tar.extractfile(member).read()
            if parts:
                yield key, parts
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: not a readable tar shard ({e})") from None


def shard_sample(shard, key, parts, M=None, on_count="error"):
    """(PIL RGB image, [M captions]) of one sample, or None when on_count="drop" drops it (on_count as in
    read_records; M=None: any count); DataError "SHARD: MEMBER: reason"."""
    image = next((f"{key}.{e}" for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
    if image is None or not ("json" in parts or "txt" in parts):
        raise DataError(f"{shard}: {key}: a sample needs an image (.jpg/.jpeg/.png/.webp) and a .json or .txt")
    try:
        caption = json.loads(parts["json"])["caption"] if "json" in parts else parts["txt"].decode()
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{shard}: {key}.{'json' if 'json' in parts else 'txt'}: no caption ({e!r})") from None
    caption = [caption] if isinstance(caption, str) else caption
    if not (isinstance(caption, list) and caption and all(isinstance(c, str) and c.strip() for c in caption)):
        raise DataError(f"{shard}: {key}.json: 'caption' must be a non-empty text or list of non-empty texts")
    if M is not None and len(caption) != M:
        if on_count == "drop":
            return None
        if on_count != "pad":
            raise DataError(f"{shard}: {key}.json: {len(caption)} captions, expected {M} (see --caption-count)")
        caption = [caption[m % len(caption)] for m in range(M)]
    try:
        with Image.open(io.BytesIO(parts[image.split(".")[-1]])) as im:
            return im.convert("RGB"), caption
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{shard}: {image}: cannot read image ({type(e).__name__}: {e})") from None


class ShardDataset(IterableDataset):
    """Batches (images (B, 3, S, S), tokens (B, M, T)) streamed from tar shards, for a DataLoader with
    batch_size=None. The W ranks x `workers` loader processes are C consumers; consumer c = rank * workers + w reads
    shards c, c + C, c + 2C, ... (the same ones every epoch, in an order shuffled by (seed, epoch)), shuffles its
    samples in a buffer of 1,000 and yields exactly `batches` batches: the smallest consumer's count, so no rank
    waits for another and a rank's batch j comes from its worker j % workers. Resuming skips batches by reading
    and decoding their samples without transforming them: exact. Bad samples stop the run, named by shard and
    member, or with skip_bad are skipped and printed (the other samples of the shard cover for them)."""

    def __init__(self, shards, tokenizer, image_size, batch_size, M, context_length=77, seed=0, rank=0, world=1,
                 workers=0, on_count="error", skip_bad=False):
        self.shards, self.sizes, C = shards, shard_sizes(shards), world * max(workers, 1)
        if len(shards) < C:
            raise DataError(f"{len(shards)} shards for {world} ranks x {max(workers, 1)} loader processes: "
                            f"every one needs a shard (write smaller shards, or use fewer --workers)")
        self.batches = min(sum(self.sizes[c::C]) for c in range(C)) // batch_size  # per consumer and epoch
        if M is None:  # the first sample's count, as read_records takes the first record's
            M = len(shard_sample(shards[0], *next(read_shard(shards[0])))[1])
        self.tokenizer, self.transform = tokenizer, image_transform(image_size, train=True)
        self.B, self.M, self.T, self.seed, self.rank = batch_size, M, context_length, seed, rank
        self.workers = max(workers, 1)
        self.on_count, self.skip_bad = on_count, skip_bad
        self.C, self.epoch, self.skip = C, 0, 0  # set by loader() before each epoch

    def __len__(self):  # samples in all shards
        return sum(self.sizes)

    def samples(self, c):
        """Consumer c's raw samples for this epoch, (shard, key, parts): its shards in a shuffled order, then a
        shuffle buffer; deterministic from (seed, epoch, c)."""
        rng = np.random.default_rng([self.seed, self.epoch, c])
        mine = self.shards[c::self.C]
        buffer = []
        for i in rng.permutation(len(mine)):
            read = 0
            for key, parts in read_shard(mine[i]):
                buffer.append((mine[i], key, parts))
                read += 1
                if len(buffer) >= 1000:
                    yield buffer.pop(rng.integers(len(buffer)))
            if read != self.sizes[c + i * self.C]:  # a tar cut at a member's edge reads as a shorter, whole one
                raise DataError(f"{mine[i]}: {read} samples where sizes.json says {self.sizes[c + i * self.C]} "
                                "(a shard cut short, or replaced: write the shards again)")
        while buffer:
            yield buffer.pop(rng.integers(len(buffer)))

    def __iter__(self):
        # the DataLoader asks its workers in turn from worker 0 on, so after `skip` batches worker i plays the
        # part w of the worker that served batch skip + i of the epoch
        info = get_worker_info()
        w = ((info.id if info else 0) + self.skip) % self.workers
        c = self.rank * self.workers + w
        skip = (self.skip - w + self.workers - 1) // self.workers  # part w's batches among the first `skip`
        stream, made = self.samples(c), 0
        for b in range(self.batches):
            batch = []
            while len(batch) < self.B:
                shard, key, parts = next(stream, (None, None, None))
                if shard is None:
                    raise DataError(f"consumer {c} ran out of samples (too many bad ones skipped)")
                try:  # decoded even when skipped for a resume: a bad sample must be skipped as the first time
                    sample = shard_sample(shard, key, parts, self.M, self.on_count)
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    print(f"skipped: {e}", file=sys.stderr) if b >= skip else None
                    continue
                if sample is None:  # dropped for its caption count
                    continue
                image, caption = sample
                made += 1
                if b < skip:
                    batch.append(None)
                    continue
                with torch.random.fork_rng(devices=[]):  # augmentation from (seed, epoch, consumer, sample)
                    torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + c) * 1_000_003 + made)
                    batch.append((self.transform(image), self.tokenizer.tokenize(caption, self.T)))
            if b >= skip:
                yield torch.stack([x for x, _ in batch]), torch.stack([t for _, t in batch])

    def loader(self, epoch, skip_batches=0, pin_memory=False):
        """A DataLoader over one epoch of this rank's batches, from batch `skip_batches` on."""
        self.epoch, self.skip = epoch, skip_batches
        return DataLoader(self, batch_size=None, num_workers=self.workers if self.workers > 1 else 0,
                          pin_memory=pin_memory, worker_init_fn=ignore_sigterm)


def write_shards(path, out, shard_size=1000, **read):
    """A jsonl/CSV dataset -> out/00000.tar, ...: per record KEY.EXT (the image file's bytes) and KEY.json
    {"caption": [...]}, shard_size records per shard; then sizes.json, and the data's tokenizer.json when it has one."""
    records = read_records(path, **read)
    os.makedirs(out, exist_ok=True)
    sizes = {}
    for s in tqdm(range(0, len(records), shard_size), desc="shards", disable=None):
        name = f"{s // shard_size:05d}.tar"
        with tarfile.open(os.path.join(out, name + ".tmp"), "w") as tar:
            for i, r in enumerate(records[s:s + shard_size], s):
                ext = os.path.splitext(r["image"])[1].lower()
                if ext not in (".jpg", ".jpeg", ".png", ".webp"):  # what shard_sample reads back
                    raise DataError(f"{path}:{r['line']}: {r['image']}: a shard holds .jpg/.jpeg/.png/.webp images")
                tar.add(r["image"], f"{i:09d}{ext}")
                text = json.dumps({"caption": r["caption"]}).encode()
                info = tarfile.TarInfo(f"{i:09d}.json")
                info.size = len(text)
                tar.addfile(info, io.BytesIO(text))
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
        sizes[name] = len(records[s:s + shard_size])
    write_atomic(os.path.join(out, "sizes.json"), json.dumps(sizes))
    if os.path.exists(tokenizer_path(path)):
        Tokenizer.load(tokenizer_path(path)).save(os.path.join(out, "tokenizer.json"))
    return f"{out}/{{00000..{len(sizes) - 1:05d}}}.tar"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="the jsonl/csv/tsv dataset")
    p.add_argument("--out", required=True, help="folder for the shards")
    p.add_argument("--shard-size", type=int, default=1000, help="records per shard")
    p.add_argument("--captions", type=int, help="expected M per record (see data.read_records)")
    args = p.parse_args()
    if os.path.exists(os.path.join(args.out, "sizes.json")):
        sys.exit(f"error: {args.out} already holds shards: choose another --out")
    try:
        print(f"wrote {write_shards(args.data, args.out, args.shard_size, captions=args.captions)}")
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
