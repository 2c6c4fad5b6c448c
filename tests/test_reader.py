"""The WebDataset reader: splitting, determinism, resume, corrupt data, both payloads, both decoders
(the finishing step's threads and process: tests/test_finishing.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tarfile

import pytest
import torch

from carl_scale.config import ConfigError
from carl_scale.data.manifest import read_manifest, resolve_shards
from carl_scale.data.reader import VideoLoader
from carl_scale.datasets.synthetic import render_video
from loader_helpers import corrupt_shard, loader_cfg, loader_ids


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_and_workers_partition_the_data(vp9_shards, tiny_cfg, workers):
    """4 shards, 2 ranks x (1 or 2) workers: every sample exactly once per epoch, same step count."""
    seen, steps = [], []
    for rank in range(2):
        loader = VideoLoader(loader_cfg(vp9_shards, num_workers=workers), rank=rank, world_size=2)
        ids = loader_ids(loader)
        steps.append(len(ids) // 2)
        seen += ids
    assert steps[0] == steps[1] == tiny_cfg.train_videos // 2 // 2
    assert sorted(seen) == sorted(f"synthetic_train_{i:06d}" for i in range(tiny_cfg.train_videos))


def test_uneven_split_still_gives_every_rank_the_same_steps(vp9_shards):
    """3 ranks over 4 shards: ranks wrap around so that all run len(loader) steps."""
    lens = []
    for rank in range(3):
        loader = VideoLoader(loader_cfg(vp9_shards, batch_size=1), rank=rank, world_size=3)
        lens.append((len(loader), len(loader_ids(loader))))
    assert len({n for n, _ in lens}) == 1 and all(n == got for n, got in lens)


def test_an_epoch_is_whole_rounds_over_the_workers_so_no_worker_wraps_into_repeats(vp9_shards):
    """8 videos, batch 1, 3 workers: 8 batches would give two workers a third turn, reading past
    their share of two videos into a second pass (repeats, while the first worker's last videos
    went unseen); 6 batches keep every video of the epoch distinct."""
    loader = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=3))
    ids = loader_ids(loader)
    assert len(loader) == len(ids) == 6 and len(set(ids)) == 6


def test_a_batch_never_holds_one_video_twice_where_a_pass_ends(tmp_path, monkeypatch):
    """4 shards of 3 videos, 2 workers, batch 4: a worker's pass ends with a partial batch that
    the next pass completes, and that pass may begin with the same videos. Metadata-only shards
    (no decoder: the collate would decode)."""
    import types

    from carl_scale.data import stream
    from carl_scale.data.batch import SkipCounter

    urls = []
    for s in range(4):
        urls.append(str(tmp_path / f"s{s}.tar"))
        with tarfile.open(urls[-1], "w") as tf:
            for i in range(3):
                meta = {"num_frames": 30, "phase_labels": [0] * 30, "height": 64, "width": 64,
                        "video_id": f"v{s}_{i}", "action_label": 0}
                for ext, data in (("json", json.dumps(meta).encode()), ("video", b"x")):
                    info = tarfile.TarInfo(f"v{s}_{i}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    cfg = loader_cfg(urls, batch_size=4, num_workers=2, temporal=loader_cfg(urls).temporal.__class__(num_frames=8))
    batches = 0
    for seed in range(20):
        ds = stream.ShardedVideoDataset(urls, cfg, rank=0, world_size=1, batches_per_epoch=6, decoder=None,
                                        counter=SkipCounter(), seed=seed, photometric=False, num_workers=2)
        for w in range(2):
            monkeypatch.setattr(stream, "get_worker_info", lambda w=w: types.SimpleNamespace(id=w, num_workers=2))
            for wb in ds:
                keys = [s.key for s in wb.samples]
                assert len(set(keys)) == len(keys) == 4, keys
                batches += 1
    assert batches == 20 * 6


def test_ffmpegs_out_of_memory_error_is_a_damaged_video_and_the_process_running_out_is_not(vp9_shards, monkeypatch):
    """PyAV's MemoryError (FFmpeg's ENOMEM, which damaged streams give too) subclasses Python's:
    the video is skipped and counted; Python's own MemoryError stops the run instead of being
    counted against every video after it."""
    import av

    from carl_scale.data import stream
    from carl_scale.errors import out_of_memory

    assert out_of_memory(MemoryError()) and not out_of_memory(av.error.MemoryError(12, "Cannot allocate memory"))
    real, calls = stream.prepare_sample, []

    def failing(error):
        def prepare(sample, *a, **k):
            calls.append(1)
            if len(calls) == 1:
                raise error
            return real(sample, *a, **k)
        return prepare

    monkeypatch.setattr(stream, "prepare_sample", failing(av.error.MemoryError(12, "Cannot allocate memory")))
    loader = VideoLoader(loader_cfg(vp9_shards))
    next(iter(loader))
    assert loader.skipped == 1
    calls.clear()
    monkeypatch.setattr(stream, "prepare_sample", failing(MemoryError()))
    with pytest.raises(MemoryError):
        next(iter(VideoLoader(loader_cfg(vp9_shards))))


def test_batch_contents(vp9_shards, tiny_cfg):
    """A batch's views, timestamps and labels; the workers fork with no cyclic garbage pending
    (freed in a forked worker, an earlier compiled run's crashed it with a segmentation fault)."""
    import gc
    import weakref

    class Cycle:
        pass

    pending = Cycle()
    pending.me = pending
    gone = weakref.ref(pending)
    del pending
    loader = VideoLoader(loader_cfg(vp9_shards, num_workers=1))
    assert gone() is not None and gc.isenabled()
    batch = next(iter(loader))
    assert gone() is None  # collected here, before the workers forked
    assert batch.views.shape == (2, 2, 12, 3, 32, 32) and batch.views.dtype == torch.float32
    assert batch.timestamps.shape == batch.mask.shape == batch.phase_labels.shape == (2, 2, 12)
    for b, vid in enumerate(batch.video_ids):
        ref = render_video(tiny_cfg, "train", int(vid.rsplit("_", 1)[1]))
        assert batch.action_labels[b] == ref.action_label and batch.num_frames[b] == len(ref.frames)
        assert torch.equal(batch.phase_labels[b], torch.from_numpy(ref.phase_labels[batch.timestamps[b].numpy()]))
        assert torch.all(batch.timestamps[b, :, 1:] >= batch.timestamps[b, :, :-1])


def test_deterministic_by_seed_and_epoch(vp9_shards):
    def first_batches(seed, epoch, workers):
        loader = VideoLoader(loader_cfg(vp9_shards, num_workers=workers), seed=seed)
        loader.set_epoch(epoch)
        return list(loader)

    a, b = first_batches(0, 0, 2), first_batches(0, 0, 2)
    for x, y in zip(a, b):
        assert x.video_ids == y.video_ids
        assert torch.equal(x.timestamps, y.timestamps) and torch.equal(x.views, y.views)
    c = first_batches(0, 1, 2)
    assert [x.video_ids for x in a] != [x.video_ids for x in c] or not all(
        torch.equal(x.timestamps, y.timestamps) for x, y in zip(a, c))
    d = first_batches(1, 0, 2)
    assert not all(torch.equal(x.timestamps, y.timestamps) for x, y in zip(a, d))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_state_dict_yields_the_same_next_batches(vp9_shards, workers):
    full = list(VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=workers)))
    loader = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=workers))
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    assert state["next_batch"] == 3
    resumed = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=workers))
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.video_ids for b in rest] == [b.video_ids for b in full[3:]]
    for x, y in zip(rest, full[3:]):
        assert torch.equal(x.views, y.views) and torch.equal(x.timestamps, y.timestamps)
    assert resumed.state_dict()["epoch"] == 1


