"""data.py: the data stage of Holistic CLIP (paper.md section 1: every image carries M texts, one per perspective,
and slot m trains image branch m). How ANY dataset is read: records, a byte-level BPE tokenizer, the image-text
dataset and loader, and a check of a dataset on disk. Datasets are made in prepare/ (its README): the built-in
synthetic world (world.py, written on first use) and clip art and emoji from Debian packages (debian.py); train.py
opens them through prepare/datasets.py (at scale: a jsonl's token cache, cache.py, or tar shards, shards.py).

    python data.py --check data/shapes/train.jsonl --captions 6    # validate; exit 1 on bad records
    python data.py --check my.tsv --skip-bad                        # go on past bad records and count them
    python prepare/world.py                                         # writes the synthetic world to data/shapes
    python -m pytest -q tests/test_data.py

Record format (jsonl, one object per line, the official one): {"image": "path", "caption": ["c1", ..., "cM"]};
paths are relative to the jsonl's folder; a string caption means M = 1; other keys are kept. Also open_clip-style
CSV/TSV with `filepath` and `title` columns (one record per physical line, M = 1). Slot order is meaningful: the
world's is the official [alt, detail, nouns, background, main, style]; each real dataset documents its own, slot 0
always the alt-text-like name.

Reading order: records, tokenizer, images and loader, caption lengths, the command line.
Letters: B images per rank, W world size, M texts per image, T text tokens, S image side in pixels, V vocabulary.
"""
import argparse
import contextlib
import csv
import functools
import heapq
import json
import math
import multiprocessing
import os
import re
import signal
import stat
import sys
import warnings
from collections import Counter, defaultdict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Records: jsonl or CSV/TSV -> list of dicts; every bad line is a DataError that names FILE:LINE.

class DataError(ValueError):
    """Bad input. The message starts with "FILE:LINE: " (records) or with the image path (images)."""


def _record(text, sep, header, folder):
    """One line -> {"image": absolute path, "caption": [str, ...], other keys}; DataError (without the location)
    when the line is not a good record."""
    if sep:  # CSV/TSV: quoted fields may hold the separator (not a newline)
        cells = next(csv.reader([text], delimiter=sep))
        if len(cells) != len(header):
            raise DataError(f"{len(cells)} fields, the header has {len(header)}")
        rec = dict(zip(header, cells))
        rec["image"], rec["caption"] = rec.pop("filepath"), rec.pop("title")
    else:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e})") from None
        if not isinstance(rec, dict) or "image" not in rec or "caption" not in rec:
            raise DataError("a record needs 'image' and 'caption' keys")
    caption = [rec["caption"]] if isinstance(rec["caption"], str) else rec["caption"]
    if not isinstance(caption, list) or not all(isinstance(c, str) for c in caption):
        raise DataError("'caption' must be a string or a list of strings")
    if not caption or not all(c.strip() for c in caption):
        raise DataError("empty caption")
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise DataError("'image' must be a non-empty path")
    # JSON may escape a lone surrogate ("\ud800"): no file name and no tokenizer takes one
    for what, text in [("'image'", rec["image"])] + [(f"caption {m + 1}", c) for m, c in enumerate(caption)]:
        if hit := re.search("[\ud800-\udfff]", text):
            raise DataError(f"{what} cannot be encoded as UTF-8 (a lone surrogate at character {hit.start() + 1})")
    return {**rec, "image": os.path.join(folder, rec["image"]), "caption": caption}


def _parse_records(path, sep=None):
    """Yield (line, record or DataError naming FILE:LINE) for every non-blank line; the caller raises or counts.
    Shared by read_records (which may pad or drop) and check (which also opens every image)."""
    ext = os.path.splitext(path)[1].lower()  # a .jsonl file is JSON lines, even beside a --csv-separator TSV
    sep = None if ext == ".jsonl" else sep or {".csv": ",", ".tsv": "\t"}.get(ext)  # None: JSON lines
    # relative image paths start in the data's real folder, links resolved: the folder prepare/cache.py keys by
    folder, header = os.path.dirname(os.path.realpath(path)), None
    # line numbers are physical lines from 1, blank lines included, so FILE:LINE opens at the right place
    try:
        f = open(path, "rb")  # bytes: a non-UTF-8 line is an error of that line, not of the whole file
    except OSError as e:  # missing, a folder, unreadable
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for line, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff").rstrip("\r\n")  # a byte-order mark is fine
            except UnicodeDecodeError as e:
                yield line, DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#x} at column {e.start + 1})")
                continue
            if not text.strip():
                continue
            if sep and header is None:  # the first line of a CSV/TSV names the columns
                header = next(csv.reader([text], delimiter=sep))
                if "filepath" not in header or "title" not in header:
                    raise DataError(f"{path}:{line}: the header needs 'filepath' and 'title' columns, got {header}")
                continue
            try:
                rec = {**_record(text, sep, header, folder), "line": line}
            except DataError as e:
                rec = DataError(f"{path}:{line}: {e}")
            yield line, rec


