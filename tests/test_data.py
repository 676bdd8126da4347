import gzip
import io
import json
import logging
import os
import random
import re
import struct
import sys
import tarfile
import zlib
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import vitdist.shard_list
from conftest import TINY, children, png_bytes, run_pretrain, vitdist_cli, write_png_folder, write_shard
from vitdist.config import ConfigError, DataConfig
from vitdist.config_yaml import load_config
from vitdist.data import EvalLoader, TrainLoader
from vitdist.streams import Stream, shard_order
from vitdist.shard_list import expand_urls, train_shard_urls
from vitdist.transforms import draw_augmentation, eval_transform, sample_crop
from vitdist.samples import (BadSample, NoUsableSamples, Skips, TooManyBadSamples, check_skipped, load_rgb, open_image,
                             read_image, read_sample, too_many_skipped)
from vitdist.tars import READ_ERROR, read_samples
from vitdist.imagefolder import to_shards
from vitdist.preflight import preflight
from vitdist.make_shards import make_shards, scan_image_folder
from vitdist.workers import WORKER_NICENESS


def data_cfg(shards, *overrides):
    return load_config(TINY, [f"data.train_shards={shards['train']}", "data.val_shards=null", *overrides])


def keys_by_step(cfg, world_size, steps, positions=None):
    """Per optimizer step, the sorted keys of the global batch, gathered over all ranks."""
    batches = [iter(TrainLoader(cfg.data, 32, 8, cfg.train.global_batch_size, rank, world_size,
                                positions[rank] if positions else None)) for rank in range(world_size)]
    return [sorted(k for it in batches for k in next(it)["key"]) for _ in range(steps)]


def all_keys(pattern):
    return sorted(s["__key__"] for url in expand_urls(pattern) for s in wds.WebDataset(url, shardshuffle=False))


def test_each_sample_once_per_epoch_with_2_ranks_x_2_workers(demo_shards):
    cfg = data_cfg(demo_shards, "data.num_workers=2", "data.streams=4", "train.global_batch_size=64")
    epoch = keys_by_step(cfg, world_size=2, steps=512 // 64)  # 16 shards x 32 samples
    seen = [k for step in epoch for k in step]
    assert len(seen) == 512 and sorted(seen) == all_keys(demo_shards["train"])
    next_epoch = keys_by_step(cfg, world_size=2, steps=2 * 512 // 64)[512 // 64:]
    assert sorted(k for step in next_epoch for k in step) == sorted(seen)
    assert next_epoch != epoch  # reshuffled


def test_each_epoch_deals_the_shards_out_to_the_streams_anew(demo_shards):
    """4 streams of 4 shards of 32 samples: an epoch is 8 steps of 16 samples per stream. Each
    stream reads 4 whole shards an epoch, and the next epoch deals other ones to it: a stream
    that kept its shards would only see its samples in another order."""
    cfg = data_cfg(demo_shards, "data.num_workers=0", "data.streams=4", "train.global_batch_size=64")
    batches = iter(TrainLoader(cfg.data, 32, 8, 64, 0, 1))
    epochs = []
    for _ in range(2):
        shards = [set() for _ in range(4)]
        for _ in range(8):
            urls = next(batches)["url"]  # stream by stream
            for stream, own in enumerate(shards):
                own.update(urls[16 * stream : 16 * (stream + 1)])
        assert [len(own) for own in shards] == [4, 4, 4, 4]
        assert set().union(*shards) == set(expand_urls(demo_shards["train"]))
        epochs.append(shards)
    assert epochs[0] != epochs[1]


def test_each_block_of_a_shard_is_shuffled_by_a_seed_of_its_own(demo_shards):
    """data.shuffle_block=8: a stream yields its shard's samples 8 at a time, each 8 a permutation
    of 8 consecutive samples of the shard, and no two blocks in the same order."""
    cfg = data_cfg(demo_shards, "data.shuffle_block=8")
    stream = Stream(expand_urls(demo_shards["train"]), 0, cfg.data.streams, cfg.data)
    samples = [stream.next_raw()[0] for _ in range(32)]  # its first shard, whole
    in_shard = [s["__key__"] for s in read_samples(samples[0]["__url__"])]
    orders = [tuple(in_shard.index(s["__key__"]) - start for s in samples[start : start + 8]) for start in range(0, 32, 8)]
    assert all(sorted(order) == list(range(8)) for order in orders)
    assert len(set(orders)) == 4, orders


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2)])
def test_each_sample_once_per_epoch_of_an_image_folder_not_divisible_by_the_streams(tmp_path, world_size, workers):
    """75 images for 4 streams: one shard per stream (19, 19, 19, 18), so an epoch of 18 steps of 4
    samples sees 72 different ones and misses 3. (Shards of 75 // 4 = 18 samples and one of 3 gave
    one stream two shards: the epoch saw 57 different samples, 15 twice.)"""
    make_image_folder(tmp_path / "src", per_class=25)
    urls = to_shards(DataConfig(train_shards=str(tmp_path / "src"), streams=4), 3, tmp_path / "run", True).train_shards
    cfg = data_cfg({"train": json.dumps(urls)}, "data.streams=4", "train.global_batch_size=4",
                   f"data.num_workers={workers}")
    seen = [k for step in keys_by_step(cfg, world_size, steps=75 // 4) for k in step]
    assert len(set(seen)) == len(seen) == 72


def test_shards_not_a_multiple_of_the_streams_are_warned_about_once(demo_shards, caplog):
    def warnings(shards):
        cfg = data_cfg({"train": json.dumps(shards)}, "data.streams=4", "data.num_workers=0")
        caplog.clear()
        for rank in range(2):  # rank 0 alone warns
            TrainLoader(cfg.data, 32, 8, 128, rank, 2)
        return [r.message for r in caplog.records if r.levelname == "WARNING"]

    urls = expand_urls(demo_shards["train"])
    assert warnings(urls[:8]) == []
    [message] = warnings(urls[:6])
    assert message.startswith("6 training shards for data.streams=4, not a multiple: ")
    assert "some samples repeat before others are seen" in message


def test_loader_workers_run_in_their_own_session_below_the_training_process(demo_shards):
    """SLURM's and torchrun's signals to the job's process group reach only the main process, and
    decoding on every core leaves the training process first in line for a core."""
    before = set(children(os.getpid()))
    batches = iter(TrainLoader(data_cfg(demo_shards, "data.num_workers=2").data, 32, 8, 128, 0, 1))
    next(batches)
    workers = [pid for pid in children(os.getpid()) if pid not in before]
    assert len(workers) == 2
    own_nice = os.getpriority(os.PRIO_PROCESS, 0)
    for pid in workers:
        assert os.getsid(pid) == pid != os.getsid(0)
        assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, own_nice + WORKER_NICENESS)


@pytest.mark.parametrize("block, steps", [(128, 3), (10, 5), (10, 8), (8, 2)])
def test_stream_positions_resume_exactly(demo_shards, block, steps):
    """Resume mid-block, mid-shard, at an epoch boundary (8 steps x 8 samples = 2 shards of 32) and
    at a block's edge inside a shard."""
    cfg = data_cfg(demo_shards, "data.num_workers=1", f"data.shuffle_block={block}")
    loader = TrainLoader(cfg.data, 32, 8, 128, 0, 1)
    batches = iter(loader)
    for _ in range(steps):
        next(batches)
    positions = dict(loader.positions)
    expected = [next(batches) for _ in range(3)]
    resumed = iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1, positions))
    for want in expected:
        got = next(resumed)
        assert got["key"] == want["key"]
        torch.testing.assert_close(got["image"], want["image"], rtol=0, atol=0)  # same crops and flips


