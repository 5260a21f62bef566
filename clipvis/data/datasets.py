"""Dataset readers and the name registry.

Video datasets (YouTube-VIS layout JSON: ``videos`` with ``file_names``/``height``/``width``/``length``,
``categories``, and ``annotations`` with per-frame ``segmentations``): LV-VIS (categories carry
``partition``: 0,1 base; 2,3 novel), YouTube-VIS 2019 / 2021, OVIS, BURST (its YouTube-VIS-format
conversion). Image datasets for training: LVIS v1 and COCO instances.

Names resolve under ``$CLIPVIS_DATASETS`` (default ``./datasets``) with the original's relative paths;
see ``datasets/README.md`` for the folder layout and how to prepare each dataset.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

from clipvis._io import write_json_atomic
from clipvis.errors import ClipvisError, VideoError

if TYPE_CHECKING:
    from clipvis.data.semseg import SemsegDataset

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: where its frames (or images) and annotation JSON are, and free-form metadata
    (e.g. ``{"evaluator": "lvvis"}``). Relative paths are resolved under the datasets root at load time."""

    kind: str  # "video" or "image"
    root: Path
    json_file: Path
    metadata: Tuple[Tuple[str, object], ...] = ()


_REGISTRY: Dict[str, DatasetEntry] = {}


def _register(kind: str, name: str, metadata: Optional[dict], json_file: PathLike, root: PathLike) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ClipvisError(f"a dataset name must be a non-empty string, got {name!r}")
    entry = DatasetEntry(kind, Path(root), Path(json_file), tuple(sorted((metadata or {}).items())))
    if name in _REGISTRY and _REGISTRY[name] != entry:
        raise ClipvisError(f"dataset {name!r} is already registered (as {_REGISTRY[name].json_file}); choose another name")
    _REGISTRY[name] = entry


def register_video_dataset(name: str, metadata: Optional[dict], json_file: PathLike, image_root: PathLike) -> None:
    """Make a YouTube-VIS-format video dataset known by `name` (to `get_dataset`, DATASETS.TRAIN / TEST,
    evaluation), as detectron2's ``register_ytvis_instances(name, metadata, json_file, image_root)``.

    json_file: the annotation JSON; image_root: the folder its ``file_names`` are relative to. Relative paths
    are taken under the datasets root (``$CLIPVIS_DATASETS``, default ``./datasets``), absolute ones as they
    are. Registering the same name twice with other paths is an error."""
    _register("video", name, metadata, json_file, image_root)


def register_image_dataset(name: str, metadata: Optional[dict], json_file: PathLike, image_root: PathLike) -> None:
    """Make a COCO/LVIS-format instance segmentation image dataset known by `name` (for training), as
    detectron2's ``register_coco_instances(name, metadata, json_file, image_root)``; paths as in
    `register_video_dataset`."""
    _register("image", name, metadata, json_file, image_root)


def register_semseg_dataset(name: str, metadata: dict, image_root: PathLike, gt_root: PathLike) -> None:
    """Make a semantic segmentation dataset (images + label images, detectron2 format) known by `name`, for
    `clipvis evaluate-semseg`. metadata: {"labels": class texts, "background": background texts or None,
    "mode": "with_background" | "voc20" | "plain", "gt_suffix": ".png", "image_suffix": None} (see
    `clipvis.data.semseg.SemsegDataset`); paths as in `register_video_dataset`."""
    if not isinstance(metadata, dict) or not metadata.get("labels"):
        raise ClipvisError(f"semantic segmentation dataset {name!r} needs metadata with its class texts under 'labels'")
    frozen = {k: tuple(v) if isinstance(v, list) else v for k, v in metadata.items()}
    _register("semseg", name, frozen, gt_root, image_root)


def is_video_dataset(name: str) -> bool:
    """Whether `name` is a registered video dataset."""
    return name in _REGISTRY and _REGISTRY[name].kind == "video"