def test_jpeg_payload_same_views_from_both_decoders(jpeg_shards):
    a = list(VideoLoader(loader_cfg(jpeg_shards, decoder="pyav")))
    b = list(VideoLoader(loader_cfg(jpeg_shards, decoder="dali")))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.video_ids == y.video_ids and torch.equal(x.views, y.views)


def test_a_jpeg_payload_cut_to_the_sampled_frames_decodes_to_the_same_frames(jpeg_shards, vp9_shards):
    """Where the finishing step decodes (a GPU run), a worker hands over only the JPEGs of the
    frames its views sampled (``EncodedVideo.keep_only``), not every frame of the video: both
    decoders give the frames the whole payload gives, repeats and order as asked; a frame it was
    not cut to is a clear error; a video payload is handed over whole."""
    import numpy as np
    import webdataset as wds

    from carl_scale.data.decoders import DaliDecoder, EncodedVideo, PyAVDecoder
    from carl_scale.data.reader import parse_meta, prepare_sample

    urls, _ = resolve_shards(str(jpeg_shards), "train")
    sample = next(iter(wds.WebDataset(urls, shardshuffle=False)))
    whole = EncodedVideo.from_sample(sample, parse_meta(sample))
    asked = np.array([7, 3, 3, 12, whole.num_frames - 1, 0])
    cut = whole.keep_only(asked)
    assert cut.frame_ids.tolist() == sorted(set(asked.tolist())) and cut.num_frames == whole.num_frames
    assert cut.data == b"".join(whole.jpegs(cut.frame_ids)) and len(cut.data) < len(whole.data)
    again = cut.keep_only(np.array([12, 3]))  # a cut payload cut again
    assert again.frame_ids.tolist() == [3, 12] and again.jpegs(np.array([12, 3])) == whole.jpegs(np.array([12, 3]))
    with pytest.raises(ValueError, match="cut to no frame"):
        whole.keep_only(np.array([], dtype=np.int64))
    for decoder in (PyAVDecoder(), DaliDecoder()):
        np.testing.assert_array_equal(decoder.decode([cut], [asked])[0], decoder.decode([whole], [asked])[0])
        with pytest.raises(IndexError, match=r"frames \[5\] are not among the 5 sampled frames"):
            decoder.decode([cut], [np.array([5])])
    # the loader's workers cut it to the two views' frames when the collate decodes
    prepared = prepare_sample(sample, loader_cfg(jpeg_shards), 0, 0, None)
    assert prepared.encoded.frame_ids.tolist() == np.unique(prepared.timestamps).tolist()
    video = next(iter(wds.WebDataset(resolve_shards(str(vp9_shards), "train")[0], shardshuffle=False)))
    enc = EncodedVideo.from_sample(video, parse_meta(video))
    assert enc.keep_only(np.array([1, 2])) is enc


