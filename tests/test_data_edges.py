"""Edge cases of the shards as they come from the wild: how they were compressed, joined, cut."""

import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import webdataset as wds

from conftest import TINY, png_bytes, write_shard
from vitdist.config import ConfigError
from vitdist.config_yaml import load_config
from vitdist.data import EvalLoader
from vitdist.imagefolder import image_folders
from vitdist.samples import BadSample, read_sample
from vitdist.shard_list import expand_urls
from vitdist.streams import sample_digest
from vitdist.tars import READ_ERROR, read_samples


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


def test_validation_on_more_slots_than_shards_reads_each_shard_only_as_often_as_needed(tmp_path):
    """With more ranks x workers than validation shards, every slot read every shard whole and kept
    every n-th sample: timm's ImageNet validation (64 shards) on 16 GPUs x 8 workers was read 128 times
    at each evaluation, 6.4 GB per worker. Each shard is read by ceil(slots / shards) slots at most
    now, still each sample once. The shards are `pipe:` commands that log each read."""
    log = tmp_path / "reads.log"
    urls = []
    for s in range(3):
        write_shard(tmp_path / f"val-{s}.tar", [{"__key__": f"s{s}k{i}", "png": png_bytes((s, i, 0)), "cls": i % 8}
                                                for i in range(5 + s)])
        urls.append(f"pipe:echo {s} >> {log}; cat {tmp_path / f'val-{s}.tar'}")
    cfg = load_config(TINY, [f"data.val_shards={json.dumps(urls)}", "data.num_workers=2", "data.micro_batch_size=3"])
    seen = Counter()
    for rank in range(2):  # 4 slots, 3 shards
        for batch in EvalLoader(cfg.data, 32, 8, rank, 2):
            seen.update(batch["key"])
    assert sorted(seen.elements()) == sorted(f"s{s}k{i}" for s in range(3) for i in range(5 + s))
    assert sorted(Counter(log.read_text().split()).values()) == [1, 1, 2]


def test_zeros_in_place_of_a_shards_samples_are_a_read_error(tmp_path):
    """aria2c (and other downloaders that write segments in parallel) preallocates a file at its final
    name and fills it in: a download cut short leaves zeros where segments are missing, and a crash
    can leave a written file's end zeroed. tarfile takes the first zero block for the end of the
    archive, so the samples from the first hole on were left out without a word (all of them when
    the hole starts the file). A tar pads its end to a record of 10 KiB (1 MiB at most here)."""
    tar = tmp_path / "whole.tar"
    write_shard(tar, [{"__key__": f"k{i}", "png": png_bytes((i, 0, 0)), "cls": i, "npy": bytes(range(256)) * 2000}
                      for i in range(8)])
    data = tar.read_bytes()
    assert _read(str(tar)) == [f"k{i}" for i in range(8)]
    hole_at = min(m.offset for m in tarfile.open(tar).getmembers() if m.name.startswith("k4."))
    (tmp_path / "end.tar").write_bytes(data[:hole_at] + bytes(len(data) - hole_at))
    (tmp_path / "start.tar").write_bytes(bytes(hole_at) + data[hole_at:])
    (tmp_path / "padded.tar").write_bytes(data + bytes((1 << 20) - 20 * 512))  # tar -b 2048: 1 MiB records
    *kept, error = _read(str(tmp_path / "end.tar"))
    assert kept == ["k0", "k1", "k2", "k3"]
    assert re.fullmatch(r"EOFError: \d+ MiB of zeros after the tar's end-of-archive block, where a tar pads to a record: "
                        r"zeros in place of its samples \(a download cut short\? a crash\?\), which are not read", error)
    assert _read(str(tmp_path / "start.tar")) == ["EOFError: the shard starts with zeros in place of its samples (a "
                                                  "download cut short? a crash?), which are not read"]
    assert _read(str(tmp_path / "padded.tar")) == [f"k{i}" for i in range(8)]
    # A small shard zeroed whole (a 64 KiB one, under the 1 MiB of padding allowed after a tar's
    # end) was read as a tar of no member, its samples left out without a word; an empty tar is
    # one record of zeros.
    (tmp_path / "zeroed.tar").write_bytes(bytes(64 << 10))
    assert _read(str(tmp_path / "zeroed.tar")) == _read(str(tmp_path / "start.tar"))
    wds.TarWriter(str(tmp_path / "empty.tar")).close()
    assert (tmp_path / "empty.tar").read_bytes() == bytes(10240) and _read(str(tmp_path / "empty.tar")) == []


