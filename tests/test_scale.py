"""The data path at scale: the token cache (equal to tokenising directly, rebuilt on any change, never used when
corrupt) and tar shards (every sample once per epoch across ranks and workers, deterministic, exact resume, bad
samples named by shard and member).

    python -m pytest -q tests/test_scale.py
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, Tokenizer, read_records
from prepare.cache import CachedRecords, cached_records
from prepare.shards import ShardDataset, expand_shards, read_shard, shard_sample, write_shards
from prepare.world import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_world(str(out), train_size=48, val_size=8, seed=1)
    return out


def direct(records, tok, T):
    """What ImageTextDataset tokenises from a list of records: the reference."""
    return tok.tokenize([c for r in records for c in r["caption"]], T).view(len(records), -1, T)


# -----------------------------------------------------------------------------
# the token cache

@pytest.mark.parametrize("vocab, dtype", [(None, np.uint16), (70_000, np.int32)])
def test_cache_equals_direct_tokenisation(world, tmp_path, vocab, dtype):
    """Bit for bit, for a vocabulary that fits uint16 (the world's) and one that needs int32; the paths and line
    numbers are the records'; built in 2 processes, read back in this one."""
    tok = Tokenizer.load(world / "tokenizer.json") if vocab is None else Tokenizer([], vocab)
    records = read_records(str(world / "train.jsonl"))
    cache = cached_records(str(world / "train.jsonl"), tok, 20, cache=str(tmp_path / "c"), workers=2)
    assert cache.tokens.dtype == dtype and len(cache) == len(records) and cache.M == len(records[0]["caption"])
    assert torch.equal(torch.from_numpy(cache.tokens.astype(np.int64)), direct(records, tok, 20))
    assert cache.truncated > 0  # T = 20 cuts some detail captions: counted as ImageTextDataset counts them
    assert [cache[i] for i in range(len(cache))] == [{"image": r["image"], "line": r["line"]} for r in records]


def test_cache_is_rebuilt_on_any_change(world, tmp_path, capsys):
    """A changed data file, another tokenizer or T, a corrupt byte or a truncated file: rebuilt, never used."""
    data = tmp_path / "train.jsonl"
    data.write_text((world / "train.jsonl").read_text().replace('"images/', f'"{world}/images/'))
    tok, path = Tokenizer.load(world / "tokenizer.json"), str(tmp_path / "train.jsonl.cache")
    first = cached_records(str(data), tok, 32)
    assert os.path.exists(path) and torch.equal(torch.from_numpy(first.tokens.astype(np.int64)),
                                                direct(read_records(str(data)), tok, 32))
    data.write_text(data.read_text().replace("square", "circle"))  # same size in lines, other captions
    changed = cached_records(str(data), tok, 32)
    assert torch.equal(torch.from_numpy(changed.tokens.astype(np.int64)), direct(read_records(str(data)), tok, 32))
    assert not np.array_equal(changed.tokens, first.tokens)
    other = Tokenizer.train(["circle square"] * 10, 300)
    assert cached_records(str(data), other, 32).tokens.max() < 300  # rebuilt with the other tokenizer
    assert cached_records(str(data), other, 24).tokens.shape[2] == 24
    key = np.array(cached_records(str(data), other, 24).tokens)  # warm: the same file, opened again (a copy)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # one flipped byte in the last token row
        f.seek(size - 3)
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        cached_records(str(data), other, 24, build=False)  # a rank that only opens: an error, not a wrong token
    assert np.array_equal(cached_records(str(data), other, 24).tokens, key)  # rank 0: rebuilt
    assert "truncated or corrupt (its checksum does not match): building it again" in capsys.readouterr().err
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    assert np.array_equal(cached_records(str(data), other, 24).tokens, key)
    with pytest.raises(ValueError, match="built from other data"):
        CachedRecords(path, {"another": "key"})


# -----------------------------------------------------------------------------
# tar shards

@pytest.fixture(scope="module")
def shards(world, tmp_path_factory):
    """The 48 world images in 8 shards of 6, written by prepare/shards.py's writer."""
    out = tmp_path_factory.mktemp("shards")
    pattern = write_shards(str(world / "train.jsonl"), str(out), shard_size=6)
    assert pattern == f"{out}/{{00000..00007}}.tar" and os.path.exists(out / "tokenizer.json")
    return pattern


def shard_set(pattern, rank=0, world=1, workers=0, batch=3, skip_bad=False):
    tok = Tokenizer.load(os.path.join(os.path.dirname(pattern), "tokenizer.json"))
    return ShardDataset(expand_shards(pattern), tok, 64, batch, None, 32, seed=0, rank=rank, world=world,
                        workers=workers, skip_bad=skip_bad)


def test_expand_shards():
    assert expand_shards("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert expand_shards("{0..1}-{a..b}/{1..2}.tar") == ["0-{a..b}/1.tar", "0-{a..b}/2.tar", "1-{a..b}/1.tar",
                                                         "1-{a..b}/2.tar"]
    assert expand_shards("one.tar") == ["one.tar"]


def test_every_sample_once_per_epoch_across_2_ranks_and_2_workers(shards, world):
    """4 consumers (2 ranks x 2 workers) read disjoint shards; together they read every record exactly once, each
    consumer in an order that depends on (seed, epoch) only, and every rank yields the same number of batches."""
    keys = {}
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            ds = shard_set(shards, rank, 2, workers=2)
            ds.epoch = epoch
            seen += [(shard, key) for c in (2 * rank, 2 * rank + 1) for shard, key, _ in ds.samples(c)]
        assert len(seen) == len(set(seen)) == len(read_records(str(world / "train.jsonl")))
        keys[epoch] = seen
    assert sorted(keys[0]) == sorted(keys[1]) and keys[0] != keys[1]  # the same samples, reshuffled
    batches = [list(shard_set(shards, rank, 2, workers=2).loader(0)) for rank in range(2)]
    assert len(batches[0]) == len(batches[1]) == 8  # 2 workers x (12 samples // 3)
    again = list(shard_set(shards, 0, 2, workers=2).loader(0))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[0], again))


