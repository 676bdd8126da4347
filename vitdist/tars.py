"""Reading one shard's tar: its raw samples, files grouped by key, from a local path, a `pipe:`
command or a URL webdataset opens, decompressed by their magic bytes, with a read that breaks
(truncated, joined, zeroed, deleted) ending in one READ_ERROR sample in place of the rest; and the
links the tar holds, carried beside each sample. samples.py checks what this reads.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import re
import signal
import tarfile
import zlib
from typing import Callable, Iterator

from webdataset.gopen import Pipe
from webdataset.tariterators import base_plus_ext, url_opener

from .commands import end_command, recorded
from .preemption import SIGNALS as PREEMPTION_SIGNALS

READ_ERROR = "__read_error__"  # the key of the sample that stands for the unreadable rest of a shard


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
