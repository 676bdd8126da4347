"""The order of training samples, a contract: it depends on `data.seed`, `data.streams`,
`data.shuffle_block`, the shard list and the global batch size only, never on world size, loader
workers or micro-batch size. Stream s of `data.streams` walks its own share of the shards (a fresh
shard permutation every epoch) through a block-wise shuffle. A stream's position is a sample
count, so resuming replays it exactly on any world size; a checkpoint's position also holds the
digest of the sample before it, which the resumed stream checks (ShardChanged)."""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import Counter
from typing import Iterator

from .config import DataConfig
from .samples import NoUsableSamples
from .tars import READ_ERROR, read_samples


def shard_order(urls: list[str], seed: int, epoch: int) -> list[str]:
    """The shards as epoch `epoch` deals them out: stream s of n reads the s-th, (s + n)-th, ..."""
    shards = list(urls)
    random.Random(f"{seed}/shards/{epoch}").shuffle(shards)
    return shards


class ShardChanged(ValueError):
    """A resumed stream's shard no longer holds, before the stream's position, the sample the
    checkpointed run read there: a data problem that a retry meets again."""


def sample_digest(sample: dict) -> str:
    """What tells a raw sample from another, wherever its shard lies: its key and its files' bytes,
    not its URL (shards moved to another directory resume)."""
    digest = hashlib.sha256(sample["__key__"].encode())
    for name in sorted(name for name in sample if not name.startswith("__")):
        digest.update(f"\0{name}\0{len(sample[name])}\0".encode())
        digest.update(sample[name])
    return digest.hexdigest()[:16]


