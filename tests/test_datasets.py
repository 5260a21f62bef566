"""Dataset readers (YouTube-VIS-layout video JSON, LVIS/COCO instances) and the name registry, on small
files written by the test under a temporary $CLIPVIS_DATASETS."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from clipvis.data.datasets import (
    ImageDataset,
    VideoDataset,
    dataset_entry,
    dataset_paths,
    get_dataset,
    list_datasets,
    load_image_dataset,
    load_video_dataset,
    remove_rare_categories,
)
from clipvis.errors import ClipvisError, VideoError


def _video_json(with_partition: bool, with_annotations: bool = True, num_frames: int = 3) -> dict:
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "zebra"}]
    if with_partition:
        for c, p in zip(cats, (0, 1, 2)):
            c["partition"] = p
    data = {
        "videos": [
            {"id": 7, "height": 4, "width": 6, "file_names": [f"v7/{i:05d}.jpg" for i in range(num_frames)]},
            {"id": 3, "height": 4, "width": 6, "length": 2, "file_names": ["v3/a.jpg", "v3/b.jpg"]},
        ],
        "categories": cats,
    }
    if with_annotations:
        data["annotations"] = [
            {"id": 1, "video_id": 7, "category_id": 2, "segmentations": [None] * num_frames, "areas": [None] * num_frames, "iscrowd": 0},
            {"id": 2, "video_id": 3, "category_id": 1, "segmentations": [None, None], "areas": [None, None], "iscrowd": 0},
        ]
    return data


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _touch_frames(root: Path, data: dict, skip: int = 0) -> None:
    names = [f for v in data["videos"] for f in v["file_names"]]
    for name in names[skip:]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def test_video_dataset_reader(tmp_path):
    data = _video_json(with_partition=True)
    ds = load_video_dataset(_write(tmp_path / "ann.json", data), tmp_path / "frames", name="toy")
    assert isinstance(ds, VideoDataset) and ds.name == "toy"
    assert [v["id"] for v in ds.videos] == [7, 3]
    assert [v["length"] for v in ds.videos] == [3, 2]  # filled from file_names where missing
    assert ds.has_annotations and ds.has_partition and ds.evaluation_mode == "lvvis"
    assert ds.class_names == ["cat", "dog", "zebra"]
    assert ds.frame_paths(ds.videos[1]) == [tmp_path / "frames" / "v3/a.jpg", tmp_path / "frames" / "v3/b.jpg"]
    assert [a["id"] for a in ds.annotations_of(3)] == [2]

    ytvis = load_video_dataset(_write(tmp_path / "yt.json", _video_json(with_partition=False)), tmp_path)
    assert not ytvis.has_partition and ytvis.evaluation_mode == "ytvis"

    test_split = load_video_dataset(_write(tmp_path / "test.json", _video_json(True, with_annotations=False)), tmp_path)
    assert not test_split.has_annotations and test_split.annotations_of(7) == []


def test_video_dataset_bad_files(tmp_path):
    with pytest.raises(ClipvisError, match="not found"):
        load_video_dataset(tmp_path / "nope.json", tmp_path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ClipvisError, match="not valid JSON"):
        load_video_dataset(tmp_path / "broken.json", tmp_path)
    with pytest.raises(ClipvisError, match="videos"):
        load_video_dataset(_write(tmp_path / "coco.json", {"images": [], "categories": []}), tmp_path)
    data = _video_json(True)
    del data["videos"][0]["height"]
    with pytest.raises(ClipvisError, match="height"):
        load_video_dataset(_write(tmp_path / "noh.json", data), tmp_path)
    data = _video_json(True)
    data["annotations"][0]["segmentations"] = [None]
    with pytest.raises(ClipvisError, match=r"\[1\]"):
        load_video_dataset(_write(tmp_path / "short.json", data), tmp_path)


def test_missing_frames_are_named(tmp_path, caplog):
    data = _video_json(True)
    frames = tmp_path / "frames"
    _touch_frames(frames, data, skip=1)
    ds = load_video_dataset(_write(tmp_path / "ann.json", data), frames)
    assert ds.missing_frames() == [frames / "v7/00000.jpg"]
    with pytest.raises(VideoError, match="00000.jpg"):
        ds.check_frames()
    with caplog.at_level(logging.WARNING):
        ds.check_frames(strict=False)
    assert "00000.jpg" in caplog.text
    _touch_frames(frames, data)
    ds.check_frames()


def _lvis_json() -> dict:
    return {
        "images": [
            {"id": 5, "height": 10, "width": 12, "coco_url": "http://images.cocodataset.org/train2017/000000000005.jpg"},
            {"id": 9, "height": 8, "width": 8, "coco_url": "http://images.cocodataset.org/val2017/000000000009.jpg", "neg_category_ids": [2]},
        ],
        "categories": [{"id": 1, "name": "apple", "frequency": "f"}, {"id": 2, "name": "armoire", "frequency": "r"}, {"id": 3, "name": "bow", "frequency": "c"}],
        "annotations": [
            {"id": 1, "image_id": 5, "category_id": 1, "segmentation": [[0, 0, 4, 0, 4, 4]], "bbox": [0, 0, 4, 4], "area": 8},
            {"id": 2, "image_id": 5, "category_id": 2, "segmentation": [[1, 1, 3, 1, 3, 3]], "bbox": [1, 1, 2, 2], "area": 2},
            {"id": 3, "image_id": 9, "category_id": 3, "segmentation": [[2, 2, 5, 2, 5, 5]], "bbox": [2, 2, 3, 3], "area": 4.5},
        ],
    }


def test_image_dataset_readers(tmp_path):
    lvis = load_image_dataset(_write(tmp_path / "lvis.json", _lvis_json()), tmp_path / "coco", name="lvis")
    assert isinstance(lvis, ImageDataset)
    assert [r["file_name"] for r in lvis.records] == [str(tmp_path / "coco" / "train2017/000000000005.jpg"), str(tmp_path / "coco" / "val2017/000000000009.jpg")]
    assert [a["category_id"] for a in lvis.records[0]["annotations"]] == [1, 2]
    assert lvis.records[1]["neg_category_ids"] == [2]
    assert lvis.records[0]["annotations"][0]["segmentation"] == [[0, 0, 4, 0, 4, 4]]

    coco = {
        "images": [{"id": 1, "file_name": "000000000001.jpg", "height": 4, "width": 4}, {"id": 2, "file_name": "000000000002.jpg", "height": 4, "width": 4}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [{"id": 4, "image_id": 1, "category_id": 18, "segmentation": {"size": [4, 4], "counts": [0, 16]}, "bbox": [0, 0, 4, 4], "iscrowd": 1}],
    }
    ds = load_image_dataset(_write(tmp_path / "coco.json", coco), tmp_path / "imgs")
    assert ds.records[0]["annotations"][0]["iscrowd"] == 1 and ds.records[1]["annotations"] == []
    assert ds.class_names == ["person", "dog"]
    with pytest.raises(ClipvisError, match="images"):
        load_image_dataset(_write(tmp_path / "vid.json", _video_json(True)), tmp_path)


def test_remove_rare_categories(tmp_path):
    src = _write(tmp_path / "lvis" / "lvis_v1_train.json", _lvis_json())
    out = remove_rare_categories(src)
    assert out == tmp_path / "lvis" / "lvis_v1_train_norare.json"
    data = json.loads(out.read_text())
    assert [a["id"] for a in data["annotations"]] == [1, 3]
    assert len(data["categories"]) == 3 and len(data["images"]) == 2
    with pytest.raises(ClipvisError, match="frequency"):
        remove_rare_categories(_write(tmp_path / "coco.json", {"images": [], "categories": [{"id": 1, "name": "x"}], "annotations": []}))


def test_registry_resolves_under_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPVIS_DATASETS", str(tmp_path))
    for name in ("lvvis_val", "lvvis_train", "lvvis_test", "ytvis_2019_val", "ytvis_2021_val", "ovis_val", "burst_val", "lvis_v1_train_norare", "coco_2017_train"):
        assert name in list_datasets()
    frames, js = dataset_paths("lvvis_val")
    assert frames == tmp_path / "lvvis/val/JPEGImages" and js == tmp_path / "lvvis/val/val_instances_.json"
    _write(js, _video_json(True))
    ds = get_dataset("lvvis_val")
    assert ds.name == "lvvis_val" and ds.frames_root == frames and ds.evaluation_mode == "lvvis"

    _write(tmp_path / dataset_entry("ytvis_2019_test").json_file, _video_json(False, with_annotations=False))
    assert not get_dataset("ytvis_2019_test").has_annotations

    lvis_src = _write(tmp_path / "lvis" / "lvis_v1_train.json", _lvis_json())
    remove_rare_categories(lvis_src)
    norare = get_dataset("lvis_v1_train_norare")
    assert isinstance(norare, ImageDataset) and norare.image_root == tmp_path / dataset_entry("lvis_v1_train_norare").root
    assert sum(len(r["annotations"]) for r in norare.records) == 2

    other = tmp_path / "elsewhere"
    _write(other / dataset_entry("ovis_val").json_file, _video_json(False))
    assert get_dataset("ovis_val", root=other).frames_root == other / "ovis/valid"


def test_registry_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPVIS_DATASETS", str(tmp_path))
    with pytest.raises(ClipvisError, match="lvvis_val") as info:
        get_dataset("lvvis_vall")
    assert "ytvis_2019_val" in str(info.value) and "coco_2017_train" in str(info.value)
    with pytest.raises(ClipvisError, match=str(tmp_path / "ytvis2021" / "valid.json")):
        get_dataset("ytvis_2021_val")


def test_default_root_is_cwd_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPVIS_DATASETS", raising=False)
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "datasets" / dataset_entry("lvvis_train").json_file, _video_json(True))
    assert get_dataset("lvvis_train").frames_root == Path("datasets") / "lvvis/train/JPEGImages"


def test_a_registered_dataset_is_loaded_and_evaluated_by_name(tmp_path):
    """A user adds a dataset without editing the library: register it, name it in DATASETS.TEST, evaluate."""
    import torch

    import clipvis
    from clipvis.engine.evaluation import evaluate_datasets
    from test_eval_only import TINY, write_mini_lvvis

    gt = write_mini_lvvis(tmp_path / "mine", num_videos=2)
    clipvis.register_video_dataset("my_videos", {"note": "test"}, gt, gt.parent / "JPEGImages")
    clipvis.register_video_dataset("my_videos", {"note": "test"}, gt, gt.parent / "JPEGImages")  # same again: fine
    with pytest.raises(ClipvisError, match="already registered"):
        clipvis.register_video_dataset("my_videos", None, tmp_path / "other.json", tmp_path)
    assert "my_videos" in list_datasets()
    dataset = get_dataset("my_videos")
    assert isinstance(dataset, VideoDataset) and len(dataset.videos) == 2

    cfg = clipvis.load_config(TINY, ["DATASETS.TEST", '("my_videos",)', "OUTPUT_DIR", str(tmp_path / "out")])
    torch.manual_seed(0)
    metrics = evaluate_datasets(cfg, model=clipvis.build_model(cfg))
    assert set(metrics) == {"my_videos"}
    assert (tmp_path / "out" / "inference" / "my_videos" / "results.json").is_file()
    assert (tmp_path / "out" / "inference" / "my_videos" / "metrics.json").is_file()
