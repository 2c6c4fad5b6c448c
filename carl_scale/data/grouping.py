"""Batches that hold videos of the same label: what the paired contrastive loss pairs.

:class:`LabelGrouper` deals a stream of samples into batches of ``batch_size // per_label`` groups
of ``per_label`` videos sharing a video-level label, in stream order: a group is complete when its
label has ``per_label`` pending videos, and a batch is the first complete groups. It holds at most
``held`` videos: past that, the oldest pending ones (and videos without a label) are dealt into
mixed groups, so a rare label never stalls the stream. The grouping is a pure function of the
stream, which is what keeps a resumed run exact: the reader replays it from the samples' metadata
without decoding a frame. A group whose member cannot be decoded is dropped whole (the member is
counted as skipped), so batches stay made of groups; a resume is then exact as long as no sample
failed before the point it resumes from (as without grouping). With many classes (FineGym's 99),
raise the shuffle buffer: ``held`` is the larger of it and 4 batches, and a label needs a second
video within that window to be paired.
"""

from __future__ import annotations

from typing import Any


class LabelGrouper:
    def __init__(self, batch_size: int, per_label: int, held: int):
        if per_label < 2 or batch_size % per_label:
            raise ValueError(f"per_label must be >= 2 and divide batch_size {batch_size}, got {per_label}")
        self.k, self.groups = per_label, batch_size // per_label
        self.held = max(held, batch_size)
        self.pending: dict[int, list[tuple[int, Any]]] = {}  # label -> [(arrival, item)], < k of them
        self.complete: list[list[Any]] = []  # groups of k, in the order they completed
        self.filler: list[Any] = []  # a mixed group being dealt from the oldest held videos
        self.seq = 0

    def _count(self) -> int:
        return sum(map(len, self.pending.values())) + self.k * len(self.complete) + len(self.filler)

    def add(self, item: Any, label: int) -> list[list[Any]]:
        """Take one sample (label < 0: none); return the batches it completes (usually none)."""
        self.seq += 1
        key = label if label >= 0 else -self.seq  # an unlabelled video waits alone, to fill a mixed group
        queue = self.pending.setdefault(key, [])
        queue.append((self.seq, item))
        if len(queue) == self.k:
            self.complete.append([x for _, x in queue])
            del self.pending[key]
        while self._count() > self.held and self.pending:
            oldest = min(self.pending, key=lambda k: self.pending[k][0][0])
            self.filler.append(self.pending[oldest].pop(0)[1])
            if not self.pending[oldest]:
                del self.pending[oldest]
            if len(self.filler) == self.k:
                self.complete.append(self.filler)
                self.filler = []
        batches = []
        while len(self.complete) >= self.groups:
            batches.append([x for group in self.complete[: self.groups] for x in group])
            self.complete = self.complete[self.groups:]
        return batches
