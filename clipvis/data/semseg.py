"""Semantic segmentation datasets (detectron2 format, as MaskFormer prepares them) for training-free
evaluation: a folder of images and a folder of label images with one class index per pixel (255 = ignore).

The built-in benchmarks (VOC20/21, Pascal Context 59/60/459, COCO-Stuff 171, COCO-Object 80, ADE20K 150 and
847, Cityscapes 19) carry the class texts and background texts the original CLIPtrase uses
(`semseg_vocabularies.json`) and the code path it takes for each: `with_background` (background texts are
appended; predictions of any background text and GT 255 become class C), `voc20` (patch logits weighted by
the CLS token's logits) or `plain`. They are registered with `register_semseg_dataset`, as a user registers
their own; datasets/README.md gives each layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

from clipvis.errors import ClipvisError

MODES = ("with_background", "voc20", "plain")  # the original CLIPtrase's code paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VOCABULARIES_FILE = Path(__file__).resolve().parent / "semseg_vocabularies.json"


@dataclass
class SemsegDataset:
    """A semantic segmentation split.

    labels: the class texts (class k = labels[k]); background: background texts (with_background mode) or None;
    mode: one of MODES; gt_suffix: the label file's name after the image's stem (".png"; ".tif" for ADE-847 and
    PC-459); image_suffix: when set, images are matched by this suffix (Cityscapes' "_leftImg8bit.png"), in
    subfolders too, and the GT name replaces it by gt_suffix.
    """

    name: str
    image_root: Path
    gt_root: Path
    labels: List[str]
    background: Optional[List[str]] = None
    mode: str = "plain"
    gt_suffix: str = ".png"
    image_suffix: Optional[str] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ClipvisError(f"semantic segmentation dataset {self.name!r}: mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.labels:
            raise ClipvisError(f"semantic segmentation dataset {self.name!r} has no class texts")
        if self.mode == "with_background" and not self.background:
            raise ClipvisError(f"semantic segmentation dataset {self.name!r}: mode with_background needs background texts")

    @property
    def num_classes(self) -> int:
        """Classes in the metric: C, plus one background class in with_background mode."""
        return len(self.labels) + (1 if self.mode == "with_background" else 0)

    @property
    def class_names(self) -> List[str]:
        """Names of the metric's classes (with_background: "background" last)."""
        return list(self.labels) + (["background"] if self.mode == "with_background" else [])

    def pairs(self) -> List[Tuple[Path, Path]]:
        """(image, label image) paths, sorted by image path. ClipvisError if a folder is missing, empty, or an
        image has no label file (naming the first few)."""
        for what, folder in (("image", self.image_root), ("label", self.gt_root)):
            if not folder.is_dir():
                raise ClipvisError(f"{self.name}: {what} folder not found: {folder} (see datasets/README.md for the layout)")
        if self.image_suffix:
            images = sorted(p for p in self.image_root.rglob(f"*{self.image_suffix}") if p.is_file())
            gts = [self.gt_root / p.relative_to(self.image_root).parent / (p.name[: -len(self.image_suffix)] + self.gt_suffix)
                   for p in images]
        else:
            images = sorted(p for p in self.image_root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
            gts = [self.gt_root / (p.name.split(".")[0] + self.gt_suffix) for p in images]  # stem up to the first dot
        if not images:
            raise ClipvisError(f"{self.name}: no images in {self.image_root}")
        missing = [str(g) for g in gts if not g.is_file()]
        if missing:
            raise ClipvisError(f"{self.name}: {len(missing)} of {len(images)} images have no label file, e.g. {', '.join(missing[:3])}")
        return list(zip(images, gts))


def builtin_semseg_vocabularies() -> dict:
    """{name: {"mode", "image_dir", "gt_dir", "gt_suffix", "labels", "background", ...}} of the built-in benchmarks."""
    data = json.loads(VOCABULARIES_FILE.read_text(encoding="utf-8"))
    data.pop("_comment", None)
    return data