def read_records(path, captions=None, on_count="error", skip_bad=False, sep=None):
    """Records with absolute "image", "caption" (list of M str) and "line". captions = expected M (None: the
    count of the first good record); a count other than M is an error, or with on_count="pad" repeats the captions
    cyclically up to M (and cuts longer lists), or with on_count="drop" drops the record. skip_bad: skip and count
    bad records instead. No record at all is a DataError too: "FILE: no records" or "FILE: no records left: ..."."""
    assert on_count in ("error", "pad", "drop"), on_count
    records, skipped, dropped, padded, first = [], [], 0, 0, None
    for line, rec in _parse_records(path, sep):
        if isinstance(rec, dict) and captions is None:  # one M for all records: the first good one sets it
            captions, first = len(rec["caption"]), line
        if isinstance(rec, dict) and len(rec["caption"]) != captions:
            n = len(rec["caption"])
            if on_count == "drop":
                dropped += 1
                continue
            if on_count == "pad":
                # cyclically: ["a", "b"] -> ["a", "b", "a"] for M = 3, and the first M of a longer list
                rec["caption"] = [rec["caption"][m % n] for m in range(captions)]
                padded += 1
            else:
                of = f"the count of line {first}; " if first else ""
                rec = DataError(f"{path}:{line}: {n} captions, expected {captions} ({of}see on_count: pad or drop)")
        if isinstance(rec, DataError) and not skip_bad:  # the parser's own error, or the count error above
            raise rec
        (records if isinstance(rec, dict) else skipped).append(rec)
    if not records:  # an empty list would only fail later (IndexError), far from its cause
        why = (f"no records left: {len(skipped)} bad skipped, {dropped} dropped for caption count {captions}"
               if skipped or dropped else "no records (an empty file, blank lines or a header only)")
        raise DataError(f"{path}: {why}")
    if skipped or dropped or padded:  # nothing silent: one summary line
        print(f"{path}: {len(records)} records kept, {len(skipped)} bad skipped, {dropped} dropped and {padded} padded "
              f"for caption count {captions}", file=sys.stderr)
    return records


def load_image(path, verify=False):
    """An RGB PIL image, else DataError "PATH: cannot read image (reason)". Nothing blocks or blows up: only a
    regular non-empty file is opened (a FIFO blocks open() until a writer comes), of at most MAX_IMAGE_PIXELS
    (above, Pillow warns up to twice that and decodes). verify: check only (a PNG's chunk checksums, nothing
    decoded; other formats decoded) and return the message or None."""
    try:
        st = os.stat(path)  # follows symbolic links
        why = (None if stat.S_ISREG(st.st_mode) and st.st_size else "an empty file" if stat.S_ISREG(st.st_mode)
               else f"not a regular file but {'a directory' if stat.S_ISDIR(st.st_mode) else 'a FIFO or device'}")
    except OSError as e:  # FileNotFoundError: missing, or a symbolic link to something missing
        why = "a dangling symbolic link" if os.path.islink(path) else f"{type(e).__name__}: {e.strerror}"
    # the bomb warning is raised as an error, so such an image is never decoded
    with warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning):
        try:
            if why is None:
                with Image.open(path) as image:  # convert() decodes all before the file closes; any mode -> RGB
                    if verify:  # PNG: its chunks and checksums, undecoded; verify() lets a JPEG cut short pass
                        image.verify() if image.format == "PNG" else image.load()
                    return None if verify else image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            why = f"{type(e).__name__}: {e}"
    if verify:
        return f"{path}: cannot read image ({why})"
    raise DataError(f"{path}: cannot read image ({why})")


