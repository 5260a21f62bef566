"""What a new user hits in the first hour (issue 14): every case through the real command in a subprocess,
checking the exit status, the one-line message and what is left in the output folder."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipvis.config import builtin_config
from clipvis.data.synthetic import synthetic_video, write_frame_folder, write_video
from clipvis.mask_encoding import masks_to_rles

REPO = Path(__file__).resolve().parents[1]
TINY = "clipvis_video_tiny.yaml"
VOCAB = "circle; square, box; triangle"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    frames = synthetic_video(8, 64, 80, seed=3)
    return write_video(frames, folder / "clip.mp4"), write_frame_folder(frames, folder / "frames", ext="png")


def clipvis(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "clipvis", *map(str, args)], capture_output=True, text=True, timeout=timeout)


def error_line(proc) -> str:
    """The single error line on stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def assert_refused(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    line = error_line(proc).lower()
    for fragment in fragments:
        assert fragment.lower() in line, (fragment, line)


# --------------------------------------------------------------------------- vocabulary


def test_duplicate_classes_are_refused(clips, tiny_weights, tmp_path):
    out = tmp_path / "out"
    for vocab in ("cat; cat", "cat; Cat, kitty", "dog; puppy, dog"):
        proc = clipvis("infer", clips[0], "--vocab", vocab, "--config", TINY, "--weights", tiny_weights, "--out", out)
        assert_refused(proc, "class 1 and class 2", "once")
    assert not out.exists()


def test_vocabulary_file_that_is_not_utf8_is_refused(clips, tiny_weights, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes("café\nchâteau\n".encode("latin-1"))
    proc = clipvis("infer", clips[0], "--vocab-file", vocab, "--config", TINY, "--weights", tiny_weights, "--out", tmp_path / "out")
    assert_refused(proc, "vocab.txt", "utf-8")
    assert not (tmp_path / "out").exists()


def test_vocabulary_file_of_only_comments_is_refused(clips, tiny_weights, tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# classes\n\n   # none yet\n")
    proc = clipvis("infer", clips[0], "--vocab-file", vocab, "--config", TINY, "--weights", tiny_weights, "--out", tmp_path / "out")
    assert_refused(proc, "no class names")


def test_rerun_replaces_every_output_and_reads_utf16_vocabulary_with_comments(clips, tiny_weights, tmp_path):
    """Run 1 (frame folder, --start: the assumed frame rate is said) writes an overlay; run 2 into the same
    --out with --no-overlay and a UTF-16 vocabulary file with comments and blank lines leaves no stale overlay.mp4."""
    out = tmp_path / "out"
    first = clipvis("--quiet", "infer", clips[1], "--vocab", VOCAB, "--config", TINY, "--weights", tiny_weights,
                    "--out", out, "--start", "0.5", "--vis-threshold", "0")
    assert first.returncode == 0, first.stderr
    assert "6 fps" in first.stderr and "--folder-fps" in first.stderr, first.stderr
    assert sorted(p.name for p in out.iterdir()) == ["instances.csv", "overlay.mp4", "results.json"]
    assert all(len(r["segmentations"]) == 5 for r in json.loads((out / "results.json").read_text()))  # frames 3..7 at 6 fps

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("# shapes in the clip\n\ncircle\n  # not a class\nsquare, box\n\n", encoding="utf-16")
    second = clipvis("--quiet", "infer", clips[0], "--vocab-file", vocab, "--config", TINY, "--weights", tiny_weights,
                     "--out", out, "--no-overlay")
    assert second.returncode == 0, second.stderr
    assert sorted(p.name for p in out.iterdir()) == ["instances.csv", "results.json"]  # no stale overlay, no temp folder
    assert "text encoding" in second.stdout and "(2 classes)" in second.stdout, second.stdout  # its own stage
    results = json.loads((out / "results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2}
    assert all(len(r["segmentations"]) == 8 for r in results)
    classes = {line.split(",")[1] for line in (out / "instances.csv").read_text().splitlines()[1:]}
    assert classes <= {"circle", '"square', "square"}, classes


def test_failed_run_keeps_the_previous_outputs(clips, tiny_weights, tmp_path):
    """A run that fails after the checks (here: a checkpoint that does not fit) leaves the folder as it was."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[]")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    proc = clipvis("infer", clips[0], "--vocab", VOCAB, "--config", TINY, "--weights", bad, "--out", out)
    assert proc.returncode == 2
    assert sorted(p.name for p in out.iterdir()) == ["results.json"] and (out / "results.json").read_text() == "[]"


def test_checkpoint_of_another_model_is_one_line_with_every_fix(clips, tiny_weights, tmp_path):
    """No open_clip "initialized randomly" lines; all the fixes at once; no empty output folder left behind."""
    out = tmp_path / "out"
    proc = clipvis("infer", clips[0], "--vocab", VOCAB, "--config", "clipvis_video_R50.yaml", "--weights", tiny_weights, "--out", out)
    assert proc.returncode == 2
    assert "initialized randomly" not in proc.stderr and "No pretrained" not in proc.stderr, proc.stderr
    line = error_line(proc)
    for fix in ("MODEL.MASK_FORMER.DEC_LAYERS 3", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES 10", "MODEL.FC_CLIP.CLIP_MODEL_NAME clipvis_tiny_convnext"):
        assert fix in line, line
    assert not out.exists()
    assert "--config clipvis_video_tiny.yaml" in line, line
    # following every fix at once leads to a model that loads, not to a second error without advice
    fixes = ["MODEL.MASK_FORMER.DEC_LAYERS", "3", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "10",
             "MODEL.FC_CLIP.CLIP_MODEL_NAME", "clipvis_tiny_convnext"]
    for option in ("MODEL.SEM_SEG_HEAD.CONVS_DIM", "MODEL.SEM_SEG_HEAD.MASK_DIM", "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS",
                   "MODEL.MASK_FORMER.HIDDEN_DIM", "MODEL.MASK_FORMER.DIM_FEEDFORWARD"):
        assert option in line, (option, line)
        fixes += [option, line.split(option + " ")[1].split()[0].rstrip(";,)")]
    proc = clipvis("--quiet", "infer", clips[0], "--vocab", VOCAB, "--config", "clipvis_video_R50.yaml", "--weights", tiny_weights,
                   "--out", out, "--no-overlay", "--opts", *fixes)
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- arguments, checked before anything slow


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--vis-threshold", "nan"], ["--vis-threshold", "between 0 and 1"]),
        (["--vis-threshold", "2"], ["--vis-threshold", "between 0 and 1"]),
        (["--video-id", "-5"], ["--video-id", "negative"]),
        (["--device", "tpu"], ["--device", "tpu"]),
        (["--folder-fps", "0"], ["--folder-fps", "positive"]),
    ],
    ids=["threshold-nan", "threshold-2", "negative-video-id", "unknown-device", "zero-fps"],
)
def test_bad_arguments_are_refused_by_the_parser(extra, fragments, clips, tiny_weights, tmp_path):
    proc = clipvis("infer", clips[0], "--vocab", VOCAB, "--config", TINY, "--weights", tiny_weights, "--out", tmp_path / "out", *extra)
    assert_refused(proc, *fragments)
    assert not (tmp_path / "out").exists()


def test_device_is_case_insensitive():
    from clipvis.cli.main import build_parser

    args = build_parser().parse_args(["infer", "v.mp4", "--vocab", "cat", "--device", "CPU"])
    assert args.device == "cpu"


@pytest.mark.parametrize(
    "extra, fragments",
    [
        ([], ["no --weights", "--random-weights"]),
        (["--weights", "{missing}"], ["missing.pth", "not found"]),
        (["--weights", "{folder}"], ["folder"]),
        (["--weights", "{weights}", "--opts", "TEST.NUM_FRAME", "0"], ["TEST.NUM_FRAME", "positive"]),
        (["--weights", "{weights}", "--opts", "INPUT.MIN_SIZE_TEST", "-8"], ["INPUT.MIN_SIZE_TEST", "positive"]),
    ],
    ids=["no-weights", "missing-weights", "weights-is-a-folder", "zero-window", "negative-size"],
)
def test_setup_problems_are_refused_before_the_model_is_built(extra, fragments, clips, tiny_weights, tmp_path):
    fill = {"{missing}": str(tmp_path / "missing.pth"), "{folder}": str(tmp_path), "{weights}": str(tiny_weights)}
    extra = [fill.get(a, a) for a in extra]
    proc = clipvis("infer", clips[0], "--vocab", VOCAB, "--config", TINY, "--out", tmp_path / "out", *extra)
    assert_refused(proc, *fragments)
    assert not (tmp_path / "out").exists()
    assert "building the model" not in proc.stderr


def test_help_does_not_import_torch():
    code = ("import sys\nfrom clipvis.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "infer" in proc.stdout


# --------------------------------------------------------------------------- frames


def test_16_bit_png_frames_are_scaled_not_clipped(tmp_path):
    from clipvis.data.video import open_video

    folder = tmp_path / "frames16"
    folder.mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 65536, size=(3, 20, 24), dtype=np.uint16)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{t:05d}.png")  # mode I;16
    got = open_video(folder).read_all()
    assert got.dtype == np.uint8 and got.shape == (3, 20, 24, 3)
    expected = (frames >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], expected)
    assert (got == 255).mean() < 0.05


def test_partly_corrupt_video_keeps_the_decodable_frames(tiny_weights, tmp_path):
    """20% of the middle bytes randomised: decord fails mid-video; PyAV decodes what it can, the frames lost are
    named in one warning, their masks are null, and the run finishes (no C++ source paths reach the user)."""
    path = write_video(synthetic_video(30, 64, 80, seed=1), tmp_path / "clip.mp4")
    data = bytearray(path.read_bytes())
    a, b = int(len(data) * 0.4), int(len(data) * 0.6)
    data[a:b] = np.random.default_rng(0).integers(0, 256, b - a, dtype=np.uint8).tobytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = clipvis("--quiet", "infer", bad, "--vocab", VOCAB, "--config", TINY, "--weights", tiny_weights, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert ".cc:" not in proc.stderr and "Traceback" not in proc.stderr and "h264 @" not in proc.stderr, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "could not be decoded" in line]
    assert len(warnings) == 1, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results and all(len(r["segmentations"]) == 30 for r in results)
    lost = [t for t in range(30) if all(r["segmentations"][t] is None for r in results)]
    assert 0 < len(lost) < 30, lost
    assert f"{len(lost)} of 30 frames" in warnings[0], (warnings[0], lost)
    assert sorted(p.name for p in out.iterdir()) == ["instances.csv", "overlay.mp4", "results.json"]


def test_decoder_messages_lose_their_cpp_source_paths():
    from clipvis.data.video import _first_line

    message = ("[23:20:55] /github/workspace/src/video/ffmpeg/threaded_decoder.cc:292: [23:20:55] "
               "/github/workspace/src/video/ffmpeg/threaded_decoder.cc:218: Check failed: x >= 0 Thread worker: Error sending packet.")
    assert _first_line(RuntimeError(message)) == "Check failed: x >= 0 Thread worker: Error sending packet."


# --------------------------------------------------------------------------- demo


def test_demo_sample_plays_everywhere(tmp_path):
    import av

    proc = clipvis("--quiet", "demo", "--frames", "4", "--height", "64", "--width", "80", "--config", TINY, "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("sample.mp4", "overlay.mp4"):
        with av.open(str(tmp_path / name)) as container:
            assert container.streams.video[0].codec_context.pix_fmt == "yuv420p", name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances.csv", "overlay.mp4", "results.json", "sample.mp4"]


def test_overlay_draws_only_the_top_instances(tmp_path):
    from clipvis.data.video import open_video
    from clipvis.inference.outputs import VideoInstance
    from clipvis.visualization import write_overlay_video

    frames = np.zeros((2, 64, 160, 3), np.uint8)
    folder = write_frame_folder(frames, tmp_path / "frames", ext="png")
    instances = []
    for k in range(4):  # masks low in the frame, 40 px apart: labels go above them
        masks = np.zeros((2, 64, 160), bool)
        masks[:, 40:60, 5 + 40 * k: 30 + 40 * k] = True
        instances.append(VideoInstance(track_id=k, score=0.5 + 0.1 * k, category_id=1, class_name="x", rles=masks_to_rles(masks)))
    path = write_overlay_video(open_video(folder), instances, tmp_path / "overlay.mp4", threshold=0.0, max_instances=2)
    import decord

    drawn = decord.VideoReader(str(path))[0].asnumpy()
    colored = [drawn[45:55, 10 + 40 * k: 25 + 40 * k].max() > 40 for k in range(4)]
    assert colored == [False, False, True, True]  # the two best-scoring only


# --------------------------------------------------------------------------- evaluate


def write_eval_case(tmp_path: Path, score) -> tuple:
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 2:6, 2:6] = True
    rles = masks_to_rles(masks)
    gt = {"videos": [{"id": 1, "height": 8, "width": 8, "length": 2, "file_names": ["a.jpg", "b.jpg"]}],
          "categories": [{"id": 1, "name": "cat"}],
          "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "iscrowd": 0, "segmentations": rles,
                           "areas": [16, 16], "height": 8, "width": 8, "length": 2}]}
    results = [{"video_id": 1, "category_id": 1, "score": score, "segmentations": rles}]
    gt_path, results_path = tmp_path / "gt.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))  # NaN / Infinity as Python's json writes them
    return gt_path, results_path


@pytest.mark.parametrize("score", [math.nan, math.inf], ids=["nan", "inf"])
def test_evaluate_refuses_non_finite_scores(score, tmp_path):
    gt, results = write_eval_case(tmp_path, score)
    proc = clipvis("evaluate", "--gt", gt, "--results", results, "--out", tmp_path / "metrics.json")
    assert_refused(proc, "result #0", "finite")
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("kind", ["existing-folder", "trailing-slash", "file"])
def test_evaluate_out_is_a_file_or_a_folder(kind, tmp_path):
    gt, results = write_eval_case(tmp_path, 0.9)
    if kind == "existing-folder":
        (tmp_path / "metrics").mkdir()
        out, written = tmp_path / "metrics", tmp_path / "metrics" / "metrics.json"
    elif kind == "trailing-slash":
        out, written = str(tmp_path / "new" / "dir") + "/", tmp_path / "new" / "dir" / "metrics.json"
    else:
        out, written = tmp_path / "m.json", tmp_path / "m.json"
    proc = clipvis("evaluate", "--gt", gt, "--results", results, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"metrics written to {written}" in proc.stdout
    assert json.loads(written.read_text())["stats"]["AP"] == pytest.approx(1.0)


def test_evaluate_out_blocked_by_a_folder_is_refused_before_the_work(tmp_path):
    gt, results = write_eval_case(tmp_path, 0.9)
    (tmp_path / "m" / "metrics.json").mkdir(parents=True)
    proc = clipvis("evaluate", "--gt", gt, "--results", results, "--out", tmp_path / "m")
    assert_refused(proc, "is a folder")


# --------------------------------------------------------------------------- train_net.py


def train_net(*args):
    return subprocess.run([sys.executable, str(REPO / "train_net.py"), "--config-file", str(builtin_config(TINY)), "--device", "cpu",
                           *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval-only"])
def test_train_net_output_dir_that_is_a_file(eval_only, tiny_weights, tmp_path):
    blocker = tmp_path / "output"
    blocker.write_text("a file")
    for output_dir in (blocker, blocker / "sub"):
        proc = train_net(*(["--eval-only"] if eval_only else []), "MODEL.WEIGHTS", tiny_weights, "OUTPUT_DIR", output_dir)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        assert "OUTPUT_DIR" in proc.stderr and "is a file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_eval_only_without_weights_is_refused(tmp_path):
    proc = train_net("--eval-only", "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "MODEL.WEIGHTS" in proc.stderr and "--random-weights" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("eval_only", [False, True], ids=["train", "eval-only"])
def test_train_net_unknown_dataset_is_refused_before_anything_is_written(eval_only, tiny_weights, tmp_path):
    key = "DATASETS.TEST" if eval_only else "DATASETS.TRAIN"
    proc = train_net(*(["--eval-only"] if eval_only else []), "MODEL.WEIGHTS", tiny_weights, key, '("not_a_dataset",)',
                     "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "unknown dataset 'not_a_dataset'" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("SOLVER.IMS_PER_BATCH", "0"), ("TEST.NUM_FRAME", "-1")])
def test_train_net_impossible_config_value_is_refused(key, value, tiny_weights, tmp_path):
    proc = train_net("MODEL.WEIGHTS", tiny_weights, key, value, "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert key in proc.stderr and "positive" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_eval_only_with_missing_weights_is_refused(tmp_path):
    proc = train_net("--eval-only", "MODEL.WEIGHTS", tmp_path / "nope.pth", "OUTPUT_DIR", tmp_path / "out")
    assert proc.returncode == 2 and "nope.pth" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- tests without the reference data


def test_suite_skips_with_the_reason_without_reference_data(tmp_path):
    env = {**os.environ, "CLIPVIS_REFERENCE": str(tmp_path / "absent")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(REPO / "tests" / "test_tracker.py")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "error" not in proc.stdout.lower().split("short test summary")[0][-200:]
    assert "reference data not found" in proc.stdout and "CLIPVIS_REFERENCE" in proc.stdout, proc.stdout[-3000:]
