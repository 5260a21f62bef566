"""Result files (RLE, results.json, instances.csv, atomic writes) and overlay videos."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from clipvis.data.synthetic import synthetic_video_and_masks, write_video
from clipvis.data.video import open_video
from clipvis.errors import ClipvisError
from clipvis._io import atomic_write
from clipvis.inference.outputs import VideoInstance, write_instances_csv, write_results_json
from clipvis.mask_encoding import masks_to_rles, rles_to_masks
from clipvis.visualization import OverlayVideoWriter, draw_overlay, track_colors, write_overlay_video

# pycocotools' decoder trips numpy 2's `__array__(copy=...)` deprecation on every call
pytestmark = pytest.mark.filterwarnings("ignore:.*__array__.*:DeprecationWarning")

T, H, W = 10, 96, 128
# H.264 4:2:0 of an overlay: mean |decoded - drawn| over all pixels (0..255 scale); at these small
# sizes the half-resolution chroma of saturated mask edges and label text dominates the error
OVERLAY_MEAN_ABS_TOL = 8.0


@pytest.fixture(scope="module")
def scene():
    """Frames [T,H,W,3] and per-shape masks [S,T,H,W], with some frames blanked so instances come and go."""
    frames, masks = synthetic_video_and_masks(T, H, W, seed=5)
    masks = masks.copy()
    masks[0, :3] = False  # enters late
    masks[1, -2:] = False  # leaves early
    masks[2, 4] = False  # a gap
    return frames, masks


@pytest.fixture(scope="module")
def instances(scene):
    _, masks = scene
    names = ["circle", "rectangle", "triangle", "ghost", "thing"]
    return [
        VideoInstance(track_id=k, score=0.95 - 0.2 * k, category_id=k + 1, class_name=names[k], rles=masks_to_rles(masks[k]))
        for k in range(len(masks))
    ]


def decode(rle):
    return mask_util.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


# ------------------------------------------------------------------ RLE


def test_rle_round_trip(scene):
    _, masks = scene
    for shape_masks in masks:
        rles = masks_to_rles(shape_masks)
        assert len(rles) == T
        for t, rle in enumerate(rles):
            if not shape_masks[t].any():
                assert rle is None
                continue
            assert isinstance(rle["counts"], str) and list(rle["size"]) == [H, W]
            np.testing.assert_array_equal(decode(rle), shape_masks[t])
            assert mask_util.area({"size": rle["size"], "counts": rle["counts"].encode()}) == shape_masks[t].sum()
        np.testing.assert_array_equal(rles_to_masks(rles, H, W), shape_masks)


def test_rle_accepts_integer_masks_and_rejects_probabilities(scene):
    _, masks = scene
    assert masks_to_rles(masks[1].astype(np.uint8)) == masks_to_rles(masks[1])
    with pytest.raises(ValueError):
        masks_to_rles(masks[1].astype(np.float32))


# ------------------------------------------------------------------ results.json / csv


def test_results_json_decodes_to_the_masks(tmp_path, scene, instances):
    _, masks = scene
    path = write_results_json(instances, video_id=7, path=tmp_path / "out" / "results.json")
    records = json.loads(path.read_text())
    assert len(records) == len(instances)
    for record, inst, shape_masks in zip(records, instances, masks):
        assert set(record) == {"video_id", "score", "category_id", "segmentations"}
        assert record["video_id"] == 7 and record["category_id"] == inst.category_id
        assert record["score"] == pytest.approx(inst.score, rel=1e-12)
        assert len(record["segmentations"]) == T
        for t, seg in enumerate(record["segmentations"]):
            if seg is None:
                assert not shape_masks[t].any()
            else:
                np.testing.assert_array_equal(decode(seg), shape_masks[t])
    assert [p.name for p in path.parent.iterdir()] == ["results.json"], "no temporary file left behind"


@pytest.mark.parametrize("with_indices", [False, True])
def test_instances_csv(tmp_path, scene, instances, with_indices):
    _, masks = scene
    frame_indices = [3 * t + 1 for t in range(T)] if with_indices else None
    path = write_instances_csv(instances, tmp_path / "instances.csv", frame_indices=frame_indices)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(instances)
    for row, inst, shape_masks in zip(rows, instances, masks):
        present = np.flatnonzero(shape_masks.reshape(T, -1).any(axis=1))
        number = (lambda t: frame_indices[t]) if with_indices else (lambda t: t)
        assert int(row["track_id"]) == inst.track_id and row["class_name"] == inst.class_name
        assert int(row["category_id"]) == inst.category_id
        assert float(row["score"]) == pytest.approx(inst.score, abs=5e-5)
        assert int(row["first_frame"]) == number(present[0]) and int(row["last_frame"]) == number(present[-1])
        assert int(row["frames_present"]) == len(present)
        assert float(row["mean_area"]) == pytest.approx(shape_masks[present].sum(axis=(1, 2)).mean(), abs=0.051)


def test_instances_csv_for_an_instance_never_present(tmp_path):
    empty = VideoInstance(3, 0.5, 2, "nothing", [None] * 4)
    with open(write_instances_csv([empty], tmp_path / "i.csv"), newline="") as f:
        row = next(csv.DictReader(f))
    assert row["first_frame"] == "" and row["frames_present"] == "0" and float(row["mean_area"]) == 0.0


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("previous")

    def failing(tmp):
        tmp.write_text("half written")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        atomic_write(target, failing)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new.json", failing)
    assert not (tmp_path / "new.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_unwritable_output_folder(tmp_path, instances):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(ClipvisError, match="a_file"):
        write_results_json(instances, 1, blocker / "results.json")
    with pytest.raises(ClipvisError, match="a_file"):
        write_instances_csv(instances, blocker / "sub" / "instances.csv")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_output_folder(tmp_path, instances):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ClipvisError, match="ro"):
            write_results_json(instances, 1, folder / "results.json")
    finally:
        folder.chmod(0o700)


# ------------------------------------------------------------------ drawing


def test_track_colors_distinct_and_stable():
    colors = track_colors(12)
    assert colors.shape == (12, 3) and colors.dtype == np.uint8
    assert len({tuple(c) for c in colors}) == 12
    np.testing.assert_array_equal(track_colors(5), colors[:5])


def test_draw_overlay_blends_masks(scene):
    frames, masks = scene
    frame = frames[5]
    color = np.array([[255, 0, 0]])
    out = draw_overlay(frame, [masks[1, 5]], color, [""])  # no label: only blend + outline
    assert out.shape == frame.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~masks[1, 5]], frame[~masks[1, 5]])
    padded = np.pad(masks[1, 5], 1)
    interior = masks[1, 5] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    assert interior.any()
    want = 0.5 * frame[interior].astype(np.float64) + 0.5 * color
    assert np.abs(out[interior] - want).max() <= 1.0
    np.testing.assert_array_equal(draw_overlay(frame, [], np.zeros((0, 3)), []), frame)
    labelled = draw_overlay(frame, [masks[1, 5]], color, ["rectangle 0.87"])
    assert (labelled != out).any(), "the label is drawn"


# ------------------------------------------------------------------ overlay video


@pytest.mark.parametrize("stride", [1, 2])
def test_overlay_video(tmp_path, scene, instances, stride):
    import decord

    frames, masks = scene
    video = write_video(frames, tmp_path / "clip.mp4", fps=8)
    source = open_video(video, frame_stride=stride)
    kept = source.info.frame_indices
    selected = [
        VideoInstance(i.track_id, i.score, i.category_id, i.class_name, [i.rles[t] for t in kept]) for i in instances
    ]
    threshold = 0.5
    path = write_overlay_video(source, selected, tmp_path / "overlay.mp4", threshold=threshold)
    reader = decord.VideoReader(str(path))
    assert len(reader) == len(kept)
    assert reader[0].shape == (H, W, 3)
    assert reader.get_avg_fps() == pytest.approx(8 / stride, rel=1e-3)
    overlay = reader.get_batch(list(range(len(reader)))).asnumpy().astype(np.int16)
    # what the video should show: each decoded frame with the instances at or above the threshold drawn
    plain = source.read_all()
    colors = track_colors(len(instances))
    shown = [k for k, inst in enumerate(instances) if inst.score >= threshold]
    assert 0 < len(shown) < len(instances)
    expected = np.stack([
        draw_overlay(
            plain[j], [masks[k, t] for k in shown if masks[k, t].any()], colors[[k for k in shown if masks[k, t].any()]],
            [f"{instances[k].class_name} {instances[k].score:.2f}" for k in shown if masks[k, t].any()],
        )
        for j, t in enumerate(kept)
    ]).astype(np.int16)
    everything = np.stack([
        draw_overlay(plain[j], list(masks[:, t]), colors, [f"{i.class_name} {i.score:.2f}" for i in instances])
        for j, t in enumerate(kept)
    ]).astype(np.int16)
    assert np.abs(overlay - expected).mean() < OVERLAY_MEAN_ABS_TOL
    # where drawing changes pixels, the video is far closer to the drawing than to the alternatives
    for alternative, what in ((plain.astype(np.int16), "masks are drawn"), (everything, "instances under the threshold are not drawn")):
        region = (expected != alternative).any(axis=-1)
        assert region.any()
        assert np.abs(overlay - expected)[region].mean() < 0.5 * np.abs(overlay - alternative)[region].mean(), what
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_overlay_writer_keeps_nothing_on_failure(tmp_path):
    path = tmp_path / "overlay.mp4"
    with pytest.raises(RuntimeError, match="stop"):
        with OverlayVideoWriter(path, fps=5) as writer:
            writer.write(np.zeros((16, 16, 3), np.uint8))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_overlay_writer_pads_odd_sizes_to_even(tmp_path):
    import decord

    path = tmp_path / "odd.mp4"
    with OverlayVideoWriter(path, fps=5) as writer:
        for k in range(3):
            writer.write(np.full((15, 21, 3), 40 * k, np.uint8))
    reader = decord.VideoReader(str(path))
    assert len(reader) == 3 and reader[0].shape == (16, 22, 3)


def test_overlay_rejects_instances_of_another_length(tmp_path, scene, instances):
    frames, _ = scene
    source = open_video(write_video(frames, tmp_path / "clip.mp4"), max_frames=4)
    with pytest.raises(ClipvisError):
        write_overlay_video(source, instances, tmp_path / "overlay.mp4")
    assert not (tmp_path / "overlay.mp4").exists()


@pytest.mark.parametrize("output_size", [(90, 118), (135, 177), (61, 80)])
def test_output_masks_are_the_originals_interpolation(output_size):
    """`logits_to_output_masks` gives bit for bit the original's evaluator masks: bilinear of the [1,Q,h,w]
    logits to the padded size, crop, bilinear to the output size, > 0."""
    import torch.nn.functional as F

    from clipvis.mask_encoding import logits_to_output_masks

    torch.manual_seed(0)
    logits = torch.randn(20, 24, 32) * 4
    padded, image = (96, 128), (90, 118)
    x = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)[:, :, : image[0], : image[1]]
    if output_size != image:
        x = F.interpolate(x, size=output_size, mode="bilinear", align_corners=False)
    assert torch.equal(logits_to_output_masks(logits, padded, image, output_size), x[0] > 0)
