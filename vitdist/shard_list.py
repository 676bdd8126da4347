"""The shards a config key names, checked before any process starts: a brace pattern, a list of
patterns or a .txt file of URLs, expanded; local shards that do not exist refused; and a look at
the first samples, for a mistake that every sample shares."""

from __future__ import annotations

import glob
import itertools
import logging
import os
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import braceexpand
from torch.utils.data import IterableDataset
from webdataset.gopen import gopen_schemes

from .config import ConfigError, DataConfig
from .samples import BadSample, read_image
from .tars import READ_ERROR, read_samples
from .workers import ReadStalled, data_loader, watched

log = logging.getLogger(__name__)

LISTED_FROM = 64  # shards named in one directory, from which it is listed rather than each stat'ed
PROBED_SAMPLES, PROBED_SHARDS, PROBE_TIMEOUT_S = 32, 4, 60.0  # what `probe` reads, from the head of the shard list


def is_remote(url: str) -> bool:
    """A URL that webdataset opens itself (pipe:, http:, gs:, hf:, ...), not a local file."""
    scheme, colon, _ = url.partition(":")
    return bool(colon) and scheme in gopen_schemes


def _local_spelling(url: str) -> str:
    """A local file's URL as the path every check and reader takes for one: a file: URL's path, and a
    relative path whose first part holds a colon (exp:1/train.tar) behind ./, where webdataset would
    take 'exp' for a URL scheme it has no handler for (every read failed, retried as an outage)."""
    if ":" not in url:  # no scheme: the common case, 200,000 shards checked in a moment
        return url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return url2pathname(parsed.path)
    if parsed.scheme and parsed.scheme not in gopen_schemes and os.path.exists(url):
        return f"./{url}"
    return url


