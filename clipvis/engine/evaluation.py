"""Evaluate a model on the datasets of DATASETS.TEST: inference into results.json, then video mask AP."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from clipvis.engine import distributed as comm

log = logging.getLogger(__name__)


def evaluate_datasets(cfg, device: str = "cpu", model: Optional[torch.nn.Module] = None) -> Dict[str, dict]:
    """For each dataset name in DATASETS.TEST: run inference over its videos (sharded across processes),
    write OUTPUT_DIR/inference/<name>/results.json, and, when the dataset has annotations, metrics.json.
    `model` (e.g. during training) defaults to one built from cfg with MODEL.WEIGHTS. Returns metrics per dataset
    (rank 0; empty elsewhere)."""
    from clipvis.data.datasets import get_dataset
    from clipvis.engine.dataset_inference import infer_dataset
    from clipvis.evaluation import evaluate_video_ap, format_metrics_table
    from clipvis._io import atomic_write
    from clipvis.inference.predictor import VideoPredictor

    datasets = {name: get_dataset(name) for name in cfg.DATASETS.TEST}  # a wrong name fails before the model is built
    if model is None:
        predictor = VideoPredictor.from_config(cfg, device=device, progress=False)
    else:
        predictor = VideoPredictor.from_model(model, cfg, progress=False)
    all_metrics = {}
    for name in cfg.DATASETS.TEST:
        dataset = datasets[name]
        out_dir = Path(cfg.OUTPUT_DIR) / "inference" / name
        log.info("inference on %s: %d videos, %d categories", name, len(dataset.videos), len(dataset.categories))
        results = infer_dataset(predictor, dataset, out_dir, progress=comm.is_main_process())
        if results is None:
            continue
        if not dataset.has_annotations:
            log.info("%s has no annotations (a test split): wrote %s, no metrics", name, results)
            continue
        metrics = evaluate_video_ap(dataset.json_path, results)
        atomic_write(out_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=1), encoding="utf-8"))
        log.info("%s:\n%s", name, format_metrics_table(metrics))
        all_metrics[name] = metrics
    return all_metrics
