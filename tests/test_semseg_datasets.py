"""Semantic segmentation datasets: the built-in benchmarks' vocabularies and layouts, and a user's own
dataset registered from a temporary folder."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clipvis.data.datasets import get_dataset, list_datasets, register_semseg_dataset
from clipvis.data.semseg import SemsegDataset
from clipvis.errors import ClipvisError

PAPER_BENCHMARKS = {  # name: (classes in the metric, mode)
    "voc20": (20, "voc20"), "voc21": (21, "with_background"), "pc59": (59, "plain"), "pc60": (60, "with_background"),
    "pc459": (459, "plain"), "coco_stuff_171": (171, "plain"), "coco_object_80": (81, "with_background"),
    "ade150": (150, "plain"), "ade847": (847, "plain"), "cityscapes_19": (19, "plain"),
}


@pytest.mark.parametrize("name", sorted(PAPER_BENCHMARKS))
def test_builtin_benchmarks_are_registered(name, tmp_path):
    dataset = get_dataset(name, root=tmp_path)
    assert isinstance(dataset, SemsegDataset)
    assert (dataset.num_classes, dataset.mode) == PAPER_BENCHMARKS[name]
    assert dataset.image_root.is_relative_to(tmp_path)
    with pytest.raises(ClipvisError, match="folder not found"):
        dataset.pairs()


def test_original_texts_are_kept_verbatim():
    voc21 = get_dataset("voc21")
    assert voc21.background[0] == "background" and "beachhill" in voc21.background  # the original's missing comma
    assert voc21.background.count("bed") == 2  # duplicates kept: each background text is encoded
    assert get_dataset("ade150").labels[7] == "bed "  # a trailing space is part of the text
    assert get_dataset("pc60").background == ["background"]
    assert get_dataset("ade847").gt_suffix == ".tif" and get_dataset("pc459").gt_suffix == ".tif"


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_registered_dataset_pairs_images_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    for stem in ("b.2007", "a"):
        _write(tmp_path / "img" / f"{stem}.jpg", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
        _write(tmp_path / "gt" / f"{stem.split('.')[0]}.png", rng.integers(0, 3, (20, 24), dtype=np.uint8))
    register_semseg_dataset("my_semseg", {"labels": ["cat", "dog", "grass"], "mode": "plain"},
                            tmp_path / "img", tmp_path / "gt")
    assert "my_semseg" in list_datasets()
    dataset = get_dataset("my_semseg")
    assert [(i.name, g.name) for i, g in dataset.pairs()] == [("a.jpg", "a.png"), ("b.2007.jpg", "b.png")]
    (tmp_path / "gt" / "a.png").unlink()
    with pytest.raises(ClipvisError, match="1 of 2 images have no label file"):
        dataset.pairs()
    with pytest.raises(ClipvisError, match="labels"):
        register_semseg_dataset("bad", {}, tmp_path / "img", tmp_path / "gt")
    with pytest.raises(ClipvisError, match="background"):
        SemsegDataset("bg", tmp_path, tmp_path, ["cat"], mode="with_background")


def test_cityscapes_layout_matches_by_suffix_in_city_folders(tmp_path):
    image = tmp_path / "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png"
    label = tmp_path / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png"
    _write(image, np.zeros((8, 16, 3), np.uint8))
    _write(label, np.zeros((8, 16), np.uint8))
    assert get_dataset("cityscapes_19", root=tmp_path).pairs() == [(image, label)]
