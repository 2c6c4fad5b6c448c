"""Frame decoders: one interface, two real backends.

``decode(items, indices)`` takes encoded payloads and, for each, the frame indices wanted (any
order, repeats allowed) and returns ``(len(indices), H, W, 3)`` uint8 RGB frames — numpy arrays
on the CPU, torch CUDA tensors from DALI's ``mixed`` backend. Both backends decode only what is
asked for: PyAV seeks to the keyframe before the first wanted frame and stops after the last one;
DALI's video decoder takes the frame list itself; JPEG payloads decode the wanted frames only.

* :class:`PyAVDecoder` — FFmpeg through PyAV and Pillow, CPU, any codec (H.264 included).
* :class:`DaliDecoder` — ``fn.decoders.video`` / ``fn.decoders.image`` fed through
  ``fn.external_source``; ``device="cpu"`` decodes VP8/VP9/MJPEG video and JPEG frames,
  ``device="cuda"`` uses NVDEC/nvJPEG (``mixed``) and adds H.264/HEVC/AV1.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import math
import os
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Sequence

import av
import numpy as np
from PIL import Image

from carl_scale.data.codec import frame_to_rgb, split_jpeg_blob
from carl_scale.data.config import NVJPEG_HW_LOAD

DALI_CPU_CODECS = {"vp8", "vp9", "mjpeg", "jpeg"}
# NVDEC's smallest frame (height, width) per codec, from NVIDIA's decoder capability table; VP9's
# was seen on an H200 ("Video is too small ... 64x64 vs supported:128x128"). Unknown codecs: 144.
NVDEC_MIN_SIZE = {"h264": (16, 48), "vp8": (16, 48), "mjpeg": (16, 48), "vp9": (128, 128), "av1": (128, 128),
                  "hevc": (144, 144), "h265": (144, 144)}
NVDEC_MIN_UNKNOWN = (144, 144)

# A process that forks (DataLoader workers) after building DALI pipelines hands its children
# copies of them whose threads do not exist there: a child that destroys one (its garbage
# collector freeing a decoder the parent had dropped) hangs or crashes, and one that runs it
# hangs. So a child keeps every inherited pipeline alive and unused, and its decoders build anew.
_PIPELINES: weakref.WeakSet = weakref.WeakSet()
_DECODERS: weakref.WeakSet = weakref.WeakSet()
_INHERITED: list = []


def keep_out_of_children(pipe):
    """Register a built DALI pipeline: a forked child never runs or destroys its copy."""
    _PIPELINES.add(pipe)
    return pipe


def _after_fork_in_child() -> None:
    _INHERITED.extend(_PIPELINES)
    for d in list(_DECODERS):
        d._video_pipe = d._image_pipe = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def below_nvdec_minimum(item: "EncodedVideo") -> bool:
    """A video (of known size) NVDEC cannot decode: smaller than its codec's minimum either way."""
    if item.kind != "video" or item.height <= 0 or item.width <= 0:
        return False
    min_h, min_w = NVDEC_MIN_SIZE.get(item.codec, NVDEC_MIN_UNKNOWN)
    return item.height < min_h or item.width < min_w


