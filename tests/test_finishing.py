"""The loader's finishing step on its own threads or in a process of its own (where a GPU decodes):
order, errors, batches ahead, corrupt videos, exact resume, and the same batches as one thread."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import torch

from carl_scale.config import ConfigError
from carl_scale.data.manifest import read_manifest
from carl_scale.data.reader import VideoLoader
from loader_helpers import corrupt_shard, loader_cfg


@pytest.mark.parametrize("lanes", [1, 3])
def test_finish_ahead_keeps_order_raises_the_threads_error_and_stops_when_closed(lanes):
    """The GPU loader's finishing threads (here on the CPU, where they have no stream): results in
    input order, item k finished by lane k mod n's own function whatever each takes; an error in
    ``finish`` or in reading the items is raised to the consumer in the place of its item; a
    consumer that stops early leaves no thread behind, and reading stays a few items ahead."""
    import random
    import threading
    import time

    from carl_scale.data.prefetch import THREAD_NAME, finish_ahead

    cpu = torch.device("cpu")
    rng = random.Random(0)
    delays = [rng.uniform(0, 0.004) for _ in range(40)]
    seen, busy = [], [0] * lanes

    def lane(j):
        def finish(i):
            busy[j] += 1
            assert busy[j] == 1, f"lane {j} ran twice at once"  # (a DALI pipeline takes one thread at a time)
            time.sleep(delays[i])
            seen.append((i, j, threading.current_thread().name))
            busy[j] -= 1
            return i * i
        return finish

    assert list(finish_ahead(range(40), [lane(j) for j in range(lanes)], 2, cpu)) == [(i, i * i) for i in range(40)]
    assert sorted((i, j) for i, j, _ in seen) == [(i, i % lanes) for i in range(40)]
    # each lane always in its own one thread
    assert len({(j, name) for _, j, name in seen}) == len({name for _, _, name in seen}) == lanes
    assert all(n.startswith(THREAD_NAME) for _, _, n in seen)

    def bad(i):
        if i == 3:
            raise ValueError("frame 3 is broken")
        time.sleep(0.002 * (i % 2))
        return i

    got = []
    with pytest.raises(ValueError, match="frame 3"):
        for item, _ in finish_ahead(range(10), [bad] * lanes, 2, cpu):
            got.append(item)
    assert got == [0, 1, 2]

    def broken_items():
        yield from range(4)
        raise OSError("shard 7 is unreadable")

    got = []
    with pytest.raises(OSError, match="shard 7"):
        for item, _ in finish_ahead(broken_items(), [lambda i: i] * lanes, 2, cpu):
            got.append(item)
    assert got == [0, 1, 2, 3]

    started = []

    def slow(i):
        started.append(i)
        return i

    gen = finish_ahead(range(1000), [slow] * lanes, 2, cpu)
    assert next(gen) == (0, 0)
    gen.close()
    assert not any(t.name.startswith(THREAD_NAME) for t in threading.enumerate())
    # per lane: ceil(2 / n) queued, one waiting to be queued; one handed over
    assert len(started) <= 1 + lanes * (-(-2 // lanes) + 1)
    with pytest.raises(ValueError, match="at least one lane"):
        next(finish_ahead(range(3), [], 2, cpu))


@pytest.mark.parametrize("threads", [1, 2])
def test_the_finishing_thread_gives_the_same_batches_and_a_closed_epoch_resumes_exactly(vp9_shards, threads):
    """The GPU loader's thread path, forced on the CPU: the same batches as without it; closed
    after 3 batches, the old iterator yields nothing more and does not end the epoch, and a loader
    restored from the state resumes with batch 4. With 2 threads side by side (decoding in them,
    each with its own DALI CPU decoder, as on a GPU) the same."""
    def loader(thread: bool) -> VideoLoader:
        if threads == 1:
            out = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=2))
        else:
            out = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=2, decoder="dali",
                                   finish_threads=threads if thread else 1), decode_in_collate=True)
        out.finish_in_thread = thread
        return out

    plain = list(loader(False))
    threaded = loader(True)
    got = list(threaded)
    assert [b.video_ids for b in got] == [b.video_ids for b in plain] and threaded.epoch == 1
    assert all(torch.equal(x.views, y.views) for x, y in zip(got, plain))
    cut = loader(True)
    it = iter(cut)
    for _ in range(3):
        next(it)
    cut.close()
    assert list(it) == [] and cut.state_dict()["epoch"] == 0 and cut.state_dict()["next_batch"] == 3
    resumed = loader(True)
    resumed.load_state_dict(cut.state_dict())
    assert [b.video_ids for b in resumed] == [b.video_ids for b in plain[3:]]


def test_finishing_threads_side_by_side_give_the_same_batches_each_with_its_own_decoder(vp9_shards):
    """--finish-threads, run on the CPU with DALI's CPU decoder in the GPU decoder's place
    (decoding in the collate, in background threads): two threads side by side, each decoding
    with its own decoder (DALI pipelines are not shared between threads), give the batches of
    one thread. Where the workers decode, the flag is refused."""
    from carl_scale.data.decoders import DaliDecoder

    used = []

    def loader(threads: int) -> VideoLoader:
        out = VideoLoader(loader_cfg(vp9_shards, batch_size=2, num_workers=2, decoder="dali", finish_threads=threads),
                          decode_in_collate=True)
        out.finish_in_thread = True
        for d in out.decoders:
            decode = d.decode
            d.decode = lambda videos, *a, _d=d, _decode=decode, **k: (used.append(id(_d)), _decode(videos, *a, **k))[1]
        return out

    first = loader(1)
    one = list(first)
    first.close()
    used.clear()
    two = loader(2)
    assert len({id(d) for d in two.decoders}) == 2 and all(isinstance(d, DaliDecoder) for d in two.decoders)
    assert "2 background threads side by side" in two.describe()
    got = list(two)
    assert [b.video_ids for b in got] == [b.video_ids for b in one] and len(got) >= 3
    assert sorted(used) == sorted(id(two.decoders[k % 2]) for k in range(len(got)))  # each its share
    two.close()
    for a, b in zip(one, got):
        torch.testing.assert_close(b.views, a.views, rtol=0, atol=0)
    with pytest.raises(ValueError, match="--finish-threads 2 decodes batches side by side"):
        VideoLoader(loader_cfg(vp9_shards, decoder="dali", finish_threads=2))
    with pytest.raises(ConfigError, match=r"--finish-threads must be in \[1, 16\], got 0"):
        loader_cfg(vp9_shards, finish_threads=0)
    # auto (the default): two where a GPU decodes in the training process, one wherever the CPU decodes
    assert VideoLoader(loader_cfg(vp9_shards, decoder="dali")).finish_threads == 1
    assert VideoLoader(loader_cfg(vp9_shards, decoder="dali"), decode_in_collate=True).finish_threads == 1


def test_batches_ahead_counts_what_the_finishing_threads_make_before_they_are_asked(vp9_shards):
    """``batches_ahead()`` is what benchmarks take without a step to time the loader from empty
    buffers (bench.e2e): left alone after one batch, two finishing threads (on the CPU, DALI's CPU
    decoder in the GPU's place) fill their buffers: each thread's share of GPU_PREFETCH_BATCHES
    finished and one more waiting to be queued, their inboxes, the reader thread's batch and the
    workers' prefetch, together exactly ``batches_ahead()`` (the bound is reached, not exceeded)."""
    import time

    from carl_scale.data.reader import GPU_PREFETCH_BATCHES

    loader = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=2, decoder="dali", finish_threads=2,
                              epoch_samples=64), decode_in_collate=True)
    loader.finish_in_thread = True
    loader.finish_times = made = []
    it = iter(loader)
    next(it)

    def quiet() -> int:  # until no batch was finished for 3 s
        seen, since, t0 = len(made), time.monotonic(), time.monotonic()
        while time.monotonic() - since < 3.0 and time.monotonic() - t0 < 60:
            time.sleep(0.1)
            if len(made) != seen:
                seen, since = len(made), time.monotonic()
        return seen

    assert quiet() - 1 == 2 * (GPU_PREFETCH_BATCHES // 2 + 1) == 4  # finished ahead: 2 queued, 2 held
    # every batch ahead of the consumer, finished or not: those the workers were asked for, less the
    # one taken (the DataLoader's count). Its own 2 per worker are asked for and not yet handed on,
    # whether a worker still has them or they wait in its reorder buffer (a CI run found one there)
    workers = loader._dl._iterator
    assert workers._send_idx - workers._rcvd_idx == 2 * 2
    assert workers._send_idx - 1 == loader.batches_ahead() == 2 * 2 + 2 * (2 + 1 + 1) + 1
    it.close()
    loader.close()
    assert VideoLoader(loader_cfg(vp9_shards, num_workers=3, decoder="pyav")).batches_ahead() == 3 * 2  # workers only


def test_frames_decoded_in_the_collate_at_another_size_than_the_metadata_are_counted_and_stood_in_for(vp9_shards):
    """The crops were drawn for the metadata's frame size: a video the finishing step's decoder
    returns at another size is counted and stood in for, as in the workers, not cropped wrongly."""
    loader = VideoLoader(loader_cfg(vp9_shards, batch_size=2, shuffle_buffer=0, epoch_samples=4), decode_in_collate=True)
    decode = loader.decoder.decode
    # the first video of each decoding call comes back two columns narrower
    loader.decoder.decode = lambda videos, idx: [f[:, :, :-2] if k == 0 else f
                                                 for k, f in enumerate(decode(videos, idx))]
    batches = list(loader)
    assert len(batches) == 2 and loader.skipped == 2
    assert all(b.video_ids[0] == b.video_ids[1] and torch.equal(b.views[0], b.views[1]) for b in batches)


def test_colour_in_the_collate_equals_colour_in_the_workers(vp9_shards):
    """The GPU loader's split, run on the CPU: workers crop only and the collate colours the whole
    batch (photometric_batch); the views equal the workers' per-view colour up to rounding. The
    batch says on the host whether any frame is padding."""
    def batches(in_workers: bool, dtype=torch.float32) -> list:
        loader = VideoLoader(loader_cfg(vp9_shards, batch_size=2, num_workers=1), views_dtype=dtype)
        loader.dataset.photometric = in_workers
        return list(loader)

    workers, collate = batches(True), batches(False)
    assert [b.video_ids for b in workers] == [b.video_ids for b in collate]
    for a, b in zip(workers, collate):
        torch.testing.assert_close(b.views, a.views, rtol=0, atol=2e-5)
        assert a.padded == b.padded == (not bool(a.mask.all()))
    # a bf16 run's views: the float32 ones rounded once, wherever the colour was made
    for in_workers, fp32 in ((True, workers), (False, collate)):
        for a, b in zip(fp32, batches(in_workers, torch.bfloat16)):
            assert b.views.dtype == torch.bfloat16 and torch.equal(b.views, a.views.to(torch.bfloat16))


def test_a_share_of_the_videos_decoded_in_the_workers_changes_no_batch(jpeg_shards):
    """--cpu-decode-share, run on the CPU with the collate in the GPU decoder's place: half of the
    videos decoded by PyAV in the workers, the rest by the collate's decoder, give the batches of
    the collate decoding all of them; the split follows stream positions, so a resumed loader
    splits (and yields) as the original did. Without a decoder in the collate the flag is refused."""
    from carl_scale.data.reader import cpu_decoded

    assert [cpu_decoded(i, 0.5) for i in range(6)] == [False, True] * 3
    assert sum(cpu_decoded(i, 0.25) for i in range(100)) == 25 and not any(cpu_decoded(i, 0.0) for i in range(9))

    in_collate = []

    def loader(share: float) -> VideoLoader:
        out = VideoLoader(loader_cfg(jpeg_shards, num_workers=2, cpu_decode_share=share), decode_in_collate=True)
        decode = out.decoder.decode
        out.decoder.decode = lambda videos, *a, **k: (in_collate.append(len(videos)), decode(videos, *a, **k))[1]
        return out

    whole = list(loader(0.0))
    n_whole, in_collate[:] = sum(in_collate), []
    split = loader(0.5)
    assert "50% of the videos decoded by pyav" in split.describe() and "50% by PyAV in the workers" in split.describe()
    got = list(split)
    assert [b.video_ids for b in got] == [b.video_ids for b in whole] and len(got) >= 3
    assert n_whole == 2 * len(got) and sum(in_collate) == len(got)  # the other half decoded in the workers
    for a, b in zip(whole, got):
        torch.testing.assert_close(b.views, a.views, rtol=0, atol=2e-5)
    cut = loader(0.5)
    it = iter(cut)
    next(it)
    state = cut.state_dict()
    cut.close()
    resumed = loader(0.5)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.video_ids for b in rest] == [b.video_ids for b in got[1:]]
    for a, b in zip(got[1:], rest):
        torch.testing.assert_close(b.views, a.views, rtol=0, atol=0)
    with pytest.raises(ValueError, match="--cpu-decode-share 0.5 splits decoding"):
        VideoLoader(loader_cfg(jpeg_shards, cpu_decode_share=0.5))


