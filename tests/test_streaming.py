"""The streaming driver with a model of its own: any `VideoStep` gets windows of the asked size, in order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipvis.errors import VideoError
from clipvis.inference.streaming import StageTimer, stream_video


class MeanColourStep:
    """A toy per-frame model: the mean colour of every frame, and the window sizes it was given."""

    def __init__(self):
        self.frame_size = None
        self.window_sizes = []
        self.means = []

    def start(self, frame_size):
        self.frame_size = frame_size

    def process_window(self, window: torch.Tensor, timer: StageTimer) -> None:
        self.window_sizes.append(len(window))
        with timer("mean colour"):
            self.means.extend(window.float().mean(dim=(1, 2)))

    def finish(self, timer):
        return torch.stack(self.means)


def test_any_step_is_driven_over_rewindowed_frames():
    frames = np.random.default_rng(0).integers(0, 256, size=(11, 6, 8, 3), dtype=np.uint8)
    chunks = [frames[:2], frames[2:7], frames[7:]]  # as a decoder yields them
    step = MeanColourStep()
    result, timings = stream_video(chunks, step, window_size=4, num_frames=11, progress=False)
    assert step.frame_size == (6, 8)
    assert step.window_sizes == [4, 4, 3]
    assert torch.allclose(result, torch.from_numpy(frames).float().mean(dim=(1, 2)))
    assert set(timings) == {"mean colour"}


def test_driver_refuses_bad_streams():
    frames = np.zeros((3, 6, 8, 3), dtype=np.uint8)
    with pytest.raises(VideoError, match="differ in size"):
        stream_video([frames, np.zeros((2, 6, 9, 3), dtype=np.uint8)], MeanColourStep(), window_size=2, progress=False)
    with pytest.raises(VideoError, match="no frames"):
        stream_video([], MeanColourStep(), window_size=2, progress=False)
    with pytest.raises(VideoError, match="uint8"):
        stream_video([frames.astype(np.float32)], MeanColourStep(), window_size=2, progress=False)
