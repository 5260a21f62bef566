"""The streaming driver of video inference, independent of the model that processes the frames.

`stream_video(windows, step, window_size=...)` re-chunks any iterable of uint8 frame chunks `[w,H,W,3]`
into windows of `window_size` frames, checks them (dtype, layout, one frame size per video), shows a
progress bar, times the stages, returns freed memory to the system between windows once the heap has grown
(`TrimWhenGrown`), and finally asks the step for its result. The step is the model-specific part
(`VideoStep`): CLIP-VIS's is `clipvis.inference.predictor.ClipVisVideoStep`; another per-frame model provides
its own.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Dict, Iterable, Iterator, List, Optional, Protocol, Tuple, TypeVar, Union

import numpy as np
import torch

from clipvis.data.video import progress_bar
from clipvis.errors import VideoError
from clipvis.memory import TrimWhenGrown

Frames = Union[np.ndarray, torch.Tensor]
Result = TypeVar("Result")

__all__ = ["Frames", "StageTimer", "VideoStep", "as_uint8_frames", "rewindow", "stream_video"]


class StageTimer:
    """Accumulates wall-clock seconds per named stage (`with timer("tracker"): ...`)."""

    def __init__(self):
        self.seconds: Dict[str, float] = defaultdict(float)

    def __call__(self, stage: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] += time.perf_counter() - self.start

        return _Span()


class VideoStep(Protocol[Result]):
    """What a model provides to `stream_video`: called with each window, in order, then once at the end."""

    def start(self, frame_size: Tuple[int, int]) -> None:
        """Before the first window: the video's frame size (H, W)."""

    def process_window(self, window: torch.Tensor, timer: StageTimer) -> None:
        """One window of uint8 RGB frames `[w,H,W,3]`: process (and keep what the result needs of) each frame."""

    def finish(self, timer: StageTimer) -> Result:
        """After the last window: the video's result."""


def stream_video(
    windows: Iterable[Frames],
    step: "VideoStep[Result]",
    *,
    window_size: int,
    num_frames: Optional[int] = None,
    progress: bool = True,
) -> Tuple[Result, Dict[str, float]]:
    """Drive `step` over a video given as consecutive uint8 frame chunks `[w,H,W,3]` (numpy or torch).

    Returns (the step's result, seconds per stage). `num_frames` only sizes the progress bar. Raises
    VideoError for frames of the wrong type or layout, frames that change size, or a video without frames."""
    timer = StageTimer()
    frame_size = None
    bar = progress_bar(num_frames, "inference", enabled=progress)
    trim = TrimWhenGrown()
    try:
        for window in rewindow(windows, window_size):  # checked uint8 [w,H,W,3] tensors
            if frame_size is None:
                frame_size = tuple(window.shape[1:3])
                step.start(frame_size)
            elif tuple(window.shape[1:3]) != frame_size:
                raise VideoError(f"frames differ in size: {tuple(window.shape[1:3])} after {frame_size}; "
                                 "all frames of a video must have one size")
            step.process_window(window, timer)
            bar.update(len(window))
            trim()  # stops heap fragmentation from growing over the windows of a long video
    finally:
        bar.close()
    if frame_size is None:
        raise VideoError("the video has no frames")
    result = step.finish(timer)
    return result, dict(timer.seconds)


def as_uint8_frames(frames: Frames) -> torch.Tensor:
    """numpy/torch uint8 `[T,H,W,3]` -> torch uint8 `[T,H,W,3]`, with clear errors for anything else."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not torch.is_tensor(frames):
        raise VideoError(f"frames must be a uint8 array [T,H,W,3], got {type(frames).__name__}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"frames must have shape [T,H,W,3] (RGB), got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8:
        raise VideoError(f"frames must be uint8 (0..255), got {frames.dtype}")
    if frames.shape[0] == 0:
        raise VideoError("the video has no frames")
    return frames


def rewindow(windows: Iterable[Frames], size: int) -> Iterator[torch.Tensor]:
    """Re-chunk an iterable of frame chunks into chunks of exactly `size` frames (the last may be shorter)."""
    pending: List[torch.Tensor] = []
    count = 0
    for chunk in windows:
        chunk = as_uint8_frames(chunk)
        if pending and chunk.shape[1:] != pending[0].shape[1:]:
            raise VideoError(
                f"frames differ in size: {tuple(chunk.shape[1:3])} after {tuple(pending[0].shape[1:3])}; "
                "all frames of a video must have one size"
            )
        pending.append(chunk)
        count += len(chunk)
        while count >= size:
            merged = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield merged[:size]
            rest = merged[size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield torch.cat(pending) if len(pending) > 1 else pending[0]
