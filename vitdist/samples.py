"""One shard's raw samples, checked: the encoded image and its label, or a BadSample that is
skipped and counted by kind; and the stop when too many of them are bad.

Skipping, not failing, because a web-scale shard set always holds a few broken samples; counting
by kind (data/skipped_<kind> curves), because a sudden rise of one kind points at its cause.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import io
import logging
import lzma
import re
import signal
import tarfile
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from PIL import Image
from webdataset.gopen import Pipe
from webdataset.tariterators import base_plus_ext, url_opener

from .commands import end_command, recorded
from .config import DataConfig
from .preemption import SIGNALS as PREEMPTION_SIGNALS

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
# Why a sample was skipped; the training loop sums them over ranks in this order.
SKIP_KINDS = ("read_error", "no_label", "bad_label", "no_image", "link", "undecodable", "too_small", "too_large")
READ_ERROR = "__read_error__"  # the key of the sample that stands for the unreadable rest of a shard
_MAX_WARNINGS = 20  # logged per kind and worker: the first ones name the broken shards, more would flood the log


def read_samples(url: str) -> Iterator[dict]:
    """Raw samples of one shard: {'__key__', '__url__', ext: bytes}. A shard that cannot be read to
    its end (truncated, deleted since the start) ends with one {READ_ERROR: message} sample in place
    of the rest, the sample being read when it broke included: it is skipped and counted like any
    bad sample, and it holds a position in the stream, so a resumed stream meets it where it was.
    The command a shard's URL starts (`pipe:`, http:) is recorded while open (vitdist.commands)."""
    errors = []

    def stop(exn: Exception) -> bool:  # nothing after a broken tar header or member can be trusted
        errors.append(exn)
        return False

    with _preemption_signals_blocked():  # in the command the URL starts, if any
        opened = [dict(source, url=url) for source in url_opener([{"url": _opened_as(url)}], handler=stop)]
    sources = [dict(source, stream=_Tail(source["stream"])) for source in opened]
    commands = [source["stream"].proc for source in opened if isinstance(source["stream"], Pipe)]
    try:
        with recorded(commands):
            for sample in _group_by_keys(_tar_files(sources, stop)):
                if errors:
                    break
                yield sample
            if not errors and sources:
                try:
                    sources[0]["stream"].check_end()
                except (EOFError, OSError, zlib.error, lzma.LZMAError) as exn:  # OSError: e.g. a pipe's command failed
                    errors.append(exn)
    except GeneratorExit:
        # Left mid-shard (the loader stopped: the run's end, a preemption; a probe read enough): the
        # rest is not wanted, and webdataset's close would wait up to 2 hours for the command to exit,
        # which one stalled on the network never does while it writes nothing. A preemption's run
        # waited at its exit, past the scheduler's grace.
        for command in commands:
            if command.poll() is None:
                end_command(command.pid)
        raise
    if errors:
        reason = getattr(errors[0], "strerror", None) or errors[0].args[0]
        if isinstance(reason, str) and url.startswith("pipe:"):  # a failed command's: as the user wrote it
            reason = reason.replace(repr(_opened_as(url)[5:]), repr(url[5:]))
        yield {"__key__": "", "__url__": url, READ_ERROR: f"{type(errors[0]).__name__}: {reason}"}


