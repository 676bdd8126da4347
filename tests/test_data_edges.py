"""Edge cases of the shards as they come from the wild: how they were compressed, joined, cut."""

import bz2
import gzip
import lzma

from conftest import png_bytes, write_shard
from vitdist.samples import READ_ERROR, read_samples


def _read(url):
    return [sample.get(READ_ERROR, sample["__key__"]) for sample in read_samples(url)]


def test_compressed_shards_of_several_streams_are_read_whole_and_joined_ones_are_a_read_error(tmp_path):
    """pbzip2 and lbzip2 write a bzip2 file as many streams, bgzip a gzip file as many members: tarfile's
    stream mode decompressed only the first, and the rest of every such shard was a read error. Compressed
    shards joined with cat were the opposite: tarfile stopped at the first tar's end, and the samples of
    the others were left out unseen, where plain tars joined so are a read error, counted."""
    tar, other = tmp_path / "a.tar", tmp_path / "b.tar"
    write_shard(tar, [{"__key__": f"k{i}", "png": png_bytes((i, 0, 0)), "cls": i} for i in range(6)])
    write_shard(other, [{"__key__": f"o{i}", "png": png_bytes((0, i, 0)), "cls": i} for i in range(2)])
    data, more = tar.read_bytes(), other.read_bytes()
    half = len(data) // 2
    joined = "EOFError: data after the tar's end-of-archive block, which is not read (tars joined with cat? write " \
             "each shard as one tar)"
    for suffix, compress in (("gz", gzip.compress), ("bz2", bz2.compress), ("xz", lzma.compress)):
        split = tmp_path / f"split.tar.{suffix}"
        split.write_bytes(compress(data[:half]) + compress(data[half:]))
        assert _read(str(split)) == [f"k{i}" for i in range(6)], suffix
        cat = tmp_path / f"cat.tar.{suffix}"
        cat.write_bytes(compress(data) + compress(more))
        for url in str(cat), f"pipe:cat {cat}":
            assert _read(url) == [*(f"k{i}" for i in range(6)), joined], url
    named_like_bzip2 = tmp_path / "plain.tar"  # a plain tar begins with its first key
    write_shard(named_like_bzip2, [{"__key__": "BZh9", "png": png_bytes((1, 2, 3)), "cls": 1}])
    assert _read(str(named_like_bzip2)) == ["BZh9"]
