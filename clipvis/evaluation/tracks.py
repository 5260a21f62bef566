"""Reading ground truth and results into video tracks: one object per annotated or predicted instance,
holding one RLE (or None) per frame of its video.

The two accepted layouts are the YouTube-VIS / LV-VIS annotation JSON (``videos``, ``categories``,
``annotations`` with ``segmentations`` per frame) and the matching results list (``video_id``,
``category_id``, ``score``, ``segmentations``). Per-frame masks may be compressed RLE (string
``counts``), uncompressed RLE (list ``counts``) or, in ground truth, polygons; absent frames are
``None``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pycocotools.mask as mask_utils

from clipvis.errors import ClipvisError

log = logging.getLogger(__name__)

JsonLike = Union[dict, list, str, Path]


@dataclass
class GroundTruthVideo:
    """One video of the ground truth: its id, frame size and number of frames."""

    id: int
    height: int
    width: int
    length: int


@dataclass
class Track:
    """One instance over a video: ground truth (``score`` None) or a prediction.

    ``rles[t]`` is a pycocotools RLE dict for frame t or None where the instance is absent;
    ``frame_areas``: int64 ``[T]`` pixel count of each frame's mask (0 where absent);
    ``avg_area`` is the mean of its non-zero per-frame areas (0 if none), the quantity the
    official evaluators compare with the area ranges (for GT: from the file's stored ``areas``).
    """

    video_id: int
    category_id: int
    ann_id: int
    rles: List[Optional[dict]]
    frame_areas: np.ndarray
    avg_area: float
    iscrowd: bool = False
    score: Optional[float] = None


@dataclass
class GroundTruth:
    """A parsed ground-truth file: videos by id, the category list (file order) and GT tracks."""

    videos: Dict[int, GroundTruthVideo]
    categories: List[dict]
    tracks: List[Track] = field(default_factory=list)
    has_annotations: bool = True

    @property
    def has_partition(self) -> bool:
        """True when every category carries the LV-VIS ``partition`` field (0,1 base; 2,3 novel)."""
        return bool(self.categories) and all("partition" in c for c in self.categories)


def read_json(source: JsonLike, what: str) -> Any:
    """The parsed JSON of a path (str/Path) or the object itself when already in memory."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ClipvisError(f"{what} file not found: {path}")
        try:
            with open(path, "r") as f:
                return json.load(f)
        except json.JSONDecodeError as e:
            raise ClipvisError(f"{what} file {path} is not valid JSON ({e}); check that it was written completely") from e
    return source


def _segmentation_to_rle(segm: Any, height: int, width: int, where: str) -> Optional[dict]:
    """One frame's segmentation (polygons, uncompressed or compressed RLE, or None) as a compressed RLE.

    Returns None for an absent frame (None or an empty object)."""
    if not segm:
        return None
    if isinstance(segm, list):  # polygons: every part merged into one mask
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if not isinstance(segm, dict) or "counts" not in segm or "size" not in segm:
        raise ClipvisError(f"{where}: a frame's segmentation is neither an RLE dict with 'size' and 'counts' nor polygons")
    size = [int(s) for s in segm["size"]]
    if size != [height, width]:
        raise ClipvisError(
            f"{where}: mask size {size[0]}x{size[1]} does not match the video's frame size {height}x{width}; "
            "predictions must be resized to the original video resolution"
        )
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _frame_rles(segms: Any, video: GroundTruthVideo, where: str) -> List[Optional[dict]]:
    """Per-frame RLEs of one track, checked against the video's frame count and size."""
    if not isinstance(segms, list):
        raise ClipvisError(f"{where}: 'segmentations' must be a list with one entry per frame")
    if len(segms) != video.length:
        raise ClipvisError(
            f"{where}: has {len(segms)} per-frame masks but video {video.id} has {video.length} frames; "
            "give one entry per frame (None where the instance is absent)"
        )
    size = [video.height, video.width]
    out = []
    for s in segms:  # fast path: a compressed RLE of the right size is used as is
        if type(s) is dict and s.get("size") == size and isinstance(s.get("counts"), (str, bytes)):
            out.append(s)
        else:
            out.append(_segmentation_to_rle(s, video.height, video.width, where))
    return out


def _frame_areas(rles: Sequence[Optional[dict]]) -> np.ndarray:
    """Pixel count per frame -> int64 ``[T]`` (0 where absent); one pycocotools call per track."""
    areas = np.zeros(len(rles), dtype=np.int64)
    present = [i for i, r in enumerate(rles) if r is not None]
    if present:
        areas[present] = mask_utils.area([rles[i] for i in present])
    return areas


def _mean_of_truthy(values: Sequence, truncate: bool = False) -> float:
    """The mean of the non-zero, non-None values (the official ``avg_area``), 0 when there are none.

    ``truncate``: cast each kept value to int first (after the zero/None filter, as LV-VIS does)."""
    kept = [int(v) if truncate else v for v in values if v]
    return float(np.array(kept).mean()) if kept else 0


def load_ground_truth(gt: JsonLike, truncate_areas: bool) -> GroundTruth:
    """Parse a YouTube-VIS / LV-VIS ground-truth JSON (path or dict) into videos, categories and tracks.

    ``truncate_areas``: LV-VIS rule, each per-frame GT area in ``areas`` is cast to int before averaging
    (YouTube-VIS averages them as stored). The per-frame areas come from the file's ``areas`` field
    (as the official code does); where it is missing they are measured from the masks.
    GT annotations of a category not in ``categories`` or of an unknown video are left out (with a warning),
    as the official evaluators do.
    """
    data = read_json(gt, "ground-truth")
    if not isinstance(data, dict) or "videos" not in data or "categories" not in data:
        raise ClipvisError("ground truth must be a YouTube-VIS/LV-VIS JSON object with 'videos' and 'categories'")
    videos: Dict[int, GroundTruthVideo] = {}
    for v in data["videos"]:
        try:
            length = int(v["length"]) if "length" in v else len(v["file_names"])
            videos[v["id"]] = GroundTruthVideo(v["id"], int(v["height"]), int(v["width"]), length)
        except KeyError as e:
            raise ClipvisError(f"ground-truth video {v.get('id', '?')} lacks the field {e}") from e
    categories = list(data["categories"])
    # A test split has no annotations: the key is absent (LV-VIS) or null (YouTube-VIS valid.json).
    result = GroundTruth(videos, categories, has_annotations=data.get("annotations") is not None)
    if not result.has_annotations:
        return result
    category_ids = {c["id"] for c in categories}
    dropped_categories, dropped_videos = set(), set()
    for index, ann in enumerate(data["annotations"]):
        where = f"ground-truth annotation {ann.get('id', f'#{index}')}"
        if ann.get("video_id") not in videos:
            dropped_videos.add(ann.get("video_id"))
            continue
        if ann.get("category_id") not in category_ids:
            dropped_categories.add(ann.get("category_id"))
            continue
        video = videos[ann["video_id"]]
        rles = _frame_rles(ann.get("segmentations"), video, where)
        frame_areas = _frame_areas(rles)
        stored = ann.get("areas")
        areas = stored if stored is not None else [a if rle is not None else None for a, rle in zip(frame_areas.tolist(), rles)]
        result.tracks.append(
            Track(
                video_id=ann["video_id"],
                category_id=ann["category_id"],
                ann_id=ann.get("id", index + 1),
                rles=rles,
                frame_areas=frame_areas,
                avg_area=_mean_of_truthy(areas, truncate_areas),
                iscrowd=bool(ann.get("iscrowd", 0)),
            )
        )
    if dropped_videos:
        log.warning("ground truth: %d annotation(s) of video ids not in 'videos' are ignored: %s", len(dropped_videos), sorted(map(str, dropped_videos))[:10])
    if dropped_categories:
        log.warning("ground truth: annotations of category ids not in 'categories' are ignored: %s", sorted(map(str, dropped_categories))[:10])
    return result


def load_results(results: JsonLike, gt: GroundTruth) -> List[Track]:
    """Parse a results list (path or in-memory list) into prediction tracks, in file order.

    Raises ClipvisError for a result of an unknown video, a missing field, a mask of the wrong size or a
    wrong number of frames. Results of a category id that is not in the ground truth's categories are
    dropped with a warning (the official evaluators silently skip them). ``ann_id`` is the 1-based
    position in the list.
    """
    data = read_json(results, "results")
    if not isinstance(data, list):
        raise ClipvisError("results must be a JSON list of {video_id, category_id, score, segmentations} objects")
    if not data:
        log.warning("the results list is empty: every figure with ground truth is 0")
        return []
    unknown_videos = sorted({str(r.get("video_id")) for r in data if isinstance(r, dict) and r.get("video_id") not in gt.videos})
    if unknown_videos:
        raise ClipvisError(
            f"results name {len(unknown_videos)} video id(s) that are not in the ground truth ({', '.join(unknown_videos[:10])}); "
            "evaluate against the annotation file the predictions were made for"
        )
    category_ids = {c["id"] for c in gt.categories}
    unknown_categories = set()
    tracks: List[Track] = []
    for index, r in enumerate(data):
        where = f"result #{index} (video {r.get('video_id')})"
        missing = [k for k in ("video_id", "category_id", "score", "segmentations") if k not in r]
        if missing:
            raise ClipvisError(f"{where} lacks the field(s) {', '.join(missing)}")
        score = r["score"]
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
            raise ClipvisError(
                f"{where} has score {score!r}, not a finite number; fix the predictions that wrote it "
                "(a NaN or infinite score cannot be ranked)"
            )
        if r["category_id"] not in category_ids:
            unknown_categories.add(r["category_id"])
            continue
        rles = _frame_rles(r["segmentations"], gt.videos[r["video_id"]], where)
        frame_areas = _frame_areas(rles)
        tracks.append(
            Track(
                video_id=r["video_id"],
                category_id=r["category_id"],
                ann_id=index + 1,
                rles=rles,
                frame_areas=frame_areas,
                avg_area=_mean_of_truthy(frame_areas.tolist()),
                score=r["score"],
            )
        )
    if unknown_categories:
        log.warning(
            "results: %d prediction(s) of category ids not in the ground truth are ignored: %s",
            sum(1 for r in data if r["category_id"] in unknown_categories),
            sorted(map(str, unknown_categories))[:10],
        )
    return tracks