def test_a_corrupt_member_header_is_named_as_such_not_as_tars_joined_with_cat(tmp_path):
    """tarfile ends a tar at a member header whose checksum is wrong (a bit flipped on a disk, a
    damaged copy) as at its end-of-archive block: the rest of the shard was counted as a read error
    that blamed tars joined with cat, which the shard was not."""
    tar = tmp_path / "shard.tar"
    write_shard(tar, [{"__key__": f"k{i}", "png": png_bytes((i, 0, 0)), "cls": i} for i in range(6)])
    data = bytearray(tar.read_bytes())
    header = min(m.offset for m in tarfile.open(tar).getmembers() if m.name.startswith("k3."))
    data[header] ^= 0x20  # the first letter of its name
    (tmp_path / "flipped.tar").write_bytes(data)
    assert _read(str(tmp_path / "flipped.tar")) == [
        "k0", "k1", "k2", "EOFError: a member header of the tar is corrupt (a damaged file?): tarfile stops there, "
                          "and the samples after it are not read"]


def test_a_glob_of_existing_shards_is_refused_saying_globs_are_not_expanded(tmp_path):
    """`data.train_shards=/data/train-*.tar` was refused as '1 shard file(s) do not exist', of files
    that the user could list with that very glob."""
    for s in range(2):
        write_shard(tmp_path / f"train-{s}.tar", [{"__key__": "k", "png": png_bytes((s, 0, 0)), "cls": 0}])
    with pytest.raises(ConfigError, match=re.escape(f"data.train_shards: 1 shard file(s) do not exist, first: "
                                                    f"'{tmp_path}/train-*.tar' (a glob, which names 2 file(s): shard specs "
                                                    "are brace patterns, train-{000000..000099}.tar, or a .txt file")):
        expand_urls(str(tmp_path / "train-*.tar"), "data.train_shards")


def test_a_folder_of_shards_given_as_shards_is_refused_saying_how_to_name_them(tmp_path):
    """A directory is read as an ImageFolder; a folder of shards given so (data.train_shards=/data/in21k)
    was refused as having 'no class sub-folders (expected <root>/<class>/<image>)', which says nothing
    of the shards in it nor how to name them."""
    for s in range(3):
        write_shard(tmp_path / f"train-{s:06d}.tar", [{"__key__": "k", "png": png_bytes((s, 0, 0)), "cls": 0}])
    cfg = load_config(TINY, [f"data.train_shards={tmp_path}", "data.val_shards=null"])
    with pytest.raises(ConfigError, match=re.escape(
            f"data.train_shards: '{tmp_path}' has no class sub-folders (expected <root>/<class>/<image>): a directory "
            f"is read as an ImageFolder, and this one holds 3 shard(s) ('train-000000.tar', ...): name them with a "
            f"brace pattern, '{tmp_path}/train-{{000000..000099}}.tar', or a .txt file of one path per line")):
        image_folders(cfg.data, 8)


def test_file_urls_and_relative_paths_with_a_colon_are_read_as_the_local_shards_they_name(tmp_path, monkeypatch):
    """webdataset opens file: URLs, which were refused as missing files; a relative path whose first
    part holds a colon passed the check, and then every read failed (webdataset took 'exp' for a URL
    scheme), retried as an outage."""
    (tmp_path / "exp:1").mkdir()
    for name in ("exp:1/a.tar", "b.tar"):
        write_shard(tmp_path / name, [{"__key__": f"{name[0]}{i}", "png": png_bytes((i, 0, 0)), "cls": i} for i in range(2)])
    monkeypatch.chdir(tmp_path)
    urls = expand_urls(["exp:1/a.tar", f"file://{tmp_path / 'b.tar'}"], "data.train_shards")
    assert [_read(url) for url in urls] == [["e0", "e1"], ["b0", "b1"]]
    with pytest.raises(ConfigError, match="exp:1/a.tar' is named 2 times"):
        expand_urls(["exp:1/a.tar", f"file://{tmp_path / 'exp:1' / 'a.tar'}"], "data.train_shards")