# The built-in datasets, with the original's paths relative to the datasets root.
for _name, (_root, _json) in {
    "ytvis_2019_train": ("ytvis2019/train/JPEGImages", "ytvis2019/train.json"),
    "ytvis_2019_val": ("ytvis2019/valid/JPEGImages", "ytvis2019/valid.json"),
    "ytvis_2019_test": ("ytvis2019/test/JPEGImages", "ytvis2019/test.json"),
    "ytvis_2021_train": ("ytvis2021/train/JPEGImages", "ytvis2021/train.json"),
    "ytvis_2021_val": ("ytvis2021/valid/JPEGImages", "ytvis2021/valid.json"),
    "ytvis_2021_test": ("ytvis2021/test/JPEGImages", "ytvis2021/test.json"),
    "ovis_val": ("ovis/valid", "ovis/annotations_valid.json"),
    "lvvis_train": ("lvvis/train/JPEGImages", "lvvis/train/train_ytvis_style.json"),
    "lvvis_val": ("lvvis/val/JPEGImages", "lvvis/val/val_instances_.json"),
    "lvvis_test": ("lvvis/test/JPEGImages", "lvvis/test/test_instances.json"),
    "burst_val": ("burst/val", "burst/b2y_val.json"),
}.items():
    register_video_dataset(_name, None, _json, _root)
for _name, (_root, _json) in {
    "coco_2017_train": ("coco/train2017", "coco/annotations/instances_train2017.json"),
    "coco_2017_val": ("coco/val2017", "coco/annotations/instances_val2017.json"),
    "lvis_v1_train": ("coco", "lvis/lvis_v1_train.json"),
    "lvis_v1_val": ("coco", "lvis/lvis_v1_val.json"),
    "lvis_v1_train_norare": ("coco", "lvis/lvis_v1_train_norare.json"),
}.items():
    register_image_dataset(_name, None, _json, _root)


def _register_builtin_semseg() -> None:
    from clipvis.data.semseg import builtin_semseg_vocabularies

    for name, info in builtin_semseg_vocabularies().items():
        keys = ("labels", "background", "mode", "gt_suffix", "image_suffix")
        register_semseg_dataset(name, {k: info.get(k) for k in keys}, info["image_dir"], info["gt_dir"])