@contextlib.contextmanager
def _preemption_signals_blocked() -> Iterator[None]:
    """The preemption signals blocked in the calling thread, and so in the commands it starts
    (webdataset's curl for http:, gsutil for gs:, a `pipe:` shard's shell): blocked signals are
    inherited across fork and exec, where handlers are reset. The commands leave these signals to
    the training process, as the loader workers do. One that reaches every process of the job
    (SLURM's scancel --signal=TERM under proctrack/linuxproc, systemd's stop), or the training
    process's group, which holds its commands when it reads the shards itself
    (data.num_workers=0), ended the command mid-shard: the rest of the shard, read for the steps
    before the preemption's checkpoint, was skipped as a read error, and the checkpoint's positions
    passed over it, unseen that epoch. A command still ends with its reader (SIGPIPE) or at SIGKILL
    (vitdist.commands, vitdist.workers). A signal that comes to this thread meanwhile is taken
    after, not lost."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, PREEMPTION_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


# dash, the /bin/sh of Debian and Ubuntu that runs `pipe:` commands, unblocks every signal as it
# starts: the shell ignores them itself, and the commands it starts inherit that.
_IGNORING_PREEMPTION = "trap '' TERM USR1; "


def _opened_as(url: str) -> str:
    """The URL `read_samples` opens for `url`: a `pipe:` command ignoring the preemption signals."""
    return f"pipe:{_IGNORING_PREEMPTION}{url.removeprefix('pipe:')}" if url.startswith("pipe:") else url


LINKS = "__links__"  # a sample's files that the tar holds as links: {suffix: (target, hard)}
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members, which it passes over


def _tar_files(sources: list[dict], stop: Callable[[Exception], bool]) -> Iterator[dict]:
    """The files of each source's tar, {'fname', 'data', '__url__'}, as webdataset's
    tar_file_expander gives them, and its links too, with 'link': (target, hard) in place of
    'data': GNU tar stores each hard link to a file after the first as a link to it (images
    deduplicated by hard links), and webdataset drops links without a word, which left samples
    that seemed to have no image."""
    for source in sources:
        try:
            tar = tarfile.open(fileobj=source["stream"], mode="r|*")
            for member in tar:
                if _META.match(member.name):
                    continue
                if member.isreg():
                    yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": source["url"]}
                elif member.islnk() or member.issym():
                    yield {"fname": member.name, "link": (member.linkname, member.islnk()), "__url__": source["url"]}
                tar.members = []  # else the stream keeps every header it has read
        except Exception as e:  # tarfile's, or the stream's (decompression, a command that failed)
            if not stop(e):
                return


def _group_by_keys(files: Iterator[dict]) -> Iterator[dict]:
    """Consecutive files of one key (a file name up to the first dot of its last part) as one
    sample, suffixes lowercased, as webdataset groups them; but a suffix the sample already holds
    (a sample written twice in a row, a.jpg beside a.JPG) starts a new sample, where webdataset's
    grouping raises and so gives up the rest of a readable shard. Links make no sample and no
    boundary, as when webdataset dropped them (a shard's samples, and so the stream positions and
    the resume digests, are as they were): a sample carries those of its key under LINKS."""
    sample, links = None, {}
    for file in files:
        key, suffix = base_plus_ext(file["fname"])
        if key is None:  # no dot: no suffix to file it under
            continue
        suffix = suffix.lower()
        if "link" in file:
            links.setdefault(key, {})[suffix] = file["link"]
            continue
        if sample is None or key != sample["__key__"] or suffix in sample:
            if sample is not None:
                yield _with_links(sample, links)
            sample = {"__key__": key, "__url__": file["__url__"]}
        sample[suffix] = file["data"]
    if sample is not None:
        yield _with_links(sample, links)


def _with_links(sample: dict, links: dict) -> dict:
    if found := links.pop(sample["__key__"], None):
        sample[LINKS] = found
    return sample


# The compressions read, by their magic bytes. Decompressed here, not by tarfile: its stream mode
# reads only the first of several gzip members or bzip2 streams, which bgzip and pbzip2 write for
# one tar (the rest of the shard was a read error), and its end-of-archive checks see only the
# compressed bytes, so that compressed tars joined with cat lost the samples of all but the first,
# unseen (see check_end).
# A plain tar begins with its first file's name: bzip2's magic is matched whole, block size and first
# block's magic included, so that a key beginning with 'BZh' is no bzip2 file.
_DECOMPRESSORS = ((re.compile(b"\x1f\x8b\x08"), lambda raw: gzip.GzipFile(fileobj=raw)),
                  (re.compile(rb"BZh[1-9]1AY&SY"), bz2.BZ2File), (re.compile(b"\xfd7zXZ\x00"), lzma.LZMAFile))


class _Prefixed:
    """A stream whose first bytes were read already: `head`, then the rest of `stream`."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:n], self.head[n:]
        return data + self.stream.read(n - len(data)) if len(data) < n else data