def test_video_payload_dali_and_pyav_agree(vp9_shards):
    a = list(VideoLoader(loader_cfg(vp9_shards, decoder="pyav", num_workers=2)))
    b = list(VideoLoader(loader_cfg(vp9_shards, decoder="dali", num_workers=2)))
    for x, y in zip(a, b):
        assert x.video_ids == y.video_ids
        # same frames up to one grey level of rounding, then the same augmentation
        assert (x.views - y.views).abs().mean() < 0.01


def test_resampled_stream_has_fixed_length_and_its_copies_of_a_video_differ(vp9_shards):
    """Shards drawn with replacement hold a video more than once in a pass (and on every rank):
    each copy gets views of its own, not the same views again."""
    loader = VideoLoader(loader_cfg(vp9_shards, resampled=True, epoch_samples=24, num_workers=2))
    batches = list(loader)
    assert len(loader) == 12 and len(batches) == 12
    seen: dict[str, list] = {}
    for b in batches:
        for i, vid in enumerate(b.video_ids):
            seen.setdefault(vid, []).append(b.timestamps[i])
    copies = [ts for ts in seen.values() if len(ts) > 1]
    assert copies  # fewer videos than draws
    assert all(not torch.equal(a, b) for ts in copies for k, a in enumerate(ts) for b in ts[k + 1:])


@pytest.mark.parametrize("decoder", ["dali", "pyav"])
def test_whole_video_reading_passes_over_corrupt_videos(vp9_shards, tmp_path, decoder):
    """Evaluation's reader: each damaged sample is reported and skipped, and the decoder is reset
    after a failure, so the good video after a corrupt one still decodes."""
    from carl_scale.data.decoders import make_decoder
    from carl_scale.data.whole_video import iter_whole_videos

    train = read_manifest(vp9_shards)["splits"]["train"]["shards"]
    bad = tmp_path / "bad-000000.tar"
    good_key = corrupt_shard(vp9_shards / train[0]["path"], bad)
    errors = []
    got = list(iter_whole_videos([str(bad)], make_decoder(decoder, codec="vp9"),
                                 on_error=lambda what, exn: errors.append(what)))
    assert [m["video_id"] for m, _ in got] == [json.loads(_member(bad, f"{good_key}.json"))["video_id"]]
    assert len(got[0][1]) == got[0][0]["num_frames"] and len(errors) == 3


def test_whole_video_reading_raises_out_of_memory_and_a_broken_device_instead_of_counting_the_video(vp9_shards):
    """Evaluation's reader takes a failure that says nothing about the video (out of memory; on a
    GPU, a broken device: batch.not_the_video) for what it is, not for one damaged video after
    another for the rest of the set."""
    from carl_scale.data.decoders import PyAVDecoder
    from carl_scale.data.whole_video import iter_whole_videos

    errors = []
    sticky = [MemoryError()] + ([torch.AcceleratorError("CUDA error: an illegal memory access was encountered")]
                                if hasattr(torch, "AcceleratorError") else [])
    for error in sticky:
        class Failing(PyAVDecoder):
            def decode_all(self, item):
                raise error

        with pytest.raises(type(error)):
            next(iter_whole_videos(vp9_shards, Failing(), on_error=lambda what, exn: errors.append(what)))
    assert errors == []


