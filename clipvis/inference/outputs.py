"""Tracked instances of one video and the files they are saved to.

- `results.json`: the YouTube-VIS / LV-VIS results format that the official evaluators read:
  a list of `{"video_id", "score", "category_id", "segmentations"}`, one COCO RLE per frame
  (counts as a string) at the video's original resolution, `None` for frames where the
  instance is absent.
- `instances.csv`: one row per instance, for people.

Every file is written atomically: to a temporary name in the target folder, then renamed.
"""
from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
from pycocotools import mask as mask_util

from clipvis._io import atomic_write
from clipvis.mask_encoding import Rle, decode_rle

log = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclass
class VideoInstance:
    """One tracked object in a video.

    `track_id`: its id in this video; `score`: confidence in [0, 1]; `category_id`: 1-based index
    into the vocabulary; `class_name`: that class's name; `rles`: one COCO RLE per selected frame at
    the original resolution (`{"size": [H, W], "counts": str}`), `None` where the mask is empty.
    """

    track_id: int
    score: float
    category_id: int
    class_name: str
    rles: List[Optional[Rle]] = field(default_factory=list)

    @property
    def num_frames(self) -> int:
        """Number of frames the instance spans (present or not)."""
        return len(self.rles)

    def areas(self) -> np.ndarray:
        """Mask area in pixels per frame, int64 `[T]` (0 where absent)."""
        return np.array([0 if r is None else int(mask_util.area(r)) for r in self.rles], dtype=np.int64)

    def mask(self, t: int) -> Optional[np.ndarray]:
        """The mask in frame `t` as bool `[H, W]`, or None where absent."""
        return decode_rle(self.rles[t])


def results_records(instances: Sequence[VideoInstance], video_id: int) -> List[dict]:
    """Instances of one video as YouTube-VIS / LV-VIS result records:
    `[{"video_id", "score", "category_id", "segmentations": [RLE or None per frame]}]`."""
    return [
        {
            "video_id": int(video_id) if isinstance(video_id, (int, np.integer)) else video_id,
            "score": float(inst.score),
            "category_id": int(inst.category_id),
            "segmentations": list(inst.rles),
        }
        for inst in instances
    ]


def write_results_json(instances: Sequence[VideoInstance], video_id: int, path: PathLike) -> Path:
    """Write one video's instances as a YouTube-VIS / LV-VIS `results.json` (see `results_records`).
    Atomic; an unwritable folder raises ClipvisError. Returns the path."""
    records = results_records(instances, video_id)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f, separators=(",", ":"))

    atomic_write(path, write)
    log.info("wrote %d instances to %s", len(records), path)
    return Path(path)


CSV_COLUMNS = ("track_id", "class_name", "category_id", "score", "first_frame", "last_frame", "frames_present", "mean_area")


def write_instances_csv(
    instances: Sequence[VideoInstance], path: PathLike, frame_indices: Optional[Sequence[int]] = None
) -> Path:
    """Write one row per instance: track id, class name, category id, score, first and last frame
    where the mask is non-empty, number of such frames, and mean area in pixels over them (blank /
    0 for an instance that is never present). Frame numbers are positions among the selected frames,
    or source frame numbers when `frame_indices` (`VideoInfo.frame_indices`) is given. Atomic."""

    def row(inst: VideoInstance) -> list:
        areas = inst.areas()
        present = np.flatnonzero(areas > 0)
        if frame_indices is not None and len(frame_indices) != inst.num_frames:
            raise ValueError(f"instance {inst.track_id} has {inst.num_frames} frames but {len(frame_indices)} frame indices were given")
        number = (lambda t: int(frame_indices[t])) if frame_indices is not None else int
        first = number(present[0]) if len(present) else ""
        last = number(present[-1]) if len(present) else ""
        mean_area = float(areas[present].mean()) if len(present) else 0.0
        return [inst.track_id, inst.class_name, inst.category_id, f"{inst.score:.4f}", first, last, len(present), f"{mean_area:.1f}"]

    rows = [row(inst) for inst in instances]

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)

    atomic_write(path, write)
    return Path(path)