# A shard read in a thread of a process with preemption handlers, as the training process reads
# without loader workers: what it read, and the signals its handlers had.
READ_IN_A_THREAD = """
import json, signal, sys, threading
from vitdist.tars import READ_ERROR, read_samples
received, read = [], []
for signum in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, lambda signum, frame: received.append(signum))
thread = threading.Thread(target=lambda: read.extend(s.get(READ_ERROR, s["__key__"]) for s in read_samples(sys.argv[1])))
thread.start()
while thread.is_alive():
    thread.join(0.1)  # the handlers run in this thread, between its waits
print(json.dumps({"read": read, "received": received}))
"""


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http: shards with curl")
def test_a_preemption_signal_to_the_readers_group_leaves_http_reads_reading(tmp_path):
    """webdataset reads an http: shard through curl, a child of the process that reads. A preemption
    signal to that process's group (a shell's or SLURM's to the job; the training process's own
    reads without loader workers) killed curl mid-shard, and the rest of the shard was a read
    error, passed over by the preemption's checkpoint: unseen that epoch. Only `pipe:` commands
    had been kept out of it. Every command a read starts now leaves the signals to the reader."""
    shard = tmp_path / "s.tar"
    keys = [f"k{i:02d}" for i in range(16)]
    write_shard(shard, [{"__key__": key, "png": png_bytes((i, 0, 0)), "cls": i % 8} for i, key in enumerate(keys)])
    data = shard.read_bytes()
    pause = tarfile.open(shard).getmembers()[16].offset  # after 8 samples of 2 members
    paused, go = threading.Event(), threading.Event()

    class SlowNetwork(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:pause])
            self.wfile.flush()
            paused.set()
            go.wait(60)
            self.wfile.write(data[pause:])

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowNetwork)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/s.tar"
    reader = subprocess.Popen([sys.executable, "-c", READ_IN_A_THREAD, url], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        assert paused.wait(60)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            os.killpg(reader.pid, signum)
        time.sleep(0.5)  # for curl to die of them, as it did
        go.set()
        out, _ = reader.communicate(timeout=60)
    finally:
        go.set()
        server.shutdown()
        if reader.poll() is None:
            reader.kill()
    result = json.loads(out)
    assert result["read"] == keys
    assert sorted(result["received"]) == sorted([signal.SIGTERM, signal.SIGUSR1])


def test_images_held_as_links_in_the_tar_are_named_and_labels_are_plain_integers(tmp_path):
    """GNU tar stores a second hard link to a file (images deduplicated by hard links) as a link
    to the first, which webdataset's reader dropped without a word: the sample was counted as having
    no image, and the probe's hint sent the user to `tar --sort=name`, which the shard was written
    with. A link is its own kind now, named with the tar option that writes the file instead.
    Labels are plain integers: int() had read `1_0` as 10 and other scripts' digits as 3."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(png_bytes((9, 9, 9)))
    os.link(src / "a.png", src / "b.png")
    (src / "c.png").symlink_to("a.png")
    for key, label in zip("abcd", ["\ufeff1\r\n", " 2 ", "+3", "4"]):
        (src / f"{key}.cls").write_text(label, encoding="utf-8")
    (src / "d.png").write_bytes(png_bytes((4, 4, 4)))
    (src / "d.json").symlink_to("d.cls")  # a key vitdist ignores: d trains
    (src / "e.png").symlink_to("a.png")  # a link alone makes no sample, as when links were dropped

    def kinds(*tar_options):
        shard = tmp_path / f"shard{len(tar_options)}.tar"
        subprocess.run(["tar", "--sort=name", *tar_options, "-cf", str(shard), "-C", str(src), "."], check=True)
        found = {}
        for sample in read_samples(str(shard)):
            sample_digest(sample)  # what a checkpoint records of the sample before its position
            try:
                found[sample["__key__"]] = read_sample(sample, 8)[1]
            except BadSample as bad:
                found[sample["__key__"]] = f"{bad.kind}: {bad}"
        return found

    assert kinds() == {"./a": 1, "./b": "link: its .png is held in the tar as a hard link to './a.png', not as a "
                                        "file: write shards with tar --hard-dereference, or with vitdist make-shards",
                       "./c": "link: its .png is held in the tar as a symbolic link to 'a.png', not as a file: write "
                              "shards with tar -h, or with vitdist make-shards", "./d": 4}
    assert kinds("--hard-dereference", "-h") == {"./a": 1, "./b": 2, "./c": 3, "./d": 4, "./e": "no_label: no .cls "
                                                 "label among ['png']"}
    for label in b"1_0", "\u0663".encode(), b"1 0", b"0x1", b"", b"9" * 5000:  # int() raised past 4300 digits
        with pytest.raises(BadSample, match="is not an integer") as bad:
            read_sample({"__key__": "k", "cls": label, "png": png_bytes((9, 9, 9))}, 20)
        assert bad.value.kind == "bad_label"
