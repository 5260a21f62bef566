"""Reading videos into frames, resizing them as the model expects, and writing frames to mp4.

A video is either a video file (decoded with decord) or a folder of frame images
(jpg/jpeg/png, in natural sort order, the YouTube-VIS / LV-VIS layout). `open_video` picks the
frames to use (start/end in seconds, a stride, a cap) and returns a `VideoSource` that decodes
them lazily, one window of consecutive selected frames at a time, so memory does not grow with
the length of the video.

Frames are uint8 RGB arrays `[H, W, 3]`; a stack of them is `[T, H, W, 3]`.
"""
from __future__ import annotations

import logging
import math
import numbers
import os
import re
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipvis._io import default_file_mode, read_rgb_image
from clipvis.errors import ClipvisError, VideoError

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
# A frame folder carries no frame rate. YouTube-VIS frames are every 5th frame of 30 fps videos.
DEFAULT_FOLDER_FPS = 6.0


def progress_enabled(enabled: bool = True) -> bool:
    """Whether to show a progress bar: asked for, and clipvis logs below WARNING (not --quiet)."""
    return enabled and logging.getLogger("clipvis").getEffectiveLevel() < logging.WARNING


def progress_bar(total: Optional[int], desc: str, unit: str = "frame", enabled: bool = True) -> tqdm:
    """A tqdm bar over `total` items, hidden unless `progress_enabled(enabled)`."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(enabled), leave=False, dynamic_ncols=True)


@dataclass
class VideoInfo:
    """What `open_video` found: the selected frames and the video's original geometry.

    `num_frames` counts the frames left after start/end/stride/max selection, `frame_indices`
    are their positions in the full video (0-based), `fps` is the source frame rate,
    `height`/`width` the original resolution, `frame_stride` the stride that was applied.
    """

    path: str
    num_frames: int
    fps: float
    height: int
    width: int
    frame_indices: List[int] = field(default_factory=list)
    frame_stride: int = 1

    @property
    def selected_fps(self) -> float:
        """Frame rate of the selected frames (source fps divided by the stride)."""
        return self.fps / self.frame_stride


class VideoSource:
    """The selected frames of one video, decoded on demand.

    `info` describes them; `windows(size)` yields them in order as uint8 RGB chunks
    `[w, H, W, 3]` (w = size, the last one possibly shorter); `len()` is the number of selected frames.
    """

    def __init__(self, info: VideoInfo):
        self.info = info

    def __len__(self) -> int:
        return self.info.num_frames

    def __repr__(self) -> str:
        i = self.info
        return f"{type(self).__name__}({i.path!r}, frames={i.num_frames}, {i.width}x{i.height}, fps={i.fps:g})"

    def windows(self, size: int, *, progress: Optional[str] = None) -> Iterator[np.ndarray]:
        """Yield the selected frames as uint8 RGB arrays `[w, H, W, 3]` of at most `size` consecutive
        selected frames, decoding one window at a time. `progress`: a label to show a progress bar."""
        if not isinstance(size, numbers.Integral) or size < 1:
            raise ClipvisError(f"window size must be a whole number of frames >= 1, got {size!r}")
        return self._windows(int(size), progress)

    def _windows(self, size: int, progress: Optional[str]) -> Iterator[np.ndarray]:
        indices = self.info.frame_indices
        with progress_bar(len(indices), progress or "", enabled=progress is not None) as bar:
            for lo in range(0, len(indices), size):
                chunk = indices[lo : lo + size]
                frames = self._read(chunk)
                bar.update(len(chunk))
                yield frames

    def read_all(self) -> np.ndarray:
        """All selected frames at once, uint8 RGB `[T, H, W, 3]` (for short clips and tests)."""
        return np.concatenate(list(self.windows(64)), axis=0)

    def _read(self, indices: Sequence[int]) -> np.ndarray:
        """Frames at these source positions, uint8 RGB `[len(indices), H, W, 3]`."""
        raise NotImplementedError


class _DecordVideo(VideoSource):
    """A video file read with decord."""

    def __init__(self, info: VideoInfo, reader):
        super().__init__(info)
        self._reader = reader
        # Frames (positions in the whole video) that neither decord nor PyAV could decode; they are given
        # as the last decodable frame before them (black before any), and their results should be dropped.
        self.unreadable: set = set()
        self._last_good: Optional[np.ndarray] = None

    def _read(self, indices: Sequence[int]) -> np.ndarray:
        try:
            batch = self._reader.get_batch(list(indices))
            frames = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)
        except Exception as e:  # decord raises DECORDError / RuntimeError with a C++ traceback
            if self.info.height <= 0:  # the probe of the first frame: the file is not usable at all
                raise VideoError(
                    f"{self.info.path}: cannot decode frame {indices[0]} ({_first_line(e)}); "
                    "the file may be truncated or corrupt, re-encode or re-download it"
                ) from None
            log.debug("%s: decord failed on frames %d..%d (%s); decoding them with PyAV", self.info.path, indices[0], indices[-1], e)
            frames = self._read_with_pyav(indices)
        if len(frames):
            self._last_good = frames[-1]
        if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
            raise VideoError(f"{self.info.path}: decoder returned frames of shape {frames.shape}; re-encode the video (e.g. to H.264 mp4)")
        return np.ascontiguousarray(frames, dtype=np.uint8)

    def _read_with_pyav(self, indices: Sequence[int]) -> np.ndarray:
        """`indices` decoded with PyAV, skipping corrupt packets; frames it cannot produce are recorded in
        `unreadable` and filled with the last good frame."""
        wanted = set(int(i) for i in indices)
        got = _pyav_frames(self.info.path, wanted, self.info.fps)
        shape = (self.info.height, self.info.width, 3)
        out = np.empty((len(indices), *shape), dtype=np.uint8)
        previous = self._last_good if self._last_good is not None else np.zeros(shape, np.uint8)
        for k, i in enumerate(indices):
            frame = got.get(int(i))
            if frame is None or frame.shape != shape:
                self.unreadable.add(int(i))
                frame = previous
            out[k] = previous = frame
        return out


def _pyav_frames(path: str, wanted: set, fps: float) -> dict:
    """{frame index: uint8 RGB frame} for the indices in `wanted` that PyAV can decode (frame index from the
    presentation time x fps). Decoding errors skip the packet; nothing is raised."""
    import av

    found: dict = {}
    try:
        container = av.open(path)
    except Exception:
        return found
    with container:
        stream = container.streams.video[0]
        base = float(stream.time_base)
        start = stream.start_time or 0
        first, last = min(wanted), max(wanted)
        try:
            container.seek(int(max(first / fps - 1.0, 0) / base) + start, stream=stream, backward=True)
        except Exception:
            pass
        try:
            for packet in container.demux(stream):
                try:
                    decoded = packet.decode()
                except Exception:  # a corrupt packet
                    continue
                for frame in decoded:
                    if frame.pts is None:
                        continue
                    index = int(round((frame.pts - start) * base * fps))
                    if index in wanted and index not in found:
                        try:
                            found[index] = frame.to_ndarray(format="rgb24")
                        except Exception:
                            continue
                if found.keys() >= wanted or (decoded and frame.pts is not None and index > last):
                    break
        except Exception:  # a broken container past this point
            pass
    return found


class _FrameFolder(VideoSource):
    """A folder of frame images, one file per frame."""

    def __init__(self, info: VideoInfo, files: List[Path]):
        super().__init__(info)
        self._files = files

    def _read(self, indices: Sequence[int]) -> np.ndarray:
        out = np.empty((len(indices), self.info.height, self.info.width, 3), dtype=np.uint8)
        for k, i in enumerate(indices):
            out[k] = _load_frame(self._files[i], (self.info.height, self.info.width))
        return out


def open_video(
    path: PathLike,
    *,
    frame_stride: int = 1,
    max_frames: Optional[int] = None,
    start: Optional[float] = None,
    end: Optional[float] = None,
    folder_fps: float = DEFAULT_FOLDER_FPS,
) -> VideoSource:
    """Open a video file (mp4, avi, mkv, webm, mov; decoded with decord) or a folder of frames
    (jpg/jpeg/png, natural sort order: 2.jpg before 10.jpg) and select the frames to use.

    Selection, in this order: frames whose time `i / fps` lies in `[start, end)` seconds, then every
    `frame_stride`-th of those, then the first `max_frames`. `folder_fps` is the frame rate assumed
    for a frame folder. Returns a `VideoSource`; raises `VideoError` when the path is missing, not a
    readable video, has no frames, or the selection leaves none.
    """
    path = Path(path).expanduser()
    _check_selection(path, frame_stride, max_frames, start, end)
    if not path.exists():
        raise VideoError(f"{path}: no such file or folder; pass a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
    if path.is_dir():
        if not folder_fps or folder_fps <= 0:
            raise VideoError(f"{path}: frame rate for a frame folder must be positive, got {folder_fps}")
        return _open_folder(path, frame_stride, max_frames, start, end, float(folder_fps))
    if path.suffix.lower() in FRAME_SUFFIXES:
        raise VideoError(f"{path}: is a single image; pass the folder that holds the video's frames")
    return _open_file(path, frame_stride, max_frames, start, end)


def _check_selection(path: Path, stride, max_frames, start, end) -> None:
    if not isinstance(stride, numbers.Integral) or stride < 1:
        raise VideoError(f"{path}: frame stride must be a whole number >= 1, got {stride!r}")
    if max_frames is not None and (not isinstance(max_frames, numbers.Integral) or max_frames < 1):
        raise VideoError(f"{path}: max frames must be a whole number >= 1, got {max_frames!r}")
    for name, value in (("start", start), ("end", end)):
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise VideoError(f"{path}: {name} time must be a number of seconds >= 0, got {value!r}")
    if start is not None and end is not None and start >= end:
        raise VideoError(f"{path}: start ({start:g}s) must be before end ({end:g}s)")


def select_frames(
    total: int, fps: float, frame_stride: int = 1, max_frames: Optional[int] = None,
    start: Optional[float] = None, end: Optional[float] = None,
) -> List[int]:
    """Positions (0-based) of the frames kept out of `total`: time `i / fps` in `[start, end)`,
    then every `frame_stride`-th, then at most `max_frames`."""
    # round() guards against 0.3 * 10 = 3.0000000000000004 pushing a boundary frame out
    first = 0 if start is None else math.ceil(round(start * fps, 6))
    stop = total if end is None else min(total, math.ceil(round(end * fps, 6)))
    kept = list(range(first, stop, frame_stride))
    return kept if max_frames is None else kept[:max_frames]


def _no_frames_left(path: Path, total: int, fps: float, start, end) -> VideoError:
    span = f"{total} frames, {total / fps:.2f}s at {fps:g} fps"
    return VideoError(
        f"{path}: no frames left after selecting start={start}, end={end} ({span}); "
        "pick start/end inside the video"
    )


def _open_file(path: Path, stride, max_frames, start, end) -> VideoSource:
    import decord

    if log.getEffectiveLevel() > logging.DEBUG:
        decord.logging.set_level(decord.logging.QUIET)  # ffmpeg's own stderr chatter
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        log.debug("%s: suffix %r is not a known video type; trying to decode it anyway", path, path.suffix)
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty; pass a video file ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
    try:
        reader = decord.VideoReader(str(path), num_threads=0)
        total = len(reader)
        fps = float(reader.get_avg_fps())
    except Exception as e:  # DECORDError / RuntimeError carry an ffmpeg message and a C++ trace
        raise VideoError(
            f"{path}: not a readable video ({_first_line(e)}); pass an mp4/avi/mkv/webm/mov file "
            "or a folder of jpg/png frames, or re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)"
        ) from None
    if total <= 0:
        raise VideoError(f"{path}: the video has no frames")
    if not math.isfinite(fps) or fps <= 0:
        log.warning("%s: no usable frame rate in the file (%r); assuming 30 fps", path, fps)
        fps = 30.0
    indices = select_frames(total, fps, stride, max_frames, start, end)
    if not indices:
        raise _no_frames_left(path, total, fps, start, end)
    info = VideoInfo(str(path), len(indices), fps, 0, 0, indices, int(stride))
    source = _DecordVideo(info, reader)
    first = source._read([indices[0]])[0]  # decode one frame now: a broken file fails here, not mid-run
    info.height, info.width = int(first.shape[0]), int(first.shape[1])
    log.debug("opened %r (%d of %d frames)", source, len(indices), total)
    return source


def _natural_key(name: str):
    """Sort key that orders digit runs by value: '2.jpg' < '10.jpg'."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part.lower()) for part in re.split(r"(\d+)", name) if part]