def expand_urls(spec: str | list[str], key: str | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a list of patterns, or a .txt file with one per line.
    `key` (the config key that gave them) is named in the errors. A shard named twice is refused:
    its samples would be read twice per epoch, and count twice in validation."""
    where = f"{key}: " if key else ""
    if isinstance(spec, str) and _is_list_file(spec):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"{where}shard list file '{spec}' does not exist")
        # utf-8-sig: the byte-order mark a Windows editor writes would begin the first shard's path, unseen
        text = path.read_text(encoding="utf-8-sig")
        spec = [line for line in map(str.strip, text.splitlines()) if line and not line.startswith("#")]
    elif listed := next((p for p in ([] if isinstance(spec, str) else spec) if _is_list_file(p)), None):
        raise ConfigError(f"{where}the shard list file '{listed}' is an item of a list, where it would be read as a tar "
                          "shard: give the .txt file alone, or its lines in the list")
    patterns = [spec] if isinstance(spec, str) else spec
    try:
        urls = [_local_spelling(url) for pattern in patterns for url in braceexpand.braceexpand(pattern)]
    except braceexpand.UnbalancedBracesError as e:
        raise ConfigError(f"{where}{e}: a brace that is part of a name is written \\{{ or \\}}") from None
    located = [None if is_remote(url) else _split(url) for url in urls]  # once: 200,000 shards take seconds
    files = _same_file_spellings(urls, located)
    if twice := next((file for file, count in Counter(files).items() if count > 1), None):
        named = [url for url, file in zip(urls, files) if file == twice]
        spellings = "" if len(set(named)) == 1 else f" (as {', '.join(map(repr, dict.fromkeys(named)))})"
        raise ConfigError(f"{where}'{named[0]}' is named {len(named)} times{spellings}: its samples would be read as "
                          "many times per epoch (and counted as many times in validation); name each shard once")
    missing = _missing_files(urls, located)
    if missing:
        # A job started in another directory than the config's relative paths assume (the shipped configs' demo/...)
        relative = "" if Path(missing[0]).is_absolute() else f" (a relative path, from the working directory '{Path.cwd()}')"
        # A glob names shards that exist, which the message would deny without a word on why
        if set("*?[") & set(missing[0]) and (globbed := glob.glob(missing[0])):
            relative += (f" (a glob, which names {len(globbed)} file(s): shard specs are brace patterns, "
                         "train-{000000..000099}.tar, or a .txt file of one path per line)")
        raise ConfigError(f"{where}{len(missing)} shard file(s) do not exist, first: '{missing[0]}'{relative}")
    if not urls:
        raise ConfigError(f"{where}no shards in {spec!r}")
    return urls


def _same_file_spellings(urls: list[str], located: list[tuple[str, str] | None]) -> list[tuple[str, str]]:
    """Each URL as one key for each file: a local shard spelt otherwise ('d/./a.tar', relative
    beside absolute, through a symbolic link to its directory: a cluster's /data linked to
    /mnt/lustre/data) gives the same, its directory known by its device and inode. One stat per
    directory, not per shard (see _missing_files); a directory that is missing by its text.
    `located`: each URL's directory and name (_split), None for a remote one."""
    directories: dict[str, str] = {}
    files = []
    for url, place in zip(urls, located):
        if place is None:
            files.append((url, ""))
            continue
        directory, name = place
        if directory not in directories:
            try:
                stat = os.stat(directory or ".")
                directories[directory] = f"{stat.st_dev}:{stat.st_ino}"
            except OSError:
                directories[directory] = directory
        files.append((directories[directory], name))
    return files


def _split(path: str) -> tuple[str, str]:
    """A path's directory, as it is spelt ('' for the working directory), and its name: the checks
    here take 200,000 shards, for which os.path's functions would cost seconds on every rank."""
    directory = path[:path.rfind("/") + 1]
    return directory, path[len(directory):]


def _missing_files(urls: list[str], located: list[tuple[str, str] | None]) -> list[str]:
    """The local shards (`located` as for _same_file_spellings) that are not files. Every rank checks the shard list (the config check, the run,
    the loader), and a stat per shard, tens of thousands from every rank at once, loads a cluster
    filesystem's metadata server: a directory named by many paths is listed once instead."""
    by_directory: dict[str, list[tuple[str, str]]] = {}
    for path, place in zip(urls, located):
        if place is not None:
            directory, name = place
            by_directory.setdefault(directory, []).append((path, name))
    missing = set()
    for directory, named in by_directory.items():
        if len(named) < LISTED_FROM:
            missing.update(path for path, _ in named if not os.path.isfile(path))
            continue
        try:
            with os.scandir(directory or ".") as entries:
                files = {entry.name for entry in entries if entry.is_file()}
        except OSError:  # missing or unreadable: as a stat of each would find them
            files = set()
        missing.update(path for path, name in named if name not in files)
    return [path for path in urls if path in missing]


def probe(urls: list[str], cfg: DataConfig, num_classes: int, key: str, timeout_s: float) -> None:
    """ConfigError, naming `key`, when not one of the first PROBED_SAMPLES samples of the first
    shards is usable: a mistake every sample shares (labels under another key than .cls, images
    under another extension) found in a moment, before any process starts. The loader would read
    shard after shard of them without filling a batch, until its worker was taken for stalled.
    Only the samples' headers are read. What cannot be read within `timeout_s` (PROBE_TIMEOUT_S at
    most), or to the end of a shard, is not judged here: the loader meets it, and counts it."""
    read, probed, skipped = 0, set(), {}  # skipped: kind -> (count, the first one's sample and reason)
    timeout_s = min(timeout_s, PROBE_TIMEOUT_S)
    try:
        for sample in itertools.islice(watched(data_loader(_Heads(urls), 0, timeout_s), timeout_s, "probe"), PROBED_SAMPLES):
            if READ_ERROR in sample:
                _refuse_if_not_a_tar(sample, probed, key)
                return
            read += 1
            probed.add(sample["__url__"])
            try:
                read_image(sample, cfg, num_classes)
                return
            except BadSample as reason:
                count, first = skipped.get(reason.kind, (0, (sample, reason)))
                skipped[reason.kind] = (count + reason.count, first)
    except ReadStalled:
        log.warning("%s: the first shards gave no sample within %g s: their samples are not checked before the start",
                    key, timeout_s)
        return
    if read:
        shards = f"'{urls[0]}'" if len(probed) == 1 else f"{len(probed)} shards, from '{urls[0]}' on"
        kinds = "; ".join(f"{count} {kind}, first '{first['__key__']}' in '{first['__url__']}': {reason}"
                          for kind, (count, (first, reason)) in skipped.items())
        # webdataset makes a sample of files that follow one another: a tar written in a folder's order
        # (ext4's is a hash's) or as `*.jpg *.cls` splits each into an image alone and a label alone.
        apart = (" If the tar holds them, a sample's files must follow one another in it: `tar cf` of a folder, or "
                 "of *.jpg *.cls, writes them apart (give tar --sort=name, or write shards with vitdist make-shards)"
                 if skipped.keys() & {"no_label", "no_image"} else "")
        raise ConfigError(f"{key}: none of the first {read} samples of {shards} is usable ({kinds}).{apart} Images are "
                          f"read from .jpg, .jpeg, .png or .webp, labels from .cls (a class index below model.num_classes)")


# What tarfile says of a file whose first block is not a tar header (nor gzip, bzip2 or xz).
_NOT_A_TAR = ("ReadError: invalid header", "ReadError: truncated header")


def _refuse_if_not_a_tar(sample: dict, probed: set[str], key: str) -> None:
    """ConfigError when a local shard's first bytes are not a tar's: zstd-compressed, or a page saved
    in its place. Each read of it would be taken for a storage outage, and retried. A remote shard's
    command or server may give such bytes in an outage (curl's error page), so it is not judged."""
    url = sample["__url__"]
    if url not in probed and not is_remote(url) and sample[READ_ERROR] in _NOT_A_TAR:
        raise ConfigError(f"{key}: '{url}' is not a tar ({sample[READ_ERROR]}): shards are tars, plain or compressed "
                          "with gzip, bzip2 or xz (not zstd)")


class _Heads(IterableDataset):
    """The samples of the first PROBED_SHARDS shards, for `probe`."""

    def __init__(self, urls: list[str]):
        self.urls = urls

    def __iter__(self):
        return itertools.chain.from_iterable(map(read_samples, self.urls[:PROBED_SHARDS]))


def _is_list_file(spec: str) -> bool:
    return spec.endswith(".txt") and not spec.startswith("pipe:")


def train_shard_urls(cfg: DataConfig, world_size: int) -> list[str]:
    """The training shard URLs, refused (ConfigError) when missing or too few for the streams."""
    urls = expand_urls(cfg.train_shards, "data.train_shards")
    if len(urls) < cfg.streams:
        raise ConfigError(
            f"{len(urls)} training shard(s) for data.streams={cfg.streams} (at least ranks x workers = {world_size} x "
            f"{max(1, cfg.num_workers)}): every stream needs a shard; write more, smaller shards or lower data.streams")
    return urls