def check_images(path, records, skip_bad=False, workers=2):
    """The records whose image opens and verifies (load_image), in input order; `path`: their file. A bad image
    raises DataError "FILE:LINE: IMAGE: cannot read image (reason)", or with skip_bad is skipped and counted in one
    line on stderr that names the first. workers > 1: a pool of that many processes (fork); else this process."""
    images, verify = [r["image"] for r in records], functools.partial(load_image, verify=True)  # message or None
    with multiprocessing.get_context("fork").Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        errors = list(tqdm(pool.imap(verify, images, chunksize=16) if pool else map(verify, images),
                           total=len(images), desc="images", disable=None))  # imap keeps the order
    bad = [DataError(f"{path}:{r['line']}: {e}") for r, e in zip(records, errors) if e]
    kept, what = [r for r, e in zip(records, errors) if e is None], f"{len(bad)} with a bad image skipped"
    if bad and not (skip_bad and kept):  # the first bad image, or none left
        raise DataError(f"{path}: no records left: {what} (the first: {bad[0]})") if skip_bad else bad[0]
    if bad:
        print(f"{path}: {len(kept)} records kept, {what} (the first: {bad[0]})", file=sys.stderr)
    return kept


# -----------------------------------------------------------------------------
# Tokenizer: byte-level BPE (GPT-2 style) learned on word counts. V ids: PAD 0, bytes 1..256, merges 257.., then
# SOT = V - 2 and EOT = V - 1, the two largest, so `tokens.argmax(-1)` finds each text's EOT as in openai/CLIP.

# Pre-tokenisation: words keep their leading space; every character falls in exactly one class (letters, digits,
# other symbols incl. "_" and combining marks, whitespace), so nothing is dropped and decode(encode(s)) == s.
SPLIT = re.compile(r" ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+")


def _merge(ids, pair, new):
    """Replace every non-overlapping occurrence of `pair` in `ids`, left to right, by `new`."""
    out, i = [], 0
    while i < len(ids):
        hit = i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]
        out.append(new if hit else ids[i])
        i += 2 if hit else 1
    return out