class Stream:
    """One virtual stream: an endless, deterministic walk over its share of the shards.

    Epoch e deals the shards, permuted by (seed, e), out to the streams. A stream reads its
    shards in turn, each in blocks of `shuffle_block` samples, every block shuffled by its own
    seed. `position` is (epoch, shard index, offset in shard) of the next sample; a stream built
    at a position yields exactly what the uninterrupted stream yields from there, after reading
    (not decoding) the part of that one shard before it. A checkpoint's position also holds the
    digest of the sample before it (`resume_point`): shards written again under the same names
    (make-shards run anew, a dataset's next version) pass the resume's check of the shard list, and
    their samples at the position are others, or fewer, which the stream would read on from without
    a word; it finds them there and stops (ShardChanged). A shard that gives no usable sample
    (none at all, or only ones its reader skipped: see `judged`) is passed over; once every shard
    has been passed over without a usable one in between, none ever will give one: an error, not an
    endless search (a mistake all samples share is refused sooner, by shard_list.probe). Shards
    read to their end are a data problem that a retry meets again (NoUsableSamples); a read error
    among them may be the storage's passing failure (RuntimeError, retried).
    """

    def __init__(self, urls: list[str], stream_id: int, num_streams: int, cfg: DataConfig,
                 position: tuple = (0, 0, 0)):
        """`position`: (epoch, shard index, offset), and the digest of the sample before it where
        a checkpoint records one (those written before vitdist recorded it do not)."""
        self.urls, self.stream_id, self.num_streams, self.cfg = urls, stream_id, num_streams, cfg
        self.position, self._last, self._block_cut = tuple(position[:3]), None, False
        self._samples = self._walk(*self.position, *position[3:])
        self._shard_usable, self._shard_skips = False, Counter()

    def judged(self, skipped: str | None, count: int = 1) -> None:
        """The reader's word on the sample last given: None if usable, else the kind it was skipped
        as, and the samples it stands for (BadSample.count). Only the reader can tell: the stream
        does not decode. It reads the next sample only once the reader has judged this one, so at a
        shard's end it knows whether the shard gave anything to train on, and if not, why."""
        if skipped is None:
            self._shard_usable = True
        else:
            self._shard_skips[skipped] += count

    def _walk(self, epoch: int, shard_index: int, offset: int,
              last: str | None = None) -> Iterator[tuple[dict, tuple[int, int, int]]]:
        """(sample, position after it), forever. `last`: the digest of the sample before the position."""
        block_size, seed = self.cfg.shuffle_block, self.cfg.seed
        # The shards read in a row without a usable sample (each once, in order), how many reads that
        # took, and their samples' skips (counted at a shard's first read).
        barren, reads, skips, shards_listed = {}, 0, Counter(), len(set(self.urls))
        while True:
            shards = shard_order(self.urls, seed, epoch)
            for index, url in enumerate(shards[self.stream_id :: self.num_streams][shard_index:], start=shard_index):
                start = (offset - 1) // block_size * block_size if offset else 0  # the block of the sample before it
                samples = read_samples(url)
                # Read, not decoded; a read error there ends the shard before the position (its message kept).
                cut = next((sample[READ_ERROR] for sample in itertools.islice(samples, start) if READ_ERROR in sample), None)
                self._shard_usable, self._shard_skips = offset > 0, Counter()  # usable before the position resumed from
                while block := list(itertools.islice(samples, block_size)):
                    random.Random(f"{seed}/block/{epoch}/{self.stream_id}/{index}/{start}").shuffle(block)
                    if last is not None:
                        self._check_resumed(block, offset - start - 1, last, url, (epoch, index, offset), cut)
                        last = None
                    self._block_cut = any(READ_ERROR in sample for sample in block)
                    for k in range(offset - start, len(block)):
                        yield block[k], (epoch, index, start + k + 1)
                    start = offset = start + len(block)
                if last is not None:  # the shard ends before the position
                    self._check_resumed([], 0, last, url, (epoch, index, offset), cut)
                offset = 0
                if self._shard_usable:
                    barren, reads, skips = {}, 0, Counter()
                    continue
                reads += 1
                if url not in barren:
                    barren[url] = None
                    skips.update(self._shard_skips)
                if len(barren) == shards_listed:  # a stream is dealt a share per epoch, not every shard
                    raise self._barren(list(barren), reads, skips)
            epoch, shard_index = epoch + 1, 0

    def _barren(self, shards: list[str], reads: int, skips: Counter) -> Exception:
        """The error that ends the stream once it has read every shard without a usable sample, in
        `reads` reads in a row (their samples' skips by kind, at each shard's first read)."""
        named = ", ".join(f"'{url}'" for url in shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
        kinds = ", ".join(f"{kind} {count}" for kind, count in skips.most_common())
        over = f" over {reads} reads, each epoch dealing it a share of them" if reads > len(shards) else ""
        where = (f"data stream {self.stream_id} read {len(shards)} shards in a row without a usable sample ({named}"
                 f"{over})")
        if skips["read_error"]:
            return RuntimeError(f"{where}: {skips['read_error']} of them could not be read to their end, which may "
                                f"pass (a storage outage); skipped: {kinds} (the log names the first skipped ones, with why)")
        lacked = (f"all their {skips.total()} samples were skipped: {kinds} (the log names the first of each kind, with "
                  "why)" if skips else "they hold no samples")
        return NoUsableSamples(f"{where}, each read to its end: {lacked}. Fix or drop these shards: a retry would "
                               "meet them again")

    def _check_resumed(self, block: list[dict], k: int, last: str, url: str, position: tuple,
                       cut: str | None) -> None:
        """Stop unless `block[k]`, the sample before the position resumed from, is the one read there
        (digest `last`). `cut`: the read error that ended the shard before `block`, if one did."""
        if k < len(block) and sample_digest(block[k]) == last:
            return
        if error := cut or next((sample[READ_ERROR] for sample in block if READ_ERROR in sample), None):
            raise RuntimeError(f"data stream {self.stream_id} could not read shard '{url}' up to the position it "
                               f"resumes from, {position} (epoch, shard, offset), which may pass (a storage "
                               f"outage): {error}")
        raise ShardChanged(
            f"data stream {self.stream_id} resumes in shard '{url}' at {position} (epoch, shard, offset), but the "
            f"sample there is not the one the checkpointed run read (the shard holds "
            f"{'other samples' if k < len(block) else 'fewer samples'}): it was written again under its name since, "
            "and the stream positions would index other samples, seen twice or never. Resume with the shards the "
            "checkpoint was trained on, or start a new run.dir with finetune.init=<the checkpoint>")

    def next_raw(self, copies: int = 1) -> tuple[dict, list[random.Random]]:
        """The next raw sample and an augmentation rng for each of its `copies` (data.aug_repeats),
        seeded by its position (exact on resume)."""
        seed = f"{self.cfg.seed}/aug/{self.stream_id}/{self.position}"
        rngs = [random.Random(seed if copy == 0 else f"{seed}/{copy}") for copy in range(copies)]
        self._last, self.position = next(self._samples)
        return self._last, rngs

    def resume_point(self) -> tuple:
        """The position and the digest of the sample before it, for a checkpoint (see `_walk`). None
        in a block a read error cut: read whole on resume (the error passed), it is another block, and
        the read this run made cannot be had again; the stream goes on there, unchecked."""
        if self._last is None or self._block_cut:
            return self.position
        return (*self.position, sample_digest(self._last))