def _in_process(shards, **kw) -> VideoLoader:
    """A loader finishing in a process of its own (--finish-in process), on the CPU: DALI's CPU
    decoder in the GPU decoder's place, decoding in the finishing step as on a GPU."""
    return VideoLoader(loader_cfg(shards, **{"decoder": "dali", "num_workers": 2, **kw, "finish_in": "process"}),
                       decode_in_collate=True)


def test_batches_finished_in_a_process_of_their_own_are_the_threads_batches_and_resume_exactly(vp9_shards):
    """--finish-in process: a spawned child builds the same loader and finishes its batches in
    threads; this process gets the threaded loader's batches in order, epoch after epoch (the
    child and its workers kept), and keeps the state: cut after 3 batches, the old iterator
    yields nothing more and the epoch does not end, and a new loader from that state goes on
    with batch 4. Where the workers decode, the flag is refused."""
    threads = VideoLoader(loader_cfg(vp9_shards, batch_size=1, num_workers=2, decoder="dali"), decode_in_collate=True)
    threads.finish_in_thread = True
    plain, second = list(threads), list(threads)
    threads.close()
    proc = _in_process(vp9_shards, batch_size=1)
    assert "in a process of its own" in proc.describe()
    proc.finish_times = times = []  # (a benchmark's: the child's host seconds per batch)
    got = list(proc)
    assert len(times) == len(got) and all(t[0] > 0 and t[1:] == (None, None) for t in times)
    proc.finish_times = None
    assert [b.video_ids for b in got] == [b.video_ids for b in plain] and proc.epoch == 1
    assert all(torch.equal(x.views, y.views) and torch.equal(x.mask, y.mask) for x, y in zip(got, plain))
    child = proc._process._proc
    it = iter(proc)
    assert [next(it).video_ids for _ in range(3)] == [b.video_ids for b in second[:3]]
    assert proc._process._proc is child  # one child for the run, not one per epoch
    proc.close()
    assert not child.is_alive() and child.exitcode == 0 and list(it) == []  # (stopped mid-pass: a clean exit)
    assert proc.state_dict()["epoch"] == 1 and proc.state_dict()["next_batch"] == 3
    resumed = _in_process(vp9_shards, batch_size=1)
    resumed.load_state_dict(proc.state_dict())
    assert [b.video_ids for b in resumed] == [b.video_ids for b in second[3:]]
    resumed.close()
    with pytest.raises(ValueError, match="--finish-in process decodes batches in a process of its own"):
        VideoLoader(loader_cfg(vp9_shards, decoder="dali", finish_in="process"))
    # auto (the default): a process only where a GPU decodes; a CPU decoder finishes in threads
    assert loader_cfg(vp9_shards).finish_in == "auto"
    cpu = VideoLoader(loader_cfg(vp9_shards, decoder="dali", num_workers=0), decode_in_collate=True)
    assert not cpu.finish_process and "process" not in cpu.describe()
    with pytest.raises(ConfigError, match="--finish-in must be one of"):
        loader_cfg(vp9_shards, finish_in="processes")