def _member(tar, name: str) -> bytes:
    with tarfile.open(tar) as tf:
        return tf.extractfile(name).read()


def test_corrupt_samples_are_skipped_counted_and_logged(vp9_shards, tmp_path, caplog):
    train = read_manifest(vp9_shards)["splits"]["train"]["shards"]
    bad = tmp_path / "bad-000000.tar"
    good_key = corrupt_shard(vp9_shards / train[0]["path"], bad)
    # and a shard cut off mid-member, as an interrupted copy leaves it
    data = (vp9_shards / train[1]["path"]).read_bytes()
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    shutil.copy(vp9_shards / train[2]["path"], tmp_path / "ok-000000.tar")
    urls = [str(bad), str(cut), str(tmp_path / "ok-000000.tar")]
    with caplog.at_level(logging.WARNING, logger="carl_scale.data"):
        loader = VideoLoader(loader_cfg(urls, batch_size=1, epoch_samples=8, shuffle_buffer=0))
        ids = loader_ids(loader)
    assert len(ids) == 8  # the fixed epoch length is kept, filled with good samples
    assert "trunc" not in ids and "garbage" not in ids
    assert loader.skipped >= 4  # 3 broken samples + the truncated shard, each counted
    text = caplog.text
    assert "trunc" in text and "garbage" in text and "skipping" in text
    assert good_key in ids


def test_a_damaged_jpeg_offset_table_is_skipped_in_the_worker_when_the_finishing_step_decodes(jpeg_shards, tmp_path,
                                                                                              caplog):
    """Where the finishing step decodes (a GPU run), the worker cuts a jpeg payload to its views'
    frames (``EncodedVideo.keep_only``): a damaged offset table shows there, so the worker counts
    the sample and draws the next one, as a CPU run's worker does, instead of failing a batched
    decode after it."""
    import numpy as np

    train = read_manifest(jpeg_shards)["splits"]["train"]["shards"]
    src = jpeg_shards / train[0]["path"]
    with tarfile.open(src) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    keys = sorted({n.split(".")[0] for n in members})
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as dst:
        for name, data in sorted(members.items()):
            if name == f"{keys[0]}.jpgofs":  # offsets that do not end at the payload's size
                offs = np.frombuffer(data, "<i8").copy()
                offs[-1] += 7
                data = offs.astype("<i8").tobytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    with caplog.at_level(logging.WARNING, logger="carl_scale.data"):
        loader = VideoLoader(loader_cfg([str(bad)], batch_size=1, epoch_samples=2, shuffle_buffer=0), decode_in_collate=True)
        ids = loader_ids(loader)
    assert ids == [keys[1], keys[1]] and loader.skipped == 2  # the damaged one, counted in each pass
    assert "damaged jpeg offset table" in caplog.text and "finishing step" not in caplog.text


@pytest.mark.parametrize("decoder", ["pyav", "dali"])
def test_a_video_that_fails_to_decode_in_the_finishing_step_is_counted_and_stood_in_for(vp9_shards, tmp_path,
                                                                                      caplog, decoder):
    """The GPU loader's decoding after the workers (here on the CPU, in the collate): a corrupt
    video fails the batched decode, is found by decoding one video at a time on fresh pipelines,
    counted and logged, and its place taken by a video of its batch that decoded; a batch where
    none did is stood in for by the next good batch (the last, at the epoch's end), so the epoch
    keeps its length. The count survives a resume."""
    train = read_manifest(vp9_shards)["splits"]["train"]["shards"]
    bad = tmp_path / "bad-000000.tar"
    good_key = corrupt_shard(vp9_shards / train[0]["path"], bad)  # in order: badjson, garbage, good, trunc

    def loader(shards, batch_size: int, samples: int) -> VideoLoader:
        return VideoLoader(loader_cfg(shards, batch_size=batch_size, epoch_samples=samples, shuffle_buffer=0,
                                decoder=decoder), decode_in_collate=True)

    with caplog.at_level(logging.WARNING, logger="carl_scale.data"):
        first = loader([str(bad)], 2, 4)
        batches = list(first)
    # [garbage, good]: the batch's good one stands in; [trunc, garbage (the stream's next pass)]:
    # none decoded, so a good batch stands in for it (here the last: it ends the epoch)
    assert [b.video_ids for b in batches] == [[good_key, good_key]] * 2
    assert torch.equal(batches[1].views[0], batches[0].views[1])
    # the copy carries no label: the weak objective never pairs a video with its own copy
    good_label = int(batches[0].action_labels[1])
    assert batches[0].action_labels.tolist() == [-1, good_label] and good_label >= 0
    assert first.skipped == 5  # badjson twice (in the worker), garbage twice and trunc (here)
    assert "its place in the batch goes to a copy" in caplog.text and "'trunc'" in caplog.text
    resumed = loader([str(bad)], 2, 4)
    resumed.load_state_dict(first.state_dict())
    assert resumed.skipped == 5  # (a resumed run's count goes on from its checkpoint's)

    only_bad = tmp_path / "only-bad-000000.tar"
    with tarfile.open(bad) as src, tarfile.open(only_bad, "w") as dst:
        for m in src.getmembers():
            if not m.name.startswith(good_key):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(ValueError, match="no video of the last 2 batches of this epoch decoded"):
        list(loader([str(only_bad)], 1, 2))
    # batches of one: [garbage] decodes nothing, so the next good batch stands in for it too
    ones = loader([str(bad)], 1, 3)
    got = list(ones)
    assert [b.video_ids for b in got] == [[good_key]] * 3 and got[0] is got[1] and ones.skipped == 3