_register_builtin_semseg()


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ClipvisError(f"{what} annotation file not found: {path} (see datasets/README.md for the expected layout)")
    try:
        with open(path, "r") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ClipvisError(f"{what} annotation file {path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ClipvisError(f"{what} annotation file {path} must hold a JSON object")
    return data


@dataclass
class VideoDataset:
    """A video instance segmentation split.

    videos: list of ``{"id", "file_names" (relative to frames_root), "height", "width", "length"}`` in
    file order; categories: list of ``{"id", "name", "partition"?}``; annotations: list of
    ``{"id", "video_id", "category_id", "segmentations" [length], "areas", "iscrowd"}`` or None for a
    split without annotations (a test split).
    """

    name: str
    json_path: Path
    frames_root: Path
    videos: List[dict]
    categories: List[dict]
    annotations: Optional[List[dict]] = None

    @property
    def has_annotations(self) -> bool:
        """False for a split whose JSON has no ``annotations`` (test splits): results can be written, not scored."""
        return self.annotations is not None

    @property
    def has_partition(self) -> bool:
        """True when every category carries the LV-VIS ``partition`` (base/novel split)."""
        return bool(self.categories) and all("partition" in c for c in self.categories)

    @property
    def evaluation_mode(self) -> str:
        """``"lvvis"`` for categories with ``partition``, else ``"ytvis"`` (YouTube-VIS / OVIS / BURST)."""
        return "lvvis" if self.has_partition else "ytvis"

    @property
    def class_names(self) -> List[str]:
        """Category names in category-id order."""
        return [c["name"] for c in sorted(self.categories, key=lambda c: c["id"])]  # verbatim (no '_' -> ' ')

    def frame_paths(self, video: dict) -> List[Path]:
        """Absolute frame paths of one video record."""
        return [self.frames_root / f for f in video["file_names"]]

    def annotations_of(self, video_id) -> List[dict]:
        """The annotations of one video (empty for a split without annotations)."""
        return [a for a in (self.annotations or []) if a["video_id"] == video_id]

    def missing_frames(self, limit: Optional[int] = None) -> List[Path]:
        """Frame files named by the JSON that are not on disk (at most ``limit``)."""
        missing: List[Path] = []
        for video in self.videos:
            for path in self.frame_paths(video):
                if not path.is_file():
                    missing.append(path)
                    if limit is not None and len(missing) >= limit:
                        return missing
        return missing

    def check_frames(self, strict: bool = True) -> None:
        """Raise VideoError (strict) or warn when frames named in the JSON are missing, naming the first few."""
        missing = self.missing_frames(limit=6)
        if not missing:
            return
        shown = ", ".join(str(p) for p in missing[:5])
        more = " and more" if len(missing) > 5 else ""
        message = f"{self.name}: frame files are missing under {self.frames_root}: {shown}{more}; see datasets/README.md"
        if strict:
            raise VideoError(message)
        log.warning(message)


@dataclass
class ImageDataset:
    """An image instance segmentation split (LVIS v1 / COCO instances) for training.

    records: list of ``{"file_name" (absolute), "image_id", "height", "width", "annotations": [
    {"category_id", "segmentation" (polygons or RLE), "bbox" [x,y,w,h], "iscrowd"}]}``;
    categories: list of ``{"id", "name", ...}`` (LVIS: with ``frequency`` r/c/f).
    """

    name: str
    json_path: Path
    image_root: Path
    records: List[dict]
    categories: List[dict]

    @property
    def class_names(self) -> List[str]:
        """Category names in category-id order."""
        return [c["name"] for c in sorted(self.categories, key=lambda c: c["id"])]  # verbatim (no '_' -> ' ')


def load_video_dataset(json_path: PathLike, frames_root: PathLike, name: Optional[str] = None) -> VideoDataset:
    """Read a YouTube-VIS-layout JSON (LV-VIS, YTVIS 2019/2021, OVIS, BURST converted) -> VideoDataset.

    Fills ``length`` from ``file_names`` where missing. Raises ClipvisError for a missing file or a video
    without ``file_names``/``height``/``width``; annotations whose ``segmentations`` length differs from
    the video's are reported by id.
    """
    json_path = Path(json_path)
    data = _read_json(json_path, name or "video dataset")
    if "videos" not in data or "categories" not in data:
        raise ClipvisError(f"{json_path} is not a YouTube-VIS-layout file: it needs 'videos' and 'categories'")
    videos = []
    for v in data["videos"]:
        missing = [k for k in ("id", "file_names", "height", "width") if k not in v]
        if missing:
            raise ClipvisError(f"{json_path}: video {v.get('id', '?')} lacks {', '.join(missing)}")
        record = dict(v)
        record.setdefault("length", len(v["file_names"]))
        videos.append(record)
    annotations = data.get("annotations")
    if annotations is not None:
        lengths = {v["id"]: v["length"] for v in videos}
        bad = [a.get("id") for a in annotations if a.get("video_id") in lengths and len(a.get("segmentations") or []) != lengths[a["video_id"]]]
        if bad:
            raise ClipvisError(f"{json_path}: annotation(s) {bad[:5]} have a number of per-frame segmentations different from their video's length")
    return VideoDataset(
        name=name or json_path.stem,
        json_path=json_path,
        frames_root=Path(frames_root),
        videos=videos,
        categories=list(data["categories"]),
        annotations=annotations,
    )


def _image_file_name(img: dict) -> str:
    """The image path relative to the image root: ``file_name``, else (LVIS) the last two parts of ``coco_url``."""
    if "file_name" in img:
        return img["file_name"]
    if "coco_url" in img:
        return "/".join(img["coco_url"].split("/")[-2:])
    raise ClipvisError(f"image {img.get('id', '?')} has neither 'file_name' nor 'coco_url'")


def load_image_dataset(json_path: PathLike, image_root: PathLike, name: Optional[str] = None) -> ImageDataset:
    """Read a COCO-instances or LVIS v1 JSON -> ImageDataset with one record per image (file order)."""
    json_path = Path(json_path)
    image_root = Path(image_root)
    data = _read_json(json_path, name or "image dataset")
    if "images" not in data or "categories" not in data:
        raise ClipvisError(f"{json_path} is not a COCO/LVIS instances file: it needs 'images' and 'categories'")
    by_image: Dict[int, List[dict]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(
            {
                "category_id": ann["category_id"],
                "segmentation": ann.get("segmentation"),
                "bbox": ann.get("bbox"),
                "iscrowd": int(ann.get("iscrowd", 0)),
                "id": ann.get("id"),
            }
        )
    records = []
    for img in data["images"]:
        record = {
            "file_name": str(image_root / _image_file_name(img)),
            "image_id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "annotations": by_image.get(img["id"], []),
        }
        for key in ("not_exhaustive_category_ids", "neg_category_ids"):
            if key in img:
                record[key] = img[key]
        records.append(record)
    return ImageDataset(name or json_path.stem, json_path, image_root, records, list(data["categories"]))


def category_vocabulary(categories: List[dict]) -> Tuple[List[str], List[int]]:
    """Dataset categories (``{"id", "name"}``) -> (class names in id order with '_' as spaces, their ids).
    A category without ``id`` gets its 1-based position."""
    numbered = [(int(c.get("id", i + 1)), c["name"]) for i, c in enumerate(categories)]
    numbered.sort(key=lambda item: item[0])
    return [name.replace("_", " ") for _, name in numbered], [i for i, _ in numbered]


def datasets_root(root: Optional[PathLike] = None) -> Path:
    """The datasets folder: ``root`` if given, else ``$CLIPVIS_DATASETS``, else ``./datasets``."""
    return Path(root if root is not None else os.environ.get("CLIPVIS_DATASETS", "datasets"))


def list_datasets() -> List[str]:
    """Every registered dataset name (the built-in video splits, the built-in image splits, then the user's)."""
    return list(_REGISTRY)


def dataset_entry(name: str) -> DatasetEntry:
    """The registration of `name`; ClipvisError listing the known names if there is none."""
    if name not in _REGISTRY:
        raise ClipvisError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())} "
                           "(add one with clipvis.register_video_dataset)")
    return _REGISTRY[name]