def test_repeated_augmentation_gives_each_sample_its_copies_in_one_step_and_resumes_exactly(demo_shards):
    """data.aug_repeats=3, 4 streams of 12 samples a step, 2 workers: each step holds the 16 samples
    that aug_repeats=1 gives a step of 16, in the same order, each 3 times in a row; the first copy is
    that run's crop, the other two are cropped on their own. Resumed from positions, the same batches.
    A stream's share of a step that the copies do not divide is refused, naming the key."""
    common = ["data.streams=4", "data.num_workers=2"]
    repeated_cfg = data_cfg(demo_shards, *common, "data.aug_repeats=3", "train.global_batch_size=48").data
    repeated = TrainLoader(repeated_cfg, 32, 8, 48, 0, 1)
    single = iter(TrainLoader(data_cfg(demo_shards, *common, "train.global_batch_size=16").data, 32, 8, 16, 0, 1))
    batches = iter(repeated)
    for _ in range(2):
        got, want = next(batches), next(single)
        assert got["key"] == [key for key in want["key"] for _ in range(3)]
        assert torch.equal(got["label"], want["label"].repeat_interleave(3))
        copies = got["image"].view(16, 3, *got["image"].shape[1:])
        assert torch.equal(copies[:, 0], want["image"])
        assert sum(not torch.equal(c[0], c[1]) and not torch.equal(c[1], c[2]) for c in copies) >= 12
    positions = dict(repeated.positions)
    expected = [next(batches) for _ in range(2)]
    resumed = iter(TrainLoader(repeated_cfg, 32, 8, 48, 0, 1, positions))
    for want in expected:
        got = next(resumed)
        assert got["key"] == want["key"] and torch.equal(got["image"], want["image"])

    with pytest.raises(ConfigError, match=re.escape("data.aug_repeats=5 does not divide the 12 samples a step takes "
                                                    "from each stream")):
        data_cfg(demo_shards, "data.streams=4", "train.global_batch_size=48", "data.aug_repeats=5")


