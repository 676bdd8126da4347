"""RandAugment on the training crops and random erasing of the batch: their laws, and draws that
depend on the sample (or the step) only."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY
from vitdist.augment import RandAugment, random_erase
from vitdist.config import ConfigError, DataConfig
from vitdist.config_yaml import load_config
from vitdist.data import TrainLoader, decodes_on_device
from vitdist.prefetch import DeviceBatches
from vitdist.preflight import preflight

DEIT = "rand-m9-mstd0.5-inc1"


def photo(size=64):
    """A smooth image with structure every op changes (a flat or noise image some ops leave alone)."""
    y, x = np.mgrid[0:size, 0:size]
    pixels = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=0).astype(np.uint8)
    return torch.from_numpy(pixels)


def test_rand_augment_draws_its_ops_from_the_seed_only():
    ra = RandAugment(DataConfig(rand_augment=DEIT), 64)
    image = photo()
    outputs = [ra(image, seed) for seed in range(20)]
    assert all(out.shape == (3, 64, 64) and out.dtype == torch.uint8 for out in outputs)
    assert all(torch.equal(ra(image, seed), outputs[seed]) for seed in (0, 7, 19))  # whatever ran in between
    # Two ops at p=0.5 each change 3 images in 4, less the draws of an op that leaves this one as it is.
    assert sum(not torch.equal(out, image) for out in outputs) >= 10
    assert len({out.numpy().tobytes() for out in outputs}) >= 10


@pytest.mark.parametrize("config, message", [
    ("rand-mfoo", "sections timm would pass over: 'mfoo'"),
    ("rand-m9-tPosterize", "sections timm would pass over: 'tPosterize'"),
    ("rand-m9-t3a-tweights", "sections timm would pass over: 'tweights'"),  # timm takes the first op set only
    ("rand-m9-x3", "Unknown RandAugment config section"),
    ("augmix-m5", "the first 'rand'"),
    # timm reads these, but clamps the magnitude to 10, and fails the 16th draw of 15 weighted ops mid-run
    ("rand-m100", "magnitude m100 above 10, which timm clamps it to: add mmax100"),
    ("rand-m12-mmax11", "magnitude m12 above 11"),
    ("rand-m9-n16-tweights", "n16 ops per image, drawn without repeats from the 15 of the weighted op set"),
    ("rand-m9-p2", "p2: the probability of applying each op, from 0 to 1"),  # applied always, as p1
])
def test_a_rand_augment_string_timm_cannot_read_is_refused_naming_it(demo_shards, config, message):
    cfg = load_config(TINY, [f"data.train_shards={demo_shards['train']}", "data.val_shards=null",
                             f"data.rand_augment={config}"])
    with pytest.raises(ConfigError, match=f"data.rand_augment='{config}'.*{message}"):
        preflight(cfg, world_size=1)


def test_rand_augment_strings_at_the_limits_are_read_as_written():
    """At the top magnitude, above 10 with mmax, and as many weighted ops as the set holds."""
    for config, magnitude, layers in (("rand-m10", 10, 2), ("rand-m30-mmax30", 30, 2), ("rand-n15-tweights", 10, 15)):
        ra = RandAugment(DataConfig(rand_augment=config), 64).transform
        assert (ra.ops[0].magnitude, ra.num_layers) == (magnitude, layers), config


def test_an_empty_rand_augment_string_is_refused_not_taken_for_none():
    with pytest.raises(ConfigError, match="'data.rand_augment' is empty"):
        load_config(TINY, ["data.train_shards=x.tar", "data.rand_augment=''"])


def test_rand_augment_decodes_in_the_workers():
    with pytest.raises(ConfigError, match="data.decode=gpu"):
        load_config(TINY, ["data.train_shards=x.tar", f"data.rand_augment={DEIT}", "data.decode=gpu"])
    assert not decodes_on_device(DataConfig(rand_augment=DEIT, decode="auto"))


def test_rand_augmented_batches_are_the_same_whichever_workers_read_them(demo_shards):
    def batches(*overrides):
        cfg = load_config(TINY, [f"data.train_shards={demo_shards['train']}", "data.val_shards=null", *overrides])
        loader = iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1))
        return [next(loader) for _ in range(2)]

    plain = batches("data.num_workers=0")
    augmented = batches("data.num_workers=0", f"data.rand_augment={DEIT}")
    by_workers = batches("data.num_workers=2", f"data.rand_augment={DEIT}")
    for p, a, w in zip(plain, augmented, by_workers):
        assert p["key"] == a["key"] == w["key"]  # the data order is the augmentation's business of none
        assert torch.equal(a["image"], w["image"])
        changed = [not torch.equal(x, y) for x, y in zip(p["image"], a["image"])]
        assert 0.6 < sum(changed) / len(changed) < 1  # 3 in 4 changed; an identity op or a p=0.5 miss leaves some


def test_random_erasing_follows_timms_law():
    torch.manual_seed(0)
    n, size = 4000, 32
    images = torch.zeros(n, 3, size, size)
    erased = random_erase(images, 0.25)
    hit = erased.ne(0).any(1)  # (n, size, size): noise is never exactly 0
    chosen = hit.flatten(1).any(1)
    assert abs(chosen.float().mean().item() - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    for mask in hit[chosen][:200]:
        rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
        h, w = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w  # one rectangle
        assert mask.sum() == h * w and h < size and w < size
        # Its area and aspect as drawn, up to the rounding of the sides to whole pixels.
        assert 0.02 * size**2 * 0.7 <= h * w <= size**2 / 3 * 1.3
        assert 0.3 * 0.7 <= h / w <= 1 / 0.3 * 1.3
    noise = erased[hit.unsqueeze(1).expand_as(erased)]
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    assert torch.equal(random_erase(images, 0.0), images)
    torch.manual_seed(1)
    first = random_erase(images[:64], 0.5)
    torch.manual_seed(1)
    assert torch.equal(random_erase(images[:64], 0.5), first)  # the step's seed decides it


def test_the_strongest_increasing_posterize_gives_black_not_an_error():
    """At magnitude 10 timm's increasing posterize keeps 0 bits, which Pillow 13 refuses; DeiT's
    m9 with its noise gets there."""
    ra = RandAugment(DataConfig(rand_augment="rand-m10-n1-p1.0-inc1"), 64)
    posterize = next(op for op in ra.transform.ops if op.name == "PosterizeIncreasing")
    assert torch.from_numpy(np.array(posterize(Image.fromarray(photo().permute(1, 2, 0).numpy())))).eq(0).all()


def test_rand_augment_keeps_its_draws_while_the_training_thread_compiles(demo_shards):
    """With data.num_workers=0 the batches are made in DeviceBatches' thread beside the training;
    torch.compile restores Python's global random state after each compilation, which overwrote
    the draws of the sample that thread was augmenting then."""
    cfg = load_config(TINY, [f"data.train_shards={demo_shards['train']}", "data.val_shards=null",
                             "data.num_workers=0", f"data.rand_augment={DEIT}"])
    loader = iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1))
    expected = [next(loader)["image"] for _ in range(24)]
    with DeviceBatches(iter(TrainLoader(cfg.data, 32, 8, 128, 0, 1)), torch.device("cpu"),
                       ahead=len(expected)) as batches:
        for _ in range(3 * len(expected)):  # compilations while the thread augments them all
            torch._dynamo.reset()  # else dynamo would reuse the first one's
            torch.compile(lambda x: x.sin() * 2, backend="eager")(torch.ones(4))
        found = [next(batches)["image"] for _ in expected]
    assert [i for i, (e, f) in enumerate(zip(expected, found)) if not torch.equal(e, f)] == []