def dataset_paths(name: str, root: Optional[PathLike] = None) -> Tuple[Path, Path]:
    """(frames or image root, annotation JSON or label folder) of a registered name, relative paths under the
    datasets root."""
    entry = dataset_entry(name)
    base = datasets_root(root)
    return base / entry.root, base / entry.json_file


def get_dataset(name: str, root: Optional[PathLike] = None) -> Union[VideoDataset, ImageDataset, "SemsegDataset"]:
    """Load a registered dataset by name, resolved under ``root`` / ``$CLIPVIS_DATASETS`` / ``./datasets``.

    Raises ClipvisError for an unknown name (listing the known ones) or a missing annotation file.
    """
    folder, js = dataset_paths(name, root)
    entry = dataset_entry(name)
    if entry.kind == "video":
        return load_video_dataset(js, folder, name=name)
    if entry.kind == "semseg":
        from clipvis.data.semseg import SemsegDataset

        meta = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(entry.metadata).items() if v is not None}
        return SemsegDataset(name, folder, js, **meta)
    return load_image_dataset(js, folder, name=name)


def remove_rare_categories(src: PathLike, dst: Optional[PathLike] = None) -> Path:
    """Write an LVIS v1 JSON without the annotations of rare (``frequency == "r"``) categories.

    The category list and images are kept; ``dst`` defaults to ``<src without .json>_norare.json``
    (``lvis_v1_train.json`` -> ``lvis_v1_train_norare.json``). Returns the written path.
    """
    src = Path(src)
    data = _read_json(src, "LVIS")
    frequency = {c["id"]: c.get("frequency") for c in data.get("categories", [])}
    if not any(f is not None for f in frequency.values()):
        raise ClipvisError(f"{src}: categories carry no 'frequency'; is this an LVIS v1 file?")
    before = len(data.get("annotations", []))
    data["annotations"] = [a for a in data.get("annotations", []) if frequency.get(a["category_id"]) != "r"]
    dst = Path(dst) if dst is not None else src.with_name(src.stem + "_norare.json")
    write_json_atomic(dst, data, indent=None)
    log.info("%s: kept %d of %d annotations (rare categories removed) -> %s", src, len(data["annotations"]), before, dst)
    return dst


if __name__ == "__main__":  # python -m clipvis.data.datasets remove-rare datasets/lvis/lvis_v1_train.json
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clipvis.data.datasets", description="dataset preparation helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("remove-rare", help="LVIS v1 train without rare-category annotations (lvis_v1_train_norare.json)")
    p.add_argument("ann", help="lvis_v1_train.json")
    p.add_argument("--out", default=None)
    sub.add_parser("list", help="print the registered dataset names")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "remove-rare":
            print(remove_rare_categories(args.ann, args.out))
        else:
            print("\n".join(list_datasets()))
    except ClipvisError as error:
        raise SystemExit(f"{parser.prog} {args.command}: error: {error}") from None
