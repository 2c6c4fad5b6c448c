"""Batches that hold videos of the same label: what the paired contrastive loss pairs.

:class:`LabelGrouper` deals a stream of samples into batches of ``batch_size // per_label`` groups
of ``per_label`` videos sharing a video-level label, in stream order: a group is complete when its
label has ``per_label`` pending videos, and a batch is the first complete groups. It holds at most
``held`` videos: past that, the oldest pending ones (and videos without a label) are dealt into
mixed groups, so a rare label never stalls the stream. The grouping is a pure function of the
stream, which is what keeps a resumed run exact: the reader replays it from the samples' metadata
without decoding a frame. A group whose member cannot be decoded is dropped whole (the member is
counted as skipped), so batches stay made of groups; a resume is exact all the same (the reader
keeps each worker's stream position, failures included). With many classes (FineGym's 99),
raise the shuffle buffer: ``held`` is the larger of it and 4 batches, and a label needs a second
video within that window to be paired.

No batch holds one video twice. Held videos carry over from one pass over the data to the next,
so with a share of the data no larger than ``held`` a video would meet its own next-pass copy
(and a resampled shard drawn twice its own copy in one pass): same label, so the paired loss would
take the video for its own "other video of the label", a trivial positive. A copy of a held video
waits until its first copy has left in a batch; only a share with fewer distinct videos than a
batch, where waiting cannot help, lets copies in once ``held`` of them wait.
"""

from __future__ import annotations

from typing import Any


class LabelGrouper:
    def __init__(self, batch_size: int, per_label: int, held: int):
        if per_label < 2 or batch_size % per_label:
            raise ValueError(f"per_label must be >= 2 and divide batch_size {batch_size}, got {per_label}")
        self.k, self.groups = per_label, batch_size // per_label
        self.held = max(held, batch_size)
        # held samples as (item, ident) entries
        self.pending: dict[int, list[tuple[int, tuple]]] = {}  # label -> [(arrival, entry)], < k of them
        self.complete: list[list[tuple]] = []  # groups of k entries, in the order they completed
        self.filler: list[tuple] = []  # a mixed group being dealt from the oldest held videos
        self.waiting: list[tuple[Any, int, Any]] = []  # (item, label, ident): copies of held videos
        self.idents: dict[Any, int] = {}  # ident -> held samples with it (1 unless a copy was let in)
        self.seq = 0

    def _count(self) -> int:
        return (sum(map(len, self.pending.values())) + self.k * len(self.complete) + len(self.filler)
                + len(self.waiting))

    def add(self, item: Any, label: int, ident: Any = None) -> list[list[Any]]:
        """Take one sample (label < 0: none; ``ident`` names its video, None: never a copy);
        return the batches it completes (usually none)."""
        self.waiting.append((item, label, ident))
        batches: list[list[Any]] = []
        while True:
            admitted = self._admit()
            while self._count() > self.held and self.pending:
                oldest = min(self.pending, key=lambda k: self.pending[k][0][0])
                self.filler.append(self.pending[oldest].pop(0)[1])
                if not self.pending[oldest]:
                    del self.pending[oldest]
                if len(self.filler) == self.k:
                    self.complete.append(self.filler)
                    self.filler = []
            dealt = len(batches)
            while len(self.complete) >= self.groups:
                batch = [entry for group in self.complete[: self.groups] for entry in group]
                self.complete = self.complete[self.groups:]
                for _, ident in batch:
                    if ident is not None:
                        self.idents[ident] -= 1
                        if not self.idents[ident]:
                            del self.idents[ident]
                batches.append([item for item, _ in batch])
            if not admitted and not (len(batches) > dealt and self.waiting):
                return batches

    def _admit(self) -> bool:
        """Hold the waiting samples whose video is not held, in arrival order (and the oldest
        past ``held`` waiting ones in any case: a share too small to avoid copies); whether any was."""
        keep, taken = [], False
        for n, (item, label, ident) in enumerate(self.waiting):
            if ident is not None and ident in self.idents and len(self.waiting) - n <= self.held:
                keep.append((item, label, ident))
                continue
            taken = True
            if ident is not None:
                self.idents[ident] = self.idents.get(ident, 0) + 1
            self.seq += 1
            key = label if label >= 0 else -self.seq  # an unlabelled video waits alone, to fill a mixed group
            queue = self.pending.setdefault(key, [])
            queue.append((self.seq, (item, ident)))
            if len(queue) == self.k:
                self.complete.append([entry for _, entry in queue])
                del self.pending[key]
        self.waiting = keep
        return taken
