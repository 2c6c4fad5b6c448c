"""Data-pipeline benchmark: decoded frames/s and training batches/s per decoder and payload.

    python -m carl_scale.bench.data                       # small synthetic shards, made if absent
    python -m carl_scale.bench.data --device cuda --height 256 --width 340 --frames 80 \\
        --image-size 224 --batch 2 --workers 8 --write-workers 16    # Kinetics-sized, on a GPU

Every number is also printed as a ratio to the reference path (PyAV decoding the ``video``
payload on the CPU), measured in the same process on the same shards, with the payload's size
(KiB per frame: the disk side of the trade-off). Three measurements per path:

* ``whole``: every frame of the first videos (what evaluation does), frames/s;
* ``sampled``: the 2T frames the two training views need, per video, batched as the loader
  batches them (seek + partial decode for video, single-frame decode for jpeg), frames/s;
* ``loader``: the full training loader (workers, shuffle, views, crops, colour augmentation; on a
  GPU the decoding and augmentation run in the main process, batched), batches/s, and the
  sampled frames/s it delivers (batches/s x batch x 2T): what a training step can consume.
  With ``--cpu-shares`` on a GPU, each DALI path also gets loader rows with that share of the
  videos decoded by PyAV in the workers (``--cpu-decode-share``: CPU and GPU decoding together),
  and with ``--nvjpeg`` the jpeg/dali path gets rows for other nvJPEG settings (the share for the
  hardware JPEG decoder, where the Huffman stage runs: ``--nvjpeg-hw-load``, ``--nvjpeg-huffman``).
  ``--jpeg-qualities 75 50`` adds each jpeg path on the same videos written at those qualities
  (shard writers' ``--jpeg-quality``). ``--side-by-side N`` adds, after each dali path, its
  sampled frames/s with N decoders in N threads: whether decoding scales past one video at a time
  (the question NVDEC's ~3.8k frames/s at 340x256 left open). ``--finish-threads 1 2 4`` adds,
  after each dali path, its loader with decoding and augmentation in the training process in
  that many threads side by side (``--finish-threads``; on the CPU too, where the loader would
  otherwise decode in the workers): the fix, if side by side pays.

On a GPU, timings end with a device synchronisation (DALI's outputs are CUDA tensors).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np

from carl_scale.data.config import LoaderConfig, SpatialConfig, SyntheticConfig, TemporalConfig
from carl_scale.data.decoders import DaliDecoder, EncodedVideo, PyAVDecoder, cuda_available
from carl_scale.data.manifest import resolve_shards
from carl_scale.data.reader import VideoLoader, parse_meta
from carl_scale.data.temporal import sample_temporal_views
from carl_scale.tables import table


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _samples(spec: str, split: str, limit: int) -> list[tuple[dict, EncodedVideo]]:
    import webdataset as wds

    urls, _ = resolve_shards(spec, split)
    out = []
    for s in wds.tarfile_to_samples()([dict(url=u) for u in urls]):
        meta = parse_meta(s)
        out.append((meta, EncodedVideo.from_sample(s, meta)))
        if len(out) >= limit:
            break
    return out


def _build(decoder, items) -> None:
    """A first small decode, so that pipeline building is not timed."""
    decoder.decode([items[0][1]], [np.arange(min(8, items[0][1].num_frames))])


def _sampled_indices(items, temporal: TemporalConfig) -> list[np.ndarray]:
    """The frames the two training views of each video need, drawn the same way for every row."""
    rng = np.random.default_rng(0)
    return [sample_temporal_views(enc.num_frames, temporal, rng).timestamps.reshape(-1) for _, enc in items]


def bench_decode(decoder, items, temporal: TemporalConfig, batch: int, whole_videos: int) -> tuple[float, float]:
    """(whole-video frames/s over the first ``whole_videos``, sampled frames/s over all)."""
    device = decoder.device
    _build(decoder, items)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for _, enc in items[:whole_videos]:
        n += len(decoder.decode_all(enc))
    _sync(device)
    whole = n / (time.perf_counter() - t0)
    idx = _sampled_indices(items, temporal)
    t0 = time.perf_counter()
    n = 0
    for s in range(0, len(items), batch):  # batched, as the loader calls it
        chunk = items[s : s + batch]
        out = decoder.decode([e for _, e in chunk], idx[s : s + batch])
        n += sum(len(o) for o in out)
    _sync(device)
    return whole, n / (time.perf_counter() - t0)


def bench_side_by_side(decoders: list, items, temporal: TemporalConfig, batch: int) -> float:
    """Sampled frames/s of ``len(decoders)`` decoders (each its own DALI pipeline) in as many
    threads, batch k going to decoder k mod n: if this rate grows with n while one decoder's does
    not, decoding is bound by each video's latency (a decoder session set up per video, one
    video at a time), not by the decoding hardware."""
    from concurrent.futures import ThreadPoolExecutor

    device = decoders[0].device
    for d in decoders:
        _build(d, items)
    idx = _sampled_indices(items, temporal)
    starts = list(range(0, len(items), batch))

    def work(k: int) -> int:
        n = 0
        for s in starts[k :: len(decoders)]:
            out = decoders[k].decode([e for _, e in items[s : s + batch]], idx[s : s + batch])
            n += sum(len(o) for o in out)
        return n

    _sync(device)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(decoders)) as pool:
        n = sum(pool.map(work, range(len(decoders))))
    _sync(device)
    return n / (time.perf_counter() - t0)


def bench_loader(cfg: LoaderConfig, batches: int, device: str, in_threads: bool = False) -> float:
    """Batches/s of the training loader in steady state, over one epoch that does not end.
    Untimed first: one batch per worker and per finishing thread (worker start-up, the first fill
    of the shuffle buffer, each thread's decoder build). Then ``batches``, rounded up to whole
    rounds of the workers: workers started together deliver their batches in bursts (the
    DataLoader takes them in turn), so a window that ends mid-round would count a burst's batches
    without the wait for the next one (up to workers - 1 batches too many).
    ``in_threads``: decoded and augmented in the training process by its finishing threads, as on
    a GPU, wherever it runs."""
    workers = max(1, cfg.num_workers)
    timed = -(-batches // workers) * workers
    # (finishing in threads here: the decoders' own throughput, comparable over leases; the
    # default's process of its own is bench.e2e's, where its hand-over meets the step)
    # one epoch, longer than the run by more than the loader runs ahead (its workers still busy at
    # the window's end: batches_ahead(), below 2 x workers + 70 with up to 16 finishing threads)
    cfg = dataclasses.replace(cfg, finish_in="thread", epoch_samples=cfg.batch_size * (timed + 4 * workers + 90))
    loader = VideoLoader(cfg, device=device, decode_in_collate=True if in_threads else None)
    if in_threads:
        loader.finish_in_thread = True
    it = iter(loader)
    for _ in range(loader.finish_threads + workers):  # batch k is finished by thread k mod N
        next(it)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(timed):
        next(it)
    _sync(device)
    rate = timed / (time.perf_counter() - t0)
    it.close()
    loader.close()
    return rate


def nvjpeg_settings(text: str) -> dict:
    """``hw_load=1,huffman=gpu`` -> the LoaderConfig fields it sets (the others at their defaults),
    their values checked by LoaderConfig itself (its ranges and choices, named by flag)."""
    fields = {"hw_load": "nvjpeg_hw_load", "huffman": "nvjpeg_huffman"}
    out = {f: getattr(LoaderConfig, f) for f in fields.values()}
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key not in fields or not value:
            raise ValueError(f"--nvjpeg {text}: settings are hw_load=0..1 and huffman=cpu|gpu, got {part!r}")
        try:
            out[fields[key]] = float(value) if key == "hw_load" else value
        except ValueError:
            raise ValueError(f"--nvjpeg {text}: hw_load takes a number in [0, 1], got {value!r}") from None
    try:
        LoaderConfig(shards="(not read here)", **out)
    except ValueError as exn:
        raise ValueError(f"--nvjpeg {text}: {exn}") from None
    return out


BENCH_SHARD_VIDEOS = 2
TEXTURE_HELP = ("the synthetic frames' background: natural (the default: a textured scene, 22-25 KiB a JPEG frame "
                "at 340x256 as camera footage, which decodes slower than small frames) or none (the plain "
                "backgrounds of the rows measured before 2026-11-28: ~4 KiB a frame)")


def texture_suffix(texture: str) -> str:
    """What the benchmarks' synthetic shard directories add to their names for ``texture`` (none:
    nothing, the names directories written before the option had)."""
    return "" if texture == "none" else f"_{texture}"


def ensure_bench_shards(a, payloads: set[str]) -> None:
    """The synthetic shards this benchmark reads, made once per size and GOP: only the payloads
    ``--paths`` reads (rendering the video payload at 340x256 costs minutes for nothing otherwise)."""
    from carl_scale.datasets.encode import EncodeOptions
    from carl_scale.datasets.synthetic import ensure_synthetic_shards

    syn = SyntheticConfig(train_videos=max(48, a.batch * (a.batches + 4)), val_videos=a.videos,
                          height=a.height, width=a.width, min_frames=a.min_frames,
                          max_frames=max(SyntheticConfig.max_frames, a.min_frames), texture=a.texture)
    where = Path(a.data_dir) / (f"{a.width}x{a.height}_gop{a.gop}" + (
        f"_min{a.min_frames}" if a.min_frames != SyntheticConfig.min_frames else "") + texture_suffix(a.texture))
    # 2 videos a shard: 24 training shards, more than the workers of any row (8-16), so each worker
    # reads shards of its own as on Kinetics; with fewer shards than workers every worker reads all
    # of them and keeps every Nth video (8 x the bytes read, 6 shards of 8 before 2026-11-28)
    kw = dict(max_samples=BENCH_SHARD_VIDEOS, workers=a.write_workers, progress=False)
    if a.shards is None and "video" in payloads:
        a.shards = str(where / "video")
        ensure_synthetic_shards(a.shards, syn, encode=EncodeOptions(gop=a.gop), **kw)
    if a.jpeg_shards is None and "jpeg" in payloads:
        a.jpeg_shards = str(where / "jpeg")
        ensure_synthetic_shards(a.jpeg_shards, syn, payload="jpeg", **kw)
    a.jpeg_quality_shards = {}
    for q in a.jpeg_qualities:
        a.jpeg_quality_shards[q] = str(where / f"jpeg_q{q}")
        ensure_synthetic_shards(a.jpeg_quality_shards[q], syn, payload="jpeg", encode=EncodeOptions(jpeg_quality=q),
                                **kw)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--shards", help="a video-payload shard directory (default: synthetic, made if absent)")
    p.add_argument("--jpeg-shards", help="the same videos as a jpeg payload (default: synthetic)")
    p.add_argument("--data-dir", default="data/bench", help="where the default synthetic shards go")
    p.add_argument("--height", type=int, default=128, help="synthetic frame height")
    p.add_argument("--width", type=int, default=128, help="synthetic frame width")
    p.add_argument("--gop", type=int, default=30, help="keyframe interval of the synthetic video payload")
    p.add_argument("--texture", choices=("natural", "none"), default="natural", help=TEXTURE_HELP)
    p.add_argument("--write-workers", type=int, default=1, help="processes rendering the synthetic shards")
    p.add_argument("--write-only", action="store_true",
                   help="write the synthetic shards --paths reads and stop (e.g. for bench.e2e --shards)")
    p.add_argument("--videos", type=int, default=24, help="videos decoded per measurement")
    p.add_argument("--min-frames", type=int, default=SyntheticConfig.min_frames,
                   help="the synthetic videos' shortest length (60-400 frames by default): T or more keeps every "
                        "batch unpadded, one step for the e2e rows to time")
    p.add_argument("--whole-videos", type=int, default=4, help="of those, videos decoded whole")
    p.add_argument("--frames", type=int, default=32, help="T, frames per view")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--device", default="cuda" if cuda_available() else "cpu")
    p.add_argument("--paths", nargs="*", default=["video/pyav", "video/dali", "jpeg/pyav", "jpeg/dali"],
                   help="payload/decoder pairs to measure; the first is the reference")
    p.add_argument("--cpu-shares", nargs="*", type=float, default=[],
                   help="on a GPU, after each dali path: its loader with this share of the videos decoded by "
                        "PyAV in the workers (--cpu-decode-share), e.g. 0.25 0.5")
    p.add_argument("--nvjpeg", nargs="*", default=[], metavar="SETTINGS",
                   help="more jpeg/dali rows with these nvJPEG settings (hw_load=0..1, huffman=cpu|gpu, joined "
                        "by commas), e.g. hw_load=1 huffman=gpu hw_load=0,huffman=gpu")
    p.add_argument("--jpeg-qualities", nargs="*", type=int, default=[], metavar="Q",
                   help="each jpeg path also on synthetic shards written at these JPEG qualities (the default "
                        "jpeg shards: 90), e.g. 75 50: disk bytes per frame against frames/s")
    p.add_argument("--side-by-side", type=int, default=0, metavar="N",
                   help="after each dali path, its sampled frames/s with N decoders in N threads side by side "
                        "(0: none): does decoding scale past one video at a time?")
    p.add_argument("--finish-threads", nargs="*", type=int, default=[], metavar="N",
                   help="after each dali path, its loader decoding in the training process in N threads side by "
                        "side (--finish-threads), e.g. 1 2 4")
    a = p.parse_args(argv)
    if any(not 1 <= q <= 100 for q in a.jpeg_qualities):
        p.error("--jpeg-qualities must be in [1, 100]")
    if a.jpeg_qualities and a.jpeg_shards is not None:
        p.error("--jpeg-qualities writes synthetic shards: drop --jpeg-shards")
    try:
        variants = [nvjpeg_settings(v) for v in a.nvjpeg]
    except ValueError as e:
        p.error(str(e))
    if any(not 0 < x <= 1 for x in a.cpu_shares):
        p.error("--cpu-shares must be in (0, 1]")
    if min(a.videos, a.whole_videos, a.frames, a.batch, a.batches, a.image_size, a.write_workers, a.min_frames) < 1 \
            or a.workers < 0 or a.gop < 1 or a.side_by_side < 0 or any(not 1 <= n <= 16 for n in a.finish_threads):
        p.error("every count must be >= 1 (--workers >= 0, --finish-threads 1..16)")
    paths = [tuple(x.split("/")) for x in a.paths]
    if not paths or any(len(x) != 2 or x[0] not in ("video", "jpeg") or x[1] not in ("pyav", "dali") for x in paths):
        p.error("--paths takes video|jpeg/pyav|dali pairs, e.g. video/pyav jpeg/dali")

    ensure_bench_shards(a, {payload for payload, _ in paths})
    if a.write_only:
        print(f"shards written: {', '.join(x for x in (a.shards, a.jpeg_shards) if x is not None)}")
        return []
    temporal = TemporalConfig(num_frames=a.frames)
    decoders = {"pyav": PyAVDecoder(), "dali": DaliDecoder(device="cuda" if a.device.startswith("cuda") else "cpu",
                                                           num_threads=max(1, a.workers))}
    rows, handed = [], {}
    # (row label, payload, decoder, shards): the paths asked for, then the jpeg ones at each quality
    runs = [(payload, payload, name, a.shards if payload == "video" else a.jpeg_shards) for payload, name in paths]
    runs += [(f"jpeg q{q}", "jpeg", name, a.jpeg_quality_shards[q])
             for q in a.jpeg_qualities for payload, name in paths if payload == "jpeg"]
    for label, payload, name, spec in runs:
        items = _samples(spec, "val", a.videos)
        kib = sum(len(e.data) for _, e in items) / sum(e.num_frames for _, e in items) / 1024
        # what a worker hands the finishing step per video where that step decodes (a GPU run): a
        # jpeg payload cut to the views' frames, a video payload whole
        handed[label] = sum(len(e.keep_only(i).data) for (_, e), i in zip(items, _sampled_indices(items, temporal))) \
            / sum(len(e.data) for _, e in items)
        whole, sampled = bench_decode(decoders[name], items, temporal, a.batch, a.whole_videos)
        # the loader: DALI on the GPU when measuring the GPU; PyAV always in the CPU workers
        cfg = LoaderConfig(shards=spec, batch_size=a.batch, num_workers=a.workers, decoder=name,
                           temporal=temporal, spatial=SpatialConfig(image_size=a.image_size))
        loader = bench_loader(cfg, a.batches, a.device)
        rows.append(dict(payload=label, decoder=name, kib=kib, whole=whole, sampled=sampled, loader=loader,
                         loader_frames=loader * a.batch * 2 * a.frames))
        print(f"measured {label}/{name}: {kib:.1f} KiB/frame, whole {whole:.0f} f/s, sampled {sampled:.0f} f/s, "
              f"loader {loader:.2f} batches/s", flush=True)
        if label != payload:
            continue
        if name == "dali" and a.side_by_side:
            n = a.side_by_side
            decs = [DaliDecoder(device=decoders["dali"].device, num_threads=max(1, a.workers // n)) for _ in range(n)]
            sampled = bench_side_by_side(decs, items, temporal, a.batch)
            rows.append(dict(payload=payload, decoder=f"dali, {n} side by side", kib=kib, whole=None, sampled=sampled,
                             loader=None, loader_frames=None))
            print(f"measured {payload}/dali, {n} decoders side by side: sampled {sampled:.0f} f/s", flush=True)
        for n in (a.finish_threads if name == "dali" else []):
            loader = bench_loader(dataclasses.replace(cfg, finish_threads=n), a.batches, a.device, in_threads=True)
            rows.append(dict(payload=payload, decoder=f"dali in {n} finishing thread{'s' if n > 1 else ''}", kib=kib,
                             whole=None, sampled=None, loader=loader, loader_frames=loader * a.batch * 2 * a.frames))
            print(f"measured {payload}/dali in {n} finishing thread(s): loader {loader:.2f} batches/s", flush=True)
        for share in (a.cpu_shares if name == "dali" and a.device.startswith("cuda") else []):
            loader = bench_loader(dataclasses.replace(cfg, cpu_decode_share=share), a.batches, a.device)
            rows.append(dict(payload=payload, decoder=f"dali + {100 * share:.0f}% pyav", kib=kib, whole=None,
                             sampled=None, loader=loader, loader_frames=loader * a.batch * 2 * a.frames))
            print(f"measured {payload}/dali with {100 * share:.0f}% decoded by pyav in the workers: loader "
                  f"{loader:.2f} batches/s", flush=True)
        for text, kw in (zip(a.nvjpeg, variants) if (payload, name) == ("jpeg", "dali") else []):
            dec = DaliDecoder(device=decoders["dali"].device, num_threads=decoders["dali"].num_threads,
                              jpeg_hw_load=kw["nvjpeg_hw_load"], jpeg_huffman=kw["nvjpeg_huffman"])
            whole, sampled = bench_decode(dec, items, temporal, a.batch, a.whole_videos)
            loader = bench_loader(dataclasses.replace(cfg, **kw), a.batches, a.device)
            rows.append(dict(payload=payload, decoder=f"dali {text}", kib=kib, whole=whole, sampled=sampled,
                             loader=loader, loader_frames=loader * a.batch * 2 * a.frames))
            print(f"measured jpeg/dali {text}: whole {whole:.0f} f/s, sampled {sampled:.0f} f/s, loader "
                  f"{loader:.2f} batches/s", flush=True)
    ref = rows[0]

    def rate(r, key: str) -> tuple[str, str]:
        return ("-", "-") if r[key] is None else (f"{r[key]:.0f}", f"{r[key] / ref[key]:.2f}")

    print(f"\ndata pipeline on {a.device}: {a.width}x{a.height} videos, GOP {a.gop}, T={a.frames}, "
          f"{a.image_size}px views, batch {a.batch}, {a.workers} workers; ratios are to {paths[0][0]}/{paths[0][1]}")
    def loader(r) -> tuple[str, str, str]:
        return ("-", "-", "-") if r["loader"] is None else (
            f"{r['loader']:.2f}", f"{r['loader'] / ref['loader']:.2f}", f"{r['loader_frames']:.0f}")

    print(table([(r["payload"], r["decoder"], f"{r['kib']:.1f}", *rate(r, "whole"), *rate(r, "sampled"), *loader(r))
                 for r in rows],
                ("payload", "decoder", "KiB/frame", "whole f/s", "x", "sampled f/s", "x", "loader batches/s", "x",
                 "loader sampled f/s")))
    print("share of each video's payload bytes a worker hands to a GPU's finishing step (the views' frames): "
          + ", ".join(f"{label} {share:.2f}" for label, share in handed.items()))
    for r in rows:
        r["handed"] = handed[r["payload"]]
    return rows


if __name__ == "__main__":
    from carl_scale.errors import run_cli

    run_cli("carl_scale.bench.data", main)