# The most zeros a tar ends with after its end-of-archive block: padding to a record, 10 KiB by default
# (GNU tar, Python's tarfile, bsdtar), 1 MiB with `tar -b 2048`.
_MAX_PADDING = 1 << 20
_EMPTY_TAR = 10240  # a tar of no member, as tar, tarfile and webdataset write one: a record of zeros


class _Tail:
    """A shard's byte stream, decompressed, that keeps its first and last blocks. tarfile reads a
    tar cut exactly before a member's header as a complete archive: only the missing end-of-archive
    block (zeros) tells (a compressed one's decompressor finds its own truncation)."""

    def __init__(self, stream):
        self.raw, self.stream, self.head, self.tail, self.last, self.size = stream, None, b"", b"", b"", 0

    def read(self, n: int = -1) -> bytes:
        if self.stream is None:  # on the first read, where tarfile's handler takes its errors
            magic = self.raw.read(10)
            stream = _Prefixed(magic, self.raw)
            decompress = next((opener for prefix, opener in _DECOMPRESSORS if prefix.match(magic)), None)
            self.stream = decompress(stream) if decompress else stream
        data = self.stream.read(n)
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        self.tail = (self.tail + data[-512:])[-512:]  # copies a block at most, not the whole read
        self.last = data
        self.size += len(data)
        return data

    def check_end(self) -> None:
        """After tarfile has stopped, at the first zero block: in the tar, what follows is
        padding (zeros). Any other byte is data tarfile would never read, most often a second tar
        (shards joined with `cat`): its samples are counted as lost rather than silently left out."""
        # tarfile stops at a member header that is not one as at the end-of-archive block, and reads
        # 512-byte blocks from reads of whole blocks: the block it stopped at is one of its last read.
        stopped = self.last
        at_zeros = any(stopped[i : i + 512] == bytes(512) for i in range(0, len(stopped), 512))
        beyond, after = False, 0
        while data := self.read(1 << 16):
            beyond = beyond or bool(data.strip(b"\0"))
            after += len(data)
        # An archive that starts with its end is checked too: a file whose first bytes are zeros.
        if self.head[257:262] != b"ustar" and any(self.head):  # a V7 tar, without the magic: not told from other data
            return
        # Zeros where samples should be: tarfile takes the first zero block for the archive's end. A
        # downloader that writes segments in parallel (aria2c) preallocates the file under its final
        # name, and a download cut short leaves the missing segments zero; a crash can zero a file's end.
        zeros = "zeros in place of its samples (a download cut short? a crash?), which are not read"
        if not any(self.head) and (beyond or self.size > _EMPTY_TAR):  # no member, and more than an empty tar
            raise EOFError(f"the shard starts with {zeros}")
        if len(self.tail) < 512 or any(self.tail):
            raise EOFError("the tar ends without its end-of-archive block, cut short before a member")
        if beyond and not at_zeros:
            raise EOFError("a member header of the tar is corrupt (a damaged file?): tarfile stops there, and the "
                           "samples after it are not read")
        if beyond:
            raise EOFError("data after the tar's end-of-archive block, which is not read (tars joined with cat? write "
                           "each shard as one tar)")
        if after > _MAX_PADDING:
            raise EOFError(f"{after >> 20} MiB of zeros after the tar's end-of-archive block, where a tar pads to a "
                           f"record: {zeros}")