@pytest.mark.parametrize("in_collate", [False, True])
def test_the_skip_count_is_exact_across_a_resume(vp9_shards, tmp_path, in_collate):
    """Skips are counted with the batches handed over: a loader cut anywhere and resumed from its
    state ends the epoch with the uninterrupted count, though its workers (and finishing thread)
    had read ahead, and read those samples again after the resume."""
    train = read_manifest(vp9_shards)["splits"]["train"]["shards"]
    bad = tmp_path / "bad-000000.tar"
    corrupt_shard(vp9_shards / train[0]["path"], bad)
    urls = [str(bad), str(vp9_shards / train[1]["path"])]

    def loader() -> VideoLoader:
        out = VideoLoader(loader_cfg(urls, batch_size=1, epoch_samples=6, num_workers=2, shuffle_buffer=0),
                          decode_in_collate=in_collate)
        out.finish_in_thread = in_collate
        return out

    whole = loader()
    list(whole)
    assert whole.skipped >= 3
    for cut in (1, 2, 3):  # (cut after 4, the rest of the epoch has no good video in collate: an error)
        first = loader()
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state_dict()
        first.close()
        rest = loader()
        rest.load_state_dict(state)
        list(rest)
        assert rest.skipped == whole.skipped, cut


def test_a_url_or_a_pipe_command_as_a_shard_is_refused_and_never_run(vp9_shards, tmp_path, monkeypatch):
    """WebDataset runs a ``pipe:`` shard in a shell and fetches a URL with curl: a shard list is a
    file someone else may have written, and nothing is downloaded at run time."""
    marker = tmp_path / "ran"
    listed = tmp_path / "list.txt"
    listed.write_text(f"{vp9_shards / 'train-000000.tar'}\npipe:touch {marker}\n")
    for spec, scheme in ((str(listed), "pipe"), (f"pipe:touch {marker}", "pipe"), ("https://h/t-{0..1}.tar", "https"),
                         ([str(vp9_shards / "train-000000.tar"), "file:///x.tar"], "file")):
        with pytest.raises(ValueError, match=rf"--shards: .* is a {scheme}: URL, not a local path\. .*local paths only"):
            resolve_shards(spec)
        with pytest.raises(ValueError, match="local paths only"):
            VideoLoader(loader_cfg(spec, epoch_samples=2))
    assert not marker.exists()
    # local files whose names read as URLs are local files: absolute, relative (handed to WebDataset
    # as ./a:b.tar), in a .txt list next to it, and a shard directory named with a colon
    colon = tmp_path / "a:b.tar"
    colon.write_bytes((vp9_shards / "train-000000.tar").read_bytes())
    assert resolve_shards(str(colon))[0] == [str(colon)]
    (tmp_path / "colon.txt").write_text("a:b.tar\n")
    assert resolve_shards(str(tmp_path / "colon.txt"))[0] == [str(colon)]
    named = tmp_path / "data:v2"
    shutil.copytree(vp9_shards, named)
    monkeypatch.chdir(tmp_path)
    urls, _ = resolve_shards("data:v2", "val")
    assert urls and all(u.startswith("./data:v2/") for u in urls)
    ids = loader_ids(VideoLoader(loader_cfg("data:v2", epoch_samples=2)))
    assert len(ids) == 2
    (tmp_path / "missing.txt").write_text("./c:d.tar\n")  # missing, and written as a path: said so
    with pytest.raises(FileNotFoundError, match="c:d.tar does not exist"):
        resolve_shards("missing.txt")


