import io
import json
import random
import re
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import REPO, TINY
from vitdist.config import ConfigError, load_config
from vitdist.data import EvalSamples, TrainLoader, train_shard_urls, expand_urls, sample_crop
from vitdist.shards import make_shards


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


def test_global_batches_do_not_depend_on_ranks_or_workers(demo_shards):
    """The data-order contract: same seed, shards and global batch -> same global batches."""
    reference = keys_by_step(data_cfg(demo_shards, "data.num_workers=0"), world_size=1, steps=6)
    for world, workers in ((1, 2), (2, 1), (2, 2), (4, 2)):
        assert keys_by_step(data_cfg(demo_shards, f"data.num_workers={workers}"), world, 6) == reference
    assert keys_by_step(data_cfg(demo_shards, "data.num_workers=0", "data.seed=1"), 1, 6) != reference


@pytest.mark.parametrize("block, steps", [(128, 3), (10, 5), (10, 8)])
def test_stream_positions_resume_exactly(demo_shards, block, steps):
    """Resume mid-block, mid-shard and at an epoch boundary (8 steps x 8 samples = 2 shards of 32)."""
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


def test_train_batches_are_uint8_crops_with_labels(demo_shards):
    cfg = data_cfg(demo_shards, "data.num_workers=0")
    batch = next(iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1)))
    assert batch["image"].shape == (128, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["label"].dtype == torch.int64 and set(batch["label"].tolist()) <= set(range(8))
    assert batch["skipped"] == 0 and len(set(batch["key"])) == 128


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)


def png_bytes(color, size=(40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_samples_are_skipped_and_counted(tmp_path, caplog):
    good = [{"__key__": f"good{i}", "png": png_bytes((i, 0, 0)), "cls": i % 8} for i in range(14)]
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(jpeg, format="JPEG")
    bad = [{"__key__": "truncated", "jpg": jpeg.getvalue()[:40], "cls": 1},
           {"__key__": "garbage", "jpg": b"not an image at all", "cls": 1},
           {"__key__": "nolabel", "png": png_bytes((9, 9, 9))},
           {"__key__": "outofrange", "png": png_bytes((9, 9, 9)), "cls": 8},
           {"__key__": "noimage", "txt": b"hello", "cls": 2}]
    # Bad samples first and no shuffle, so that the first batch meets all of them.
    write_shard(tmp_path / "s0.tar", bad[:3] + good[:7])
    write_shard(tmp_path / "s1.tar", bad[3:] + good[7:])
    cfg = load_config(TINY, [f"data.train_shards={tmp_path}/s{{0..1}}.tar", "data.streams=2", "data.shuffle_block=1",
                             "train.global_batch_size=14", "data.micro_batch_size=7", "data.num_workers=0"])
    batch = next(iter(TrainLoader(cfg.data, 32, 8, 14, 0, 1)))
    assert sorted(batch["key"]) == sorted(s["__key__"] for s in good)
    assert batch["skipped"] == 5
    for key in ("truncated", "garbage", "nolabel", "outofrange", "noimage"):
        assert any(f"skipped sample '{key}'" in r.message for r in caplog.records), key


def test_fewer_shards_than_streams_is_a_clear_error(demo_shards):
    cfg = data_cfg(demo_shards, "data.streams=32", "train.global_batch_size=128", "data.num_workers=2")
    with pytest.raises(ConfigError, match=re.escape("16 training shard(s) for data.streams=32 (at least ranks x workers = 8 x 2)")):
        train_shard_urls(cfg.data, 8)


def test_resume_with_other_streams_is_refused(demo_shards):
    cfg = data_cfg(demo_shards, "data.num_workers=0")
    with pytest.raises(ConfigError, match="positions of 4 data streams, the config has data.streams=16"):
        TrainLoader(cfg.data, 32, 8, 128, 0, 1, positions={s: (0, 0, 10) for s in range(4)})


def test_shard_specs(demo_shards, tmp_path):
    urls = expand_urls(demo_shards["train"])
    assert len(urls) == 16 and urls[0].endswith("train-000000.tar")
    listing = tmp_path / "shards.txt"
    listing.write_text("# my shards\n" + "\n".join(urls[:3]) + "\n\n")
    assert expand_urls(str(listing)) == urls[:3]
    assert expand_urls(urls[:2]) == urls[:2]
    assert expand_urls(f"pipe:cat {urls[0]}") == [f"pipe:cat {urls[0]}"]
    with pytest.raises(ConfigError, match=r"do not exist, first: '.*/nope-1.tar'"):
        expand_urls(str(tmp_path / "nope-{1..2}.tar"))
    with pytest.raises(ConfigError, match="shard list file '.*missing.txt' does not exist"):
        expand_urls(str(tmp_path / "missing.txt"))


def test_pipe_urls_are_read(demo_shards, tmp_path):
    urls = expand_urls(demo_shards["train"])
    cfg = load_config(TINY, [f"data.train_shards={[f'pipe:cat {u}' for u in urls]}".replace("'", '"'),
                             "data.num_workers=0"])
    assert len(next(iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1)))["key"]) == 128


