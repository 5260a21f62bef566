"""`train_net.py --eval-only` on a mini LV-VIS dataset written by the test: one process and two gloo
processes give identical results.json, metrics are written, and an interrupted run resumes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipvis.checkpoint import model_to_official_keys
from clipvis.config import builtin_config, load_config
from clipvis.data.synthetic import synthetic_video_and_masks, write_frame_folder
from clipvis.mask_encoding import masks_to_rles
from clipvis.modeling.meta_arch import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = builtin_config("clipvis_video_tiny.yaml")
CATEGORIES = [
    {"id": 1, "name": "circle", "partition": 0},
    {"id": 2, "name": "square", "partition": 1},
    {"id": 3, "name": "triangle", "partition": 2},
]


def write_mini_lvvis(root: Path, num_videos: int = 3) -> Path:
    """LV-VIS val layout under `root`: lvvis/val/JPEGImages/<video>/*.jpg and val_instances_.json."""
    frames_root = root / "lvvis" / "val" / "JPEGImages"
    videos, annotations = [], []
    for v in range(num_videos):
        frames, masks = synthetic_video_and_masks(4 + v, 64, 80, seed=10 + v)
        name = f"{v:05d}"
        write_frame_folder(frames, frames_root / name, ext="jpg")
        files = sorted(p.name for p in (frames_root / name).iterdir())
        videos.append({"id": v + 1, "file_names": [f"{name}/{f}" for f in files], "height": 64, "width": 80, "length": len(files)})
        for s, track in enumerate(masks):
            rles = masks_to_rles(track)
            annotations.append({
                "id": len(annotations) + 1, "video_id": v + 1, "category_id": s % 3 + 1, "iscrowd": 0,
                "segmentations": rles, "areas": [int(m.sum()) if m.any() else None for m in track],
                "bboxes": [None] * len(rles), "height": 64, "width": 80, "length": len(rles),
            })
    gt = {"videos": videos, "categories": CATEGORIES, "annotations": annotations}
    path = root / "lvvis" / "val" / "val_instances_.json"
    path.write_text(json.dumps(gt))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_mini_lvvis(root)
    torch.manual_seed(0)
    model = build_model(load_config(TINY))
    weights = root / "tiny.pth"
    torch.save({"model": model_to_official_keys(model.state_dict())}, weights)
    return root, weights


def run_eval_only(root: Path, weights: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPVIS_DATASETS": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(TINY), "--eval-only", "--device", "cpu", *extra,
           "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", '("lvvis_val",)', "OUTPUT_DIR", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_one_and_two_processes_give_identical_results(setup, tmp_path):
    root, weights = setup
    one = run_eval_only(root, weights, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_eval_only(root, weights, tmp_path / "two", "--num-gpus", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    res1 = json.loads((tmp_path / "one/inference/lvvis_val/results.json").read_text())
    res2 = json.loads((tmp_path / "two/inference/lvvis_val/results.json").read_text())
    assert res1 and res1 == res2
    assert [r["video_id"] for r in res1] == sorted(r["video_id"] for r in res1)
    metrics = json.loads((tmp_path / "one/inference/lvvis_val/metrics.json").read_text())
    assert set(metrics) >= {"stats", "stats_base", "stats_novel", "per_category"}
    assert 0.0 <= metrics["stats"]["AP"] <= 1.0
    assert not list((tmp_path / "one/inference/lvvis_val").glob("results.part*"))


def test_interrupted_run_resumes(setup, tmp_path):
    """A shard file with one finished video and a line cut short: only the other videos run again."""
    from clipvis.data.datasets import get_dataset
    from clipvis.engine.dataset_inference import infer_dataset
    from clipvis.inference.predictor import VideoPredictor

    root, weights = setup
    cfg = load_config(TINY, ["MODEL.WEIGHTS", str(weights)])
    predictor = VideoPredictor.from_config(cfg, progress=False)
    dataset = get_dataset("lvvis_val", root=root)
    full = json.loads(infer_dataset(predictor, dataset, tmp_path / "full", progress=False).read_text())

    out = tmp_path / "resumed"
    out.mkdir()
    first = [r for r in full if r["video_id"] == 1]
    (out / "results.part0.jsonl").write_text(json.dumps({"video_id": 1, "results": first}) + "\n" + '{"video_id": 2, "resu')
    calls = []
    original = predictor.predict_windows
    predictor.predict_windows = lambda *a, **k: calls.append(1) or original(*a, **k)
    resumed = json.loads(infer_dataset(predictor, dataset, out, progress=False).read_text())
    assert len(calls) == len(dataset.videos) - 1
    assert resumed == full


def test_an_error_in_worker_processes_is_one_line(setup, tmp_path):
    """A bad dataset name with 2 processes: exit status 2, the error line, and no traceback from the launcher."""
    root, weights = setup
    env = {**os.environ, "CLIPVIS_DATASETS": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(TINY), "--eval-only", "--device", "cpu",
           "--num-gpus", "2", "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", '("not_a_dataset",)', "OUTPUT_DIR", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "unknown dataset 'not_a_dataset'" in proc.stderr


def test_model_device_is_honoured_without_device_flag(monkeypatch):
    """MODEL.DEVICE picks the device as in detectron2; a CUDA device where there is none falls back to the CPU."""
    from clipvis.inference.predictor import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device("cpu") == "cpu"
    assert default_device("cuda") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device("cuda") == "cpu"
    assert load_config(TINY).MODEL.DEVICE == "cpu"


def test_eval_only_takes_clip_from_the_checkpoint(setup, tmp_path, monkeypatch):
    """With MODEL.WEIGHTS the config's open_clip pretrained tag is never fetched: the checkpoint carries CLIP."""
    from clipvis.engine.evaluation import evaluate_datasets

    root, weights = setup
    monkeypatch.setenv("CLIPVIS_DATASETS", str(root))
    cfg = load_config(TINY, ["MODEL.WEIGHTS", str(weights), "MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", "not_a_cached_tag",
                             "DATASETS.TEST", '("lvvis_val",)', "OUTPUT_DIR", str(tmp_path)])
    metrics = evaluate_datasets(cfg, device="cpu")
    assert set(metrics) == {"lvvis_val"} and 0.0 <= metrics["lvvis_val"]["stats"]["AP"] <= 1.0