def test_resume_skips_exactly(shards):
    """loader(epoch, skip_batches=k) yields what the full epoch yields from batch k on: the same images (crops
    included) and tokens, with 2 workers taking turns."""
    full = list(shard_set(shards, workers=2).loader(1))
    for k in (1, 3, 4):
        rest = list(shard_set(shards, workers=2).loader(1, skip_batches=k))
        assert len(rest) == len(full) - k
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[k:], rest))


def test_a_bad_sample_is_named_by_shard_and_member(shards, tmp_path, capsys):
    """A corrupt image in a shard: DataError "SHARD: MEMBER: cannot read image"; with skip_bad it is skipped and
    printed, and the others cover for it (one batch of 5 from the 5 good samples). A sample without a caption
    file is named by shard and key."""
    members = list(read_shard(expand_shards(shards)[0]))
    bad = tmp_path / "00000.tar"
    with tarfile.open(bad, "w") as tar:
        for i, (key, parts) in enumerate(members):
            for ext, blob in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                blob = b"not a png" if (i, ext) == (2, "png") else blob
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    (tmp_path / "tokenizer.json").write_text(open(os.path.join(os.path.dirname(shards), "tokenizer.json")).read())
    with pytest.raises(DataError, match=rf"{bad}: {members[2][0]}.png: cannot read image"):
        list(shard_set(str(bad), batch=1).loader(0))
    got = list(shard_set(str(bad), batch=5, skip_bad=True).loader(0))
    assert len(got) == 1 and len(got[0][0]) == 5
    assert f"skipped: {bad}: {members[2][0]}.png: cannot read image" in capsys.readouterr().err
    with pytest.raises(DataError, match=rf"{bad}: {members[4][0]}: a sample needs an image .* and a .json or .txt"):
        shard_sample(str(bad), members[4][0], {"png": members[4][1]["png"]})


def test_a_shard_cut_short_is_named(shards, tmp_path):
    """A shard cut at a member's edge (a copy interrupted): it reads as a whole tar of fewer samples than
    sizes.json says. It was read as a shorter shard and the epoch ended later with "ran out of samples" and no
    shard named."""
    import shutil
    folder = tmp_path / "shards"
    shutil.copytree(os.path.dirname(shards), folder)
    cut = folder / "00001.tar"
    with tarfile.open(cut) as tar:
        edge = tar.getmembers()[4].offset  # the header of the third sample's first member
    cut.write_bytes(cut.read_bytes()[:edge])
    with pytest.raises(DataError, match=rf"^{cut}: "):
        list(shard_set(str(folder / "{00000..00007}.tar")).loader(0))


def test_cache_built_through_a_symlinked_folder_outlives_the_link(world, tmp_path):
    """A data folder reached through a link (a second checkout's data/ pointing at the first's): the cache is keyed
    by the real folder, so its image paths must be the real folder's too, not the link's, or a later run through
    the real path would read images from a link that is gone."""
    (tmp_path / "link").symlink_to(world, target_is_directory=True)
    tok = Tokenizer.load(world / "tokenizer.json")
    cached_records(str(tmp_path / "link" / "train.jsonl"), tok, 32, cache=str(tmp_path / "c"))
    (tmp_path / "link").unlink()
    cache = cached_records(str(world / "train.jsonl"), tok, 32, cache=str(tmp_path / "c"), build=False)
    assert [cache[i]["image"] for i in range(len(cache))] == [r["image"] for r in read_records(world / "train.jsonl")]
    assert all(os.path.exists(cache[i]["image"]) for i in range(len(cache)))