class BadSample(ValueError):
    """A sample that is skipped and counted under its `kind`, one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def read_sample(sample: dict, num_classes: int) -> tuple[bytes, int]:
    """The encoded image and class index of a raw sample, or BadSample."""
    if READ_ERROR in sample:
        raise BadSample("read_error", f"the rest of the shard is unreadable: {sample[READ_ERROR]}")
    if "cls" not in sample:
        raise _linked(sample, ("cls",)) or BadSample("no_label", _lacking(".cls label", sample))
    # A Windows editor's byte-order mark, and whitespace, are allowed; not what int() also reads as
    # a number (1_0 as 10, other scripts' digits), nor more digits than any class index has.
    label = re.fullmatch(rb"(?:\xef\xbb\xbf)?\s*([+-]?[0-9]{1,18})\s*", sample["cls"])
    if label is None:
        raise BadSample("bad_label", f"label {sample['cls'][:20]!r} is not an integer")
    label = int(label[1])
    if not 0 <= label < num_classes:
        raise BadSample("bad_label", f"label {label} outside [0, {num_classes})")
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise _linked(sample, IMAGE_KEYS) or BadSample("no_image", _lacking("image (.jpg/.jpeg/.png/.webp)", sample))
    return data, label


def _linked(sample: dict, suffixes: tuple[str, ...]) -> BadSample | None:
    """The BadSample for a file of these suffixes that the tar holds as a link, if it does."""
    links = sample.get(LINKS, {})
    suffix = next((k for k in suffixes if k in links), None)
    if suffix is None:
        return None
    target, hard = links[suffix]
    return BadSample("link", f"its .{suffix} is held in the tar as a {'hard' if hard else 'symbolic'} link to "
                             f"'{target}', not as a file: write shards with tar {'--hard-dereference' if hard else '-h'}, "
                             "or with vitdist make-shards")


def _lacking(what: str, sample: dict) -> str:
    """Why a sample lacks `what`: the files it has, and, when their names hold a dot, how a key with
    a dot splits. Shards tarred from files named like 'img.v2.jpg' meet it in every sample."""
    files = sorted(k for k in sample if not k.startswith("__"))
    dotted = next((f for f in files if "." in f), None)
    if dotted is None:
        return f"no {what} among {files}"
    key = sample["__key__"]
    return (f"no {what} among {files} (a key ends at the first dot of a file name: '{key}.{dotted}' is key '{key}', "
            f"file '{dotted}'; write keys without dots, as vitdist make-shards does)")


# The formats read: all that PIL knows but EPS, whose pixels PIL has Ghostscript decode, a program
# run on a shard's bytes (a sample's .jpg may hold anything).
Image.init()
_FORMATS = tuple(name for name in Image.OPEN if name != "EPS")


def open_image(data: bytes) -> Image.Image:
    """The image with only its header read (size, mode, format): no pixels decoded yet; or BadSample.
    data.max_image_pixels judges the size (read_image). PIL's own decompression-bomb check, which
    warns from Image.MAX_IMAGE_PIXELS and refuses from twice that, is left in place for the rest
    of the process: here its warning is silenced and its refusal counted as too_large."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", f"{e} (PIL's limit, 2 x PIL.Image.MAX_IMAGE_PIXELS, bounds data.max_image_pixels)") from None
    except Exception as e:
        raise BadSample("undecodable", f"undecodable image: {e}") from None


# 0xFF and a marker's code. Not one: 0xFF 0x00 (a 0xFF byte of entropy-coded data), 0xFF 0xFF (fill
# before a marker), and the markers without a length (TEM, restarts, start of image).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\x01\xd0-\xd8\xff]")


