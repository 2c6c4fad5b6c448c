"""Each DataLoader worker's stream: shards -> samples -> batches of prepared samples.

Per worker (see :class:`~carl_scale.data.reader.VideoLoader` for the loader around it)::

    shard list (shuffled per epoch by (seed, epoch), or resampled)
      -> split by rank (explicit) -> split by worker (explicit)
      -> tar -> samples (bad tar members: warn, count, go on); from the shard's index where it has
         one, each sample's bytes read when it is dealt (carl_scale.data.indexed)
      -> shuffle buffer (seeded by (seed, epoch, rank, worker))
      -> prepare: parse metadata, draw the temporal views and spatial parameters from a generator
         seeded by (seed, epoch, video key, pass), decode only the sampled frames, crop/flip, and
         on a CPU run the colour augmentation too (a sample that fails: warn, count, go on)
      -> batches of ``batch_size``, a fixed number per worker, each with the stream position
         a resume starts from
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import random
import tarfile
import zlib
from dataclasses import dataclass
from itertools import islice
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from carl_scale.data.batch import PreparedSample, SkipCounter
from carl_scale.data.codec import check_jpeg_offsets
from carl_scale.data.config import LoaderConfig
from carl_scale.data.decoders import EncodedVideo, FrameDecoder
from carl_scale.data.grouping import LabelGrouper
from carl_scale.data import indexed
from carl_scale.data.indexed import LazySample, samples_of
from carl_scale.data.spatial import apply_geometric, apply_photometric, draw_view_params, to_tchw
from carl_scale.data.temporal import sample_temporal_views
from carl_scale.errors import out_of_memory

log = logging.getLogger("carl_scale.data")

BARREN_PASSES = 16  # passes in a row without a usable sample before a worker gives up


# -- per-sample preparation --------------------------------------------------------------------
def _seed_of(*parts: int | str) -> list[int]:
    return [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]


def parse_meta(sample: dict) -> dict:
    meta = json.loads(sample["json"])
    n = int(meta["num_frames"])
    if "nframes" in sample and int(np.frombuffer(sample["nframes"], "<i4")[0]) != n:
        raise ValueError(f"nframes field disagrees with the JSON num_frames ({n})")
    if len(meta["phase_labels"]) != n:
        raise ValueError(f"{len(meta['phase_labels'])} phase labels for {n} frames")
    return meta


def prepare_sample(sample: dict, cfg: LoaderConfig, epoch: int, pass_: int, decoder: FrameDecoder | None, *,
                   seed: int = 0, photometric: bool = True, draw: tuple[int, ...] = ()) -> PreparedSample:
    """Draw both views of one video and (with a decoder) decode and crop their frames, and with
    ``photometric`` colour-augment them too (a CPU run: the workers do all of the augmentation).
    The views are a function of (seed, epoch, video, pass) and ``draw``, which tells apart the
    copies of a video that one pass may hold (resampled shards: drawn with replacement, by every
    rank and worker on its own)."""
    # From a shard's index a JPEG payload is read as far as the views' frames need (its metadata
    # first, which the views are drawn from); any other sample in one read of all its members.
    partial = isinstance(sample, LazySample) and (sample.unread_size("jpgs") or 0) > indexed.SMALL \
        and "jpgofs" in sample and "video" not in sample
    if isinstance(sample, LazySample):  # (partial: every member but the frames, in one read: they sit after them)
        sample.load([n for n in sample.unread() if n != "jpgs"] if partial else None)
    meta = parse_meta(sample)
    rng = np.random.default_rng(_seed_of(seed, epoch, sample["__key__"], pass_, *draw))
    tv = sample_temporal_views(int(meta["num_frames"]), cfg.temporal, rng)
    enc = sampled_jpegs(sample, meta, tv.timestamps) if partial else EncodedVideo.from_sample(sample, meta)
    h, w = int(meta["height"]), int(meta["width"])
    params = (draw_view_params(h, w, cfg.spatial, rng), draw_view_params(h, w, cfg.spatial, rng))
    out = PreparedSample(sample["__key__"], meta, tv.timestamps, tv.mask, params)
    if decoder is None:  # decoded in the finishing step: only the sampled frames' JPEGs go there
        out.encoded = enc.keep_only(tv.timestamps.reshape(-1))
        return out
    flat = decoder.decode([enc], [tv.timestamps.reshape(-1)])[0]
    frames = to_tchw(flat).reshape(2, -1, 3, *flat.shape[1:3])
    if frames.shape[-2:] != (h, w):
        raise ValueError(f"decoded frames are {tuple(frames.shape[-2:])}, metadata says {(h, w)}")
    views = [apply_geometric(frames[v], params[v], cfg.spatial.image_size) for v in range(2)]
    if photometric:
        views = [apply_photometric(x, params[v], cfg.spatial) for v, x in enumerate(views)]
    out.views = torch.stack(views)
    return out


def sampled_jpegs(sample: LazySample, meta: dict, timestamps: np.ndarray) -> EncodedVideo:
    """The jpeg payload of an indexed sample cut to these frames, read from the shard as far as they
    need (frames close together in one read: at T = 80 about half of a 10 s clip's bytes); the same
    payload ``EncodedVideo.from_sample(...).keep_only(frames)`` gives from the whole member."""
    offsets = np.frombuffer(sample["jpgofs"], dtype="<i8")
    check_jpeg_offsets(offsets, sample.unread_size("jpgs"))
    frames = np.unique(np.asarray(timestamps, dtype=np.int64).reshape(-1))
    if not len(frames) or frames[0] < 0 or frames[-1] >= len(offsets) - 1:
        raise IndexError(f"frames {frames[:1].tolist()}..{frames[-1:].tolist()} out of range for a "
                         f"{len(offsets) - 1}-frame jpeg payload")
    parts = sample.read_ranges("jpgs", [(int(offsets[i]), int(offsets[i + 1])) for i in frames])
    whole = EncodedVideo("jpeg", b"", int(meta["num_frames"]), offsets, "jpeg", height=int(meta.get("height", 0)),
                         width=int(meta.get("width", 0)))  # (the payload as from_sample gives it, its bytes unread)
    return whole.cut_to(frames, parts)


def cpu_decoded(position: int, share: float) -> bool:
    """Whether the sample at this stream position is one of the ``share`` the workers decode on
    the CPU (the rest decoded on the GPU): spread evenly, a function of the position alone, so a
    resumed stream splits as the original did."""
    return math.floor((position + 1) * share) > math.floor(position * share)


# -- the iterable dataset ----------------------------------------------------------------------
class ShardedVideoDataset(IterableDataset):
    """Yields lists of ``batch_size`` :class:`PreparedSample`, a fixed number per worker."""

    def __init__(self, urls: list[str], cfg: LoaderConfig, *, rank: int, world_size: int,
                 batches_per_epoch: int, decoder: FrameDecoder | None, counter: SkipCounter, seed: int,
                 photometric: bool, num_workers: int, cpu_decoder: FrameDecoder | None = None):
        """``decoder`` decodes every sample in the workers (None: the collate decodes them), except
        the ``cfg.cpu_decode_share`` of them that ``cpu_decoder`` decodes here when given."""
        self.urls, self.cfg, self.seed, self.photometric = urls, cfg, seed, photometric
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = batches_per_epoch
        self.decoder, self.counter, self.cpu_decoder = decoder, counter, cpu_decoder
        # What the next pass over the data starts from, in shared memory: persistent DataLoader
        # workers (forked once) read it whenever a new epoch or a resume begins. [0] epoch, [1] the
        # global batch index to resume from within it, [2 + w] logical worker w's stream position
        # at that batch (-1: none recorded).
        self._state = mp.get_context("fork").Array("q", [0, 0] + [-1] * max(1, num_workers), lock=False)

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    @property
    def start_batch(self) -> int:
        return int(self._state[1])

    @property
    def resume_at(self) -> dict[int, int]:
        return {w: int(p) for w, p in enumerate(self._state[2:]) if p >= 0}

    def set_start(self, epoch: int, start_batch: int, resume_at: dict[int, int]) -> None:
        """Where the next ``iter()`` starts (call it in the main process before the iterator is made)."""
        self._state[0], self._state[1] = epoch, start_batch
        for w in range(len(self._state) - 2):
            self._state[2 + w] = resume_at.get(w, -1)

    def _worker(self) -> tuple[int, int]:
        """(logical worker, number of workers). The DataLoader takes batches from its workers
        round-robin starting at worker 0, so on a resume at global batch k the worker ids are
        rotated by k: the first batch then comes from the worker that owned batch k."""
        info = get_worker_info()
        if info is None:
            return 0, 1
        return (info.id + self.start_batch) % info.num_workers, info.num_workers

    def _passes(self, worker: int, num_workers: int) -> Iterator[tuple[list[str], int, int]]:
        """Per pass over the data, forever: (shard list, sample stride, sample offset) of this
        rank and worker. Shards are split when there are enough of them for every rank x worker;
        otherwise every consumer reads all shards and keeps every (world x workers)-th sample."""
        cfg = self.cfg
        consumers = self.world_size * num_workers
        me = self.rank * num_workers + worker
        if cfg.resampled:  # (salted: the shuffle buffer's generator has the same parts, and drew the same numbers)
            rng = random.Random(str(_seed_of(self.seed, self.epoch, self.rank, worker, "shards")))
            while True:
                yield [rng.choice(self.urls) for _ in range(len(self.urls))], 1, 0
        for pass_ in range(1 << 30):
            order = list(self.urls)
            # Same permutation on every rank and worker, so the split below is a partition.
            random.Random(str(_seed_of(self.seed, self.epoch, pass_))).shuffle(order)
            if len(order) >= consumers:
                yield list(islice(islice(order, self.rank, None, self.world_size), worker, None, num_workers)), 1, 0
            else:
                yield order, consumers, me

    def _counted_by_the_first(self, exn: BaseException) -> bool:
        """WebDataset's handler protocol (True: go on) for a consumer that is not the first of a
        split by sample: a damaged tar's error is the first consumer's to count, any other is this
        one's."""
        return True if isinstance(exn, tarfile.TarError) else self.counter.handler(exn)

    def _samples(self, worker: int, num_workers: int) -> Iterator[tuple[dict, int]]:
        """(sample, pass) pairs. The shuffle buffer is flushed at the end of each pass, so a
        sample never meets its own next-pass copy in the buffer."""
        cfg = self.cfg
        rng = random.Random(str(_seed_of(self.seed, self.epoch, self.rank, worker)))
        for pass_, (urls, stride, offset) in enumerate(self._passes(worker, num_workers)):
            # Damage in a tar is met before the split by sample below: where every consumer reads every
            # shard, each would count it (the run's count summed over ranks: world x workers times
            # too many). The first consumer counts it; the others go on past it without a word. A
            # failure to open or read a shard is each consumer's own (a network's), still counted.
            handler = self.counter.handler if stride == 1 or offset == 0 else self._counted_by_the_first
            # from each shard's index where it has one, payloads read only when dealt: a resume's replay
            # of the epoch up to its batch reads no payload, and the shuffle buffer holds none
            samples = samples_of(urls, lambda one, handler=handler: wds.tarfile_to_samples(handler=handler)(
                [dict(url=u) for u in one]))
            if stride > 1:
                samples = islice(samples, offset, None, stride)
            if cfg.shuffle_buffer > 1:
                samples = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(samples)
            for s in samples:
                yield s, pass_
            yield None, pass_  # end of pass marker: lets the consumer notice a pass with nothing usable

    def _dealt(self, stream: Iterator[tuple[dict | None, int]]) -> Iterator[list[tuple[dict, int]] | int]:
        """Raw batches of (sample, pass), and at the end of each pass the number of samples it gave
        (an int): consecutive samples (a video the open batch already holds waits for the next
        one), or with ``per_label`` the groups of :class:`~carl_scale.data.grouping.LabelGrouper`.
        A function of the stream alone (labels read from the metadata, nothing decoded), so a
        resumed run deals the same batches; positions count samples in the order dealt."""
        cfg = self.cfg
        grouper = LabelGrouper(cfg.batch_size, cfg.per_label, held=max(cfg.shuffle_buffer, 4 * cfg.batch_size)) \
            if cfg.per_label else None
        raw: list[tuple[dict, int]] = []
        held: list[tuple[dict, int]] = []  # samples whose video the open batch holds already
        entered = 0

        def ident(item: tuple[dict, int]) -> tuple:
            return item[0].get("__url__"), item[0].get("__key__")

        for sample, pass_ in stream:
            if sample is None:
                yield entered
                entered = 0
            elif grouper is None:
                entered += 1
                # A pass's last samples wait in a partial batch beside the next pass's first: one
                # video twice in a batch would be its own negative. Held back for the next batch,
                # unless a share smaller than a batch leaves nothing else (then repeats must be).
                if ident((sample, pass_)) in {ident(r) for r in raw} and len(held) < cfg.batch_size:
                    held.append((sample, pass_))
                    continue
                raw.append((sample, pass_))
                while len(raw) == cfg.batch_size:
                    yield raw
                    raw, waiting, held = [], held, []
                    for item in waiting:
                        (held if ident(item) in {ident(r) for r in raw} else raw).append(item)
            else:
                try:
                    label = int(parse_meta(sample).get("action_label", -1))
                except Exception as exn:  # corrupt metadata: counted, never fatal
                    self.counter.add(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}", exn)
                    continue
                entered += 1
                yield from grouper.add((sample, pass_), label, ident=(sample.get("__url__"), sample.get("__key__")))

    def __iter__(self) -> Iterator["WorkerBatch"]:
        worker, num_workers = self._worker()
        cfg = self.cfg
        nb = self.batches_per_epoch
        quota = nb // num_workers + (1 if worker < nb % num_workers else 0)
        # Resuming at global batch k: batches of this worker come at k = worker + j * num_workers.
        done = max(0, math.ceil((self.start_batch - worker) / num_workers))
        if done >= quota:
            return
        # Where this worker's stream resumes, counted in dealt samples: the position its last
        # consumed batch reported (exact even when failed samples made it read more than it
        # yielded), or for a state without positions, done whole raw batches.
        target = self.resume_at.get(worker, done * cfg.batch_size)
        self.counter.discard()  # (a persistent worker's last epoch: read after its last batch)
        pos = self.counter.position = 0  # dealt samples consumed so far: prepared, failed or skipped undecoded
        # prepared, in stream order, each with its position: a failed sample's place is taken by the next
        ready: list[tuple[int, PreparedSample]] = []
        tried = prepared = 0  # since the last pass ended
        barren = 0  # consecutive passes that gave nothing usable
        for raw in self._dealt(self._samples(worker, num_workers)):
            if isinstance(raw, int):  # passes of nothing usable would spin forever: say so instead
                if prepared:
                    barren = 0
                elif raw == 0 or tried >= raw:  # (a pass whose samples wait in a partial batch says nothing)
                    barren += 1
                # A share of a few samples (fewer shards than consumers) may hold only a damaged
                # one in one pass and good ones in the next, whose order differs: only a share that
                # is empty, or unusable pass after pass, is an error.
                if barren >= BARREN_PASSES:
                    raise ValueError(
                        f"rank {self.rank} worker {worker}: " + ("its share of the shards is empty (fewer samples "
                        "than ranks x workers?)" if raw == 0 else f"{barren} passes over its shards in a row gave no "
                        f"usable sample") + f" ({self.counter.total} skipped so far): are the shards corrupt or empty?")
                tried = prepared = 0
                continue
            start, pos = pos, pos + len(raw)
            self.counter.position = pos
            first = min(len(raw), max(0, target - start))  # consumed before the resume point: not decoded
            prepared += first
            group = cfg.per_label or 1  # a label group stays whole: a failed member drops its group
            for g in range(first, len(raw), group):
                members = []
                for i, (sample, pass_) in enumerate(raw[g: g + group]):
                    tried += 1
                    at = start + g + i
                    decoder = self.cpu_decoder if self.cpu_decoder is not None and \
                        cpu_decoded(at, cfg.cpu_decode_share) else self.decoder
                    try:
                        members.append((at, prepare_sample(
                            sample, cfg, self.epoch, pass_, decoder, seed=self.seed, photometric=self.photometric,
                            draw=(self.rank, worker, at) if cfg.resampled else ())))
                        prepared += 1
                    except Exception as exn:  # corrupt or undecodable: counted, never fatal, never silent
                        if out_of_memory(exn):  # the machine's, not the video's: never counted as corrupt
                            raise
                        self.counter.add(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}", exn, at)
                if len(members) == min(group, len(raw) - g):
                    ready += members
            while len(ready) >= cfg.batch_size:
                batch, ready = ready[: cfg.batch_size], ready[cfg.batch_size:]
                done += 1
                # leftovers are whole groups, so ready[0] starts one: the next batch is rebuilt from there
                resume_at = ready[0][0] if ready else pos
                yield WorkerBatch([s for _, s in batch], worker, resume_at,
                                  self.counter.take(before=resume_at, after=target))
                if done >= quota:
                    return


@dataclass
class WorkerBatch:
    """A worker's batch and where its stream resumes after it (see ``VideoLoader.state_dict``)."""

    samples: list[PreparedSample]
    worker: int  # logical worker id
    resume_at: int  # dealt samples of the worker's epoch stream that come before its next batch
    skipped: int = 0  # samples skipped on the way to this batch (counted when the batch is taken)