@pytest.mark.parametrize("shards", [1, 4])
def test_eval_sees_every_sample_once(demo_shards, tmp_path, shards):
    """Whole shards per rank x worker when there are enough, else every n-th sample."""
    pattern = demo_shards["val"] if shards == 4 else demo_shards["val"].replace("{000000..000001}", "000000")
    cfg = load_config(TINY, [f"data.val_shards={pattern}", "data.num_workers=2"])
    urls = expand_urls(pattern)
    seen = Counter()
    for rank in range(2):
        loader = torch.utils.data.DataLoader(EvalSamples(urls, cfg.data, 32, 8, rank, 2), batch_size=None,
                                             num_workers=2)
        for sample in loader:
            seen[(sample["label"], sample["image"].sum().item())] += 1
    assert sum(seen.values()) == len(all_keys(pattern))


def test_crop_boxes_follow_scale_and_ratio():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(20, 500), rng.randint(20, 500)
        left, top, right, bottom = sample_crop(rng, w, h, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    areas = [(r - l) * (b - t) / 40000 for l, t, r, b in (sample_crop(rng, 200, 200, (0.5, 1.0), (1, 1)) for _ in range(500))]
    assert 0.48 <= min(areas) and max(areas) <= 1.0 and 0.7 < sum(areas) / len(areas) < 0.8


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
    for s in samples:
        label = int(s["cls"])
        name = ["cat", "dog", "eel"][label]
        assert f"_{name}_img_" in s["__key__"]  # the dotted file name survives as a key
        image = s.get("png") or s.get("jpg")
        assert Image.open(io.BytesIO(image)).getpixel((0, 0))[0] in range(label * 80 - 3, label * 80 + 4)
    assert [int(s["cls"]) for s in samples] != sorted(int(s["cls"]) for s in samples)  # shuffled


def test_make_shards_by_size(tmp_path):
    """--max-shard-bytes bounds the image bytes per shard (a new shard starts once it is passed)."""
    gen = torch.Generator().manual_seed(0)
    for i in range(30):
        (tmp_path / "src" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        noise = torch.randint(0, 256, (40, 40, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(noise).save(tmp_path / "src" / f"c{i % 3}" / f"{i}.png")
    image_bytes = max(p.stat().st_size for p in (tmp_path / "src").rglob("*.png"))
    pattern = make_shards(tmp_path / "src", tmp_path / "out", samples_per_shard=1000, max_shard_bytes=4 * image_bytes,
                          progress=False)
    counts = [len(list(wds.WebDataset(u, shardshuffle=False))) for u in expand_urls(pattern)]
    assert sum(counts) == 30 and max(counts) <= 5 and len(counts) >= 6


def test_make_shards_cli(tmp_path):
    make_image_folder(tmp_path / "src")
    run = subprocess.run([sys.executable, "-m", "vitdist.cli", "make-shards", str(tmp_path / "src"),
                          str(tmp_path / "out"), "--samples-per-shard", "8", "--prefix", "pets"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"shards: {tmp_path}/out/pets-{{000000..000001}}.tar" in run.stdout
    assert "15/15" in run.stderr  # the progress bar
    run = subprocess.run([sys.executable, "-m", "vitdist.cli", "make-shards", str(tmp_path / "nope"),
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and "image folder" in run.stderr and "nope' does not exist" in run.stderr