@dataclass
class EncodedVideo:
    kind: Literal["video", "jpeg"]
    data: bytes  # container bytes, or the concatenated JPEGs
    num_frames: int
    offsets: np.ndarray | None = None  # jpeg only: int64, one more than the JPEGs in ``data``
    codec: str = ""
    height: int = 0  # frame size from the metadata (0: not known)
    width: int = 0
    # jpeg only: the (sorted) frames of the video that ``data`` holds, None: all ``num_frames``
    frame_ids: np.ndarray | None = None

    def jpegs(self, frames: np.ndarray) -> list[bytes]:
        """The JPEG bytes of these frames of the video (frame numbers, as the timestamps count)."""
        frames = np.asarray(frames, dtype=np.int64)
        if self.frame_ids is None:
            return split_jpeg_blob(self.data, self.offsets, frames)
        at = np.searchsorted(self.frame_ids, frames).clip(max=max(0, len(self.frame_ids) - 1))
        missing = frames[self.frame_ids[at] != frames] if len(self.frame_ids) else frames
        if len(missing):
            raise IndexError(f"frames {missing[:5].tolist()} are not among the {len(self.frame_ids)} sampled frames "
                             f"this payload was cut to")
        return split_jpeg_blob(self.data, self.offsets, at)

    def keep_only(self, frames: np.ndarray) -> "EncodedVideo":
        """The jpeg payload cut to these frames (the views' sampled ones: what the finishing step
        decodes), so that a worker hands over their bytes only, not every frame of the video;
        a video payload as it is (its frames need the stream around them). A damaged offset table
        is raised here, in the worker, which counts the sample and draws the next one."""
        if self.kind != "jpeg":
            return self
        frames = np.unique(np.asarray(frames, dtype=np.int64))
        if not len(frames):
            raise ValueError("a jpeg payload cut to no frame")
        if self.frame_ids is not None and np.array_equal(self.frame_ids, frames):  # (cut to them already)
            return self
        return self.cut_to(frames, self.jpegs(frames))

    def cut_to(self, frames: np.ndarray, parts: list[bytes]) -> "EncodedVideo":
        """This jpeg payload holding only ``frames`` (sorted, unique), whose JPEGs are ``parts``."""
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in parts], out=offsets[1:])
        return dataclasses.replace(self, data=b"".join(parts), offsets=offsets, frame_ids=frames)

    @classmethod
    def from_sample(cls, sample: dict, meta: dict) -> "EncodedVideo":
        """From a webdataset sample dict (raw bytes per extension) and its parsed JSON."""
        size = dict(height=int(meta.get("height", 0)), width=int(meta.get("width", 0)))
        if "video" in sample:
            return cls("video", sample["video"], int(meta["num_frames"]), codec=meta.get("codec", ""), **size)
        if "jpgs" in sample and "jpgofs" in sample:
            offs = np.frombuffer(sample["jpgofs"], dtype="<i8")
            return cls("jpeg", sample["jpgs"], int(meta["num_frames"]), offs, "jpeg", **size)
        raise ValueError(f"sample {sample.get('__key__')!r} has neither a 'video' nor 'jpgs'+'jpgofs' payload "
                         f"(fields: {sorted(k for k in sample if not k.startswith('__'))})")


