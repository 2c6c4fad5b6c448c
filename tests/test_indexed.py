"""Samples from a shard's index, payloads read when dealt (carl_scale.data.indexed): the same
samples as WebDataset's reader, a resume that reads no payload before its batch, and WebDataset
wherever the index cannot stand in for the tar."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from carl_scale.bench.resume import bytes_read
from carl_scale.data import indexed
from carl_scale.data.indexed import LazySample, index_path, indexed_samples, samples_of
from carl_scale.data.config import TemporalConfig
from carl_scale.data.manifest import resolve_shards
from carl_scale.data.reader import VideoLoader
from loader_helpers import loader_cfg


def _webdataset(urls):
    return list(wds.tarfile_to_samples()([dict(url=u) for u in urls]))


@pytest.mark.parametrize("payload", ["video", "jpeg"])
def test_indexed_samples_are_webdatasets_samples(vp9_shards, jpeg_shards, payload, monkeypatch):
    """Same keys, URLs and field bytes, in the same order, over every shard of the split; nothing
    of a sample is read until one of its fields is used: the metadata alone, or the payload and
    everything left (the tiny test videos are "small" at the default 64 KiB: 2 KiB here)."""
    monkeypatch.setattr(indexed, "SMALL", 2048)
    urls, _ = resolve_shards(str(vp9_shards if payload == "video" else jpeg_shards), "train")
    ours = list(samples_of(urls, _webdataset))
    assert all(isinstance(s, LazySample) and not s.loaded for s in ours)
    assert [(s["__key__"], s.get("__url__")) for s in ours] == [(s["__key__"], s["__url__"]) for s in _webdataset(urls)]
    assert not any(s.loaded for s in ours)  # (the key and URL are not the tar's bytes)
    first, payload = ours[0], "video" if payload == "video" else "jpgs"
    assert "json" in first and first.get("json") is not None and not first.loaded  # the metadata alone
    assert first[payload] is not None and first.loaded  # the payload, and whatever was left
    assert dict(ours[1].items()) == _webdataset(urls)[1]
    assert dict(ours[2]) == _webdataset(urls)[2] and ours[3].copy() == _webdataset(urls)[3]  # (never placeholders)
    assert ours[4] == _webdataset(urls)[4] and not ours[5] != _webdataset(urls)[5] and ours[6] != _webdataset(urls)[4]
    assert [dict(s.items()) for s in ours] == _webdataset(urls)
    again = list(samples_of(urls, _webdataset))
    assert again[7].pop("json") == _webdataset(urls)[7]["json"] and "json" not in again[7]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/io")
@pytest.mark.parametrize("per_label", [0, 2])
def test_a_resume_reads_no_payload_before_its_batch(jpeg_shards, tmp_path, per_label, monkeypatch):
    """Resumed at the last batch of the epoch, the replay up to it reads the indexes (and with
    --per-label the metadata, which the grouping deals by) and the payloads of that batch alone: a
    fraction of the bytes WebDataset's replay reads (the same shards without their indexes), with
    the same batches as the uninterrupted epoch."""
    monkeypatch.setattr(indexed, "SMALL", 2048)  # (the tiny test videos' payloads: tens of KiB)
    plain = tmp_path / "plain"
    shutil.copytree(jpeg_shards, plain)
    for idx in plain.glob("*.idx"):
        idx.unlink()
    cfg = dict(batch_size=2, per_label=2, epoch_samples=16) if per_label else dict(batch_size=1)
    full = list(VideoLoader(loader_cfg(jpeg_shards, **cfg)))
    it = iter(first := VideoLoader(loader_cfg(jpeg_shards, **cfg)))
    for _ in range(len(full) - 1):
        next(it)
    state = first.state_dict()

    def resumed(shards):
        loader = VideoLoader(loader_cfg(shards, **cfg))
        loader.load_state_dict(state)
        before = bytes_read()
        batches = list(loader)
        return batches, bytes_read() - before

    (with_index, read), (without, read_all) = resumed(jpeg_shards), resumed(plain)
    assert [b.video_ids for b in with_index] == [b.video_ids for b in without] == [b.video_ids for b in full[-1:]]
    assert torch.equal(with_index[0].views, full[-1].views) and len(full) > 3
    assert read < read_all / 3, (read, read_all)


def test_a_dealt_sample_is_one_unbuffered_read_or_two(jpeg_shards, monkeypatch):
    """Each prepared sample is read in one read of its members, or where its JPEG payload is large
    (over SMALL: here 2 KiB, so every one) in two: its metadata, then the views' frames (close
    together: one read); the only other reads are headers and a shard's end, 512 bytes each."""
    monkeypatch.setattr(indexed, "SMALL", 2048)
    calls = []
    real = indexed.read_at

    def counted(fd, offset, size):
        calls.append(size)
        return real(fd, offset, size)

    monkeypatch.setattr(indexed, "read_at", counted)
    batches = list(VideoLoader(loader_cfg(jpeg_shards, batch_size=1)))
    assert sum(1 for size in calls if size > 512) == 2 * len(batches) == 16
    assert all(size == 512 for size in calls if size <= 512)


