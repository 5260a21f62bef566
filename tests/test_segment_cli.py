"""`clipvis segment` (CLIPtrase) through the real CLI on an image, a folder and a video, with a tiny ViT and
random weights saved as a local file; bad input gives one clear line and leaves nothing behind. That the
segmentation itself equals the original's is tests/test_cliptrase.py's, and through SemanticSegmenter's paper
protocol tests/test_semseg_evaluation.py's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipvis.cli.main import main

TINY = "clipvis_tiny_vit"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    from clipvis.inference.semantic_segmenter import build_clip_vit

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny_vit.pt"
    torch.save(build_clip_vit(TINY, None).state_dict(), path)
    return path


def _image(path: Path, h: int = 70, w: int = 90, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    if mode == "I;16":
        image = Image.fromarray((array[..., 0].astype(np.uint16) * 257))
    elif mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _segment(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipvis", "--quiet", "segment", *args], capture_output=True, text=True,
                          timeout=600)


def test_segment_an_image_a_folder_and_a_video(tmp_path, tiny_weights):
    from clipvis.data.synthetic import synthetic_video
    from clipvis.data.video import Mp4Writer

    model = ["--clip-model", TINY, "--clip-weights", str(tiny_weights)]
    image = _image(tmp_path / "in" / "street.jpg")
    run = _segment(str(image), "--vocab", "road; car; sky", *model, "--out", str(tmp_path / "one"))
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "one" / "segments.json").read_text())
    assert summary["classes"] == ["road", "car", "sky"]
    fractions = summary["images"]["street.jpg"]["fractions"]
    assert set(fractions) <= {"road", "car", "sky"} and abs(sum(fractions.values()) - 1) < 1e-4
    labels = np.asarray(Image.open(tmp_path / "one" / "street.png"))
    assert labels.shape == (70, 90) and labels.max() < 3  # every pixel of the image, at its size
    assert np.asarray(Image.open(tmp_path / "one" / "street_overlay.png")).shape == (70, 90, 3)

    _image(tmp_path / "in" / "tall.png", h=120, w=40)
    run = _segment(str(tmp_path / "in"), "--vocab", "road; car", "--background", "sky; tree", *model,
                   "--out", str(tmp_path / "folder"), "--protocol", "paper")
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "folder" / "segments.json").read_text())
    assert summary["classes"] == ["road", "car", "background"] and summary["count"] == 2
    assert np.asarray(Image.open(tmp_path / "folder" / "tall.png")).shape == (224, 224)  # the paper's crop

    frames = synthetic_video(3, 48, 64, seed=0)
    with Mp4Writer(tmp_path / "clip.mp4", fps=5) as writer:
        for frame in frames:
            writer.write(frame)
    run = _segment(str(tmp_path / "clip.mp4"), "--vocab", "circle; square", *model, "--out", str(tmp_path / "video"),
                   "--precision", "bf16")
    from clipvis.inference.precision import bf16_supported

    if not bf16_supported(torch.device("cpu")):  # refused at once, in one line, leaving nothing
        assert run.returncode == 2 and "no bfloat16 arithmetic" in run.stderr, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and not (tmp_path / "video").exists()
        return
    assert run.returncode == 0, run.stderr
    summary = json.loads((tmp_path / "video" / "segments.json").read_text())
    assert summary["count"] == 3 and len(summary["frames"]) == 3
    assert sorted(p.name for p in (tmp_path / "video" / "labels").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert (tmp_path / "video" / "overlay.mp4").stat().st_size > 0
    assert not [p for p in (tmp_path / "video").iterdir() if p.name.startswith(".clipvis-partial")]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_grayscale_rgba_16bit_and_palette_images_are_read(tmp_path, tiny_weights, mode, capsys):
    image = _image(tmp_path / "img.png", mode=mode)
    code = main(["--quiet", "segment", str(image), "--vocab", "a; b", "--clip-model", TINY, "--clip-weights",
                 str(tiny_weights), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(tmp_path / "out" / "img.png")).shape == (70, 90)


def test_bad_input_is_one_clear_line_and_leaves_nothing(tmp_path, tiny_weights, capsys):
    good = _image(tmp_path / "ok.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    small = _image(tmp_path / "small.png", h=10, w=40)
    other_weights = tmp_path / "other.pt"
    torch.save({"visual.conv1.weight": torch.zeros(3)}, other_weights)
    weights = ["--clip-model", TINY, "--clip-weights", str(tiny_weights)]
    cases = [
        ([str(good), "--vocab", " ; ", *weights], "vocabulary is empty"),
        ([str(good), "--vocab", "cat; Cat", *weights], "classes given twice"),
        ([str(broken), "--vocab", "cat", *weights], "cannot read this image"),
        ([str(small), "--vocab", "cat", *weights], "smaller than one 16-pixel patch"),
        ([str(good), "--vocab", "cat", "--clip-model", "RN50", "--clip-weights", str(tiny_weights)], "no ViT image tower"),
        ([str(good), "--vocab", "cat", "--clip-model", TINY, "--clip-weights", str(other_weights)], "do not fit"),
        ([str(good), "--vocab", "cat", "--clip-model", TINY, "--clip-weights", "no_such_tag"], "neither a file nor"),
        ([str(good), "--vocab", "cat", "--size", "200", *weights], "multiple of the model's 16-pixel patch"),
        ([str(good), "--vocab", "cat", "--size", "256", *weights], "give eps and min_samples"),
        ([str(tmp_path / "missing.jpg"), "--vocab", "cat", *weights], "input not found"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code = main(["--quiet", "segment", *args, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(err) == 1 and message in err[0], (message, err)
        assert not out.exists(), f"{args}: left {out}"
    with pytest.raises(SystemExit):  # argparse: usage and one error line, exit status 2
        main(["segment", str(good), "--vocab", "cat", "--eps", "nan", *weights])
    assert "--eps: must be a positive number" in capsys.readouterr().err
