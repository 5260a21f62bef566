"""Inference over a whole video dataset (LV-VIS, YouTube-VIS, OVIS, BURST) into one results.json.

Videos are sharded across processes (rank r takes videos r, r+W, ...). Each process appends one JSON line
per finished video to `results.part<r>.jsonl`, so an interrupted run resumes where it stopped; rank 0 then
merges the parts in the dataset's video order into `results.json` (written atomically) and evaluates it
when the dataset has annotations. The vocabulary is the dataset's categories.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

from clipvis._io import completed_keys, truncate_to_complete_lines
from clipvis.data.datasets import category_vocabulary
from clipvis.engine import distributed as comm
from clipvis.errors import ClipvisError

log = logging.getLogger(__name__)


def infer_dataset(predictor, dataset, out_dir: Path, progress: bool = True) -> Optional[Path]:
    """Run `predictor` over every video of `dataset` (this process's shard) and, on rank 0, write
    `out_dir/results.json`; returns its path on rank 0, None on other ranks."""
    from tqdm import tqdm

    from clipvis.data.video import open_frame_files
    from clipvis.inference.outputs import VideoInstance, results_records

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names, category_ids = category_vocabulary(dataset.categories)
    vocab = predictor.encode_vocabulary(names)
    rank, world = comm.rank(), comm.world_size()
    videos = dataset.videos[rank::world]
    part = out_dir / f"results.part{rank}.jsonl"
    done = {int(v) for v in completed_keys(part, "video_id")}
    todo = [v for v in videos if int(v["id"]) not in done]
    if done:
        log.info("resuming: %d of %d videos of this shard already in %s", len(videos) - len(todo), len(videos), part)
    truncate_to_complete_lines(part)
    with part.open("a", encoding="utf-8") as sink:
        for video in tqdm(todo, desc=f"videos (rank {rank})", unit="video", disable=not progress):
            files = [Path(dataset.frames_root) / f for f in video["file_names"]]
            source = open_frame_files(files)
            pred = predictor.predict_windows(source.windows(predictor.window_size), vocab, num_frames=len(source))
            if (pred.height, pred.width) != (video["height"], video["width"]):
                log.warning("video %s: frames are %dx%d but the annotation says %dx%d", video["id"], pred.width, pred.height, video["width"], video["height"])
            instances = [
                VideoInstance(track_id=int(q), score=float(s), category_id=category_ids[c], class_name=names[c], rles=list(r))
                for q, s, c, r in zip(pred.query_indices.tolist(), pred.scores.tolist(), pred.classes.tolist(), pred.rles)
            ]
            sink.write(json.dumps({"video_id": int(video["id"]), "results": results_records(instances, int(video["id"]))}) + "\n")
            sink.flush()
    comm.barrier()
    if not comm.is_main_process():
        return None
    return merge_parts(dataset, out_dir, world)


def merge_parts(dataset, out_dir: Path, world: int) -> Path:
    """Rank 0: gather every shard's per-video results in dataset order into `out_dir/results.json`."""
    from clipvis._io import atomic_write

    per_video: Dict[int, list] = {}
    for r in range(world):
        part = out_dir / f"results.part{r}.jsonl"
        if part.exists():
            for line in part.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    per_video[int(record["video_id"])] = record["results"]
    missing = [v["id"] for v in dataset.videos if int(v["id"]) not in per_video]
    if missing:
        raise ClipvisError(f"{len(missing)} video(s) have no results (e.g. {missing[:3]}); run again to resume")
    results = [r for v in dataset.videos for r in per_video[int(v["id"])]]
    path = atomic_write(out_dir / "results.json", lambda tmp: tmp.write_text(json.dumps(results), encoding="utf-8"))
    for r in range(world):
        (out_dir / f"results.part{r}.jsonl").unlink(missing_ok=True)
    log.info("wrote %d predictions for %d videos to %s", len(results), len(dataset.videos), path)
    return path