@pytest.mark.parametrize("decoder", ["pyav", "dali", None])
@pytest.mark.parametrize("small,gap", [(2048, 1 << 20), (256, 0)])
def test_a_jpeg_payload_is_read_as_far_as_the_views_need_and_gives_the_same_batches(jpeg_shards, monkeypatch,
                                                                                      decoder, small, gap):
    """The views' frames of an indexed JPEG payload (the tiny test payloads count as large here:
    SMALL 2 KiB) are read in ranges, frames close together in one read; the prepared samples equal
    those from the whole payload: the same views decoded by PyAV or DALI in the worker, or the same
    cut payload handed to a GPU's finishing step (decoder None). SMALL 256, MERGE_GAP 0: an offset
    table larger than SMALL (a video of 8,192 frames or more at the default), each run of adjacent
    frames a read of its own."""
    from carl_scale.data.decoders import make_decoder
    from carl_scale.data.stream import prepare_sample

    monkeypatch.setattr(indexed, "SMALL", small)
    monkeypatch.setattr(indexed, "MERGE_GAP", gap)
    cfg = loader_cfg(jpeg_shards, temporal=TemporalConfig(num_frames=4))
    dec = None if decoder is None else make_decoder(decoder, device="cpu")
    urls, _ = resolve_shards(str(jpeg_shards), "train")
    whole, ranges = 0, []
    real = LazySample.read_ranges

    def counted(self, name, wanted):
        ranges.extend(wanted)
        return real(self, name, wanted)

    monkeypatch.setattr(LazySample, "read_ranges", counted)
    for lazy, plain in zip(samples_of(urls, _webdataset), _webdataset(urls)):
        ours, theirs = (prepare_sample(s, cfg, 0, 0, dec, seed=3) for s in (lazy, plain))
        assert "jpgs" not in lazy or lazy.unread_size("jpgs")  # (the payload left unread as a field)
        assert np.array_equal(ours.timestamps, theirs.timestamps)
        if decoder is None:
            assert ours.encoded.data == theirs.encoded.data and np.array_equal(ours.encoded.offsets,
                                                                              theirs.encoded.offsets)
            assert np.array_equal(ours.encoded.frame_ids, theirs.encoded.frame_ids)
        else:
            assert torch.equal(ours.views, theirs.views)
        whole += len(plain["jpgs"])
    assert 0 < sum(b - a for a, b in ranges) < whole / 2  # 2 views x 4 of 40-100 frames


def test_an_epoch_in_two_workers_is_the_same_through_the_indexes_as_from_the_tars(jpeg_shards, tmp_path,
                                                                                   monkeypatch):
    """The loader's whole epoch, 2 worker processes, DALI decoding the JPEG frames the workers read
    as far as the views need (SMALL 2 KiB: every test payload counts as large), against the same
    shards without their indexes: the same batches, pixel for pixel."""
    monkeypatch.setattr(indexed, "SMALL", 2048)  # (the workers are forked: they inherit it)
    plain = tmp_path / "plain"
    shutil.copytree(jpeg_shards, plain)
    for idx in plain.glob("*.idx"):
        idx.unlink()
    a, b = (list(VideoLoader(loader_cfg(shards, num_workers=2, decoder="dali"))) for shards in (jpeg_shards, plain))
    assert [x.video_ids for x in a] == [y.video_ids for y in b] and len(a) == 4
    assert all(torch.equal(x.views, y.views) and torch.equal(x.timestamps, y.timestamps) for x, y in zip(a, b))


