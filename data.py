"""data.py: the data stage of Holistic CLIP (paper.md section 1: every image carries M texts, one per perspective,
and slot m trains image branch m). How ANY dataset is read: records, a byte-level BPE tokenizer, the image-text
dataset and loader, and a check of a dataset on disk. How datasets are made lives in prepare/: the built-in
synthetic world (prepare/world.py; train.py writes it on first use) and two real offline datasets, clip art and
emoji from Debian packages (prepare/debian.py, prepare/README.md). Both write through write_splits below.

    python data.py --check data/shapes/train.jsonl --captions 6    # validate; exit 1 on bad records
    python data.py --check my.tsv --skip-bad                        # go on past bad records and count them
    python prepare/world.py                                         # writes the synthetic world to data/shapes
    python -m pytest -q tests/test_data.py

Record format (jsonl, one object per line, the official one): {"image": "path", "caption": ["c1", ..., "cM"]};
paths are relative to the jsonl's folder; a string caption means M = 1; other keys are kept. Also open_clip-style
CSV/TSV with `filepath` and `title` columns (one record per physical line, M = 1). Slot order is meaningful: the
world's is the official [alt, detail, nouns, background, main, style]; each real dataset documents its own, slot 0
always the alt-text-like name.

Reading order: records, tokenizer, images and loader, writing a dataset and reading it back, the command line.
Letters: B images per rank, W world size, M texts per image, T text tokens, S image side in pixels, V vocabulary.
"""
import argparse
import csv
import heapq
import json
import math
import os
import re
import sys
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
    return {**rec, "image": os.path.join(folder, rec["image"]), "caption": caption}


def _parse_records(path, sep=None):
    """Yield (line, record or DataError naming FILE:LINE) for every non-blank line; the caller raises or counts.
    Shared by read_records (which may pad or drop) and check (which also opens every image)."""
    sep = sep or {".csv": ",", ".tsv": "\t"}.get(os.path.splitext(path)[1].lower())  # None: jsonl
    folder, header = os.path.dirname(os.path.abspath(path)), None
    # line numbers are physical lines from 1, blank lines included, so FILE:LINE opens at the right place
    with open(path, "rb") as f:  # bytes: a non-UTF-8 line is an error of that line, not of the whole file
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
    """Records with absolute "image", "caption" (list of M str) and "line". captions = expected M (None: any);
    a count other than M is an error, or with on_count="pad" repeats the captions cyclically up to M (and cuts
    longer lists), or with on_count="drop" drops the record. skip_bad: skip and count bad records instead."""
    assert on_count in ("error", "pad", "drop"), on_count
    records, bad, dropped, padded = [], 0, 0, 0
    for line, rec in _parse_records(path, sep):
        if isinstance(rec, dict) and captions is not None and len(rec["caption"]) != captions:
            n = len(rec["caption"])
            if on_count == "drop":
                dropped += 1
                continue
            if on_count == "pad":
                # cyclically: ["a", "b"] -> ["a", "b", "a"] for M = 3, and the first M of a longer list
                rec["caption"] = [rec["caption"][m % n] for m in range(captions)]
                padded += 1
            else:
                rec = DataError(f"{path}:{line}: {n} captions, expected {captions} (see on_count: pad or drop)")
        # bad: the parser's own error, or the count error above
        if isinstance(rec, DataError):
            if not skip_bad:
                raise rec
            bad += 1
            continue
        records.append(rec)
    if bad or dropped or padded:  # nothing silent: one summary line
        print(f"{path}: {len(records)} records kept, {bad} bad skipped, {dropped} dropped and {padded} padded "
              f"for caption count {captions}", file=sys.stderr)
    return records


def load_image(path):
    """An RGB PIL image; DataError naming the path when the file is missing or cannot be decoded."""
    try:
        # convert() decodes the whole file before the with closes it; grey, palette and RGBA all become RGB
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e


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


