"""data.decode: gpu, run on the CPU device (torchvision decodes JPEGs there too), and on a GPU
where there is one: the same samples, order, positions and image regions as data.decode: cpu."""

import io
import logging
import random
import re

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import TINY, read_scalars, run_pretrain
from vitdist import gpu_decode
from vitdist.config import ConfigError
from vitdist.config_yaml import load_config
from vitdist.data import TrainLoader, decodes_on_device
from vitdist.transforms import reduce_jpeg, resized_crop, sample_crop, to_uint8_tensor
from vitdist.demo_data import draw_photo
from vitdist.gpu_decode import encoded_jpegs, to_device
from vitdist.prefetch import DeviceBatches
from vitdist.samples import _MAX_WARNINGS, load_rgb

CPU = torch.device("cpu")
# Where a GPU is, the device-side tests run on it too (CI has none: they skip there).
DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                             reason="no GPU"))]
SIZES = [(120, 90), (90, 120), (100, 100)]


def encode(image, format="JPEG", **options):
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def photo_sample(key, image, kind, label):
    """One sample; some of the kinds the workers decode themselves even with decode: gpu."""
    if kind == "png":
        return {"__key__": key, "png": encode(image, "PNG"), "cls": label}
    converted = {"grey": image.convert("L"), "cmyk": image.convert("CMYK")}.get(kind, image)
    return {"__key__": key, "jpg": encode(converted, quality=90, progressive=kind == "progressive"), "cls": label}


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """8 shards of 16 photo-like images of 3 sizes: mostly colour JPEGs, 1 in 8 PNG, greyscale,
    CMYK or progressive JPEG."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    kinds = ["jpeg", "png", "jpeg", "grey", "jpeg", "cmyk", "jpeg", "progressive"] + ["jpeg"] * 8
    for shard in range(8):
        with wds.TarWriter(str(root / f"photo-{shard}.tar")) as sink:
            for i in range(16):
                image = draw_photo(*SIZES[i % 3], rng)
                sink.write(photo_sample(f"s{shard}_{i:02d}", image, kinds[(i + shard) % 16], (shard + i) % 8))
    return str(root / "photo-{0..7}.tar")


def loader(pattern, decode, *overrides, batch_size=32, positions=None):
    """data.jpeg_reduce off unless overridden: the device decodes each JPEG whole."""
    cfg = load_config(TINY, [f"data.train_shards={pattern}", "data.val_shards=null", "data.streams=4",
                             "data.shuffle_block=8", f"train.global_batch_size={batch_size}",
                             f"data.micro_batch_size={batch_size}", "data.num_workers=0", f"data.decode={decode}",
                             "data.jpeg_reduce=false", *overrides])
    return TrainLoader(cfg.data, 32, 8, batch_size, 0, 1, positions)


def mean_abs_diff(a, b):
    return (a.float() - b.float()).abs().mean().item()


def test_auto_decodes_on_the_cpu_without_cuda():
    cfg = load_config(TINY, ["data.decode=auto"]).data
    assert decodes_on_device(cfg) == torch.cuda.is_available()
    cfg.decode = "gpu"
    assert decodes_on_device(cfg)
    with pytest.raises(ConfigError, match=re.escape("config key 'data.decode' must be 'auto' | 'cpu' | 'gpu', got 'nvjpeg'")):
        load_config(TINY, ["data.decode=nvjpeg"])


def test_gpu_path_gives_the_cpu_paths_samples_crops_and_flips(photo_shards):
    cpu, gpu = iter(loader(photo_shards, "cpu")), iter(loader(photo_shards, "gpu", "data.num_workers=2"))
    for _ in range(3):
        want, got = next(cpu), next(gpu)
        assert got["key"] == want["key"] and torch.equal(got["label"], want["label"])
        encoded = got["encoded"]
        assert 20 <= encoded.sum() < len(encoded)  # both kinds, merged in sample order
        images = to_device(got, CPU)
        assert images.shape == want["image"].shape and images.dtype == torch.uint8
        # The same pixels: libjpeg-turbo decodes on both sides here (nvJPEG's IDCT differs slightly).
        assert torch.equal(images, want["image"])
        mirrored = mean_abs_diff(to_device(dict(got, jpeg_flip=~got["jpeg_flip"]), CPU)[encoded], want["image"][encoded])
        l, t, r, b = got["jpeg_box"].unbind(1)
        inner = torch.stack([l + (r - l) // 5, t + (b - t) // 5, r - (r - l) // 5, b - (b - t) // 5], dim=1)
        zoomed = mean_abs_diff(to_device(dict(got, jpeg_box=inner), CPU)[encoded], want["image"][encoded])
        assert mirrored > 10 and zoomed > 10, (mirrored, zoomed)  # about 45 and 28


def test_gpu_path_gives_the_cpu_paths_repeated_augmentations(photo_shards, monkeypatch):
    """data.aug_repeats=2: each JPEG travels once per copy, each with its own box and flip, and is
    decoded once for both, also where the copies fall into two decode groups (of 3 images here)."""
    repeats = ["data.aug_repeats=2", "train.global_batch_size=32"]
    want, got = next(iter(loader(photo_shards, "cpu", *repeats))), next(iter(loader(photo_shards, "gpu", *repeats)))
    assert got["key"] == want["key"] and got["key"][::2] == got["key"][1::2]
    assert not torch.equal(got["jpeg_box"][::2], got["jpeg_box"][1::2])
    decoded, decode_jpeg = [], gpu_decode.decode_jpeg
    monkeypatch.setattr(gpu_decode, "decode_jpeg", lambda data, **kwargs: decoded.extend(data) or decode_jpeg(data, **kwargs))
    for group_images in (gpu_decode._DECODE_IMAGES, 3):
        monkeypatch.setattr(gpu_decode, "_DECODE_IMAGES", group_images)
        decoded.clear()
        assert torch.equal(to_device(got, CPU), want["image"])
        assert len(decoded) == got["encoded"].sum() // 2


def test_a_reduced_jpeg_decode_gives_the_same_region_close_to_a_full_decodes_pixels():
    """data.jpeg_reduce: libjpeg decodes a 1024x768 JPEG at 1/4 for a 600x450 crop resized to 64 px,
    and the box follows; the crop is within a few levels of the full decode's, where a crop shifted by
    a tenth of its width is not. A crop under twice the size, and a PNG, are decoded whole."""
    data = encode(draw_photo(1024, 768, np.random.default_rng(0)), quality=90)
    box = (100, 80, 700, 530)
    image = Image.open(io.BytesIO(data))
    [reduced] = reduce_jpeg(image, [box], 64)
    assert image.size == (256, 192) and reduced == (25, 20, 175, 132)
    crop = resized_crop(load_rgb(image), reduced, False, 64)
    whole = Image.open(io.BytesIO(data))
    assert mean_abs_diff(crop, resized_crop(whole, box, False, 64)) < 3
    assert mean_abs_diff(crop, resized_crop(whole, (160, 80, 760, 530), False, 64)) > 10

    image = Image.open(io.BytesIO(data))  # several crops of one image (data.aug_repeats): the smallest decides
    assert reduce_jpeg(image, [box, (0, 0, 200, 150)], 64) == [(50, 40, 350, 265), (0, 0, 100, 75)]
    assert image.size == (512, 384)

    for small, encoded in [((0, 0, 127, 500), data), (box, encode(whole.crop((0, 0, 800, 600)), "PNG"))]:
        image = Image.open(io.BytesIO(encoded))
        size = image.size
        assert reduce_jpeg(image, [small], 64) == [small] and load_rgb(image).size == size


def test_the_cpu_path_with_jpeg_reduce_gives_the_same_samples_and_regions(photo_shards):
    """On the loader's small photos (90-120 px, 32 px crops) many JPEG crops decode at 1/2: the same
    samples and regions, about 5 levels from the full decode's at this size (a flipped or zoomed
    crop: 28-45, above)."""
    full, reduced = next(iter(loader(photo_shards, "cpu"))), next(iter(loader(photo_shards, "cpu", "data.jpeg_reduce=true")))
    assert reduced["key"] == full["key"] and torch.equal(reduced["label"], full["label"])
    differ = [i for i in range(len(full["key"])) if not torch.equal(reduced["image"][i], full["image"][i])]
    assert len(differ) >= 8
    assert mean_abs_diff(reduced["image"][differ], full["image"][differ]) < 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU")
def test_nvjpeg_crops_are_the_cpu_paths_up_to_the_decoders_rounding(photo_shards):
    """On a GPU: nvJPEG's IDCT and chroma upsampling round a little differently from libjpeg-turbo's,
    so the same regions differ by about a level; a flipped or shifted region by over 10 (above)."""
    want, got = next(iter(loader(photo_shards, "cpu"))), next(iter(loader(photo_shards, "gpu")))
    images, encoded = to_device(got, torch.device("cuda")).cpu(), got["encoded"]
    assert got["key"] == want["key"] and 20 <= encoded.sum() < len(encoded)
    assert torch.equal(images[~encoded], want["image"][~encoded])
    assert mean_abs_diff(images[encoded], want["image"][encoded]) < 2.0


@pytest.mark.parametrize("device", DEVICES)
def test_batched_resize_is_the_cpu_paths_resized_crop(device):
    """resize_crops against transforms.resized_crop (torch's uint8 resize of the cut-out box, then the
    flip), pixel for pixel: images wide, tall and thin, boxes shrunk and enlarged, one pixel wide,
    at the edges and whole, one image missing. On a GPU too, where float32 matmuls may run as TF32."""
    rng, draw = np.random.default_rng(3), random.Random(3)
    shapes = [(500, 375), (375, 500), (120, 90), (37, 300), (300, 37), (224, 224), (16, 700), (1200, 900)]
    images, boxes, flips, want = [], [], [], []
    for i in range(32):
        w, h = shapes[i % len(shapes)]
        image = draw_photo(w, h, rng) if i % 2 else Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        box = (0, 0, w, h) if i % 4 == 0 else sample_crop(draw, w, h, (0.005, 1.0), (3 / 4, 4 / 3))
        if i == 7:
            box = (3, 10, 4, 200)
        flip = i % 3 == 0
        images.append(to_uint8_tensor(image).to(device))
        boxes.append(list(box))
        flips.append(flip)
        want.append(resized_crop(image, box, flip, 64))
    images[5] = None
    got = gpu_decode.resize_crops(images, boxes, flips, 64, device).cpu()
    assert got.dtype == torch.uint8 and got.shape == (32, 3, 64, 64)
    assert torch.all(got[5] == 128)
    keep = torch.arange(32) != 5
    assert torch.equal(got[keep], torch.stack(want)[keep])
    # Resampled where the box says, not just alike: a box shifted by a few pixels is far off.
    shifted = gpu_decode.resize_crops(images[:1], [[8, 0, 500, 375]], flips[:1], 64, device).cpu()
    assert mean_abs_diff(shifted[0], want[0]) > 3


def test_positions_and_resume_are_those_of_the_cpu_path(photo_shards):
    cpu, gpu = loader(photo_shards, "cpu", "data.shuffle_block=5"), loader(photo_shards, "gpu", "data.shuffle_block=5")
    cpu_batches, gpu_batches = iter(cpu), iter(gpu)
    for _ in range(5):  # 160 samples: past the end of the first epoch (128)
        next(cpu_batches), next(gpu_batches)
    assert gpu.positions == cpu.positions
    positions = dict(gpu.positions)
    expected = [next(gpu_batches) for _ in range(2)]
    resumed = iter(loader(photo_shards, "gpu", "data.shuffle_block=5", positions=positions))
    for want in expected:
        got = next(resumed)
        assert got["key"] == want["key"]
        assert torch.equal(to_device(got, CPU), to_device(want, CPU))


def corrupt_shard(tmp_path, good, broken=1):
    """A shard read without shuffling: a truncated JPEG and a file that is no image, then JPEGs
    broken past their header ('brokenNN', class 2), the first of them before the `good` ones
    ('goodN', class N % 8) and the others amid them."""
    rng = np.random.default_rng(1)
    jpeg = encode(draw_photo(120, 90, rng), quality=90)
    broken_huffman = bytearray(jpeg)
    broken_huffman[jpeg.index(b"\xff\xc4") + 4] = 0x3F  # a Huffman table index past the last
    bad = [{"__key__": "truncated", "jpg": jpeg[: len(jpeg) // 2], "cls": 1},  # its header parses
           {"__key__": "garbage", "jpg": b"not an image at all", "cls": 1}]
    broken = [{"__key__": f"broken{i:02d}", "jpg": bytes(broken_huffman), "cls": 2} for i in range(broken)]
    goods = [{"__key__": f"good{i}", "jpg": encode(draw_photo(120, 90, rng), quality=90), "cls": i % 8}
             for i in range(good)]
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        for sample in bad + broken[:1] + goods[: good // 2] + broken[1:] + goods[good // 2 :]:
            sink.write(sample)
    return str(tmp_path / "bad.tar")


def test_corrupt_jpegs_are_skipped_counted_or_replaced(tmp_path, caplog):
    """What the worker can tell from the bytes (truncated, not an image) is skipped and counted as
    with decode: cpu; a JPEG broken past its header, which no decoder reads, is counted as
    undecodable in the batch the training loop reads, with a warning naming shard and key (the
    first _MAX_WARNINGS of them), and trained on as a copy of the good sample before it (after it,
    for the batch's first), image and label, so that the batch keeps its size. A batch with no good
    sample keeps its broken ones as grey images."""
    broken = _MAX_WARNINGS + 4
    pattern = corrupt_shard(tmp_path, good=8, broken=broken)
    options = ("data.streams=1", "data.shuffle_block=1")
    with caplog.at_level(logging.WARNING), DeviceBatches(
            iter(loader(pattern, "gpu", *options, batch_size=broken + 8)), CPU) as batches:
        batch = next(batches)
    keys = ["broken00", "good0", "good1", "good2", "good3", *(f"broken{i:02d}" for i in range(1, broken)),
            "good4", "good5", "good6", "good7"]
    assert batch["key"] == keys
    assert batch["skipped"] == {"undecodable": 2 + broken}
    images, labels = batch["image"], batch["label"]
    assert images.shape == (broken + 8, 3, 32, 32)
    goods = [i for i, key in enumerate(keys) if key.startswith("good")]
    assert labels[goods].tolist() == list(range(8))
    assert images[goods].float().std(0).mean() > 10  # 8 distinct photos
    stand_ins = [1 if key == "broken00" else 4 if key.startswith("broken") else i for i, key in enumerate(keys)]
    assert torch.equal(images, images[stand_ins]) and torch.equal(labels, labels[stand_ins])
    warnings = [r.message for r in caplog.records if "trained on as a copy of another sample" in r.message]
    assert len(warnings) == _MAX_WARNINGS
    assert warnings[0].startswith(f"skipped sample 'broken00' in {pattern}: undecodable image")

    with DeviceBatches(iter(loader(pattern, "gpu", *options, batch_size=1)), CPU) as batches:
        alone = next(batches)
    assert alone["key"] == ["broken00"] and alone["skipped"] == {"undecodable": 3}
    assert (alone["image"] == 128).all() and alone["label"].tolist() == [2]


def test_a_jpeg_with_bytes_after_its_end_is_decoded_on_the_device(tmp_path):
    """Cameras pad JPEGs after their end-of-image marker, phones append a trailer (Samsung's holds
    a video, and may hold that marker again; an Ultra HDR photo ends with a second JPEG, its gain
    map, so with the marker too): PIL and libjpeg stop at the first marker. Such JPEGs took
    the CPU path; they are decoded on the device, from their bytes up to the marker, to the CPU
    path's pixels. A JPEG cut short is still refused by the worker, as with decode: cpu, though an
    EXIF thumbnail inside it ends with that marker."""
    rng = np.random.default_rng(2)
    photos = [encode(draw_photo(120, 90, rng), quality=90) for _ in range(5)]
    exif = b"Exif\0\0" + encode(draw_photo(16, 12, rng), quality=80)
    with_thumbnail = photos[3][:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + photos[3][2:]
    samples = {"cut": with_thumbnail[: -len(photos[3]) // 3], "plain": photos[0], "padded": photos[1] + b"\0\0\0",
               "trailer": photos[2] + b"SEFH\0\0\xff\xd9\0video\xff\xd8\0" + bytes(range(256)),
               "gain_map": photos[4] + encode(draw_photo(60, 45, rng), quality=80)}
    with wds.TarWriter(str(tmp_path / "trailing.tar")) as sink:
        for i, (key, jpeg) in enumerate(samples.items()):
            sink.write({"__key__": key, "jpg": jpeg, "cls": i})
    pattern, options = str(tmp_path / "trailing.tar"), ("data.streams=1", "data.shuffle_block=1")
    want = next(iter(loader(pattern, "cpu", *options, batch_size=4)))
    got = next(iter(loader(pattern, "gpu", *options, batch_size=4)))
    assert got["key"] == want["key"] == ["plain", "padded", "trailer", "gain_map"]
    assert got["skipped"] == want["skipped"] == {"undecodable": 1}
    assert got["encoded"].all()
    assert [bytes(jpeg) for jpeg in encoded_jpegs(got)] == [*photos[:3], photos[4]]
    assert torch.equal(to_device(got, CPU), want["image"])


def test_decode_groups_bound_the_pixels_decoded_at_once(photo_shards, monkeypatch):
    """Runs in order, within the pixel and image budgets but for one image over the pixel budget
    alone; and the crops decoded in small groups are the same as in one."""
    budget, most = gpu_decode._DECODE_PIXELS, gpu_decode._DECODE_IMAGES
    pixels = [budget // 3] * 4 + [budget + 1, 5, budget, 1] + [100] * (most + 3) + [budget // 2] * 3
    groups = gpu_decode.decode_groups(pixels)
    assert [i for group in groups for i in range(len(pixels))[group]] == list(range(len(pixels)))
    assert all(len(pixels[group]) == 1 or (sum(pixels[group]) <= budget and len(pixels[group]) <= most)
               for group in groups)
    assert [len(pixels[group]) for group in groups] == [3, 1, 1, 1, 1, most, 5, 2]
    assert gpu_decode.decode_groups([]) == []

    batch = next(iter(loader(photo_shards, "gpu")))
    # The full sizes travel with the JPEGs, read from their headers.
    decoded = [image.shape[1] * image.shape[2] for image in gpu_decode.decode_jpeg(encoded_jpegs(batch))]
    assert batch["jpeg_pixels"].tolist() == decoded
    whole = to_device(batch, CPU)
    monkeypatch.setattr(gpu_decode, "_DECODE_PIXELS", 25_000)  # 2 photos of 120x90 or 100x100
    assert len(gpu_decode.decode_groups(batch["jpeg_pixels"].tolist())) > 10
    assert torch.equal(to_device(batch, CPU), whole)


def test_an_image_the_decoder_refuses_is_decoded_by_pil(photo_shards, monkeypatch):
    """nvJPEG fails a whole batch for one image it cannot read: that one then goes through PIL."""
    batch = next(iter(loader(photo_shards, "gpu")))
    want = to_device(batch, CPU)
    refused = batch["jpeg"][: batch["jpeg_sizes"][0]]
    decode_jpeg = gpu_decode.decode_jpeg

    def refusing(data, **kwargs):
        if isinstance(data, list) or torch.equal(data, refused):
            raise RuntimeError("nvjpeg: unsupported")
        return decode_jpeg(data, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", refusing)
    got = to_device(batch, CPU)
    first = batch["encoded"].nonzero()[0, 0]
    others = torch.arange(len(got)) != first
    assert torch.equal(got[others], want[others])
    assert mean_abs_diff(got[first], want[first]) < 1.0  # PIL and libjpeg-turbo decode alike


@pytest.mark.slow
def test_training_runs_with_gpu_decode(photo_shards, tmp_path):
    run = run_pretrain(0, [f"data.train_shards={photo_shards}", "data.val_shards=null", "data.decode=gpu",
                           "data.streams=4", "data.num_workers=2", "train.global_batch_size=32",
                           "data.micro_batch_size=16", "train.steps=4", "log.every_steps=2", "ckpt.every_steps=0",
                           f"run.dir={tmp_path}"])
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [value for _, value in read_scalars(tmp_path / "tb")["train/loss"]]
    assert len(losses) == 3 and all(np.isfinite(losses))  # steps 1, 2, 4


def test_a_multi_picture_jpeg_is_decoded_on_the_device(tmp_path):
    """A JPEG with an MPF segment (an Ultra HDR photo, whose gain map follows it, a camera's stereo
    pair or a phone's depth map) is opened by PIL as format MPO, not JPEG: each took the CPU path.
    The device decodes its first picture, which is what PIL decodes, from the bytes up to its end."""
    rng = np.random.default_rng(3)
    primary, gain_map = draw_photo(120, 90, rng), draw_photo(60, 45, rng)
    mpo = encode(primary, "MPO", quality=90, save_all=True, append_images=[gain_map])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    with wds.TarWriter(str(tmp_path / "mpo.tar")) as sink:
        sink.write({"__key__": "mpo", "jpg": mpo, "cls": 1})
    pattern, options = str(tmp_path / "mpo.tar"), ("data.streams=1", "data.shuffle_block=1")
    want = next(iter(loader(pattern, "cpu", *options, batch_size=1)))
    got = next(iter(loader(pattern, "gpu", *options, batch_size=1)))
    assert got["encoded"].all()
    first = bytes(encoded_jpegs(got)[0])
    assert mpo.startswith(first) and len(first) < len(mpo)  # the gain map left behind
    assert torch.equal(to_device(got, CPU), want["image"])