def test_missing_shard_is_an_error_naming_the_path(vp9_shards, tmp_path):
    missing = tmp_path / "nowhere-000000.tar"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VideoLoader(loader_cfg([str(vp9_shards / "train-000000.tar"), str(missing)], epoch_samples=2))
    with pytest.raises(FileNotFoundError, match="shards.json"):
        resolve_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"shard .*k400/train-000000.tar does not exist \(--shards .*"
                                                 r"\): write them with your dataset's converter"):
        resolve_shards(str(tmp_path / "k400/train-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"no shards at .*nope: .*python -m shards.folder --src VIDEOS --out"):
        resolve_shards(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"has no split 'test' \(it has \['train', 'val'\]\): name one of those"):
        resolve_shards(str(vp9_shards), "test")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "shards.json").write_text('{"splits": {')
    with pytest.raises(ValueError, match=r"damaged/shards.json is damaged \(.*\): remove it and rerun"):
        resolve_shards(str(damaged))
    for text in ('{"version": 1}', '{"splits": {"train": {"samples": 3}}}', '[1, 2]'):  # valid JSON, no shard list
        (damaged / "shards.json").write_text(text)
        with pytest.raises(ValueError, match=r"is damaged \(no 'splits' with a list of shards each\): remove it"):
            resolve_shards(str(damaged))
    with pytest.raises(FileNotFoundError, match="the pattern matched nothing; check --shards"):
        resolve_shards([])
    # a .txt list's relative paths: from the working directory, or else from the list's folder
    listed = tmp_path / "list.txt"
    listed.write_text(os.path.relpath(vp9_shards / "train-000000.tar", tmp_path) + "\n\n")
    assert [os.path.realpath(u) for u in resolve_shards(str(listed))[0]] == \
        [os.path.realpath(vp9_shards / "train-000000.tar")]
    # what the message says works: the writer rebuilds shards.json from its records, writing nothing
    from conftest import TINY

    from carl_scale.datasets.synthetic import write_synthetic_shards

    written = tmp_path / "written"
    write_synthetic_shards(written, TINY, payload="video", max_samples=4, progress=False)
    whole = read_manifest(written)
    stamps = {p.name: p.stat().st_mtime_ns for p in written.glob("*.tar")}
    (written / "shards.json").write_text('{"splits": {')
    (written / "shards.json").unlink()
    write_synthetic_shards(written, TINY, payload="video", max_samples=4, progress=False)
    again = read_manifest(written)
    assert {p.name: p.stat().st_mtime_ns for p in written.glob("*.tar")} == stamps
    assert {k: v["shards"] for k, v in again["splits"].items()} == {k: v["shards"] for k, v in whole["splits"].items()}


def test_fewer_shards_than_consumers_split_by_sample(vp9_shards, tiny_cfg):
    """4 shards over 4 ranks x 2 workers: the split falls back to samples, still a partition."""
    seen = []
    for rank in range(4):
        loader = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=2), rank=rank, world_size=4)
        assert len(loader) == 2
        seen += loader_ids(loader)
    assert sorted(seen) == sorted(f"synthetic_train_{i:06d}" for i in range(tiny_cfg.train_videos))


def test_all_corrupt_data_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad-000000.tar"
    with tarfile.open(bad, "w") as tf:
        info = tarfile.TarInfo("x.json")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"{}!"))
    with pytest.raises(ValueError, match="no usable sample"):
        list(VideoLoader(loader_cfg([str(bad)], epoch_samples=2)))
    # raised in a DataLoader worker (PyTorch re-raises it with the worker's traceback as its text),
    # an entry point still ends in one line with the worker's message
    from carl_scale.errors import run_cli

    with pytest.raises(SystemExit) as end:
        run_cli("prog", lambda argv: list(VideoLoader(loader_cfg([str(bad)], epoch_samples=2, num_workers=1))), [])
    message = str(end.value.code)
    assert message.startswith("prog: error: rank 0 worker 0: ") and "no usable sample" in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("workers", [0, 2])
def test_per_label_batches_pair_videos_of_a_label_and_resume_exactly(vp9_shards, workers):
    """--per-label 2, batch 4: two pairs of same-label videos per batch while the data allows; a
    loader resumed mid-epoch (its grouping replayed from metadata, undecoded) gives the same rest."""
    cfg = loader_cfg(vp9_shards, batch_size=4, per_label=2, num_workers=workers, epoch_samples=16)
    full = list(VideoLoader(cfg))  # two epochs' worth of the 8 videos (epoch_samples 16)
    assert len(full) == 4
    pairs = [b.action_labels[i].item() == b.action_labels[i + 1].item() for b in full for i in (0, 2)]
    assert sum(pairs) >= 6  # 3 labels, 8 videos: at most a leftover or two are dealt into mixed groups
    loader = VideoLoader(cfg)
    it = iter(loader)
    next(it)
    resumed = VideoLoader(cfg)
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert [b.video_ids for b in rest] == [b.video_ids for b in full[1:]]
    assert all(torch.equal(x.views, y.views) for x, y in zip(rest, full[1:]))
    with pytest.raises(ConfigError, match="--per-label"):
        loader_cfg(vp9_shards, batch_size=4, per_label=3)