def _unique(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
    return u, inverse


class FrameDecoder(ABC):
    name: str
    device: str = "cpu"

    @abstractmethod
    def decode(self, items: Sequence[EncodedVideo], indices: Sequence[np.ndarray]) -> list:
        ...

    def decode_all(self, item: EncodedVideo):
        return self.decode([item], [np.arange(item.num_frames)])[0]

    def reset(self) -> None:
        """Drop any state a failed decode may have left unusable (DALI: the built pipelines)."""

    @staticmethod
    def _check(item: EncodedVideo, idx: np.ndarray) -> None:
        if len(idx) and (idx.min() < 0 or idx.max() >= item.num_frames):
            raise IndexError(f"frame indices [{idx.min()}, {idx.max()}] outside a {item.num_frames}-frame video")


class PyAVDecoder(FrameDecoder):
    """FFmpeg via PyAV for video, Pillow for JPEG frames. CPU, every codec FFmpeg reads."""

    name = "pyav"

    def decode(self, items, indices):
        out = []
        for item, idx in zip(items, indices):
            idx = np.asarray(idx, dtype=np.int64)
            self._check(item, idx)
            u, inv = _unique(idx)
            frames = self._video(item, u) if item.kind == "video" else self._jpeg(item, u)
            out.append(frames[inv])
        return out

    @staticmethod
    def _jpeg(item: EncodedVideo, u: np.ndarray) -> np.ndarray:
        jpgs = item.jpegs(u)
        return np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in jpgs])

    @classmethod
    def _video(cls, item: EncodedVideo, u: np.ndarray) -> np.ndarray:
        if u[0] >= 8:
            try:
                return cls._scan(item, u, seek=True)
            except _NeedsLinearDecode:
                pass
        return cls._scan(item, u, seek=False)

    @staticmethod
    def _scan(item: EncodedVideo, u: np.ndarray, seek: bool) -> np.ndarray:
        """Decode frames ``u`` (sorted, unique). With ``seek``, jump to the keyframe before u[0]
        and read frame indices off timestamps (constant frame rate, as every shard writer
        produces); without, decode from the start and count frames."""
        wanted = {int(i): k for k, i in enumerate(u)}
        got: list[np.ndarray | None] = [None] * len(u)
        remaining = len(u)
        with av.open(io.BytesIO(item.data)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            tb = float(stream.time_base)
            start = stream.start_time or 0
            if seek:
                if rate <= 0:
                    raise _NeedsLinearDecode
                container.seek(start + int(round(u[0] / rate / tb)), stream=stream, backward=True)
            counted = 0
            for frame in container.decode(stream):
                if seek:
                    if frame.pts is None:
                        raise _NeedsLinearDecode
                    i = int(round((frame.pts - start) * tb * rate))
                    if counted == 0 and i > u[0]:  # landed past the first wanted frame
                        raise _NeedsLinearDecode
                else:
                    i = counted
                counted += 1
                k = wanted.get(i)
                if k is not None and got[k] is None:
                    got[k] = frame_to_rgb(frame)
                    remaining -= 1
                    if remaining == 0:
                        break
                if i > u[-1]:
                    break
        if remaining and seek:  # a gap in the timestamps (rounding, a repeated pts): count the frames instead
            raise _NeedsLinearDecode
        if remaining:
            missing = [int(u[k]) for k, g in enumerate(got) if g is None]
            raise ValueError(f"video ended before frames {missing[:5]} (of {item.num_frames} declared)")
        return np.stack(got)


class _NeedsLinearDecode(Exception):
    pass


class DaliDecoder(FrameDecoder):
    """DALI decoding fed from Python: the wanted frames of a batch of videos in one pipeline run.

    Pipelines are built lazily (so a decoder can be created before DataLoader workers fork) and
    reused; ``max_batch`` bounds the number of videos per run, ``image_batch`` the number of JPEG
    frames (the loader asks for a training batch's sampled frames, B x 2T: one run per batch).
    """

    name = "dali"

    def __init__(self, device: str = "cpu", max_batch: int = 32, num_threads: int = 2, device_id: int = 0,
                 image_batch: int = 256, jpeg_hw_load: float = NVJPEG_HW_LOAD, jpeg_huffman: str = "cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"DALI device must be 'cpu' or 'cuda', got {device!r}")
        if not 0 <= jpeg_hw_load <= 1 or jpeg_huffman not in ("cpu", "gpu"):
            raise ValueError(f"jpeg_hw_load must be in [0, 1] and jpeg_huffman 'cpu' or 'gpu', got "
                             f"{jpeg_hw_load} and {jpeg_huffman!r}")
        self.device, self.max_batch, self.num_threads, self.device_id = device, max_batch, num_threads, device_id
        self.image_batch, self.jpeg_hw_load, self.jpeg_huffman = image_batch, jpeg_hw_load, jpeg_huffman
        self._video_pipe = self._image_pipe = None
        _DECODERS.add(self)

    def __getstate__(self):  # pipelines do not cross process boundaries; workers rebuild them
        state = dict(self.__dict__)
        state["_video_pipe"] = state["_image_pipe"] = None
        return state

    def __setstate__(self, state):  # (a copy or an unpickled decoder: registered as __init__ does)
        self.__dict__.update(state)
        _DECODERS.add(self)

    def reset(self) -> None:
        self._video_pipe = self._image_pipe = None  # rebuilt at the next decode

    def _build(self, kind: str):
        from nvidia.dali import fn, pipeline_def, types

        backend = "mixed" if self.device == "cuda" else "cpu"
        dev_id = self.device_id if self.device == "cuda" else None

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads, device_id=dev_id,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def video_pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=False)
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(enc, frames=frames, device=backend, pad_mode="none")

        @pipeline_def(batch_size=self.image_batch, num_threads=self.num_threads, device_id=dev_id,
                      exec_dynamic=True, prefetch_queue_depth=1)
        def image_pipe():
            enc = fn.external_source(name="enc", dtype=types.UINT8, ndim=1, no_copy=False)
            return fn.decoders.image(enc, device=backend, output_type=types.RGB, **self.image_options())

        pipe = video_pipe() if kind == "video" else image_pipe()
        pipe.build()
        return keep_out_of_children(pipe)

    def image_options(self) -> dict:
        """nvJPEG's settings for ``fn.decoders.image`` (GPU only: the CPU decodes with libjpeg-turbo).
        Kinetics-size frames (~87k pixels) are far under DALI's 1-MPixel threshold, so the frames
        the hardware decoder does not take have their Huffman stage decoded by the host threads
        unless ``jpeg_huffman`` is "gpu" (threshold 0)."""
        if self.device != "cuda":
            return {}
        return {"hw_decoder_load": float(self.jpeg_hw_load),
                **({"hybrid_huffman_threshold": 0} if self.jpeg_huffman == "gpu" else {})}

    def jpeg_engine(self) -> str:
        """What decodes JPEG frames, for the loader's log line."""
        if self.device != "cuda":
            return "libjpeg-turbo"
        return (f"nvJPEG: {100 * self.jpeg_hw_load:.0f}% to the hardware decoder where the GPU has one, Huffman "
                f"of the rest on the {'GPU' if self.jpeg_huffman == 'gpu' else f'CPU ({self.num_threads} threads)'}")

    def _outputs(self, tl) -> list:
        if self.device == "cpu":
            return [np.array(tl[i]) for i in range(len(tl))]
        import torch
        from nvidia.dali.plugin.pytorch import feed_ndarray

        res = []
        for i in range(len(tl)):
            t = tl[i]
            dst = torch.empty(tuple(t.shape()), dtype=torch.uint8, device=f"cuda:{self.device_id}")
            feed_ndarray(t, dst, cuda_stream=torch.cuda.current_stream(self.device_id))
            res.append(dst)
        return res

    def _run_video(self, encs: list[np.ndarray], frame_lists: list[np.ndarray]) -> list:
        if self._video_pipe is None:
            self._video_pipe = self._build("video")
        out = []
        for s in range(0, len(encs), self.max_batch):
            self._video_pipe.feed_input("enc", encs[s : s + self.max_batch])
            self._video_pipe.feed_input("frames", frame_lists[s : s + self.max_batch])
            (tl,) = self._video_pipe.run()
            out += self._outputs(tl)
        return out

    def _flat(self, tl):
        """A DALI TensorList copied out in one piece: (a flat uint8 buffer holding its samples back
        to back, a NumPy array or a CUDA tensor; each sample's shape). One copy whatever the
        samples' sizes, where a copy per sample costs a Python round trip each (hundreds a batch)."""
        shapes = [tuple(int(d) for d in x) for x in tl.shape()]
        total = sum(math.prod(x) for x in shapes)
        if self.device == "cpu":
            buf = np.empty(total, np.uint8)
            if total:
                tl.copy_to_external(ctypes.c_void_p(buf.ctypes.data))
            return buf, shapes
        import torch
        from nvidia.dali import types

        buf = torch.empty(total, dtype=torch.uint8, device=f"cuda:{self.device_id}")
        if total:
            stream = types._raw_cuda_stream_ptr(torch.cuda.current_stream(self.device_id))
            tl.copy_to_external(ctypes.c_void_p(buf.data_ptr()), stream, non_blocking=True)
        return buf, shapes

    def _run_images(self, jpgs: list[np.ndarray]):
        """Decoded frames of ``jpgs``, back to back in one flat buffer, and their shapes."""
        if self._image_pipe is None:
            self._image_pipe = self._build("image")
        bufs, shapes = [], []
        for s in range(0, len(jpgs), self.image_batch):
            self._image_pipe.feed_input("enc", jpgs[s : s + self.image_batch])
            (tl,) = self._image_pipe.run()
            buf, sh = self._flat(tl)
            bufs.append(buf)
            shapes += sh
        if len(bufs) == 1:
            return bufs[0], shapes
        if self.device == "cpu":
            return np.concatenate(bufs), shapes
        import torch

        return torch.cat(bufs), shapes

    def decode(self, items, indices):
        uniq = []
        for item, idx in zip(items, indices):
            idx = np.asarray(idx, dtype=np.int64)
            self._check(item, idx)
            if item.kind == "video" and self.device == "cpu" and item.codec and item.codec not in DALI_CPU_CODECS:
                raise ValueError(f"DALI's CPU video decoder cannot decode {item.codec}; use the pyav decoder "
                                 f"or a GPU (DALI 'mixed'), or transcode the shards to vp9/mjpeg")
            uniq.append(_unique(idx))
        result: list = [None] * len(items)
        small = [k for k, it in enumerate(items) if self.device == "cuda" and below_nvdec_minimum(it)]
        if small:  # NVDEC refuses them (and the pipeline is lost with them): decoded on the CPU
            import torch

            cpu = PyAVDecoder().decode([items[k] for k in small], [uniq[k][0] for k in small])
            for k, frames in zip(small, cpu):
                result[k] = torch.as_tensor(frames).to(f"cuda:{self.device_id}", non_blocking=True)
        vid = [k for k, it in enumerate(items) if it.kind == "video" and result[k] is None]
        jpg = [k for k, it in enumerate(items) if it.kind == "jpeg"]
        if vid:
            decoded = self._run_video([np.frombuffer(items[k].data, np.uint8) for k in vid],
                                      [uniq[k][0].astype(np.int32) for k in vid])
            for k, frames in zip(vid, decoded):
                if len(frames) != len(uniq[k][0]):  # (indexed below: on a GPU, out of range is a device assert)
                    raise ValueError(f"DALI decoded {len(frames)} of the {len(uniq[k][0])} frames asked of a "
                                     f"{items[k].num_frames}-frame video (a container shorter than its metadata?)")
                result[k] = frames
        if jpg:
            flat = []
            for k in jpg:
                flat += [np.frombuffer(b, np.uint8) for b in items[k].jpegs(uniq[k][0])]
            buf, shapes = self._run_images(flat)
            pos = start = 0
            for k in jpg:  # a video's frames lie back to back in the buffer: one view of it each
                n = len(uniq[k][0])
                own = set(shapes[pos : pos + n])
                if len(own) != 1:
                    raise ValueError(f"the JPEG frames of one video decode to different sizes: {sorted(own)}")
                size = n * math.prod(shapes[pos])
                result[k] = buf[start : start + size].reshape(n, *shapes[pos])
                pos, start = pos + n, start + size
        return [_gather(r, uniq[k][1]) for k, r in enumerate(result)]


def _gather(frames, inv: np.ndarray):
    """``frames[inv]``: the decoded unique frames back in the order (and repeats) asked for. For a
    CUDA tensor the index goes over from pinned memory without waiting for the stream (NumPy
    indexing copies it synchronously, after everything queued there); the identity is no copy."""
    if len(inv) == len(frames) and (inv == np.arange(len(inv))).all():
        return frames
    if isinstance(frames, np.ndarray) or not frames.is_cuda:
        return frames[inv]
    import torch

    index = torch.from_numpy(np.ascontiguousarray(inv, dtype=np.int64)).pin_memory()
    return frames.index_select(0, index.to(frames.device, non_blocking=True))


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        return False


def split_device(device: str | None) -> tuple[str, int]:
    """("cpu" | "cuda", GPU index) of a device string: "cuda:1" -> ("cuda", 1); "cuda" -> the
    current GPU (the rank's own, once the trainer has set it); None -> a GPU if there is one."""
    import torch

    dev = torch.device(device) if device else torch.device("cuda" if cuda_available() else "cpu")
    if dev.type == "cpu":
        return "cpu", 0
    if dev.type != "cuda":
        raise ValueError(f"decoding runs on the CPU or a CUDA GPU, not {device!r}")
    return "cuda", dev.index if dev.index is not None else (torch.cuda.current_device() if cuda_available() else 0)


def local_ranks() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE (it sets
    no LOCAL_WORLD_SIZE), else 1."""
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def make_decoder(name: str = "auto", *, codec: str = "", device: str | None = None,
                 image_batch: int = 256, jpeg_hw_load: float = NVJPEG_HW_LOAD,
                 jpeg_huffman: str = "cpu") -> FrameDecoder:
    """``auto``: DALI wherever it can decode the payload — always on a GPU; on the CPU for
    VP8/VP9/MJPEG video and JPEG frames (2.1x PyAV's sampled-frame rate for VP9 and 4.5x for
    JPEG on this project's 2-core machine, ``python -m carl_scale.bench.data``) — else PyAV.
    ``dali`` on a CPU-only machine for H.264 is a clear error, not a silent fallback. ``device``
    "cuda:N" decodes on GPU N (each rank its own: DALI pipelines are built for that GPU)."""
    device, device_id = split_device(device)
    dali_ok = device == "cuda" or (bool(codec) and codec in DALI_CPU_CODECS)
    if name == "auto":
        name = "dali" if dali_ok else "pyav"
    if name == "pyav":
        return PyAVDecoder()
    if name == "dali":
        if device == "cpu" and codec and codec not in DALI_CPU_CODECS:
            raise ValueError(f"decoder='dali' on the CPU cannot decode {codec} (DALI decodes only "
                             f"{sorted(DALI_CPU_CODECS)} without a GPU); use decoder='pyav' or 'auto'")
        # On a GPU it decodes in the training process, whose host threads do the decoders' CPU
        # stages (parsing, the Huffman decoding the hardware JPEG engine does not take): a quarter
        # of this rank's share of the cores (2 to 8); its DataLoader workers have the rest.
        mine = len(os.sched_getaffinity(0))  # (already this rank's share if the launcher bound its cores)
        cores = mine // local_ranks() if mine == os.cpu_count() else mine
        threads = 2 if device == "cpu" else max(2, min(8, cores // 4))
        return DaliDecoder(device=device, device_id=device_id, num_threads=threads, image_batch=image_batch,
                           jpeg_hw_load=jpeg_hw_load, jpeg_huffman=jpeg_huffman)
    raise ValueError(f"unknown decoder {name!r}; choose 'auto', 'dali' or 'pyav'")