def test_the_index_stands_in_only_where_webdataset_would_read_the_same(jpeg_shards, tmp_path):
    """No index, a URL that is no local file, an index of another version, names WebDataset reads
    otherwise (a second key in one line, a member it skips), a tar shorter than its index: None,
    and the loader reads those shards with WebDataset (damage counted as before)."""
    urls, _ = resolve_shards(str(jpeg_shards), "train")
    src = urls[0]
    assert indexed_samples(src) is not None
    assert indexed_samples("pipe:cat " + src) is None and indexed_samples("s3://bucket/train-000000.tar") is None
    work = tmp_path / "train-000000.tar"
    shutil.copy(src, work)
    assert indexed_samples(str(work)) is None  # no index beside it
    text = index_path(src).read_text()
    lines = text.splitlines()

    def with_index(content: str):
        index_path(str(work)).write_text(content)
        return indexed_samples(str(work))

    assert len(with_index(text)) == len(lines) - 1
    assert with_index(text.replace("v1.2", "v1.1", 1)) is None
    assert with_index(f"v1.2 {len(lines)}\n" + "\n".join(lines[1:]) + "\n") is None  # a count that disagrees
    first_key = lines[1].split()[3].split(".")[0]
    assert with_index(text.replace(f" {first_key}.json", " another.json", 1)) is None
    assert with_index("v1.2 0\n") is None  # (an index of nothing beside a tar of something)
    assert with_index(text.replace(" 512 ", " ５１２ ", 1)) is None  # (digits, but not ASCII ones)
    sample = lines[1].split()
    assert with_index("\n".join([f"v1.2 {len(lines) - 2}"] + lines[1:-1]) + "\n") is None  # its last sample unlisted
    assert with_index("\n".join([lines[0], " ".join(sample[:8] + sample[12:])] + lines[2:]) + "\n") is None  # a member
    assert with_index(text.replace(f" {first_key}.json", " __meta__.json", 1)) is None
    assert with_index("v1.2 2\n" + lines[1] + "\n" + lines[1] + "\n") is None  # one key twice in a row
    # a tar cut short: WebDataset reads its first samples and counts the damage, the index would not stop
    with open(work, "r+b") as f:
        f.truncate(work.stat().st_size // 2)
    assert with_index(text) is None
    got = list(samples_of([str(work)], lambda us: wds.tarfile_to_samples(handler=wds.warn_and_continue)(
        [dict(url=u) for u in us])))
    assert 0 < len(got) < len(lines) - 1 and not any(isinstance(s, LazySample) for s in got)


def test_an_index_older_than_its_shard_never_hands_out_another_members_bytes(jpeg_shards, tmp_path):
    """A shard written again beside its old index: another shard's index (other members, other
    offsets) is refused, and the tar is read; an index off in one member only (its size a byte
    longer, the layout otherwise the same, as a rewritten video's metadata may be) is caught when
    that sample is read: OSError naming the index, never bytes of the tar as that member's."""
    urls, _ = resolve_shards(str(jpeg_shards), "train")
    a = tmp_path / "a.tar"
    shutil.copy(urls[0], a)
    shutil.copy(index_path(urls[1]), index_path(str(a)))  # another shard's index beside it
    assert indexed_samples(str(a)) is None
    lines = index_path(urls[0]).read_text().splitlines()
    parts = lines[1].split()  # the first sample: jpgs, jpgofs, json, nframes
    size = int(parts[parts.index("json") + 2])
    assert size % 512 not in (0, 511)  # (a byte more stays within the member's last block)
    parts[parts.index("json") + 2] = str(size + 1)
    index_path(str(a)).write_text("\n".join([lines[0], " ".join(parts)] + lines[2:]) + "\n")
    samples = indexed_samples(str(a))
    assert samples is not None  # (the layout and the ends agree)
    with pytest.raises(OSError, match=f"a.tar: the tar holds no .*json.* of {size + 1} bytes .* an index older than"):
        samples[0]["json"]
    assert samples[1]["json"] == _webdataset([str(a)])[1]["json"]
    # the second sample's frames member off by a byte (the file's first and last members are
    # checked up front): caught reading the views' frames, by their member's header
    parts = lines[2].split()
    size = int(parts[parts.index("jpgs") + 2])
    assert size % 512 not in (0, 511)
    parts[parts.index("jpgs") + 2] = str(size + 1)
    index_path(str(a)).write_text("\n".join(lines[:2] + [" ".join(parts)] + lines[3:]) + "\n")
    samples = indexed_samples(str(a))
    assert samples is not None
    with pytest.raises(OSError, match=f"the tar holds no .*jpgs.* of {size + 1} bytes"):
        samples[1].read_ranges("jpgs", [(0, 10), (size - 10, size)])


def test_the_loader_counts_a_sample_its_index_misreads_and_goes_on(jpeg_shards, tmp_path):
    """The OSError of a sample whose index disagrees with its tar is a damaged sample: counted,
    stood in for by the next, the epoch goes on."""
    shards = tmp_path / "shards"
    shutil.copytree(jpeg_shards, shards)
    idx = sorted(shards.glob("train-*.idx"))[0]
    lines = idx.read_text().splitlines()
    parts = lines[1].split()
    parts[parts.index("json") + 2] = str(int(parts[parts.index("json") + 2]) + 1)
    idx.write_text("\n".join([lines[0], " ".join(parts)] + lines[2:]) + "\n")
    loader = VideoLoader(loader_cfg(shards, batch_size=1))
    ids = [v for b in loader for v in b.video_ids]
    bad = parts[3].split(".")[0]
    assert loader.skipped >= 1 and len(ids) == len(loader) and bad not in ids  # (the next pass's first stands in)
    assert set(ids) == {f"synthetic_train_{i:06d}" for i in range(8)} - {bad}


def test_a_shard_changed_after_its_index_is_a_damaged_sample_not_a_crash(jpeg_shards, tmp_path):
    """A sample whose bytes are gone by the time it is dealt raises OSError naming the shard (the
    loader counts it as a damaged sample, as it counts any failed sample)."""
    urls, _ = resolve_shards(str(jpeg_shards), "train")
    work = tmp_path / "train-000000.tar"
    shutil.copy(urls[0], work)
    shutil.copy(index_path(urls[0]), index_path(str(work)))
    samples = indexed_samples(str(work))
    with open(work, "r+b") as f:
        f.truncate(1024)
    with pytest.raises(OSError, match="train-000000.tar: .* bytes expected at offset .* read \\(the shard changed"):
        samples[-1]["json"]
    assert indexed.INDEX_VERSION == "v1.2"