def test_label_grouper_deals_groups_in_stream_order_and_never_stalls():
    from carl_scale.data.grouping import LabelGrouper

    g = LabelGrouper(4, 2, held=8)
    labels = [0, 1, 2, 0, 1, 3, 3, 2, 4, -1, 5, 6, 7, 8, 9, 0, 0]
    out = [b for i, lab in enumerate(labels) for b in g.add((i, lab), lab)]
    assert out[:2] == [[(0, 0), (3, 0), (1, 1), (4, 1)], [(5, 3), (6, 3), (2, 2), (7, 2)]]
    # a run of labels seen once: held up to 8, then the oldest are dealt into mixed groups
    assert len(out) == 4 and {x for b in out for x in b} >= {(8, 4), (9, -1), (10, 5)}
    assert all(len(b) == 4 for b in out)


def test_label_grouper_never_puts_a_video_twice_in_a_batch():
    """Held videos carry over to the next pass: with a share no larger than ``held``, a video met
    its own next-pass copy (same label: the paired loss's trivial positive). A copy now waits until
    its first copy has left; a share with fewer videos than a batch still gets batches."""
    from carl_scale.data.grouping import LabelGrouper

    for videos in ([("A", 0), ("B", 1), ("C", 2), ("D", 2)], [("A", 0), ("B", 1), ("C", 2), ("D", 2), ("E", 0)]):
        for held in (4, 8, 16):
            g = LabelGrouper(4, 2, held=held)
            out = [b for p in range(10) for name, lab in videos for b in g.add(f"{name}{p}", lab, ident=name)]
            assert len(out) >= 10 * len(videos) // 4 - held // 4 - 1 and all(len(b) == 4 for b in out)
            assert all(len({x[0] for x in b}) == 4 for b in out), (held, out)  # four different videos
    g = LabelGrouper(4, 2, held=8)
    three = [("A", 0), ("B", 1), ("C", 2)]
    out = [b for p in range(10) for name, lab in three for b in g.add(f"{name}{p}", lab, ident=name)]
    assert len(out) >= 5 and len(g.waiting) <= 8  # three videos cannot fill a batch of four: copies let in


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_when_failed_samples_came_before_the_checkpoint(vp9_shards, tmp_path, workers):
    """A worker that skipped failed samples has read more of its stream than it yielded: the
    loader's state keeps each worker's position, so the resumed batches are the uninterrupted
    run's, bit for bit, wherever the interruption falls."""
    shards = [str(vp9_shards / s["path"]) for s in read_manifest(vp9_shards)["splits"]["train"]["shards"]]
    corrupt_shard(shards[0], tmp_path / "bad-000000.tar")
    cfg = loader_cfg([str(tmp_path / "bad-000000.tar"), *shards[1:]], batch_size=1, num_workers=workers,
               epoch_samples=10)
    full = list(VideoLoader(cfg))
    exercised = 0
    for k in range(1, len(full)):
        loader = VideoLoader(cfg)
        it = iter(loader)
        for _ in range(k):
            next(it)
        state = loader.state_dict()
        consumed = sum(state["positions"].values())
        del it
        exercised += consumed > k  # the workers read more samples than the k batches they gave
        resumed = VideoLoader(cfg)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert [b.video_ids for b in rest] == [b.video_ids for b in full[k:]], k
        assert all(torch.equal(x.views, y.views) for x, y in zip(rest, full[k:]))
    assert exercised >= 2