def test_a_finishing_process_counts_and_stands_in_for_corrupt_videos_and_raises_the_childs_errors(vp9_shards,
                                                                                                 tmp_path):
    """Corrupt videos met in the child are counted with their batches in this process, and stood
    in for, as by threads; a cut run resumes with the uninterrupted count. An error in the child
    (a worker's shards all unusable) is raised here, and an entry point ends in its one line."""
    from carl_scale.errors import run_cli

    train = read_manifest(vp9_shards)["splits"]["train"]["shards"]
    bad = tmp_path / "bad-000000.tar"
    good_key = corrupt_shard(vp9_shards / train[0]["path"], bad)
    whole = _in_process([str(bad)], batch_size=2, epoch_samples=4, shuffle_buffer=0, num_workers=0)
    assert [b.video_ids for b in whole] == [[good_key, good_key]] * 2 and whole.skipped == 5
    whole.close()
    cut = _in_process([str(bad)], batch_size=1, epoch_samples=3, shuffle_buffer=0, num_workers=0)
    first = next(iter(cut))
    assert first.video_ids == [good_key]
    rest = _in_process([str(bad)], batch_size=1, epoch_samples=3, shuffle_buffer=0, num_workers=0)
    rest.load_state_dict(cut.state_dict())
    cut.close()
    assert len(list(rest)) == 2 and rest.skipped == 3
    rest.close()

    empty = tmp_path / "empty-000000.tar"
    with tarfile.open(empty, "w") as tf:
        info = tarfile.TarInfo("x.json")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"{}!"))
    with pytest.raises(SystemExit) as end:
        run_cli("prog", lambda argv: list(_in_process([str(empty)], epoch_samples=2, num_workers=1)), [])
    message = str(end.value.code)
    assert message.startswith("prog: error: rank 0 worker 0: ") and "no usable sample" in message
    assert "\n" not in message and "Traceback" not in message
    # (--debug's traceback): the child's own, where the error was raised there
    from carl_scale.data.finish_process import ChildTraceback

    failing = _in_process([str(empty)], epoch_samples=2, num_workers=1)
    with pytest.raises(Exception, match="no usable sample") as raised:
        list(failing)
    failing.close()
    remote = raised.value.__cause__
    assert isinstance(remote, ChildTraceback) and "in the finishing process:\nTraceback" in str(remote)
    assert "in _serve" in str(remote) and "no usable sample" in str(remote)