def write_atomic(path, text):
    """Write through a temporary file, so an interrupted run never leaves a half-written file behind."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def tokenizer_path(data_path):
    """The data's own tokenizer.json: beside the real file (a symlinked jsonl's target, as its images), not the link."""
    return os.path.join(os.path.dirname(os.path.realpath(data_path)), "tokenizer.json")


class Tokenizer:
    """encode: str -> ids, decode: ids -> str, tokenize: texts -> LongTensor (n, T) with SOT, EOT and PAD. Saved as
    a small JSON file beside the data and, as to_dict(), inside every checkpoint."""

    def __init__(self, merges, vocab_size=1024):
        assert len(merges) <= vocab_size - 259, "vocab = PAD + 256 bytes + merges + SOT + EOT"
        self.merges, self.vocab_size = [tuple(p) for p in merges], vocab_size
        self.pad, self.sot, self.eot = 0, vocab_size - 2, vocab_size - 1
        self.ranks = {p: 257 + i for i, p in enumerate(self.merges)}  # pair -> its new id (lower = learned first)
        self.pieces = [b""] + [bytes([b]) for b in range(256)]  # id -> bytes (PAD decodes to nothing)
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        # cache: word -> ids (captions reuse few words, so encoding is mostly dict lookups); truncated: texts cut by
        # tokenize() so far, for the "captions truncated" notes of train.py and eval.py
        self.cache, self.truncated = {}, 0

    @classmethod
    def train(cls, texts, vocab_size=1024):
        """Learn V - 259 merges (fewer if the pairs run out). Works on the counts of distinct words, updates pair
        counts only in the words that hold the merged pair, and finds the most frequent pair with a heap (entries
        go stale when a count changes and are skipped), so 100k captions take seconds."""
        counts = Counter(w for t in texts for w in SPLIT.findall(t))
        words, freq = [[b + 1 for b in w.encode()] for w in counts], list(counts.values())
        pairs, where = Counter(), defaultdict(set)  # pair -> weighted count; pair -> words that may hold it
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
        # min-heap of (-count, -a, -b): pops the most frequent pair; ties -> the larger ids (deterministic)
        heap = [(-n, -a, -b) for (a, b), n in pairs.items()]
        heapq.heapify(heap)
        merges = []
        while heap and len(merges) < vocab_size - 259:
            n, a, b = heapq.heappop(heap)
            best = (-a, -b)
            if pairs.get(best) != -n:
                continue  # stale: this pair's count changed after the entry was pushed
            # the new id: 257 for the first merge, then one more each; only the words holding `best` change
            merges.append(best)
            touched = set()
            for i in where.pop(best):
                # the word's pairs before the merge lose its count, the pairs after it gain it
                old = words[i]
                words[i] = new = _merge(old, best, 256 + len(merges))
                for p in zip(old, old[1:]):
                    pairs[p] -= freq[i]
                for p in zip(new, new[1:]):
                    pairs[p] += freq[i]
                    where[p].add(i)
                touched.update(zip(old, old[1:]), zip(new, new[1:]))
            for p in touched:  # re-push the changed counts; forget pairs that no longer occur
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], -p[0], -p[1]))
                else:
                    del pairs[p]
        return cls(merges, vocab_size)

    def _bpe(self, ids):
        """The ids of one pre-tokenised word, from those of its bytes: the merges in the order they were learned."""
        while len(ids) > 1:  # apply the earliest-learned merge present, as in training
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = _merge(ids, pair, self.ranks[pair])
        return ids

    def encode(self, text):
        """A list of ids in 1..V-3 (no SOT, EOT or PAD)."""
        ids = []
        for word in SPLIT.findall(text):
            if word not in self.cache:
                self.cache[word] = self._bpe([b + 1 for b in word.encode()])
            ids += self.cache[word]
        return ids

    def decode(self, ids):
        """Text of `ids`; PAD, SOT and EOT decode to nothing; a cut multi-byte character becomes U+FFFD."""
        # pieces holds PAD, the bytes and the merges: SOT and EOT, the ids above them, are left out
        return b"".join(self.pieces[i] for i in ids if i < len(self.pieces)).decode("utf-8", errors="replace")

    def tokenize(self, texts, context_length=77):
        """LongTensor (n, T): [SOT] ids [EOT] PAD...; a text that does not fit is cut to T keeping EOT, counted."""
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = [self.sot] + self.encode(text) + [self.eot]
            if len(ids) > context_length:
                # keep EOT last: the text tower reads its feature at the EOT position (the argmax)
                ids = ids[:context_length - 1] + [self.eot]
                self.truncated += 1
            # every row is exactly T ids long: PAD (0) fills the rest, so the rows stack into one tensor
            rows.append(ids + [self.pad] * (context_length - len(ids)))
        # through numpy: 8x faster than torch.tensor on lists
        return torch.from_numpy(np.array(rows, dtype=np.int64).reshape(len(texts), context_length))

    def to_dict(self):  # plain ints and lists: survives torch.load(weights_only=True) inside checkpoints
        return {"vocab_size": self.vocab_size, "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict: train.py, eval.py and caption.py rebuild the tokenizer of a checkpoint. DataError
        "not a tokenizer: ..." when `d` is not one (merge k makes id 257 + k from two ids made before it)."""
        if isinstance(d, dict) and "clip_merges" in d:  # CLIP's own BPE (prepare/clip.py)
            from prepare.clip import ClipTokenizer
            return ClipTokenizer(d["clip_merges"])
        if not isinstance(d, dict) or not {"vocab_size", "merges"} <= d.keys():
            raise DataError("not a tokenizer: it needs 'vocab_size' and 'merges' keys")
        V, merges = d["vocab_size"], d["merges"]
        for k, p in enumerate(merges if isinstance(merges, list) else [merges]):
            if not (type(p) in (list, tuple) and len(p) == 2 and all(type(i) is int and 0 < i < 257 + k for i in p)):
                raise DataError(f"not a tokenizer: merges must be pairs of earlier ids: merge {k} is {p!r}")
        if type(V) is not int or len(merges) > V - 259:  # + 259: PAD, 256 bytes, SOT and EOT
            raise DataError(f"not a tokenizer: vocab_size must be an integer, got {V!r}" if type(V) is not int else
                            f"not a tokenizer: vocab_size {V} is too small for {len(merges)} merges")
        return cls(merges, V)

    def save(self, path):
        write_atomic(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path):
        """A tokenizer.json written by save, or CLIP's bpe_simple_vocab_16e6.txt.gz (prepare/clip.py); DataError
        "PATH: not a tokenizer: ..." says what is wrong."""
        if str(path).endswith(".gz"):
            from prepare.clip import ClipTokenizer
            return ClipTokenizer.read(path)
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_dict(json.load(f))
        except ValueError as e:  # from_dict's DataError, or not JSON, or not UTF-8 (UnicodeDecodeError)
            why = e if isinstance(e, DataError) else f"not a tokenizer: not JSON ({e})"
        except OSError as e:  # missing, a folder, unreadable
            why = f"cannot read ({e.strerror})"
        raise DataError(f"{path}: {why}")

    @classmethod
    def beside(cls, data_path, records, vocab_size=1024):
        """The data's own tokenizer.json (tokenizer_path), else a new one trained on its captions."""
        path = tokenizer_path(data_path)
        return (cls.load(path) if os.path.exists(path)
                else cls.train([c for r in records for c in r["caption"]], vocab_size))