def test_workers_persist_across_epochs_and_each_epoch_is_its_own(vp9_shards):
    """Workers are forked once (not re-forked after CUDA/NCCL are up every epoch); the second
    epoch through them is the one a fresh loader set to epoch 1 gives."""
    cfg = loader_cfg(vp9_shards, num_workers=2)
    loader = VideoLoader(cfg)
    list(loader)
    pids = [w.pid for w in loader._dl._iterator._workers]
    second = list(loader)
    assert [w.pid for w in loader._dl._iterator._workers] == pids
    fresh = VideoLoader(cfg)
    fresh.set_epoch(1)
    ref = list(fresh)
    assert [b.video_ids for b in second] == [b.video_ids for b in ref]
    assert all(torch.equal(x.views, y.views) for x, y in zip(second, ref))
    loader.close()
    assert loader._dl is None
    fresh.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_older_iterator_resumed_takes_nothing_and_ends_no_epoch(vp9_shards, workers):
    """Only the newest iterator takes batches: an older one resumed (after a newer iter(), or after
    close()) yields nothing more, takes none of the newer one's batches and ends no epoch."""
    cfg = loader_cfg(vp9_shards, num_workers=workers)  # 8 videos, batch 2: 4 batches an epoch
    ref = [b.video_ids for b in VideoLoader(cfg)]
    loader = VideoLoader(cfg)
    old = iter(loader)
    got = [next(old).video_ids]
    new = iter(loader)
    got.append(next(new).video_ids)
    assert list(old) == [] and (loader.epoch, loader.next_batch) == (0, 2)
    got += [b.video_ids for b in new]
    assert got == ref and (loader.epoch, loader.next_batch) == (1, 0)
    it = iter(loader)
    next(it)
    loader.close()
    assert list(it) == [] and (loader.epoch, loader.next_batch) == (1, 1)
    loader.close()


def test_a_gpu_device_string_selects_that_gpu_for_dali():
    from carl_scale.data.decoders import make_decoder, split_device

    assert split_device("cpu") == ("cpu", 0) and split_device("cuda:3") == ("cuda", 3)
    dec = make_decoder("auto", codec="h264", device="cuda:1")  # pipelines are built lazily: no GPU needed here
    assert dec.name == "dali" and dec.device == "cuda" and dec.device_id == 1
    with pytest.raises(ValueError, match="CPU or a CUDA GPU"):
        split_device("mps")


def test_nvjpeg_settings_reach_dalis_image_decoder_by_names_its_schema_knows(jpeg_shards):
    """--nvjpeg-hw-load / --nvjpeg-huffman go from the config to fn.decoders.image on a GPU (argument
    names checked against DALI's own operator schema: a typo would fail only on a GPU) and to the
    loader's log line; on the CPU (libjpeg-turbo) they change nothing. A bad value is refused."""
    from nvidia.dali import backend as dali_backend

    from carl_scale.config import ConfigError
    from carl_scale.data.decoders import DaliDecoder, make_decoder

    gpu = make_decoder("auto", codec="jpeg", device="cuda:0", jpeg_hw_load=1.0, jpeg_huffman="gpu")
    assert gpu.image_options() == {"hw_decoder_load": 1.0, "hybrid_huffman_threshold": 0}
    assert "nvJPEG: 100% to the hardware decoder" in gpu.jpeg_engine() and "Huffman of the rest on the GPU" in \
        gpu.jpeg_engine()
    default = DaliDecoder("cuda")
    assert default.image_options() == {"hw_decoder_load": 1.0} and "on the CPU (2 threads)" in default.jpeg_engine()
    schema = dali_backend.GetSchema("decoders__Image")
    assert all(schema.HasArgument(k) for k in gpu.image_options())
    assert DaliDecoder("cpu", jpeg_hw_load=0.0, jpeg_huffman="gpu").image_options() == {}
    with pytest.raises(ValueError, match="jpeg_hw_load must be in"):
        DaliDecoder("cuda", jpeg_hw_load=1.5)

    loader = VideoLoader(loader_cfg(jpeg_shards, decoder="dali", nvjpeg_hw_load=0.3, nvjpeg_huffman="gpu"))
    assert (loader.decoder.jpeg_hw_load, loader.decoder.jpeg_huffman) == (0.3, "gpu")
    loader.close()
    with pytest.raises(ConfigError, match=r"--nvjpeg-hw-load must be in \[0, 1\], got 1.5"):
        loader_cfg(jpeg_shards, nvjpeg_hw_load=1.5)


def test_damage_in_a_tar_read_by_every_consumer_is_counted_once(vp9_shards, tmp_path):
    """Fewer shards than ranks x workers: each consumer reads every shard and keeps its share of
    the samples, after the tar reader has met the damage. Every consumer counted it, and the run's
    count (summed over ranks) was world x workers times the damage."""
    from conftest import damaged_copy

    shards = tmp_path / "shards"
    damaged_copy(vp9_shards, shards, split="train", truncate_shard=1)
    alone = VideoLoader(loader_cfg(shards, batch_size=1))
    loader_ids(alone)
    assert alone.skipped >= 1
    total = 0
    for rank in range(5):  # 4 shards for 5 ranks: split by sample
        loader = VideoLoader(loader_cfg(shards, batch_size=1, num_workers=1), rank=rank, world_size=5)
        loader_ids(loader)
        total += loader.skipped
        loader.close()
    assert total == alone.skipped
