"""Training-free semantic segmentation over a dataset (CLIPtrase, the paper's protocol) and its metric.

Each process takes every world-th image; after each image it appends that image's confusion matrix (sparse)
to `out_dir/hist.part<rank>.jsonl`, so an interrupted run resumes where it stopped. Rank 0 sums the parts into
the original's metric (pAcc, mAcc, fwIoU, mIoU, per-class IoU) and writes `out_dir/metrics.json`.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import numpy as np
from PIL import Image

from clipvis._io import completed_keys, truncate_to_complete_lines
from clipvis.engine import distributed as comm
from clipvis.errors import ClipvisError

log = logging.getLogger(__name__)


def evaluate_semseg_dataset(segmenter, dataset, out_dir: Path, progress: bool = True) -> Optional[dict]:
    """Segment every image of `dataset` (a `SemsegDataset`; this process's shard) with `segmenter` (a
    `SemanticSegmenter`, paper protocol: short side S, centre crop) and score it as the original does.

    Images whose GT is all 255 are skipped (as the original). Returns the metrics on rank 0 (`pAcc`, `mAcc`,
    `fwIoU`, `mIoU` in percent, `iou_per_class`, `class_names`, `images`, `skipped`), None elsewhere."""
    from tqdm import tqdm

    from clipvis.evaluation.semseg import confusion_matrix
    from clipvis.inference.cliptrase_preprocess import is_skipped, metric_gt, preprocess_gt, preprocess_image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = dataset.pairs()
    vocab = segmenter.encode_vocabulary(dataset.labels, dataset.background, mode=dataset.mode)
    n = dataset.num_classes
    rank, world = comm.rank(), comm.world_size()
    part = out_dir / f"hist.part{rank}.jsonl"
    done = completed_keys(part, "image")
    mine = pairs[rank::world]
    todo = [(i, g) for i, g in mine if i.name not in done]
    if done:
        log.info("resuming: %d of %d images of this shard already in %s", len(mine) - len(todo), len(mine), part)
    truncate_to_complete_lines(part)
    size = segmenter.size
    with part.open("a", encoding="utf-8") as sink:
        for image_path, gt_path in tqdm(todo, desc=f"{dataset.name} (rank {rank})", unit="image", disable=not progress):
            try:
                with Image.open(gt_path) as gt_file:
                    gt = preprocess_gt(gt_file, size)
                if is_skipped(gt):
                    record = {"image": image_path.name, "skipped": True}
                else:
                    with Image.open(image_path) as image_file:
                        crop = preprocess_image(image_file, size)  # as the original: PIL resize, crop, then RGB
                    pred = segmenter.segment_crop(crop, vocab)
                    hist = confusion_matrix(metric_gt(gt, len(dataset.labels), dataset.mode), pred, n)
                    flat = hist.reshape(-1)
                    nonzero = np.flatnonzero(flat)
                    record = {"image": image_path.name, "index": nonzero.tolist(), "count": flat[nonzero].tolist()}
            except OSError as e:
                raise ClipvisError(f"{image_path}: cannot read the image or its label file {gt_path} ({e})") from None
            sink.write(json.dumps(record) + "\n")
            sink.flush()
    comm.barrier()
    if not comm.is_main_process():
        return None
    return _merge(dataset, [i.name for i, _ in pairs], out_dir, world, n)


def _merge(dataset, image_names, out_dir: Path, world: int, n: int) -> dict:
    from clipvis._io import write_json_atomic
    from clipvis.evaluation.semseg import iou_per_class, semseg_scores

    flat = np.zeros(n * n, dtype=np.int64)
    seen: Dict[str, bool] = {}
    for r in range(world):
        part = out_dir / f"hist.part{r}.jsonl"
        if part.exists():
            for line in part.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                record = json.loads(line)
                if record["image"] in seen:
                    continue
                seen[record["image"]] = bool(record.get("skipped"))
                if not record.get("skipped"):
                    np.add.at(flat, np.asarray(record["index"], dtype=np.int64), np.asarray(record["count"], dtype=np.int64))
    missing = [name for name in image_names if name not in seen]
    if missing:
        raise ClipvisError(f"{len(missing)} image(s) have no result (e.g. {missing[:3]}); run again to resume")
    hist = flat.reshape(n, n)
    if hist.sum() == 0:
        raise ClipvisError(f"{dataset.name}: every image was skipped (all-255 labels): nothing to score")
    scores = {k: float(v) for k, v in semseg_scores(hist).items()}
    metrics = {**scores, "iou_per_class": dict(zip(dataset.class_names, np.round(iou_per_class(hist) * 100, 2).tolist())),
               "class_names": dataset.class_names, "images": sum(not s for s in seen.values()),
               "skipped": sum(seen.values()), "dataset": dataset.name}
    write_json_atomic(out_dir / "metrics.json", metrics)
    np.save(out_dir / "confusion_matrix.npy", hist)
    for r in range(world):
        (out_dir / f"hist.part{r}.jsonl").unlink(missing_ok=True)
    return metrics


def format_semseg_table(metrics: dict) -> str:
    """The original's table: one row with pAcc, mAcc, fwIoU and mIoU."""
    header = f"{'dataset':<16} {'pAcc':>7} {'mAcc':>7} {'fwIoU':>7} {'mIoU':>7}"
    row = f"{metrics['dataset']:<16} {metrics['pAcc']:>7.2f} {metrics['mAcc']:>7.2f} {metrics['fwIoU']:>7.2f} {metrics['mIoU']:>7.2f}"
    return f"{header}\n{row}"