def jpeg_end(data: bytes) -> int | None:
    """The length of a JPEG up to and including its end-of-image marker, or None where it has none
    (cut short). What follows the marker (a camera's padding, a phone's trailer) is no part of the
    image: PIL and libjpeg stop there. Marker segments are skipped by their lengths, so the end of
    an EXIF thumbnail inside one is not taken for the image's."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while marker := _JPEG_MARKER.search(data, pos):
        if marker.group()[1] == 0xD9:
            return marker.end()
        pos = marker.end() + int.from_bytes(data[marker.end() : marker.end() + 2], "big")
    return None


def read_image(sample: dict, cfg: DataConfig, num_classes: int) -> tuple[bytes, Image.Image, int]:
    """The encoded bytes, the opened image (header only) and the class index of a raw sample; or
    BadSample, sizes judged from the header: a decompression bomb never allocates its pixels."""
    data, label = read_sample(sample, num_classes)
    image = open_image(data)
    width, height = image.size
    if min(width, height) < cfg.min_image_side:
        raise BadSample("too_small", f"{width}x{height} image, shorter side below data.min_image_side={cfg.min_image_side}")
    if width * height > cfg.max_image_pixels:
        raise BadSample("too_large", f"{width}x{height} image, more than data.max_image_pixels={cfg.max_image_pixels}")
    return data, image, label


def load_rgb(image: Image.Image) -> Image.Image:
    """The pixels of an opened image, as RGB (CMYK, palette, greyscale, 16-bit converted); or BadSample."""
    try:
        image.load()
        if image.mode.startswith("I"):
            # 16-bit greyscale (PNG): PIL's own conversion clips at 255 instead of scaling 65535 to 255.
            image = Image.fromarray((np.asarray(image, dtype=np.float32) / 257).round().clip(0, 255).astype(np.uint8))
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as e:
        raise BadSample("undecodable", f"undecodable image: {e}") from None


def decode(sample: dict, cfg: DataConfig, num_classes: int) -> tuple[Image.Image, int]:
    """The RGB image and class index of a raw sample, or BadSample."""
    _, image, label = read_image(sample, cfg, num_classes)
    return load_rgb(image), label


@dataclass
class Skips:
    """Bad samples met by one worker, by kind."""
    counts: Counter = field(default_factory=Counter)

    def report(self, sample: dict, reason: BadSample) -> None:
        self.counts[reason.kind] += 1
        if self.counts[reason.kind] <= _MAX_WARNINGS:
            what = "the rest of the shard" if READ_ERROR in sample else f"sample '{sample['__key__']}'"
            log.warning("skipped %s in %s: %s [%s]", what, sample["__url__"], reason, reason.kind)


class NoUsableSamples(ValueError):
    """Training shards read to their end held no sample to train on: a data problem, not retried."""


class TooManyBadSamples(RuntimeError):
    """More of the samples read were bad than data.max_skip_frac allows."""


# The skipped fraction is judged from this optimizer step on: by then every stream has given ten
# chunks, so that one corrupt shard met first by one stream does not stop a run on its own.
_JUDGE_SKIPS_FROM_STEP = 10


def too_many_skipped(skipped: Counter, read: int, max_skip_frac: float) -> bool:
    """The one rule for bad samples, during the run and at a loader's timeout alike."""
    return skipped.total() > max_skip_frac * read


def bad_samples(what: str, skipped: Counter, max_skip_frac: float) -> TooManyBadSamples:
    """The error for `skipped` (kind -> count), which broke the rule above; `what` says how many were bad."""
    top = ", ".join(f"{kind} {count}" for kind, count in skipped.most_common(3))
    return TooManyBadSamples(
        f"{what}, more than data.max_skip_frac={max_skip_frac}; most were {top}. The log names the shard and key of "
        "the first ones of each kind: fix or drop those shards, or raise data.max_skip_frac")


def check_skipped(skipped: dict[str, int], step: int, trained: int, cfg: DataConfig) -> None:
    """TooManyBadSamples when more than `data.max_skip_frac` of the samples read in `step` steps
    were skipped, `trained` being the samples trained on. `skipped` (kind -> count) is summed over
    ranks: every rank decides alike."""
    skipped, read = Counter(skipped), sum(skipped.values()) + trained
    if step >= _JUDGE_SKIPS_FROM_STEP and too_many_skipped(skipped, read, cfg.max_skip_frac):
        raise bad_samples(f"{skipped.total() / read:.1%} of the samples read were bad ({skipped.total()} skipped, "
                          f"{trained} trained on)", skipped, cfg.max_skip_frac)