def test_train_batches_are_uint8_crops_with_labels(demo_shards):
    cfg = data_cfg(demo_shards, "data.num_workers=0")
    batch = next(iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1)))
    assert batch["image"].shape == (128, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= set(range(8))
    assert not batch["skipped"] and len(set(batch["key"])) == 128


def noise_png(seed, size=(40, 40)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image, format, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def png_claiming(width, height):
    """A PNG whose header claims width x height and whose pixel data is a few bytes of nothing."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_bad_samples_are_skipped_and_counted_by_kind(tmp_path, caplog):
    """Every kind of bad data in real shards, one shard truncated and one deleted after the loader
    is built: each good or convertible sample is delivered once, each bad one counted by kind and
    logged with its shard and key."""
    grey16 = Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16))
    converted = {"cmyk": encoded(Image.new("CMYK", (40, 40), (0, 200, 200, 0)), "JPEG"),
                 "grey16": encoded(grey16, "PNG"), "grey": encoded(Image.new("L", (40, 40), 90), "PNG"),
                 "palette": encoded(Image.new("RGB", (40, 40), (9, 99, 199)).convert("P"), "PNG"),
                 "grey_alpha": encoded(Image.new("LA", (40, 40), (90, 128)), "PNG")}
    bad = {"no_label": [{"__key__": "nolabel", "png": png_bytes((9, 9, 9))}],
           "bad_label": [{"__key__": "outofrange", "png": png_bytes((9, 9, 9)), "cls": 8},
                         {"__key__": "notanumber", "png": png_bytes((9, 9, 9)), "cls": b"cat"}],
           "no_image": [{"__key__": "noimage", "txt": b"hello", "cls": 2}],
           "undecodable": [{"__key__": "garbage", "jpg": b"not an image at all", "cls": 1}],
           "too_small": [{"__key__": "onepixel", "png": png_bytes((9, 9, 9), size=(1, 1)), "cls": 1}],
           # PIL refuses the first itself (over twice its MAX_IMAGE_PIXELS); data.max_image_pixels the second
           "too_large": [{"__key__": "bomb", "png": png_claiming(20000, 20000), "cls": 1},
                         {"__key__": "big", "png": png_claiming(12000, 9000), "cls": 1}]}
    urls = [str(tmp_path / f"s{i}.tar") for i in range(5)]
    # One stream, blocks of one sample (read in order), one batch of all good samples: the shard
    # read last ends with a good one, so that the batch meets every bad sample.
    truncated, deleted, bad_shard, converted_shard, good_shard = shard_order(urls, seed=0, epoch=0)
    write_shard(truncated, [{"__key__": f"whole{i}", "png": noise_png(i), "cls": i} for i in range(3)])
    whole = tarfile.open(truncated).getmember("whole2.png")
    Path(truncated).write_bytes(Path(truncated).read_bytes()[:whole.offset_data + whole.size // 2])
    write_shard(deleted, [{"__key__": "gone", "png": png_bytes((1, 1, 1)), "cls": 1}])
    write_shard(bad_shard, [s for samples in bad.values() for s in samples] + [{"__key__": "good0", "png": png_bytes((0, 0, 0)), "cls": 0}])
    write_shard(converted_shard, [{"__key__": key, "png" if "grey" in key or key == "palette" else "jpg": data, "cls": 3}
                                  for key, data in converted.items()])
    write_shard(good_shard, [{"__key__": f"good{i}", "png": png_bytes((i, 0, 0)), "cls": i} for i in range(1, 4)])
    delivered = ["whole0", "whole1", "good0", *converted, "good1", "good2", "good3"]
    cfg = load_config(TINY, [f"data.train_shards={json.dumps(urls)}", "data.streams=1", "data.shuffle_block=1",
                             f"train.global_batch_size={len(delivered)}", "data.micro_batch_size=1", "data.num_workers=0"])
    loader = TrainLoader(cfg.data, 32, 8, len(delivered), 0, 1)
    Path(deleted).unlink()
    batch = next(iter(loader))
    assert sorted(batch["key"]) == sorted(delivered)
    assert batch["skipped"] == {"read_error": 2, **{kind: len(samples) for kind, samples in bad.items()}}
    messages = [r.message for r in caplog.records]
    for kind, samples in bad.items():
        for sample in samples:
            assert any(f"skipped sample '{sample['__key__']}' in {bad_shard}: " in m and m.endswith(f"[{kind}]")
                       for m in messages), sample["__key__"]
    for url in truncated, deleted:
        assert any(f"skipped the rest of the shard in {url}: " in m and m.endswith("[read_error]") for m in messages), url
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own bomb check is left in place for everyone else


def test_the_limits_on_an_image_and_on_bad_samples_allow_their_own_value():
    """data.max_image_pixels: at most, not fewer than; data.max_skip_frac: more than it stops, so
    1 never does, and 0 stops on the first bad sample only."""
    cfg = load_config(TINY, ["data.max_image_pixels=10000"]).data
    read_image({"__key__": "k", "png": png_bytes((9, 9, 9), size=(100, 100)), "cls": b"1"}, cfg, 8)
    with pytest.raises(BadSample, match="101x100 image, more than data.max_image_pixels=10000"):
        read_image({"__key__": "k", "png": png_bytes((9, 9, 9), size=(101, 100)), "cls": b"1"}, cfg, 8)
    assert not too_many_skipped(Counter(no_label=10), 10, 1.0)
    assert not too_many_skipped(Counter(no_label=1), 10, 0.1) and too_many_skipped(Counter(no_label=2), 10, 0.1)
    check_skipped({}, 20, 100, replace(cfg, max_skip_frac=0.0))
    with pytest.raises(TooManyBadSamples):
        check_skipped({"no_label": 1}, 20, 100, replace(cfg, max_skip_frac=0.0))


def test_shards_without_a_usable_sample_stop_the_stream_instead_of_hanging(tmp_path):
    """Shards whose every sample is skipped (labels under another key, class names in .cls, an
    empty tar) never fill a chunk: the stream says so, rather than reading them forever (with
    workers, until the loader's timeout names no cause). Read to their end, they are a data
    problem, not retried (NoUsableSamples, through the worker); cut short by a read error, they
    may be a storage outage that passes (a RuntimeError, retried)."""
    photo = png_bytes((9, 9, 9))
    write_shard(tmp_path / "s0.tar", [{"__key__": f"j{i}", "png": photo, "json": b'{"label": 1}'} for i in range(3)])
    write_shard(tmp_path / "s1.tar", [{"__key__": f"n{i}", "png": photo, "cls": b"n01440764"} for i in range(3)])
    write_shard(tmp_path / "s2.tar", [])
    write_shard(tmp_path / "good.tar", [{"__key__": f"g{i}", "png": photo, "cls": b"1"} for i in range(3)])
    cut = (tmp_path / "good.tar").read_bytes()[:1000]  # within the first sample's image
    for i in range(3):
        (tmp_path / f"cut{i}.tar").write_bytes(cut)

    def first_batch(shards):
        cfg = load_config(TINY, [f"data.train_shards={shards}", "data.val_shards=null", "data.streams=1",
                                 "train.global_batch_size=2", "data.micro_batch_size=2", "data.num_workers=1"])
        return next(iter(TrainLoader(cfg.data, 32, 8, 2, 0, 1, timeout_s=10)))

    with pytest.raises(NoUsableSamples) as data_problem:
        first_batch(f"{tmp_path}/s{{0..2}}.tar")
    # As the stream raised it, without the worker's traceback torch puts in its message.
    assert re.fullmatch(r"data stream 0 read 3 shards in a row without a usable sample \('.*/s\d\.tar', '.*/s\d\.tar', "
                     r"'.*/s\d\.tar'\), each read to its end: all their 6 samples were skipped: (no_label 3, bad_label 3|"
                     r"bad_label 3, no_label 3) \(the log names .*", str(data_problem.value)), str(data_problem.value)
    with pytest.raises(RuntimeError, match=r"data stream 0 read 3 shards in a row without a usable sample \('.*/cut\d\.tar'"
                                           r", .*\): 3 of them could not be read to their end, which may pass") as outage:
        first_batch(f"{tmp_path}/cut{{0..2}}.tar")
    assert not isinstance(outage.value, NoUsableSamples)


def test_a_stream_dealt_only_barren_shards_for_a_while_reads_on_to_the_usable_one(tmp_path):
    """Each epoch deals a stream a share of the shards, not all of them: a stream may read as many
    barren shards in a row as there are shards and still be dealt the usable one later. Only once it
    has passed over every shard is there none to be found."""
    photo = png_bytes((9, 9, 9))
    urls = [str(tmp_path / "good.tar")]
    write_shard(urls[0], [{"__key__": f"g{i}", "png": photo, "cls": b"1"} for i in range(2)])
    for s in range(3):
        urls.append(str(tmp_path / f"nolabel{s}.tar"))
        write_shard(urls[-1], [{"__key__": f"n{s}{i}", "png": photo} for i in range(2)])
    # A seed whose first two epochs deal the usable shard to stream 1: stream 0 reads 4 barren shards first.
    seed = next(seed for seed in range(100) if all(urls[0] not in shard_order(urls, seed, e)[0::2] for e in (0, 1)))
    cfg = DataConfig(train_shards=urls, streams=2, shuffle_block=2, num_workers=0, seed=seed)
    stream, keys = Stream(urls, 0, 2, cfg), []
    while not keys or keys[-1][0] != "g":
        sample, _ = stream.next_raw()
        keys.append(sample["__key__"])
        stream.judged(None if "cls" in sample else "no_label")
    assert sum(key[0] == "n" for key in keys) >= 8  # 4 barren shards and more, in a row

    stream = Stream(urls[1:], 0, 2, replace(cfg, train_shards=urls[1:]))
    # Each of the 3 shards once in the count of them and their samples, however many reads it took
    # (a stream is dealt one or two of them per epoch: more reads than shards).
    with pytest.raises(NoUsableSamples, match=r"data stream 0 read 3 shards in a row without a usable sample \("
                                              r"'[^)]*' over \d+ reads, each epoch dealing it a share of them\), "
                                              r"each read to its end: all their 6 samples were skipped: no_label 6"):
        while True:
            stream.next_raw()
            stream.judged("no_label")


def test_shards_without_a_usable_sample_stop_the_run_unretried(tmp_path):
    """A mistake every sample shares (labels under another key) is refused before any process
    starts, from the first samples' headers, naming the key. Samples whose headers pass but whose
    images cannot be decoded are found by the streams, once every shard has given nothing: a data
    problem that exits 2 and is marked in FATAL, so neither torchrun's restarts nor SLURM's requeue
    read the same shards again; without workers, as the training process reads them."""
    photo = png_bytes((9, 9, 9))
    cut = png_bytes((9, 9, 9), size=(400, 400))
    cut = cut[:len(cut) // 2]  # its header whole, its pixels not
    for i in range(2):
        write_shard(tmp_path / f"json{i}.tar", [{"__key__": f"j{i}{k}", "png": photo, "json": b"{}"} for k in range(2)])
        write_shard(tmp_path / f"cut{i}.tar", [{"__key__": f"c{i}{k}", "png": cut, "cls": b"1"} for k in range(2)])
    args = ["data.val_shards=null", "data.streams=1", "train.global_batch_size=2", "data.micro_batch_size=2",
            "data.num_workers=0", f"run.dir={tmp_path / 'run'}"]

    refused = run_pretrain(0, [f"data.train_shards={tmp_path}/json{{0..1}}.tar", *args], timeout_s=120)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert re.search(r"config error: data.train_shards: none of the first 4 samples of 2 shards, from '.*/json0.tar' on "
                     r"is usable \(4 no_label, first 'j00' in '.*/json0.tar': no .cls label among \['json', 'png'\]\)",
                     refused.stderr), refused.stderr[-3000:]
    assert "rank 0" not in refused.stderr and not (tmp_path / "run").exists()  # refused before training began

    run = run_pretrain(0, [f"data.train_shards={tmp_path}/cut{{0..1}}.tar", *args], timeout_s=120)
    message = "data stream 0 read 2 shards in a row without a usable sample"
    assert run.returncode == 2 and f"error: {message}" in run.stderr, run.stderr[-3000:]
    assert "all their 4 samples were skipped: undecodable 4" in run.stderr
    assert (tmp_path / "run" / "FATAL").read_text().startswith(message)


ENDLESS_SHARD = """
import io, itertools, signal, sys, tarfile
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # ended quietly once the reader is gone
image = open(sys.argv[1], "rb").read()
with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
    for i in itertools.count():
        for suffix, data in (("png", image), ("cls", b"1")):
            if i < 40 or suffix == "png":  # labels for the first 40 samples only
                member = tarfile.TarInfo(f"{i:08d}.{suffix}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
"""


@pytest.mark.parametrize("workers", [1, 0])
def test_shards_read_on_without_a_usable_sample_stop_the_run_unretried_at_the_timeout(tmp_path, workers):
    """Shards whose first samples are fine and the rest unlabelled: no chunk comes, though the stream
    reads on, and its barren-shard rule would need every shard read to end it (here, an endless
    `pipe:`). At the timeout the run stops as it does for too many bad samples (exit 2, FATAL: not
    retried), naming the kind, not as for a read that stalls (exit 1, retried, the same shards
    met again)."""
    (tmp_path / "photo.png").write_bytes(png_bytes((9, 9, 9)))
    (tmp_path / "endless.py").write_text(ENDLESS_SHARD)
    run = run_pretrain(0, [f"data.train_shards=pipe:{sys.executable} {tmp_path}/endless.py {tmp_path}/photo.png",
                           "data.val_shards=null", "data.streams=1", "train.global_batch_size=2",
                           "data.micro_batch_size=2", "data.shuffle_block=8", "data.max_skip_frac=0.5",
                           f"data.num_workers={workers}", "dist.timeout_s=5", f"run.dir={tmp_path / 'run'}"],
                       timeout_s=120)
    who = r"training loader worker 0 \(pid \d+\)" if workers else r"training loader, read in the training process \(data.num_workers=0\),"
    message = rf"{who} delivered nothing for 5 s \(dist.timeout_s; vitdist evaluate's --timeout-s\), reading on: (\d+) of the \1 samples it read meanwhile were bad, more than data.max_skip_frac=0.5; most were no_label \1\."
    assert run.returncode == 2 and re.search(rf"^error: {message}", run.stderr, re.MULTILINE), run.stderr[-3000:]
    assert re.match(message, (tmp_path / "run" / "FATAL").read_text())
    assert re.search(r"^step 10/", run.stdout, re.MULTILINE), run.stdout  # the first samples were trained on


def write_tar(path, files):
    """A tar of (name, bytes) as given: names webdataset's writer would refuse, or repeat."""
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_a_file_name_met_twice_starts_a_new_sample(tmp_path):
    """A sample written twice in a row, or a.jpg beside a.JPG (suffixes are lowercased), is not a
    broken tar: webdataset's grouping gave up on the rest of the shard there (one read_error for
    all its samples); each file name met again now starts a sample of its own, judged as any other."""
    photo = png_bytes((9, 9, 9))
    write_tar(tmp_path / "twice.tar", [("a.png", photo), ("a.cls", b"1"), ("a.png", photo), ("a.cls", b"1"),
                                       ("b.jpg", photo), ("b.JPG", photo), ("b.cls", b"2"), ("c.png", photo), ("c.cls", b"3")])
    samples = list(read_samples(str(tmp_path / "twice.tar")))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("a", ["cls", "png"]), ("a", ["cls", "png"]), ("b", ["jpg"]), ("b", ["cls", "jpg"]), ("c", ["cls", "png"])]


def test_a_label_written_by_a_text_editor_is_read():
    """Whitespace, a Windows line end, and the byte-order mark that Windows editors put first."""
    for text in (b"3", b" 3\n", b"3\r\n", "\ufeff3\r\n".encode()):
        assert read_sample({"__key__": "k", "png": b"", "cls": text}, 8)[1] == 3, text
    with pytest.raises(BadSample, match="is not an integer"):
        read_sample({"__key__": "k", "png": b"", "cls": b"3a"}, 8)


def test_a_key_with_a_dot_is_skipped_naming_its_files_and_the_cause(tmp_path):
    """webdataset ends a key at the first dot of a file name: 'n0123/img.v2.cls' is key 'n0123/img',
    file 'v2.cls'. Such a sample is skipped as unlabelled, and the message says why, not just that
    it has no .cls."""
    write_tar(tmp_path / "dotted.tar", [("n0123/img.v2.jpg", png_bytes((9, 9, 9))), ("n0123/img.v2.cls", b"1")])
    [sample] = read_samples(str(tmp_path / "dotted.tar"))
    with pytest.raises(BadSample, match=re.escape("no .cls label among ['v2.cls', 'v2.jpg'] (a key ends at the first dot "
                                                  "of a file name: 'n0123/img.v2.cls' is key 'n0123/img', file 'v2.cls'")):
        read_sample(sample, 8)


def test_a_shard_whose_names_share_a_dotted_prefix_counts_as_all_its_samples_skipped(tmp_path, caplog):
    """'laion.000001.jpg', 'laion.000002.jpg', ...: every file is key 'laion', so the whole shard is
    one sample. Counted as one skip, the shard passed under data.max_skip_frac unseen, with a
    message that listed every file of it."""
    write_tar(tmp_path / "laion.tar", [(f"laion.{i:06d}.{ext}", png_bytes((9, 9, 9)) if ext == "jpg" else b"1")
                                       for i in range(20) for ext in ("jpg", "cls")])
    [sample] = read_samples(str(tmp_path / "laion.tar"))
    skips = Skips()
    with pytest.raises(BadSample) as bad:
        read_sample(sample, 8)
    skips.report(sample, bad.value)
    assert skips.counts == {"no_label": 20}
    with caplog.at_level(logging.WARNING, logger="vitdist.samples"):  # the next one is named too: 1 warning of 20
        skips.report({"__key__": "unlabelled", "__url__": "other.tar"}, BadSample("no_label", "no .cls label"))
    assert "skipped sample 'unlabelled' in other.tar: no .cls label [no_label]" in caplog.messages
    cfg = load_config(TINY, [f"data.train_shards={tmp_path / 'laion.tar'}", "data.val_shards=null", "data.streams=1",
                             "train.global_batch_size=2", "data.micro_batch_size=2", "data.num_workers=0"])
    with pytest.raises(NoUsableSamples, match="each read to its end: all their 20 samples were skipped: no_label 20 "):
        next(iter(TrainLoader(cfg.data, 32, 8, 2, 0, 1)))
    assert str(bad.value) == ("no .cls label among ['000000.cls', '000000.jpg', '000001.cls', '000001.jpg', '000002.cls', "
                              "'000002.jpg', '000003.cls', '000003.jpg', '... 32 more'] (a key ends at the first dot of a "
                              "file name: 'laion.000000.cls' is key 'laion', file '000000.cls', which makes 20 samples "
                              "one, skipped as 20; write keys without dots, as vitdist make-shards does)")


def test_a_tar_of_a_folder_whose_files_lie_apart_is_refused_saying_so(tmp_path):
    """`tar cf shard.tar -C folder .` writes the folder's order (ext4's is a hash's), and `tar cf
    shard.tar *.png *.cls` all images first: webdataset groups only files that follow one another,
    so every image and every label is a sample of its own. The refusal said only that the samples
    lacked a .cls label, and that labels are read from .cls, which they were."""
    cfg = DataConfig(train_shards="unused")
    image, label = png_bytes((9, 9, 9)), b"1"
    images_first = [("img0.png", image), ("img1.png", image), ("img0.cls", label), ("img1.cls", label)]
    hashed = [("img0.cls", label), ("img1.png", image), ("img0.png", image), ("img1.cls", label)]
    for files in (images_first, hashed):
        write_tar(tmp_path / "apart.tar", files)
        with pytest.raises(ConfigError, match=r"If the tar holds them, a sample's files must follow one another in it: "
                                              r"`tar cf` of a folder"):
            vitdist.shard_list.probe([str(tmp_path / "apart.tar")], cfg, 8, "data.train_shards", 30)
    write_tar(tmp_path / "together.tar", [("img0.png", png_bytes((0, 0, 0))), ("img0.cls", b"1")])
    vitdist.shard_list.probe([str(tmp_path / "together.tar")], cfg, 8, "data.train_shards", 30)


def test_a_local_shard_that_is_not_a_tar_is_refused_before_training(tmp_path):
    """Every read of it failed as a truncated tar would, and the run exited 1 for a storage
    outage, to be restarted and requeued onto the same files. A pipe: command's output is not judged:
    an outage may give such bytes (curl's error page)."""
    cfg = DataConfig(train_shards="unused")
    write_shard(tmp_path / "real.tar", [{"__key__": "0", "png": png_bytes((1, 2, 3)), "cls": b"1"}])
    (tmp_path / "real.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + random.Random(0).randbytes(2000))  # zstd's magic
    (tmp_path / "page.tar").write_bytes(b"<html><body>503 Service Unavailable</body></html>")
    for junk in ("real.tar.zst", "page.tar"):
        with pytest.raises(ConfigError, match=re.escape(f"data.train_shards: '{tmp_path / junk}' is not a tar (ReadError: ")):
            vitdist.shard_list.probe([str(tmp_path / junk), str(tmp_path / "real.tar")], cfg, 8, "data.train_shards", 30)
    vitdist.shard_list.probe([f"pipe:cat {tmp_path / 'page.tar'}", str(tmp_path / "real.tar")], cfg, 8,
                             "data.train_shards", 30)


def test_a_tar_cut_before_a_member_header_is_a_read_error(tmp_path):
    """tarfile ends such a tar without complaint, as if complete; plain, piped and gzipped shards.
    Also one followed by another tar."""
    whole = str(tmp_path / "whole.tar")
    write_shard(whole, [{"__key__": f"k{i}", "png": noise_png(i), "cls": i} for i in range(3)])
    cut = tmp_path / "cut.tar"
    header = min(m.offset for m in tarfile.open(whole).getmembers() if m.name.startswith("k2."))
    cut.write_bytes(Path(whole).read_bytes()[:header])
    (tmp_path / "whole.tar.gz").write_bytes(gzip.compress(Path(whole).read_bytes()))

    def read(url):
        return [sample.get(READ_ERROR, sample["__key__"]) for sample in read_samples(url)]

    for url in whole, f"pipe:cat {whole}", str(tmp_path / "whole.tar.gz"):
        assert read(url) == ["k0", "k1", "k2"], url
    for url in str(cut), f"pipe:cat {cut}":
        assert read(url) == ["k0", "k1", "EOFError: the tar ends without its end-of-archive block, cut short before a member"]
    # Two shards joined with cat: tarfile stops at the first one's end; the second's samples are a
    # read error, counted, not left out unseen.
    other = str(tmp_path / "other.tar")
    write_shard(other, [{"__key__": f"o{i}", "png": noise_png(i), "cls": i} for i in range(2)])
    joined = tmp_path / "joined.tar"
    joined.write_bytes(Path(whole).read_bytes() + Path(other).read_bytes())
    for url in str(joined), f"pipe:cat {joined}":
        assert read(url) == ["k0", "k1", "k2", "EOFError: data after the tar's end-of-archive block, which is not read "
                                               "(tars joined with cat? write each shard as one tar)"], url


def test_a_pipe_commands_failure_names_the_users_command():
    """A `pipe:` command runs behind a trap of the preemption signals (vitdist.tars): its
    failure (`curl -f` at a 404: no output, exit 22) names the command as the user wrote it. A child
    holds the output open past the exit: at the end of the output the exit is then known (else the
    end may come first, and the read error is the tar's "empty file", naming no command)."""
    command = "echo 'no such object' >&2; sleep 0.5 & exit 22"
    error, = (sample[READ_ERROR] for sample in read_samples(f"pipe:{command}"))
    assert error.startswith(f"OSError: (({command!r},), ") and error.endswith(": exit 22 (read) {}"), error


def test_16bit_png_and_cmyk_jpeg_convert_to_rgb():
    """A 16-bit gradient is the picture of its 8-bit version (not clipped to white); a CMYK JPEG
    keeps its colours."""
    ramp = np.linspace(0, 1, 64 * 256).reshape(64, 256)
    deep = load_rgb(open_image(encoded(Image.fromarray((ramp * 65535).round().astype(np.uint16)), "PNG")))
    flat = load_rgb(open_image(encoded(Image.fromarray((ramp * 255).round().astype(np.uint8)), "PNG")))
    assert deep.mode == flat.mode == "RGB"
    assert np.abs(np.asarray(deep, dtype=int) - np.asarray(flat, dtype=int)).max() <= 1
    for rgb in (200, 30, 60), (20, 180, 90), (240, 240, 250):
        cmyk = open_image(encoded(Image.new("RGB", (32, 32), rgb).convert("CMYK"), "JPEG", quality=95))
        assert cmyk.mode == "CMYK"
        assert np.abs(np.asarray(load_rgb(cmyk), dtype=int).mean((0, 1)) - rgb).max() < 8


def test_an_eps_file_under_an_image_key_is_undecodable_not_handed_to_ghostscript():
    """PIL opens any format it knows, whatever the key says; its EPS plugin has Ghostscript, a
    program outside the process, decode the shard's bytes. Other formats than the usual three still open."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"
    with pytest.raises(BadSample, match="undecodable image: cannot identify image file"):
        open_image(eps)
    assert open_image(encoded(Image.new("RGB", (32, 32)), "BMP")).size == (32, 32)


def test_fewer_shards_than_streams_is_a_clear_error(demo_shards):
    cfg = data_cfg(demo_shards, "data.streams=32", "train.global_batch_size=128", "data.num_workers=2")
    with pytest.raises(ConfigError, match=re.escape("16 training shard(s) for data.streams=32 (at least ranks x workers = 8 x 2)")):
        train_shard_urls(cfg.data, 8)


def test_shard_specs(demo_shards, tmp_path, monkeypatch):
    urls = expand_urls(demo_shards["train"])
    assert len(urls) == 16 and urls[0].endswith("train-000000.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(urls[:3]) + "\n\n")
    assert expand_urls(str(listing)) == urls[:3]
    # A Windows editor's byte-order mark began the first path: a shard that exists 'did not exist'.
    listing.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(urls[:2]).encode() + b"\r\n")
    assert expand_urls(str(listing)) == urls[:2]
    assert expand_urls(urls[:2]) == urls[:2]
    assert expand_urls(f"pipe:cat {urls[0]}") == [f"pipe:cat {urls[0]}"]
    # What webdataset opens itself is not looked for on the local disk.
    assert expand_urls("gs://bucket/train-{0..1}.tar") == ["gs://bucket/train-0.tar", "gs://bucket/train-1.tar"]
    with pytest.raises(ConfigError, match=r"do not exist, first: '.*/nope-1.tar'$"):
        expand_urls(str(tmp_path / "nope-{1..2}.tar"))
    # Looked up one by one, or, for many in one directory, by listing it: either way a link to a
    # shard is one, a directory or a dangling link is not.
    for listed_from in (vitdist.shard_list.LISTED_FROM, 1):
        monkeypatch.setattr(vitdist.shard_list, "LISTED_FROM", listed_from)
        here = tmp_path / f"listed-from-{listed_from}"
        here.mkdir()
        (here / "linked-0.tar").symlink_to(urls[0])
        (here / "linked-1.tar").mkdir()
        (here / "linked-2.tar").symlink_to(here / "gone.tar")
        assert expand_urls(str(here / "linked-0.tar")) == [str(here / "linked-0.tar")]
        monkeypatch.chdir(here)  # a bare name is in the working directory
        assert expand_urls("linked-0.tar") == ["linked-0.tar"]
        with pytest.raises(ConfigError, match=r"2 shard file\(s\) do not exist, first: '.*/linked-1.tar'$"):
            expand_urls(str(here / "linked-{0..2}.tar"))
        with pytest.raises(ConfigError, match=r"1 shard file\(s\) do not exist, first: '.*/no-such-dir/s.tar'$"):
            expand_urls([urls[0], str(here / "no-such-dir/s.tar")])
    # A relative path (as in the shipped configs: demo/...) is read from the working directory,
    # which a job started elsewhere does not share: the error says which directory that was.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"do not exist, first: 'demo/nope-1.tar' (a relative path, from "
                                                    f"the working directory '{tmp_path}')")):
        expand_urls("demo/nope-{1..2}.tar")
    with pytest.raises(ConfigError, match="shard list file '.*missing.txt' does not exist"):
        expand_urls(str(tmp_path / "missing.txt"))
    # A brace of a name, not of a pattern, was a traceback that named no key.
    (tmp_path / "a{b.tar").write_bytes(Path(urls[0]).read_bytes())
    with pytest.raises(ConfigError, match=r"^data.train_shards: Unbalanced braces: 'a\{b.tar': a brace that is part"):
        expand_urls("a{b.tar", "data.train_shards")
    assert expand_urls(r"a\{b.tar") == ["a{b.tar"]


def test_a_shard_named_twice_or_a_shard_list_inside_a_list_is_refused(demo_shards, tmp_path, monkeypatch):
    """Either would go unnoticed: a shard named twice is read twice per epoch (its validation samples
    count twice in top-1), and a .txt list inside a list was read as a tar shard, all of whose
    "samples" are skipped as read errors."""
    urls = expand_urls(demo_shards["val"])
    listing = tmp_path / "val.txt"
    listing.write_text("\n".join([*urls, urls[1]]) + "\n  # an indented comment\n")
    for spec in (str(listing), [demo_shards["val"], urls[1]]):
        with pytest.raises(ConfigError, match=f"^data.val_shards: '{re.escape(urls[1])}' is named 2 times"):
            expand_urls(spec, "data.val_shards")
    # Spelt otherwise, it is the same file all the same: through '.', relative beside absolute, or
    # through a symbolic link to its directory.
    (tmp_path / "linked").symlink_to(Path(urls[1]).parent)
    monkeypatch.chdir(Path(urls[1]).parent)
    for other in (urls[1].replace("/val-", "/./val-"), Path(urls[1]).name, str(tmp_path / "linked" / Path(urls[1]).name)):
        with pytest.raises(ConfigError, match=f"^data.val_shards: '{re.escape(urls[1])}' is named 2 times \\(as "
                                              f"'{re.escape(urls[1])}', '{re.escape(other)}'\\)"):
            expand_urls([demo_shards["val"], other], "data.val_shards")
    listing.write_text("\n".join(urls[:2]) + "\n  # an indented comment\n")
    assert expand_urls(str(listing)) == urls[:2]
    with pytest.raises(ConfigError, match=f"^data.train_shards: the shard list file '{re.escape(str(listing))}' is an "
                                          "item of a list"):
        expand_urls([str(listing), urls[0]], "data.train_shards")


def test_a_missing_shard_is_refused_naming_its_key(demo_shards, tmp_path):
    cfg = load_config(TINY, [f"data.train_shards={demo_shards['train']}", f"data.val_shards={tmp_path}/v-{{0..1}}.tar",
                               f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^data.val_shards: 2 shard file\(s\) do not exist, first: '.*/v-0.tar'"):
        preflight(cfg, 1)
    cfg.data.val_shards, cfg.data.train_shards = None, str(tmp_path / "t-{0..1}.tar")
    with pytest.raises(ConfigError, match=r"^data.train_shards: 2 shard file\(s\) do not exist"):
        preflight(cfg, 1)


def test_pipe_urls_are_read(demo_shards, tmp_path):
    urls = expand_urls(demo_shards["train"])
    cfg = load_config(TINY, [f"data.train_shards={[f'pipe:cat {u}' for u in urls]}".replace("'", '"'),
                             "data.num_workers=0"])
    assert len(next(iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1)))["key"]) == 128


@pytest.mark.parametrize("shards", [1, 16])
def test_eval_sees_every_sample_once(demo_shards, shards):
    """Whole shards per rank x worker when there are enough (16 shards, 2 x 2 slots), else every
    n-th sample (1 shard); in batches of the micro-batch size but for each slot's last."""
    pattern = demo_shards["train"] if shards == 16 else re.sub(r"\{.*\}", "000000", demo_shards["val"])
    cfg = load_config(TINY, [f"data.val_shards={pattern}", "data.num_workers=2", "data.micro_batch_size=5"])
    assert len(expand_urls(pattern)) == shards
    seen = Counter()
    for rank in range(2):
        short = 0
        for batch in EvalLoader(cfg.data, 32, 8, rank, 2):
            assert len(batch["image"]) == len(batch["label"]) == len(batch["key"]) <= 5 and batch["skipped"] == 0
            short += len(batch["key"]) < 5
            seen.update(batch["key"])
        assert short <= 2, rank  # the last batch of each of the rank's 2 workers
    assert sorted(seen.elements()) == all_keys(pattern)  # each once


def test_eval_counts_the_bad_samples_it_skips(tmp_path):
    """Skipped samples are counted in the batch after them; those after the last full batch in the
    last one, a batch of no images if no good sample is left."""
    write_shard(tmp_path / "val.tar", [{"__key__": "bad0", "png": b"not a png", "cls": 0},
                                       *({"__key__": f"good{i}", "png": png_bytes((i, 0, 0)), "cls": 1} for i in range(3)),
                                       {"__key__": "bad1", "png": b"nor this", "cls": 0},
                                       {"__key__": "nolabel", "png": png_bytes((0, 0, 0))}])
    cfg = load_config(TINY, [f"data.val_shards={tmp_path / 'val.tar'}", "data.num_workers=0"])
    cfg.data.micro_batch_size = 2
    assert [(b["key"], b["skipped"]) for b in EvalLoader(cfg.data, 32, 8, 0, 1)] == [(["good0", "good1"], 1),
                                                                                       (["good2"], 2)]
    cfg.data.micro_batch_size = 3
    batches = list(EvalLoader(cfg.data, 32, 8, 0, 1))
    assert [(b["key"], b["skipped"]) for b in batches] == [(["good0", "good1", "good2"], 1), ([], 2)]
    assert batches[-1]["image"].shape == (0, 3, 32, 32)


def test_eval_skips_a_strip_that_resized_for_its_crop_would_be_too_large(tmp_path, caplog):
    """The shorter side is resized to the crop's, the longer in proportion: a thin strip within
    data.max_image_pixels as decoded would not be once resized (8x500000 pixels: 12 GB at 224 px)."""
    write_shard(tmp_path / "val.tar", [{"__key__": "strip", "png": png_bytes((9, 9, 9), size=(8, 1000)), "cls": 0},
                                       {"__key__": "photo", "png": png_bytes((9, 9, 9), size=(80, 60)), "cls": 1}])
    cfg = load_config(TINY, [f"data.val_shards={tmp_path / 'val.tar'}", "data.num_workers=0",
                             "data.max_image_pixels=10000"])  # the strip holds 8000 pixels; resized, 162000
    assert [(b["key"], b["skipped"]) for b in EvalLoader(cfg.data, 32, 8, 0, 1)] == [(["photo"], 1)]
    assert any(f"skipped sample 'strip' in {tmp_path / 'val.tar'}: 8x1000 image, resized to 36x4500 for the "
               "validation crop: more than data.max_image_pixels=10000 [too_large]" in r.message for r in caplog.records)


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 2), (3, 1)])
def test_eval_counts_each_sample_and_each_skip_once_on_any_layout(tmp_path, world_size, workers):
    """val/top1 on N ranks is top-1 on one: shards of unequal sizes (one empty, one cut short before
    a member) dealt whole (1 and 3 slots) or every 4th sample of all (4 slots: more than shards),
    each good sample once over all ranks and workers, each bad one (undecodable, the cut shard's
    unreadable rest) counted once."""
    write_shard(tmp_path / "a.tar", [{"__key__": f"a{i}", "png": png_bytes((i, 0, 0)) if i != 3 else b"bad", "cls": i % 8}
                                     for i in range(8)])
    write_shard(tmp_path / "empty.tar", [])
    write_shard(tmp_path / "whole.tar", [{"__key__": f"c{i}", "png": png_bytes((0, i, 0)), "cls": 1} for i in range(5)])
    header = min(m.offset for m in tarfile.open(tmp_path / "whole.tar").getmembers() if m.name.startswith("c3."))
    (tmp_path / "cut.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:header])
    (tmp_path / "val.txt").write_text("".join(f"{tmp_path / name}\n" for name in ("a.tar", "empty.tar", "cut.tar")))
    cfg = load_config(TINY, [f"data.val_shards={tmp_path / 'val.txt'}", f"data.num_workers={workers}",
                             "data.micro_batch_size=2"])
    seen, skipped = Counter(), 0
    for rank in range(world_size):
        for batch in EvalLoader(cfg.data, 32, 8, rank, world_size):
            seen.update(batch["key"])
            skipped += batch["skipped"]
    assert sorted(seen.elements()) == ["a0", "a1", "a2", "a4", "a5", "a6", "a7", "c0", "c1", "c2"]
    assert skipped == 2


def test_crop_boxes_follow_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(20, 500), rng.randint(20, 500)
        left, top, right, bottom = sample_crop(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    areas = [(r - l) * (b - t) / 40000 for l, t, r, b in (sample_crop(rng, 200, 200, (0.5, 1.0), (1, 1)) for _ in range(500))]
    assert 0.48 <= min(areas) and max(areas) <= 1.0 and 0.7 < sum(areas) / len(areas) < 0.8
    ratios = [(r - l) / (b - t) for l, t, r, b in (sample_crop(rng, 200, 200, (0.5, 1.0), (3 / 4, 4 / 3)) for _ in range(500))]
    assert 0.74 <= min(ratios) < 0.8 and 1.25 < max(ratios) <= 1.35  # within the range up to rounding, and across it


def test_hflip_is_the_probability_of_a_flip():
    def flips(p):
        return sum(draw_augmentation(random.Random(i), 60, 40, DataConfig(hflip=p))[1] for i in range(400))
    assert flips(0.0) == 0 and flips(1.0) == 400 and 160 < flips(0.5) < 240


@pytest.mark.parametrize("height, width, crop_frac", [(40, 60, 1.0), (60, 40, 1.0), (60, 40, 0.8), (37, 101, 0.875),
                                                     (101, 37, 0.9), (375, 500, 0.875)])
def test_validation_resizes_the_shorter_side_then_crops_the_center(height, width, crop_frac):
    """As timm's eval transform for crop_pct=val_crop_frac: torchvision's Resize(floor(img_size /
    crop_pct)) then CenterCrop(img_size), for wide and tall images (odd margins: the rounding of
    the offsets)."""
    from timm.data import create_transform
    from torchvision.transforms.v2 import InterpolationMode, functional as TF

    transform = create_transform(32, crop_pct=crop_frac, interpolation="bicubic")
    resize, crop = [t for t in transform.transforms if type(t).__name__ in ("Resize", "CenterCrop")]
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    resized = TF.resize(image, resize.size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(eval_transform(image, DataConfig(val_crop_frac=crop_frac), 32), TF.center_crop(resized, crop.size))


def make_image_folder(root, per_class=5):
    for c, name in enumerate(["cat", "dog", "eel"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (20 + i, 30), (c * 80, i * 10, 0)).save(root / name / f"img.{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_make_shards_from_image_folder(tmp_path):
    make_image_folder(tmp_path / "src")
    pattern = make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=4, progress=False)
    assert pattern == f"{tmp_path}/out/train-{{000000..000003}}.tar"
    assert json.loads((tmp_path / "out" / "classes.json").read_text()) == ["cat", "dog", "eel"]
    samples = [s for url in expand_urls(pattern) for s in wds.WebDataset(url, shardshuffle=False)]
    assert len(samples) == 15 and [len(list(wds.WebDataset(u, shardshuffle=False))) for u in expand_urls(pattern)] == [4, 4, 4, 3]
    # For 3 streams: the fewest shards, a multiple of 3, of at most 4 samples.
    pattern = make_shards(tmp_path / "src", tmp_path / "out3", samples_per_shard=4, progress=False, streams=3)
    assert [len(list(wds.WebDataset(u, shardshuffle=False))) for u in expand_urls(pattern)] == [3, 3, 3, 2, 2, 2]
    for s in samples:
        label = int(s["cls"])
        name = ["cat", "dog", "eel"][label]
        assert f"_{name}_img_" in s["__key__"]  # the dotted file name survives as a key
        image = s.get("png") or s.get("jpg")
        assert Image.open(io.BytesIO(image)).getpixel((0, 0))[0] in range(label * 80 - 3, label * 80 + 4)
    assert [int(s["cls"]) for s in samples] != sorted(int(s["cls"]) for s in samples)  # shuffled


def test_hidden_files_and_folders_are_neither_classes_nor_images_nor_folders_named_like_images(tmp_path):
    """Jupyter's .ipynb_checkpoints beside the class folders would be class 0 and shift every label
    by one; macOS's ._<name>.jpg (AppleDouble metadata) would be stored as images that never decode."""
    make_image_folder(tmp_path / "src", per_class=1)
    (tmp_path / "src" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "src" / "dog" / ".thumbs").mkdir()
    Image.new("RGB", (20, 30)).save(tmp_path / "src" / "dog" / ".thumbs" / "img.png")
    (tmp_path / "src" / "cat" / "._img.0.jpg").write_bytes(b"\0\5\26\7 AppleDouble")
    (tmp_path / "src" / "eel" / "album.jpg").mkdir()  # a folder named like an image
    classes, items = scan_image_folder(tmp_path / "src")
    assert classes == ["cat", "dog", "eel"]
    assert [(path.relative_to(tmp_path / "src").as_posix(), label) for path, label in items] == [
        ("cat/img.0.jpg", 0), ("dog/img.0.jpg", 1), ("eel/img.0.jpg", 2)]


def test_symlinked_sub_folders_of_a_class_are_followed_but_not_round_a_loop(tmp_path):
    """A class assembled from links to other folders (as torchvision's ImageFolder follows them):
    their images are the class's; a link back to a parent folder is not followed round and round."""
    make_image_folder(tmp_path / "src", per_class=1)
    (tmp_path / "more_cats").mkdir()
    Image.new("RGB", (20, 30)).save(tmp_path / "more_cats" / "tabby.png")
    (tmp_path / "src" / "cat" / "more").symlink_to(tmp_path / "more_cats", target_is_directory=True)
    (tmp_path / "src" / "dog" / "loop").symlink_to(tmp_path / "src" / "dog", target_is_directory=True)
    classes, items = scan_image_folder(tmp_path / "src")
    assert classes == ["cat", "dog", "eel"]
    assert [(path.relative_to(tmp_path / "src").as_posix(), label) for path, label in items] == [
        ("cat/img.0.jpg", 0), ("cat/more/tabby.png", 0), ("dog/img.0.jpg", 1), ("eel/img.0.jpg", 2)]


def test_files_of_other_types_are_left_out_with_a_warning_counting_them(tmp_path, caplog):
    """A .bmp, .tif or .gif among the JPEGs (torchvision's ImageFolder reads them) is not read: say
    so, counted by type, rather than train on a smaller dataset without a word."""
    make_image_folder(tmp_path / "src", per_class=1)  # and cat/notes.txt
    for name in ("a.BMP", "b.tif", "c.bmp"):
        Image.new("RGB", (20, 30)).save(tmp_path / "src" / "dog" / name)
    (tmp_path / "src" / "dog" / ".DS_Store").write_bytes(b"\0")  # hidden: left out without a word
    (tmp_path / "src" / "dog" / "moved.jpg").symlink_to(tmp_path / "elsewhere.jpg")  # its image moved away
    with caplog.at_level(logging.WARNING, logger="vitdist.make_shards"):
        classes, items = scan_image_folder(tmp_path / "src")
    assert len(items) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"left out 5 file(s) under '{tmp_path / 'src'}' that are not .jpg/.jpeg/.png/.webp images: .bmp 2, "
        ".txt 1, .tif 1, (broken link) 1"]


def test_an_empty_class_folder_of_a_training_split_is_warned_of(tmp_path, caplog):
    """An empty class folder still takes an index (the labels after it shift, the model gets an
    output it never learns): said for a split whose folders are its classes, not for one labelled
    by another split's classes, which may lack some."""
    make_image_folder(tmp_path / "src", per_class=1)
    (tmp_path / "src" / "bat").mkdir()
    with caplog.at_level(logging.WARNING, logger="vitdist.make_shards"):
        classes, items = scan_image_folder(tmp_path / "src")
        assert classes[0] == "bat" and sorted({label for _, label in items}) == [1, 2, 3]
        assert [r.getMessage() for r in caplog.records if "hold no image" in r.getMessage()] == [
            f"class folder(s) ['bat'] of '{tmp_path / 'src'}' hold no image: each is a class all the same (index 0), "
            "with no sample to learn it from; remove them unless the classes must match another split's"]
        caplog.clear()
        scan_image_folder(tmp_path / "src", classes)
        assert not [r for r in caplog.records if "hold no image" in r.getMessage()]


def test_make_shards_refuses_a_folder_that_holds_shards_of_its_prefix(tmp_path):
    """Written again there (another --streams, --seed, or other images), shards would replace those
    of the same names, which a run may be training on (its resume would then read other samples,
    unnoticed: shards are compared by name), and fewer of them would leave old ones beside the new."""
    make_image_folder(tmp_path / "src")
    pattern = make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=4, progress=False)
    before = {url: Path(url).read_bytes() for url in expand_urls(pattern)}
    with pytest.raises(FileExistsError, match=f"'{tmp_path / 'out'}' holds 4 shard\\(s\\) train-\\*.tar already"):
        make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=8, seed=1, progress=False)
    assert {url: Path(url).read_bytes() for url in expand_urls(pattern)} == before
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == sorted(Path(u).name for u in before)
    make_shards(tmp_path / "src", tmp_path / "out", prefix="val", samples_per_shard=8, progress=False)  # another prefix


def test_make_shards_refuses_to_write_inside_the_image_folder(tmp_path):
    """Shards written into src/shards made 'shards' a class folder of src from then on: the next
    split's make-shards blamed missing classes, and an ImageFolder run took it for an empty class."""
    make_image_folder(tmp_path / "src")
    for out in (tmp_path / "src" / "shards", tmp_path / "src" / "cat" / "shards"):
        with pytest.raises(ValueError, match=f"^'{re.escape(str(out))}' is inside the image folder"):
            make_shards(tmp_path / "src", out, progress=False)
        assert not out.exists()
    make_shards(tmp_path / "src", tmp_path / "src", progress=False)  # beside the class folders: not a class
    assert scan_image_folder(tmp_path / "src")[0] == ["cat", "dog", "eel"]


def test_an_interrupted_make_shards_leaves_no_shard_behind(tmp_path, monkeypatch):
    """Ctrl-C half-way: the shard being written, closed on the way out with its end-of-archive
    block, would read as a complete shard of fewer samples, under a final name, beside complete
    ones. Nothing of the call is left: a re-run writes the shards in full."""
    make_image_folder(tmp_path / "src")
    write = wds.TarWriter.write
    calls = []

    def interrupted(self, sample):
        calls.append(sample["__key__"])
        if len(calls) == 6:  # in the second shard of 4 samples
            raise KeyboardInterrupt
        return write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []
    monkeypatch.setattr(wds.TarWriter, "write", write)
    pattern = make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=4, progress=False)
    assert [len(list(wds.WebDataset(u, shardshuffle=False))) for u in expand_urls(pattern)] == [4, 4, 4, 3]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["classes.json"] + [f"train-00000{i}.tar" for i in range(4)]


def test_a_split_lacking_classes_is_labelled_by_the_classes_json_already_there(tmp_path):
    """A validation folder without some of the training classes, numbered by its own sorted
    folders, would take other classes' indices: written beside the training shards it is labelled
    by their classes.json, which stays as it was; written elsewhere, by --classes. A split whose
    folders the classes.json lacks is refused, as is a --classes other than the one there, and a
    run (or `vitdist evaluate`) whose validation shards were labelled by other classes."""
    write_png_folder(tmp_path / "train", classes=("ant", "bee", "cat", "dog"), per_class=2)
    write_png_folder(tmp_path / "val", classes=("bee", "dog"), per_class=2)
    classes_json = tmp_path / "out" / "classes.json"
    train = make_shards(tmp_path / "train", tmp_path / "out", progress=False)
    val = make_shards(tmp_path / "val", tmp_path / "out", prefix="val", progress=False)
    assert json.loads(classes_json.read_text()) == ["ant", "bee", "cat", "dog"]

    def labels(pattern):
        return sorted({(s["__key__"].split("_")[1], int(s["cls"])) for u in expand_urls(pattern)
                       for s in wds.WebDataset(u, shardshuffle=False)})

    assert labels(val) == [("bee", 1), ("dog", 3)]
    write_png_folder(tmp_path / "more", classes=("ant", "eel"), per_class=1)
    with pytest.raises(ValueError, match=r"class folder\(s\) \['eel'\] of .* are not among the 4 classes .* \(those of "
                                         f"'{re.escape(str(classes_json))}', which labels the shards beside it"):
        make_shards(tmp_path / "more", tmp_path / "out", prefix="more", progress=False)
    with pytest.raises(ValueError, match=f"'{re.escape(str(classes_json))}' lists other classes than those given"):
        make_shards(tmp_path / "val", tmp_path / "out", prefix="val2", classes=["bee", "dog"], progress=False)

    run = vitdist_cli("make-shards", tmp_path / "val", tmp_path / "elsewhere", "--classes", classes_json)
    assert run.returncode == 0, run.stderr
    assert labels(f"{tmp_path}/elsewhere/train-000000.tar") == [("bee", 1), ("dog", 3)]
    own = make_shards(tmp_path / "val", tmp_path / "own", prefix="val", progress=False)  # numbered by its own folders
    assert labels(own) == [("bee", 0), ("dog", 1)]
    cfg = load_config(TINY, [f"data.train_shards={train}", f"data.val_shards={own}", "model.num_classes=4", "data.streams=1"])
    with pytest.raises(ConfigError, match=f"^data.val_shards: '{re.escape(str(tmp_path / 'own' / 'classes.json'))}' labels "
                                          r"its shards by other classes than the training shards' \(2 and 4 classes; "
                                          r"class 0 is 'bee' against 'ant'\)"):
        preflight(cfg, 1)
    preflight(replace(cfg, data=replace(cfg.data, val_shards=f"{tmp_path}/elsewhere/train-000000.tar")), 1)


def test_make_shards_by_size(tmp_path):
    """--max-shard-bytes bounds the image bytes per shard, and shards stay of equal sizes up to one."""
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        (tmp_path / "src" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        noise = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(noise).save(tmp_path / "src" / f"c{i % 3}" / f"{i}.png")
    image_bytes = max(p.stat().st_size for p in (tmp_path / "src").rglob("*.png"))
    pattern = make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=1000, max_shard_bytes=4 * image_bytes,
                          progress=False)
    counts = [len(list(wds.WebDataset(u, shardshuffle=False))) for u in expand_urls(pattern)]
    assert sum(counts) == 30 and max(counts) <= 4 and max(counts) - min(counts) <= 1


def test_one_image_over_the_byte_limit_does_not_split_every_shard():
    from vitdist.make_shards import shard_bounds

    bounds = shard_bounds([100] * 400 + [250_000], samples_per_shard=1000, max_shard_bytes=10_000, streams=3)
    assert len(bounds) - 1 == 6  # 40,000 bytes of the others in 4 shards, rounded up to the streams' multiple
    assert bounds[0] == 0 and bounds[-1] == 401 and max(b - a for a, b in zip(bounds, bounds[1:])) == 67


def test_shards_stay_a_multiple_of_the_streams_when_the_samples_are_too_few_to_fill_each():
    """100 samples of at most 1 per shard for 64 streams made 100 shards, not a multiple of 64: 36
    streams held two shards and the others one, and every epoch repeated some samples before
    others were seen. The largest multiple within the samples now (no shard empty), and one shard
    per sample where the samples are fewer than the streams (a small validation split)."""
    from vitdist.make_shards import shard_bounds

    for count, streams, shards in ((100, 64, 64), (128, 64, 128), (48, 64, 48), (7, 3, 6)):
        bounds = shard_bounds([100] * count, samples_per_shard=1, max_shard_bytes=1e9, streams=streams)
        assert len(bounds) - 1 == shards and bounds[-1] == count, (count, streams)
        assert min(b - a for a, b in zip(bounds, bounds[1:])) >= 1


def test_folders_named_with_braces_are_named_by_the_shard_specs_written_for_them(tmp_path):
    """make-shards' pattern and an ImageFolder's conversion are brace-expanded: a run.dir runs/{a,b}
    was read as two folders, neither of which holds the shards."""
    make_image_folder(tmp_path / "src")
    out = tmp_path / "out {a,b} \\ x"
    assert expand_urls(make_shards(tmp_path / "src", out, samples_per_shard=8, progress=False)) == [
        str(out / f"train-{i:06d}.tar") for i in range(2)]
    converted = to_shards(DataConfig(train_shards=str(tmp_path / "src"), streams=2), 3, tmp_path / "run {a,b}", True)
    assert expand_urls(converted.train_shards) == [str(tmp_path / "run {a,b}" / "train" / f"train-{i:06d}.tar")
                                                   for i in range(2)]


def test_make_shards_cli(tmp_path):
    make_image_folder(tmp_path / "src")
    run = vitdist_cli("make-shards", tmp_path / "src", tmp_path / "out", "--samples-per-shard", "8", "--streams", "3",
                      "--prefix", "pets")
    assert run.returncode == 0, run.stderr
    assert f"shards: {tmp_path}/out/pets-{{000000..000002}}.tar" in run.stdout  # 2 by size, 3 for the streams
    assert "15/15" in run.stderr  # the progress bar
    run = vitdist_cli("make-shards", tmp_path / "nope", tmp_path / "out")
    assert run.returncode == 2 and "image folder" in run.stderr and "nope' does not exist" in run.stderr


@pytest.mark.parametrize("arguments, message", [
    (["make-shards", "src", "out", "--max-shard-bytes", "-1"], "argument --max-shard-bytes: must be above 0, got -1"),
    (["make-shards", "src", "out", "--max-shard-bytes", "nan"], "argument --max-shard-bytes: must be above 0, got nan"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["evaluate", "--checkpoint", "c", "--data", "d", "--workers", "-1"], "argument --workers: must be at least 0"),
])
def test_cli_numbers_out_of_range_are_refused_before_any_work(arguments, message, capsys):
    """A negative or NaN shard size wrote one image per shard; a batch of 0 evaluated anyway, and -1
    workers failed with a DataLoader traceback."""
    from vitdist.cli import main

    with pytest.raises(SystemExit) as e:
        main(arguments)
    assert e.value.code == 2 and message in capsys.readouterr().err