# -----------------------------------------------------------------------------
# Images, dataset and loader: records -> batches of images (B, 3, S, S) and tokens (B, M, T)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # openai/CLIP's normalisation constants
STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size, train):
    """PIL -> float (3, S, S). train: RandomResizedCrop with scale (0.9, 1.0) as in the paper; eval: resize the
    short side + centre crop. Bicubic, as CLIP."""
    kw = dict(interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    resize = (v2.RandomResizedCrop(image_size, scale=(0.9, 1.0), **kw) if train
              else v2.Compose([v2.Resize(image_size, **kw), v2.CenterCrop(image_size)]))
    return v2.Compose([v2.ToImage(), resize, v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class ImageTextDataset(Dataset):
    """(image float (3, S, S), tokens long (M, T)) per record. records: a list (read_records), its captions all
    tokenised here, once; or records that bring their tokens (prepare/cache.py: memory-mapped, for millions of
    records; tokenizer unused). The images are read lazily. Training augmentation of sample i depends only on
    (seed, epoch, i), so a resumed run, any number of workers and any rank replay exactly the same crops."""

    def __init__(self, records, tokenizer, image_size, train=False, context_length=77, seed=0):
        self.records, self.train, self.seed, self.epoch = records, train, seed, 0
        self.transform = image_transform(image_size, train)
        if hasattr(records, "tokens"):
            self.tokens, self.M = records.tokens, records.M  # (n, M, T) uint16 or int32, shared pages
            return
        # one M for all records: the tokens of a batch are one (B, M, T) tensor
        assert records, "no records"
        self.M = M = len(records[0]["caption"])
        assert all(len(r["caption"]) == M for r in records), \
            f"records must share M = {M} captions: read them with captions=M and on_count='pad' or 'drop'"
        flat = [c for r in records for c in r["caption"]]  # record-major: n x M texts
        self.tokens = tokenizer.tokenize(flat, context_length).view(len(records), M, context_length)  # (n, M, T)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        image, tokens = load_image(self.records[i]["image"]), torch.as_tensor(self.tokens[i], dtype=torch.long)
        if not self.train:
            return self.transform(image), tokens
        # a private CPU generator state, restored afterwards; the seed mixes (seed, epoch, i) with a large prime
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
            return self.transform(image), tokens


def ignore_sigterm(worker_id):
    """A loader process leaves a SIGTERM to the process group (a scheduler's) to train.py: finish the step, save."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size, train, workers=0, pin_memory=False, seed=0, epoch=0, skip_batches=0):
    """A DataLoader over ONE epoch of this rank's share, starting at batch `skip_batches` (for resuming: the
    skipped samples are never loaded). Order: DistributedSampler(seed, epoch), shuffled and drop_last when
    training, and the same on 1 process (W = 1, r = 0) as on many. Evaluating with W > 1, DistributedSampler
    repeats a few samples so that every rank gets as many."""
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    W, r = (torch.distributed.get_world_size(), torch.distributed.get_rank()) if dist else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=W, rank=r, shuffle=train, drop_last=train, seed=seed)
    sampler.set_epoch(epoch)
    dataset.epoch = epoch  # read by __getitem__ (and copied into the worker processes when they start)
    # The batches are cut here, not by DataLoader(batch_size=...), so that resuming can drop the first
    # skip_batches of them before any sample is loaded.
    order = list(sampler)  # this rank's sample indices for the epoch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if train and batches and len(batches[-1]) < batch_size:
        batches.pop()  # drop_last: every training step sees a full batch of B negatives
    return DataLoader(dataset, batch_sampler=batches[skip_batches:], num_workers=workers, pin_memory=pin_memory,
                      worker_init_fn=ignore_sigterm)


# -----------------------------------------------------------------------------
# Caption lengths per slot: for checking a dataset here and for the read-back of prepare/ after writing one

def print_lengths(records, tok, slots=()):
    """Per slot: mean / max tokens (with SOT and EOT) and how many exceed 32 (the tiny preset) and 77 tokens.
    slots: the names of the M slots (prepare/world.py's SLOTS, ...); without M names the slots are numbered."""
    M = max(len(r["caption"]) for r in records)
    print(f"{'slot':<12}{'mean':>7}{'max':>6}{'>32':>7}{'>77':>7}   (tokens incl. SOT/EOT)")
    for m in range(M):
        lens = np.array([len(tok.encode(r["caption"][m])) + 2 for r in records if len(r["caption"]) > m])
        # a name only when there is one for every slot; otherwise slot0, slot1, ...
        name = slots[m] if M == len(slots) else f"slot{m}"
        print(f"{name:<12}{lens.mean():>7.1f}{lens.max():>6}{(lens > 32).sum():>7}{(lens > 77).sum():>7}")


# -----------------------------------------------------------------------------
# Command line: check a dataset

def check(args):
    """Parse every record and check every image (check_images); exit status 1 when anything is bad. Never pads or
    drops: a count other than --captions is a bad record; without --captions, mixed counts are an error."""
    skipped, records = [], []
    for line, rec in tqdm(_parse_records(args.check, args.sep), desc="records", disable=None):
        if isinstance(rec, dict) and args.captions is not None and len(rec["caption"]) != args.captions:
            rec = DataError(f"{args.check}:{line}: {len(rec['caption'])} captions, expected {args.captions}")
        if isinstance(rec, DataError) and not args.skip_bad:
            raise rec
        (records if isinstance(rec, dict) else skipped).append(rec)
    sys.stderr.write("".join(f"{e}\n" for e in skipped[:10]))  # the first 10 bad records
    counts = Counter(len(r["caption"]) for r in records).most_common()  # [(M, records)], the most common first
    if len(counts) > 1:  # which M is meant is for the user to say: training would stop at the first other one
        raise DataError(f"{args.check}: mixed caption counts ({counts[0][1]} records with {counts[0][0]}, "
                        + ", ".join(f"{n} with {m}" for m, n in counts[1:]) + "); give --captions M")
    if not records and not skipped:
        raise DataError(f"{args.check}: no records (an empty file, blank lines or a header only)")
    kept = check_images(args.check, records, args.skip_bad) if records else []  # none left: DataError
    print(f"{args.check}: {len(kept)} good records, {len(skipped) + len(records) - len(kept)} bad")
    if kept:
        print_lengths(kept, Tokenizer.beside(args.check, kept))
    return 1 if skipped or len(kept) < len(records) else 0


def main():
    """--check a dataset; without it, the help. A DataError exits with its message."""
    p = argparse.ArgumentParser(description="Check a dataset: parse every record, open every image, count the bad ones "
                                "and print the caption lengths per slot. prepare/world.py and debian.py write them.")
    p.add_argument("--check", metavar="FILE", help="the jsonl/csv/tsv dataset to validate")
    p.add_argument("--captions", type=int, help="the expected number of texts per image M")
    p.add_argument("--skip-bad", action="store_true", help="count bad records (the first 10 printed), do not stop")
    p.add_argument("--sep", help="CSV/TSV separator (default: ',' for .csv, tab for .tsv)")
    args = p.parse_args()
    if not args.check:  # nothing to check: the help says what this command does and where datasets come from
        return p.print_help()
    try:
        sys.exit(check(args))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
