"""The training reader: WebDataset shards -> two augmented views per video, in batches.

Each DataLoader worker reads its share of the shards into batches of prepared samples
(:mod:`carl_scale.data.stream`: the split by rank and worker, the shuffle buffer, the seeded
views, decoding on the CPU), a fixed number per worker, so every rank runs exactly ``len(loader)`` steps per epoch. Without resampling, an epoch is one
pass over each worker's shards; a worker whose shards run out before its quota wraps around for
another pass (new views). With shards that divide evenly over ranks x workers, every sample is
seen exactly once per epoch, up to the batches that do not make a whole round over the workers
(an epoch is a multiple of the worker count, where it can be), and except with ``--per-label``:
its grouper holds up to max(shuffle buffer, 4 batches) videos back per worker, which a pass then
leaves unseen while the worker reads into the next. With fewer shards than ranks x
workers, the split falls back to samples (every consumer reads every shard and keeps its share).
A batch does not hold one video twice where a pass's last samples meet the next pass's first
(unless a worker's share is smaller than a batch). On a GPU run the training process finishes each batch on the device (colour augmentation, and with DALI ``mixed`` the
decoding and cropping too) in a background thread on its own CUDA stream, up to
``GPU_PREFETCH_BATCHES`` ahead of the step (:func:`~carl_scale.data.prefetch.finish_ahead`);
``--finish-threads N``: N such threads side by side, each with its own decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import logging
import math
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from carl_scale.data.batch import SkipCounter, StandIns, VideoBatch, collate
from carl_scale.data.config import LoaderConfig
from carl_scale.data.decoders import DaliDecoder, FrameDecoder, PyAVDecoder, make_decoder
from carl_scale.data.finish_process import FinishProcess
from carl_scale.data.manifest import manifest_codec, manifest_samples, resolve_shards
from carl_scale.data.prefetch import finish_ahead
# (the worker streams; parse_meta, prepare_sample and cpu_decoded are imported from here too)
from carl_scale.data.stream import ShardedVideoDataset, WorkerBatch, cpu_decoded, parse_meta, prepare_sample
from carl_scale.errors import ignore_stop_signals

__all__ = ["VideoBatch", "VideoLoader", "GPU_PREFETCH_BATCHES", "cpu_decoded", "parse_meta", "prepare_sample"]

log = logging.getLogger("carl_scale.data")

# finished batches queued on the GPU; with the ones being made (one per finishing thread), the one
# handed over and the one before it (kept by __iter__ to stand in for batches at the epoch's end
# whose videos all fail to decode), up to max(GPU_PREFETCH_BATCHES, N) + N + 2 batches of
# B x 2T x 3 x S^2 views are alive at once with N finishing threads (each lane's queue holds
# ceil(GPU_PREFETCH_BATCHES / N): N of them hold max(2, N) at this depth)
GPU_PREFETCH_BATCHES = 2

# What a saved data position means: 2 since batches were dealt without a video twice and epochs
# rounded to whole rounds over the workers (a resume from 1 goes on, not exactly)
STATE_FORMAT = 2


def epoch_batches(cfg: LoaderConfig, total: int | None, world_size: int) -> int:
    """Batches per rank in an epoch of ``total`` training samples (None: unknown, no manifest;
    ``--epoch-samples`` then says it), as :class:`VideoLoader` runs them; a split that makes no
    batch is refused."""
    per_rank = cfg.epoch_samples
    if per_rank is None:
        if total is None:
            raise ValueError("shards without a shards.json manifest need --epoch-samples (samples per "
                             "rank per epoch)")
        per_rank = total // world_size
    batches = per_rank // cfg.batch_size
    workers = max(1, cfg.num_workers)
    if cfg.epoch_samples is None and not cfg.resampled and batches >= workers:
        # Workers take turns batch by batch, and their shares of a pass are equal (to a shard,
        # or a sample): a worker owing one batch more than another would read past its share
        # into a second pass (repeats) while the other's last samples go unseen
        batches -= batches % workers
    if batches < 1:
        raise ValueError(f"{per_rank} samples per rank make no batch of {cfg.batch_size}; lower the "
                         f"batch size or use more data")
    return batches


class VideoLoader:
    """Batches of two augmented views per video for one rank; ``len()`` steps per epoch.

    ``finish_in_thread`` (None: on a GPU) finishes batches in :func:`finish_ahead`'s thread;
    ``--finish-in process`` in a child process instead (:mod:`carl_scale.data.finish_process`),
    which builds this loader from the same arguments: the same batches, the state kept here.

    ``state_dict()`` holds the epoch, the next batch and each worker's stream position; a loader
    restored from it yields the batches the original would have yielded next.
    """

    def __init__(self, cfg: LoaderConfig, *, rank: int = 0, world_size: int = 1, split: str = "train",
                 seed: int = 0, device: str = "cpu", decode_in_collate: bool | None = None,
                 views_dtype: torch.dtype = torch.float32):
        """``seed`` fixes the shard order, shuffle and views of every epoch; ``device`` is where
        batches are finished (colour augmentation, and GPU decoding with DALI ``mixed``).
        ``views_dtype``: the batches' views, e.g. bf16 for a model that autocasts to bf16 (its
        first convolution would cast them anyway: the same values in half the memory).
        ``decode_in_collate`` (None: when the decoder is on a GPU) decodes in the finishing step,
        batched, instead of in the workers; ``cfg.cpu_decode_share`` of the videos then still go
        to the workers' CPU decoder (PyAV)."""
        self.cfg, self.seed, self.device, self.views_dtype = cfg, seed, str(device), views_dtype
        self.urls, self.manifest = resolve_shards(cfg.shards, split)
        self.batches_per_epoch = epoch_batches(cfg, manifest_samples(self.manifest, self.urls, split), world_size)
        # a batch's sampled JPEG frames (B x 2T) in one nvJPEG run
        self.decoder = make_decoder(cfg.decoder, codec=manifest_codec(self.manifest), device=self.device,
                                    image_batch=cfg.batch_size * 2 * cfg.temporal.num_frames,
                                    jpeg_hw_load=cfg.nvjpeg_hw_load, jpeg_huffman=cfg.nvjpeg_huffman)
        # CPU decoders run in the DataLoader workers; a GPU decoder runs here, batched, and then
        # the workers may take a share on the CPU (PyAV: no CUDA or DALI state in forked workers)
        self.in_collate = self.decoder.device == "cuda" if decode_in_collate is None else decode_in_collate
        if cfg.cpu_decode_share > 0 and not self.in_collate:
            raise ValueError(f"--cpu-decode-share {cfg.cpu_decode_share} splits decoding between the GPU and the "
                             f"workers, but {self.decoder.name} decodes on the CPU here, in the workers already: "
                             f"drop the flag (or run on a GPU)")
        # auto (None): two where a GPU decodes here (LoaderConfig.finish_threads says why), else one
        n = cfg.finish_threads
        self.finish_threads = n if n is not None else (2 if self.in_collate and self.decoder.device == "cuda" else 1)
        if n is not None and n > 1 and not self.in_collate:
            raise ValueError(f"--finish-threads {n} decodes batches side by side in the training "
                             f"process, but {self.decoder.name} decodes on the CPU here, in the workers already: drop "
                             f"the flag (or run on a GPU)")
        # one decoder per finishing thread: DALI pipelines are not shared between threads (a copy
        # carries the settings, not the pipelines, which each builds at its first batch). They split
        # the host threads, so that N side by side measure concurrency, not more threads.
        self._decoder_threads = getattr(self.decoder, "num_threads", None)  # (before the split below)
        self.decoders = [self.decoder] + [copy.copy(self.decoder) for _ in range(self.finish_threads - 1)]
        for d in self.decoders if self.finish_threads > 1 and isinstance(self.decoder, DaliDecoder) else []:
            d.num_threads = max(1, d.num_threads // self.finish_threads)
        self.cpu_decoder = PyAVDecoder() if self.in_collate and cfg.cpu_decode_share > 0 else None
        # --finish-in process: a child builds this loader from the same arguments and finishes there.
        # auto: there wherever a GPU decodes in the training process (LoaderConfig.finish_in says why)
        self.finish_process = cfg.finish_in == "process" or (
            cfg.finish_in == "auto" and self.in_collate and self.decoder.device == "cuda")
        if self.finish_process and not self.in_collate:
            raise ValueError(f"--finish-in process decodes batches in a process of its own, but {self.decoder.name} "
                             f"decodes on the CPU here, in the workers already: drop the flag (or run on a GPU)")
        self._spec = dict(cfg=dataclasses.replace(cfg, finish_in="thread"), rank=rank, world_size=world_size,
                          split=split, seed=seed, device=self.device, decode_in_collate=self.in_collate,
                          views_dtype=views_dtype)
        self._process: FinishProcess | None = None
        self.counter = SkipCounter()
        self.dataset = ShardedVideoDataset(self.urls, cfg, rank=rank, world_size=world_size,
                                           batches_per_epoch=self.batches_per_epoch,
                                           decoder=None if self.in_collate else self.decoder, counter=self.counter,
                                           seed=seed, cpu_decoder=self.cpu_decoder,
                                           photometric=torch.device(self.device).type == "cpu" and not self.in_collate,
                                           num_workers=cfg.num_workers)
        self._dl: DataLoader | None = None  # made at the first iter(); its workers persist over epochs
        self._ahead: Iterator | None = None  # a GPU run's finishing thread (finish_ahead), while one runs
        self._current: object | None = None  # the newest iterator's token: an older one, resumed, yields nothing
        self.finish_in_thread: bool | None = None
        # a list: each finished batch appends (host seconds of its finishing, and on a GPU the two
        # CUDA events around its work on the finishing stream); for benchmarks, None otherwise
        self.finish_times: list | None = None
        self.epoch, self.next_batch = 0, 0
        self._skipped = 0  # behind the batches handed over
        self.positions: dict[int, int] = {}  # logical worker -> stream position after its last batch taken

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _in_thread(self) -> bool:
        return self.finish_in_thread if self.finish_in_thread is not None else torch.device(self.device).type == "cuda"

    def describe(self) -> str:
        """The data path this loader chose, in one line (the trainer logs it)."""
        views = "" if self.views_dtype == torch.float32 else f"; views in {str(self.views_dtype).split('.')[-1]}"
        return self._describe_path() + views

    def _describe_path(self) -> str:
        what = manifest_codec(self.manifest) or "video of unknown codec"
        dec = self.decoder
        if self.in_collate:
            engine = (f" ({dec.jpeg_engine()})" if what == "jpeg" else " (NVDEC)") if dec.device == "cuda" else ""
            share = self.cfg.cpu_decode_share
            split = f"{100 * (1 - share):.0f}% of the videos " if share > 0 else ""
            cpu = f", {100 * share:.0f}% by PyAV in the workers" if share > 0 else ""
            threaded = self._in_thread() or self.finish_process
            n = self.finish_threads if threaded else 1
            lanes = "a background thread" if n == 1 else f"{n} background threads side by side (a decoder each)"
            ahead = f" in {lanes}, {max(n, GPU_PREFETCH_BATCHES)} batches ahead" if threaded else ""
            if self.finish_process:
                ipc = ", handed over through CUDA IPC and copied here up to two batches ahead"
                ahead += f" in a process of its own (--finish-in {self.cfg.finish_in})"
                ahead += ipc if dec.device == "cuda" else ""
            return (f"{what}: {split}decoded by {dec.name} on {self.device}{engine}{cpu}, crops and colour on "
                    f"{self.device}{ahead}; {self.cfg.num_workers} workers read and sample")
        where = "the GPU" if torch.device(self.device).type == "cuda" else "the workers"
        return (f"{what} decoded by {dec.name} ({dec.device}) in {self.cfg.num_workers} workers, crops there, "
                f"colour in {where}")

    def batches_ahead(self) -> int:
        """At most how many batches this loader holds ready or in the making ahead of its consumer
        once its buffers are full: the workers' prefetch (2 each); each finishing lane's inbox (2),
        its finished batches and the one it makes; the one the reader thread holds; with a
        finishing process, the one its sending loop holds, its result queue, the one being received
        here and the hand-over. Benchmarks take this many batches without a step before timing, so
        that the batches made while the step compiled are not counted as the loader's speed
        (``bench.e2e``)."""
        ahead = 2 * self.cfg.num_workers
        if self._in_thread() or self.finish_process:
            lanes = self.finish_threads
            ahead += lanes * (2 + math.ceil(GPU_PREFETCH_BATCHES / lanes) + 1) + 1
        return ahead + (4 if self.finish_process else 0)

    @property
    def skipped(self) -> int:
        """Samples skipped behind the batches handed over (and before a resume, those behind the
        batches the checkpoint's loader had handed over): those that failed, each once. With
        ``--per-label``, a group one of whose videos failed is dropped whole; its other videos, which
        did not fail, are not counted."""
        return self._skipped

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.next_batch, self.positions = epoch, 0, {}

    def state_dict(self) -> dict:
        """Where the next batch comes from: the epoch, the batch index, and per worker how many
        samples of its stream are behind it. Failed samples make a worker read more samples than
        it yields, so the positions (not ``next_batch x batch_size``) make a resume exact."""
        return {"epoch": self.epoch, "next_batch": self.next_batch, "skipped": self.skipped,
                "positions": dict(self.positions), "format": STATE_FORMAT}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("format", 1)) < STATE_FORMAT:
            log.warning("this checkpoint's data position was saved by an older reader, which dealt batches "
                        "otherwise (before 2026-11-28: epochs not rounded to the workers, a video could repeat "
                        "within a batch, resampled shards drawn otherwise): the run goes on from its epoch and "
                        "batch, but not with the batches an uninterrupted run would have had")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
        self._skipped = int(state.get("skipped", 0))
        # a state from before positions were kept resumes as it was written: whole batches
        self.positions = {int(w): int(p) for w, p in state.get("positions", {}).items()}

    def _finish(self, wb: WorkerBatch, decoder: FrameDecoder, stand_ins: StandIns) -> VideoBatch | None:
        times = self.finish_times  # read once: a benchmark may stop timing while this runs
        cuda = times is not None and torch.device(self.device).type == "cuda"
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if cuda else [None, None]
        t0 = time.perf_counter()
        if cuda:
            events[0].record()
        out = collate(wb.samples, self.cfg, decoder, self.device, self.views_dtype, stand_ins)
        # the slot travels on with the batch (its worker, resume point, skips): not its samples, whose
        # crops (on a GPU, B x 2T frames of uint8) and payloads would stay alive beside the views
        wb.samples = []
        wb.skipped += stand_ins.counter.take()  # counted with the batch, when it is taken
        if cuda:
            events[1].record()
        if times is not None:
            times.append((time.perf_counter() - t0, *events))
        return out

    def finished_stream(self, epoch: int, next_batch: int, positions: dict[int, int]) -> tuple[Iterator, Iterator | None]:
        """The workers' batches from the given start, each finished: ``(slot, batch)`` in order
        (``batch`` None where none of its videos decoded), and the generator of the threads that
        finish them (None where this thread does), which closing stops. Workers are started at the
        first call and kept."""
        self.dataset.set_start(epoch, next_batch, positions)
        workers = self.cfg.num_workers  # fixed: the shard split depends on it
        if self._dl is None:
            # Workers are forked once and kept (persistent_workers): re-forking a training process
            # every epoch, after CUDA and the process group are up, is slow and fragile. Its own
            # generator: a DataLoader iterator otherwise draws its base seed from the global torch
            # RNG, so a resumed run (new iterator mid-epoch) would shift every later dropout mask.
            # Garbage collected first, here: freed in a forked worker, the cyclic garbage of an
            # earlier compiled run in this process (a test session, a benchmark's rows)
            # crashed it with a segmentation fault (tests/test_reader.py)
            gc.collect()
            # (the workers ignore a scheduler's stop signal: their rank writes a checkpoint first)
            self._dl = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                                  generator=torch.Generator().manual_seed(self.seed),
                                  multiprocessing_context="fork" if workers > 0 else None,
                                  persistent_workers=workers > 0, prefetch_factor=2 if workers > 0 else None,
                                  worker_init_fn=ignore_stop_signals if workers > 0 else None)
        dl = self._dl
        if self._in_thread():
            # decoding and augmentation on the GPU overlap the step: threads on CUDA streams of their own
            lanes = [functools.partial(self._finish, decoder=d, stand_ins=StandIns()) for d in self.decoders]
            ahead = finish_ahead(dl, lanes, GPU_PREFETCH_BATCHES, torch.device(self.device))
            return ahead, ahead
        # the workers did the work; what is left here is a stack
        if self.cfg.finish_threads is not None and self.cfg.finish_threads > 1:
            raise ValueError(f"--finish-threads {self.cfg.finish_threads} needs the batches finished in "
                             f"background threads (finish_in_thread), which this loader was told not to do")
        if len(self.decoders) > 1:  # auto chose lanes this loader was then told not to use: one decoder, whole
            self.decoders = [self.decoder]
            self.decoder.num_threads = self._decoder_threads
        stand_ins = StandIns()
        return ((wb, self._finish(wb, self.decoder, stand_ins)) for wb in dl), None

    def _received(self, ahead: Iterator) -> Iterator[tuple[WorkerBatch, VideoBatch | None]]:
        for slot, batch, seconds in ahead:
            times = self.finish_times
            if times is not None:  # the child's host seconds (its CUDA events stay there)
                times.append((seconds, None, None))
            yield slot, batch

    def __iter__(self) -> Iterator[VideoBatch]:
        if self._ahead is not None:  # an earlier iterator's threads: one reader of the workers at a time
            self._ahead.close()
            self._ahead = None
        if self.finish_process:
            if self._process is not None and self._process.broken:  # (its failure was raised): a new one
                self._process.close()
                self._process = None
            if self._process is None:
                self._process = FinishProcess(type(self), self._spec, torch.device(self.device))
            ahead = self._process.batches(self.epoch, self.next_batch, self.positions)
            finished = self._received(ahead)
        else:
            finished, ahead = self.finished_stream(self.epoch, self.next_batch, self.positions)
        self._ahead = ahead
        # Only the newest iterator takes batches: on the CPU every iterator reads the one persistent
        # DataLoader iterator, so an older one resumed would take (and count) the newer one's batches,
        # and one resumed after close() would read the shut-down stream's end as its epoch's end
        token = self._current = object()

        def taken(slot: WorkerBatch) -> None:  # a slot's batch handed over: where a resume goes on
            self.next_batch += 1
            self.positions[slot.worker] = slot.resume_at
            self._skipped += slot.skipped

        last, owed = None, []
        try:
            for wb, batch in finished:
                if batch is None:  # none of its videos decoded: the next good batch stands in
                    owed.append(wb)
                    continue
                for slot in [*owed, wb]:  # each slot taken in turn: a state saved between them resumes exactly
                    taken(slot)
                    yield batch
                    if self._current is not token:  # resumed stale: read nothing more
                        return
                last, owed = batch, []
            # unless close() (or a newer iterator) stopped it mid-epoch
            ended = self._current is token and (ahead is None or self._ahead is ahead)
            if owed and ended:  # the epoch's last batches: the last good one stands in
                if last is None:
                    raise ValueError(f"no video of the last {len(owed)} batches of this epoch decoded, so none can "
                                     f"stand in for them (see the warnings above): remove the damaged shards, or "
                                     f"resume from an earlier checkpoint")
                for slot in owed:
                    taken(slot)
                    yield last
                    if self._current is not token:
                        return
        finally:  # also when the consumer stops early: no thread left holding batches on the GPU
            if ahead is not None:
                ahead.close()
                if self._ahead is ahead:
                    self._ahead = None
        if ended:
            self.epoch, self.next_batch, self.positions = self.epoch + 1, 0, {}

    def close(self) -> None:
        """Stop the worker processes now (they hold prefetched batches), and the finishing process
        where there is one; the next ``iter()`` starts new ones."""
        self._current = None  # an iterator of before ends where it is, its epoch not ended
        if self._ahead is not None:  # stop the finishing thread first: it reads from the workers
            self._ahead.close()
            self._ahead = None
        if self._process is not None:
            self._process.close()
            self._process = None
        it = self._dl._iterator if self._dl is not None else None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        self._dl = None