def test_cache_command_builds_what_train_py_opens(world, tmp_path):
    """python prepare/cache.py with its defaults writes the cache that train.py's defaults (the same read options,
    T of the tiny preset) open without building: the other ranks' path (build=False)."""
    import subprocess
    import sys
    data = tmp_path / "train.jsonl"
    data.write_text((world / "train.jsonl").read_text().replace('"images/', f'"{world}/images/'))
    (tmp_path / "tokenizer.json").write_text((world / "tokenizer.json").read_text())
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.dirname(__file__)), "prepare", "cache.py"),
                        str(data), "--context-length", "32"], capture_output=True, text=True)
    assert r.returncode == 0 and "48 records, M = 6, T = 32, uint16" in r.stdout, r.stderr
    read = dict(captions=None, on_count="error", skip_bad=False, sep=None)  # train.py's defaults
    cache = cached_records(str(data), Tokenizer.load(tmp_path / "tokenizer.json"), 32, build=False, **read)
    assert len(cache) == 48


def test_two_runs_building_one_cache_at_once(world, tmp_path):
    """Two runs started together on new data (two seeds, say) both build the cache: each writes its own temporary
    file and renames a whole one (they shared one temporary name and crashed each other)."""
    import multiprocessing
    data = tmp_path / "train.jsonl"
    data.write_text((world / "train.jsonl").read_text().replace('"images/', f'"{world}/images/'))
    (tmp_path / "tokenizer.json").write_text((world / "tokenizer.json").read_text())
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    procs = [multiprocessing.get_context("fork").Process(target=cached_records, args=(str(data), tok, 32))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    cache = cached_records(str(data), tok, 32, build=False)
    assert torch.equal(torch.from_numpy(cache.tokens.astype(np.int64)), direct(read_records(str(data)), tok, 32))
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json", "train.jsonl", "train.jsonl.cache"]  # no .tmp left


def test_write_shards_refuses_an_image_type_shards_cannot_hold(world, tmp_path):
    """ShardDataset reads .jpg/.jpeg/.png/.webp members; a .bmp was written and every run on the shards failed."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.bmp")
    (tmp_path / "r.jsonl").write_text(json.dumps({"image": "a.bmp", "caption": ["x"]}) + "\n")
    with pytest.raises(DataError, match=f"^{tmp_path / 'r.jsonl'}:1: {tmp_path / 'a.bmp'}: a shard holds"):
        write_shards(str(tmp_path / "r.jsonl"), str(tmp_path / "out"))


def open_as(rank, train_path, tmp_path, barriers, **flags):
    """prepare/datasets.py's open_datasets as train.py calls it, for one rank, counting its barriers."""
    from types import SimpleNamespace
    from prepare.datasets import open_datasets
    args = SimpleNamespace(**{**dict(captions=None, caption_count="error", skip_bad=False, csv_separator=None,
                                     tokenizer=None, vocab_size=300, train_data=str(train_path), val_data="none",
                                     batch_size=4, seed=0, workers=0), **flags})
    return open_datasets(args, str(train_path), "none", 64, 32, str(tmp_path / "run"), rank, 2,
                         lambda: barriers.append(rank))


def test_every_rank_takes_the_same_barriers(world, tmp_path, capsys):
    """Rank 0 trains the tokenizer; a rank that looks only after it was saved took one barrier fewer, so the
    next collective paired the wrong calls (a hang until --dist-timeout). Here rank 1 runs after rank 0; both
    must count the same barriers. A --vocab-size that the existing tokenizer does not have is said, not
    silently ignored. A jsonl in a folder whose name holds ".tar" is a jsonl, not shards."""
    folder = tmp_path / "data.tar.d"
    folder.mkdir()
    data = folder / "train.jsonl"
    data.write_text((world / "train.jsonl").read_text().replace('"images/', f'"{world}/images/'))
    barriers = []
    open_as(0, data, tmp_path, barriers)
    open_as(1, data, tmp_path, barriers)
    assert barriers == [0, 0, 1, 1]
    assert (folder / "tokenizer.json").exists()
    open_as(0, data, tmp_path, [], vocab_size=500)
    assert f"note: {folder / 'tokenizer.json'} has 300 ids; --vocab-size 500 sizes only" in capsys.readouterr().out