def _write_atomic(path, text):
    """Write through a temporary file, so an interrupted run never leaves a half-written file behind."""
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


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

    def _bpe(self, word):
        """The ids of one pre-tokenised word: its bytes, then the merges in the order they were learned."""
        ids = [b + 1 for b in word.encode()]
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
                self.cache[word] = self._bpe(word)
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
        return torch.tensor(rows, dtype=torch.long).view(len(texts), context_length)

    def to_dict(self):  # plain ints and lists: survives torch.load(weights_only=True) inside checkpoints
        return {"vocab_size": self.vocab_size, "merges": [list(p) for p in self.merges]}

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict: train.py, eval.py and caption.py rebuild the tokenizer of a checkpoint."""
        return cls(d["merges"], d["vocab_size"])

    def save(self, path):
        _write_atomic(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def beside(cls, data_path, records, vocab_size=1024):
        """The tokenizer.json beside a dataset file (the data's own), else a new one trained on its captions."""
        path = os.path.join(os.path.dirname(os.path.abspath(data_path)), "tokenizer.json")
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
    """(image float (3, S, S), tokens long (M, T)) per record. All captions are tokenised once here; the images
    are read lazily. Training augmentation of sample i depends only on (seed, epoch, i), so a resumed run, any
    number of workers and any rank replay exactly the same crops."""

    def __init__(self, records, tokenizer, image_size, train=False, context_length=77, seed=0):
        # one M for all records: the tokens of a batch are one (B, M, T) tensor
        assert records, "no records"
        M = len(records[0]["caption"])
        assert all(len(r["caption"]) == M for r in records), \
            f"records must share M = {M} captions: read them with captions=M and on_count='pad' or 'drop'"
        self.records, self.train, self.seed, self.epoch = records, train, seed, 0
        self.transform = image_transform(image_size, train)
        flat = [c for r in records for c in r["caption"]]  # record-major: n x M texts
        self.tokens = tokenizer.tokenize(flat, context_length).view(len(records), M, context_length)  # (n, M, T)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        image = load_image(self.records[i]["image"])
        if not self.train:
            return self.transform(image), self.tokens[i]
        # a private CPU generator state, restored afterwards; the seed mixes (seed, epoch, i) with a large prime
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**63)
            return self.transform(image), self.tokens[i]


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
    return DataLoader(dataset, batch_sampler=batches[skip_batches:], num_workers=workers, pin_memory=pin_memory)


# -----------------------------------------------------------------------------
# Writing a dataset and reading it back: shared by prepare/world.py and prepare/debian.py

def write_splits(out, train, val, vocab_size):
    """out/val.jsonl, out/tokenizer.json (trained on the train captions) and, last, out/train.jsonl: its presence
    marks a complete dataset."""
    _write_atomic(os.path.join(out, "val.jsonl"), "".join(json.dumps(r) + "\n" for r in val))
    Tokenizer.train([c for r in train for c in r["caption"]], vocab_size).save(os.path.join(out, "tokenizer.json"))
    _write_atomic(os.path.join(out, "train.jsonl"), "".join(json.dumps(r) + "\n" for r in train))


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


def print_summary(out, slots):
    """Read a written dataset back through the real loading path: the tokenizer's size, the train caption lengths
    per slot and the first train record. slots: the names of the slots, cut to this dataset's M."""
    train = read_records(os.path.join(out, "train.jsonl"))
    slots = slots[:len(train[0]["caption"])]  # emoji: M = 2 without emoji-test.txt
    tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
    print(f"tokenizer: {tok.vocab_size} ids ({len(tok.merges)} merges); train caption lengths:")
    print_lengths(train, tok, slots)
    print(f"example record (train.jsonl line 1): image {os.path.relpath(train[0]['image'], out)}")
    for slot, text in zip(slots, train[0]["caption"]):
        print(f"  {slot:<11} {text}")
    for key, value in train[0].items():
        if key not in ("image", "caption", "line"):
            print(f"  {key:<11} {json.dumps(value)}")


# -----------------------------------------------------------------------------
# Command line: check a dataset

def check(args):
    """Parse every record and open every image; exit status 1 when anything is bad. Unlike read_records it never
    pads or drops (a wrong caption count is bad), and with --skip-bad it prints the first 10 bad records."""
    bad, records = 0, []
    for line, rec in tqdm(_parse_records(args.check, args.sep), desc="records", disable=None):
        if isinstance(rec, dict) and args.captions is not None and len(rec["caption"]) != args.captions:
            rec = DataError(f"{args.check}:{line}: {len(rec['caption'])} captions, expected {args.captions}")
        # a good record still needs an image that opens: its error gets the record's FILE:LINE in front
        if isinstance(rec, dict):
            try:
                load_image(rec["image"])
                records.append(rec)
                continue
            except DataError as e:
                rec = DataError(f"{args.check}:{line}: {e}")
        if not args.skip_bad:
            raise rec
        bad += 1
        if bad <= 10:
            print(rec, file=sys.stderr)
    print(f"{args.check}: {len(records)} good records, {bad} bad")
    if records:
        print_lengths(records, Tokenizer.beside(args.check, records))
    return 1 if bad else 0


def main():
    """--check a dataset; without it, the help (datasets are written by prepare/). A DataError exits with its
    message."""
    p = argparse.ArgumentParser(description="Check a dataset: parse every record, open every image, count the bad "
                                "ones and print the caption lengths per slot. Datasets are written by "
                                "prepare/world.py (the synthetic world) and prepare/debian.py (emoji, openclipart).")
    p.add_argument("--check", metavar="FILE", help="the jsonl/csv/tsv dataset to validate")
    p.add_argument("--captions", type=int, help="the expected number of texts per image M")
    p.add_argument("--skip-bad", action=argparse.BooleanOptionalAction, default=False,
                   help="count bad records (first 10 printed) instead of stopping at the first")
    p.add_argument("--sep", help="CSV/TSV separator (default: ',' for .csv, tab for .tsv)")
    args = p.parse_args()
    if not args.check:  # nothing to check: the help says what this command does and where datasets come from
        p.print_help()
        return
    try:
        sys.exit(check(args))
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
