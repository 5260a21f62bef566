"""`clipvis evaluate-semseg`: CLIPtrase on a semantic segmentation benchmark in the paper's protocol (short side
S, centre crop), scored as the original scores it (pAcc, mAcc, fwIoU, mIoU). Resumable: rerun the same command
after an interruption; `--num-processes N` shards the images over N local processes."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clipvis.cli.arg_types import positive_float, positive_int
from clipvis.errors import ClipvisError

log = logging.getLogger("clipvis.evaluate_semseg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `evaluate-semseg` options."""
    parser.add_argument("--dataset", required=True,
                        help="a registered semantic segmentation dataset: voc20, voc21, pc59, pc60, pc459, coco_stuff_171, "
                             "coco_object_80, ade150, ade847, cityscapes_19 (under $CLIPVIS_DATASETS, default ./datasets)")
    parser.add_argument("--size", type=positive_int, default=224, help="short side and crop S (the paper: 224 or 336)")
    parser.add_argument("--eps", type=positive_float, default=None, help="DBSCAN eps (default the paper's for S)")
    parser.add_argument("--min-samples", type=positive_int, default=None, help="DBSCAN min_samples (default the paper's for S)")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip ViT model (default ViT-B-16)")
    parser.add_argument("--clip-weights", default="openai", help="open_clip tag in the local cache or a local OpenAI-format file")
    parser.add_argument("--out", default=None, help="output folder (default output/semseg/<dataset>_<S>)")
    parser.add_argument("--num-processes", type=positive_int, default=1, help="local processes sharing the images")


def run(args) -> int:
    from clipvis.data.datasets import get_dataset
    from clipvis.data.semseg import SemsegDataset
    from clipvis.inference.semantic_segmenter import check_settings

    dataset = get_dataset(args.dataset)
    if not isinstance(dataset, SemsegDataset):
        raise ClipvisError(f"{args.dataset} is not a semantic segmentation dataset; use one of the names in --help")
    dataset.pairs()  # missing folders or labels fail now, not after the model is built
    check_settings(args.clip_model, args.clip_weights, args.size, args.eps, args.min_samples)
    out = Path(args.out or f"output/semseg/{args.dataset}_{args.size}")
    from clipvis.cli.infer import check_output_folder
    from clipvis.engine import distributed as comm

    check_output_folder(out)
    comm.launch(_evaluate, args.num_processes, (args, out))
    return 0


def _evaluate(args, out: Path) -> None:
    from clipvis.data.datasets import get_dataset
    from clipvis.engine import distributed as comm
    from clipvis.engine.semseg_evaluation import evaluate_semseg_dataset, format_semseg_table
    from clipvis.inference.semantic_segmenter import SemanticSegmenter

    comm.init_from_environment("cpu")
    segmenter = SemanticSegmenter.from_open_clip(args.clip_model, weights=args.clip_weights, size=args.size,
                                                 protocol="paper", eps=args.eps, min_samples=args.min_samples)
    metrics = evaluate_semseg_dataset(segmenter, get_dataset(args.dataset), out,
                                      progress=not args.quiet and comm.is_main_process())
    if metrics is not None:
        print(format_semseg_table(metrics))
        print(f"{metrics['images']} images scored ({metrics['skipped']} skipped: all-255 labels); "
              f"metrics in {out / 'metrics.json'}")