def _oriented_size(img: Image.Image) -> Tuple[int, int]:
    """(height, width) of an opened image after its EXIF orientation is applied."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _load_frame(file: Path, expected: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """One frame image as uint8 RGB `[H, W, 3]` (EXIF orientation applied, as detectron2's read_image)."""
    try:
        rgb = read_rgb_image(file)
    except Exception as e:
        raise VideoError(f"{file}: cannot read this frame image ({_first_line(e)}); replace or remove the file") from None
    if expected is not None and rgb.shape[:2] != tuple(expected):
        raise VideoError(
            f"{file}: frame is {rgb.shape[1]}x{rgb.shape[0]} but the folder's first frame is "
            f"{expected[1]}x{expected[0]}; all frames of a video must have the same size"
        )
    return rgb


def _open_folder(path: Path, stride, max_frames, start, end, fps: float) -> VideoSource:
    files = [p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and not p.name.startswith(".") and p.is_file()]
    if not files:
        raise VideoError(f"{path}: the folder has no frame images (jpg, jpeg, png); pass a folder of frames or a video file")
    files.sort(key=lambda p: _natural_key(p.name))
    return _frame_list(path, files, stride, max_frames, start, end, fps)


def open_frame_files(
    files: Sequence[PathLike],
    *,
    frame_stride: int = 1,
    max_frames: Optional[int] = None,
    start: Optional[float] = None,
    end: Optional[float] = None,
    fps: float = DEFAULT_FOLDER_FPS,
) -> VideoSource:
    """A video made of these frame image files, in the order given (e.g. a dataset annotation's
    `file_names`), with the same frame selection as `open_video`. Raises `VideoError` for an empty
    list, a missing or unreadable file, or frames of different sizes."""
    files = [Path(f).expanduser() for f in files]
    label = files[0].parent if files else Path("<no frames>")
    _check_selection(label, frame_stride, max_frames, start, end)
    if not files:
        raise VideoError("got an empty list of frame files; a video needs at least one frame")
    for file in files:
        if not file.is_file():
            raise VideoError(f"{file}: no such frame file; check the dataset's image root and file names")
    if not fps or fps <= 0:
        raise VideoError(f"{label}: frame rate must be positive, got {fps}")
    return _frame_list(label, files, frame_stride, max_frames, start, end, float(fps))


def _frame_list(label: Path, files: List[Path], stride, max_frames, start, end, fps: float) -> VideoSource:
    """A source over frame files in the given order; checks every frame's size (headers only: cheap,
    and a mismatch fails now rather than mid-run)."""
    size = None
    for file in files:
        try:
            with Image.open(file) as img:
                hw = _oriented_size(img)
        except Exception as e:
            raise VideoError(f"{file}: cannot read this frame image ({_first_line(e)}); replace or remove the file") from None
        if size is None:
            size, first_file = hw, file
        elif hw != size:
            raise VideoError(
                f"{label}: frames have different sizes ({first_file.name} is {size[1]}x{size[0]}, "
                f"{file.name} is {hw[1]}x{hw[0]}); all frames of a video must have the same size"
            )
    indices = select_frames(len(files), fps, stride, max_frames, start, end)
    if not indices:
        raise _no_frames_left(label, len(files), fps, start, end)
    info = VideoInfo(str(label), len(indices), fps, size[0], size[1], indices, int(stride))
    log.debug("opened %d frame files in %s (%d selected)", len(files), label, len(indices))
    return _FrameFolder(info, files)


def _first_line(e: BaseException) -> str:
    """The useful one-line part of an exception message (decord appends C++ stack traces)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith("Stack trace")]
    text = lines[0] if lines else type(e).__name__
    text = re.sub(r"\[[\d:]+\]\s*\S+:\d+:\s*", "", text)  # "[19:57:23] /src/video_reader.cc:83: " prefixes (may nest)
    return text[:200]


# ----------------------------------------------------------------------------------------------
# resizing


def resized_shape(height: int, width: int, min_size: int = 480, max_size: int = 1333) -> Tuple[int, int]:
    """(new_height, new_width) of detectron2's test-time ResizeShortestEdge: the short side becomes
    `min_size`, unless that makes the long side exceed `max_size`, in which case the long side
    becomes `max_size`; both rounded half up. `min_size` 0 means no resize."""
    if min_size <= 0:
        return int(height), int(width)
    scale = min_size / min(height, width)
    if height < width:
        new_h, new_w = float(min_size), scale * width
    else:
        new_h, new_w = scale * height, float(min_size)
    longest = max(new_h, new_w)
    if longest > max_size:
        new_h, new_w = new_h * max_size / longest, new_w * max_size / longest
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_shortest_edge(frames: np.ndarray, min_size: int = 480, max_size: int = 1333) -> np.ndarray:
    """Resize uint8 RGB frames `[T, H, W, 3]` (or one `[H, W, 3]`) to `resized_shape(H, W, ...)`
    with PIL bilinear, as detectron2's ResizeTransform does for uint8 images. Returns uint8
    `[T, H', W', 3]` (or `[H', W', 3]`); the input itself when the size does not change."""
    frames = np.asarray(frames)
    single = frames.ndim == 3
    batch = frames[None] if single else frames
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {batch.dtype} {batch.shape}")
    height, width = batch.shape[1:3]
    new_h, new_w = resized_shape(height, width, min_size, max_size)
    if (new_h, new_w) == (height, width):
        return frames
    out = np.empty((batch.shape[0], new_h, new_w, 3), dtype=np.uint8)
    for t, frame in enumerate(batch):
        out[t] = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BILINEAR))
    return out[0] if single else out


# ----------------------------------------------------------------------------------------------
# writing


class Mp4Writer:
    """Context manager that encodes uint8 RGB frames `[H, W, 3]` into an H.264 mp4 with PyAV.

    The file is written under a temporary name in the same folder and renamed to `path` only when
    the `with` block ends without an error. Frame size is fixed by the first frame.
    `full_chroma`: store 4:4:4 (colors kept at full resolution, any size; fewer players can show
    it); otherwise 4:2:0, which plays everywhere but needs even sizes, so an odd width/height is
    padded by one repeated edge column/row. `crf`: x264 quality, lower is better (18: visually lossless).
    """

    def __init__(self, path: PathLike, fps: float = 10.0, *, crf: int = 18, full_chroma: bool = False):
        if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
            raise ClipvisError(f"{path}: frame rate must be a positive number, got {fps!r}")
        self.path = Path(path)
        self.fps = float(fps)
        self.crf = int(crf)
        self.full_chroma = full_chroma
        self.num_frames = 0
        self._container = None
        self._stream = None
        self._tmp: Optional[Path] = None
        self._size: Optional[Tuple[int, int]] = None
        self._pad = (0, 0)

    def __enter__(self) -> "Mp4Writer":
        import av

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.stem}.", suffix=".tmp.mp4", dir=self.path.parent)
            os.close(fd)
        except OSError as e:
            raise ClipvisError(f"cannot write {self.path}: {e.strerror or e}; choose a writable output folder") from None
        self._tmp = Path(tmp)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        return self

    def write(self, frame: np.ndarray) -> None:
        """Append one uint8 RGB frame `[H, W, 3]`."""
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"expected a uint8 frame [H, W, 3], got {frame.dtype} {frame.shape}")
        if self._container is None:
            raise RuntimeError("Mp4Writer.write called outside its `with` block")
        if self._stream is None:
            self._start_stream(frame.shape[0], frame.shape[1])
        elif frame.shape[:2] != self._size:
            raise ValueError(f"frame size {frame.shape[:2]} differs from the video's {self._size}")
        if any(self._pad):
            frame = np.pad(frame, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
        import av

        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
            self._container.mux(packet)
        self.num_frames += 1

    def _start_stream(self, height: int, width: int) -> None:
        self._size = (height, width)
        pix_fmt = "yuv444p" if self.full_chroma else "yuv420p"
        if not self.full_chroma and (height % 2 or width % 2):
            self._pad = (height % 2, width % 2)
            log.debug("%s: padding %dx%d frames to even size for H.264 4:2:0", self.path, width, height)
        stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(100000))
        stream.height, stream.width = height + self._pad[0], width + self._pad[1]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(self.crf), "preset": "medium"}
        self._stream = stream

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if self._stream is None:
                    raise ClipvisError(f"{self.path}: no frames were written; nothing to save")
                for packet in self._stream.encode():  # flush the encoder
                    self._container.mux(packet)
            self._container.close()
            self._container = None
            if exc_type is None:
                os.chmod(self._tmp, default_file_mode())
                os.replace(self._tmp, self.path)
        finally:
            if self._container is not None:
                try:
                    self._container.close()
                except Exception:
                    pass
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()
