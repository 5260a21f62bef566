"""`clipvis infer` / `clipvis demo` end to end on generated videos, with the tiny config.

The CLI and the Python API are run on the same file with the same checkpoint, so their masks must agree.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from clipvis.cli.main import main
from clipvis.config import builtin_config, load_config
from clipvis.data.synthetic import synthetic_video, write_frame_folder, write_video
from clipvis.data.video import open_video
from clipvis.inference.predictor import VideoPredictor

TINY = "clipvis_video_tiny.yaml"
VOCAB = "circle; square, box; triangle"


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """The same synthetic clip as an mp4 and as a folder of frames (longer than one window)."""
    folder = tmp_path_factory.mktemp("clip")
    frames = synthetic_video(14, 72, 96, seed=3)
    return write_video(frames, folder / "clip.mp4"), write_frame_folder(frames, folder / "frames", ext="png")


def infer(video, out, weights, *extra) -> int:
    return main(["--quiet", "infer", str(video), "--vocab", VOCAB, "--config", TINY, "--weights", str(weights),
                 "--out", str(out), *extra])


@pytest.mark.parametrize("kind", ["mp4", "frames"])
def test_infer_writes_results_that_match_the_python_api(kind, clip_files, tiny_weights, tmp_path):
    video = clip_files[0] if kind == "mp4" else clip_files[1]
    assert infer(video, tmp_path, tiny_weights, "--vis-threshold", "0.0") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    source = open_video(video)
    frames = source.read_all()
    assert results, "no instances written"
    for r in results:
        assert r["video_id"] == 1 and 1 <= r["category_id"] <= 3 and len(r["segmentations"]) == len(frames)
    cfg = load_config(builtin_config(TINY), ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", ""])
    predictor = VideoPredictor.from_config(cfg, weights=tiny_weights, progress=False)
    pred = predictor.predict(frames, VOCAB)
    assert [r["category_id"] - 1 for r in results] == pred.classes.tolist()
    np.testing.assert_allclose([r["score"] for r in results], pred.scores.numpy(), rtol=1e-5)
    api_masks = pred.masks()
    for n, r in enumerate(results):
        for t, rle in enumerate(r["segmentations"]):
            got = np.zeros(frames.shape[1:3], bool) if rle is None else mask_util.decode(rle).astype(bool)
            assert np.array_equal(got, api_masks[n, t])
    csv_lines = (tmp_path / "instances.csv").read_text().strip().splitlines()
    assert len(csv_lines) == len(results) + 1
    import decord

    overlay = decord.VideoReader(str(tmp_path / "overlay.mp4"))
    assert len(overlay) == len(frames)


def test_streaming_equals_all_at_once(clip_files, tiny_weights):
    """Windows of 4 frames streamed from the decoder give the instances of one pass over all frames."""
    cfg = load_config(builtin_config(TINY), ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", ""])
    streaming = VideoPredictor.from_config(cfg, weights=tiny_weights, progress=False)
    streaming.window_size = 4
    source = open_video(clip_files[0])
    streamed = streaming.predict_windows(source.windows(3), VOCAB, keep_mask_logits=True)
    whole = VideoPredictor.from_config(cfg, weights=tiny_weights, progress=False)
    whole.window_size = len(source)
    at_once = whole.predict(source.read_all(), VOCAB, keep_mask_logits=True)
    assert torch.equal(streamed.classes, at_once.classes)
    assert torch.equal(streamed.query_indices, at_once.query_indices)
    torch.testing.assert_close(streamed.scores, at_once.scores, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(streamed.mask_logits, at_once.mask_logits, rtol=1e-4, atol=1e-4)


def test_demo_runs_and_says_weights_are_synthetic(tmp_path, capsys):
    assert main(["--quiet", "demo", "--frames", "6", "--height", "64", "--width", "80", "--config", TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "meaningless" in out
    for name in ("sample.mp4", "results.json", "instances.csv", "overlay.mp4"):
        assert (tmp_path / name).is_file(), name


def test_python_m_clipvis_help():
    proc = subprocess.run([sys.executable, "-m", "clipvis", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "infer" in proc.stdout and "evaluate" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.mp4", "--vocab", VOCAB], "missing.mp4"),
        (["{garbage}", "--vocab", VOCAB], "garbage.mp4"),
        (["{no_frames}", "--vocab", VOCAB], "no frame"),
        (["{video}", "--vocab", VOCAB, "--start", "1000"], "no frames left"),
        (["{video}", "--vocab", " ; "], "blank"),
        (["{video}", "--vocab", ""], "empty"),
        (["{video}", "--vocab", VOCAB, "--device", "tpu"], "tpu"),
        (["{video}", "--vocab", VOCAB, "--device", "cuda:7"], "cuda"),
        (["{video}", "--vocab", VOCAB, "--weights", "{bad_weights}"], "bad.pth"),
        (["{video}", "--vocab", VOCAB, "--opts", "NOT.A_KEY", "1"], "NOT.A_KEY"),
        (["{video}", "--vocab", VOCAB, "--out", "/proc/clipvis_cannot_write"], "cannot write"),
    ],
    ids=["missing-video", "corrupt-video", "no-frames", "start-past-the-end", "blank-class", "empty-vocab", "unknown-device", "absent-cuda", "bad-weights", "unknown-key", "unwritable-out"],
)
def test_bad_input_is_one_clear_line(args, message, clip_files, tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    bad_weights = tmp_path / "bad.pth"
    bad_weights.write_bytes(b"not a checkpoint")
    no_frames = tmp_path / "no_frames"
    no_frames.mkdir()
    (no_frames / "notes.txt").write_text("not a frame")
    fill = {"{video}": str(clip_files[0]), "{garbage}": str(garbage), "{bad_weights}": str(bad_weights), "{no_frames}": str(no_frames)}
    args = [fill.get(a, a) for a in args]
    # --random-weights: these inputs are refused for what they are, not for the missing --weights
    args = [*args[:3], "--config", TINY, "--random-weights", *([] if "--out" in args else ["--out", str(tmp_path / "out")]), *args[3:]]
    proc = subprocess.run(
        [sys.executable, "-m", "clipvis", "infer", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and message.lower() in lines[0].lower(), proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()