def test_a_finishing_process_that_dies_is_reported_and_one_left_behind_exits(vp9_shards, tmp_path):
    """A child killed mid-epoch: the next batches it did not send end in one clear error with
    its exit code, not a hang, and the next pass starts another child. A training process that ends without closing its loader (killed,
    or os._exit) does not leave its finishing process behind: the child notices and exits."""
    import signal
    import subprocess
    import sys
    import time

    proc = _in_process(vp9_shards, batch_size=1)
    it = iter(proc)
    next(it)
    dead = proc._process
    dead._proc.kill()
    with pytest.raises(RuntimeError, match=r"--finish-in process\) died, exit code -9"):
        for _ in range(20):  # (those already received still come first)
            next(it)
    assert dead.broken
    again = iter(proc)  # the next pass starts another child, from the state of the batches taken
    assert next(again).video_ids and proc._process is not dead
    proc.close()

    script = (f"import os, sys\nsys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              f"from test_finishing import _in_process\n"
              f"loader = _in_process({str(vp9_shards)!r}, batch_size=1)\nnext(iter(loader))\n"
              f"print(loader._process._proc.pid, flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
    child = int(out.stdout.split()[-1])
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the finishing process outlived the training process by 10 s")


@pytest.mark.parametrize("error, counted", [
    (ValueError("not a webm"), True), (torch.cuda.OutOfMemoryError("CUDA out of memory"), False),
    *([(torch.AcceleratorError("CUDA error: an illegal memory access"), False)]
      if hasattr(torch, "AcceleratorError") else [])])  # (torch 2.8 on)
def test_a_failed_decode_is_counted_as_a_corrupt_video_only_when_it_is_the_videos_fault(error, counted):
    """A broken device (a sticky CUDA error) or no memory fails every video after it too: raised,
    never counted as corrupt videos for the rest of the epoch."""
    from types import SimpleNamespace

    import numpy as np

    from carl_scale.data.batch import SkipCounter, decode_or_skip

    class Failing:
        device, resets = "cpu", 0

        def decode(self, encoded, indices):
            if any(e == b"bad" for e in encoded):
                raise error
            return [torch.zeros(len(i), 3, 4, 4) for i in indices]

        def reset(self):
            self.resets += 1

    todo = [SimpleNamespace(encoded=e, timestamps=np.arange(4), meta={"video_id": v})
            for e, v in ((b"good", "a"), (b"bad", "b"))]
    counter = SkipCounter()
    if counted:
        out = decode_or_skip(Failing(), todo, counter)
        assert out[0] is not None and out[1] is None and counter.take() == 1
    else:
        with pytest.raises(type(error)):
            decode_or_skip(Failing(), todo, counter)
        assert counter.take() == 0


def test_a_finished_batch_leaves_its_slot_without_the_samples_it_was_made_from(vp9_shards):
    """What travels on with a finished batch (its worker, resume point, skips) holds none of the
    samples' crops (on a GPU, B x 2T uint8 frames each) or payloads beside the batch's views."""
    loader = VideoLoader(loader_cfg(vp9_shards, num_workers=0, decoder="dali"), decode_in_collate=True)
    loader.finish_in_thread = True
    finished, ahead = loader.finished_stream(0, 0, {})
    slots = [(slot, batch) for slot, batch in finished]
    ahead.close()
    loader.close()
    assert len(slots) == len(loader) and all(batch.views.shape[0] == 2 for _, batch in slots)
    assert all(slot.samples == [] for slot, _ in slots)


def test_a_stopped_finishing_process_leaves_no_reference_count_files_in_shared_memory():
    """It leaves through os._exit, so its CUDA views' reference-count files (named after its pid,
    removed by its own teardown otherwise) are removed when it is shut down; others' are kept."""
    from types import SimpleNamespace

    from carl_scale.data.finish_process import _shut_down

    pid = 5_000_000 + os.getpid() % 100_000  # (above Linux's largest pid, 2**22: no live process has it)
    ours, other = f"/dev/shm/torch_{pid}_1234_0", f"/dev/shm/torch_{pid + 1}_1234_0"
    for name in (ours, other):
        open(name, "wb").close()
    done = SimpleNamespace(set=lambda: None)
    _shut_down(SimpleNamespace(is_alive=lambda: False, pid=pid), None, done, done)
    assert not os.path.exists(ours) and os.path.exists(other)
    os.unlink(other)
