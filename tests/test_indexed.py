"""Samples from a shard's index, payloads read when dealt (carl_scale.data.indexed): the same
samples as WebDataset's reader, a resume that reads no payload before its batch, and WebDataset
wherever the index cannot stand in for the tar."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import webdataset as wds

from carl_scale.data import indexed
from carl_scale.data.indexed import LazySample, index_path, indexed_samples, samples_of
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
    assert [dict(s.items()) for s in ours] == _webdataset(urls)


def _bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


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
        before = _bytes_read()
        batches = list(loader)
        return batches, _bytes_read() - before

    (with_index, read), (without, read_all) = resumed(jpeg_shards), resumed(plain)
    assert [b.video_ids for b in with_index] == [b.video_ids for b in without] == [b.video_ids for b in full[-1:]]
    assert torch.equal(with_index[0].views, full[-1].views) and len(full) > 3
    assert read < read_all / 3, (read, read_all)


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
    """A shard written again (another layout) beside its old index: the first and last members'
    headers disagree, so the tar is read; an index wrong in the middle only (a member pointed at
    another's data) is caught when that sample is read: OSError naming the index, never the other
    member's bytes as this one's."""
    urls, _ = resolve_shards(str(jpeg_shards), "train")
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    shutil.copy(urls[0], a)
    shutil.copy(urls[1], b)
    shutil.copy(index_path(urls[1]), index_path(str(a)))  # another shard's index beside it
    assert indexed_samples(str(a)) is None
    shutil.copy(index_path(urls[0]), index_path(str(a)))
    lines = index_path(str(a)).read_text().splitlines()
    parts = lines[1].split()  # the first sample: jpgs, jpgofs, json, nframes
    json_at = parts.index("json")
    other = lines[2].split()
    parts[json_at + 1] = other[other.index("json") + 1]  # its json at the second sample's json
    parts[json_at + 2] = other[other.index("json") + 2]
    index_path(str(a)).write_text("\n".join([lines[0], " ".join(parts)] + lines[2:]) + "\n")
    samples = indexed_samples(str(a))
    assert samples is not None  # (the ends agree)
    with pytest.raises(OSError, match="a.tar: the tar holds no .*json.* an index older than its shard"):
        samples[0]["json"]
    assert samples[1]["json"] == _webdataset([str(a)])[1]["json"]


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
    with pytest.raises(OSError, match="train-000000.tar: .* bytes expected"):
        samples[-1]["json"]
    assert indexed.INDEX_VERSION == "v1.2"
