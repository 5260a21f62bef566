"""`clipvis evaluate --gt GT.json --results results.json [--mode lvvis|ytvis] [--out metrics.json]`.

Video mask AP of a results file against LV-VIS / YouTube-VIS / OVIS ground truth: prints a table
(AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l; base/novel rows in LV-VIS mode) and writes the metrics
as JSON (``stats``, ``stats_base``, ``stats_novel``, ``per_category``; the keys of the reference
``expected.json``).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from clipvis._io import write_json_atomic
from clipvis.errors import ClipvisError

# clipvis.evaluation.MODES, spelled out so that `clipvis --help` does not import numpy and pycocotools.
MODES = ("lvvis", "ytvis")
METRICS_FILE = "metrics.json"

log = logging.getLogger("clipvis.evaluate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `evaluate` options on ``parser``."""
    parser.add_argument("--gt", required=True, help="ground-truth annotation JSON (LV-VIS / YouTube-VIS / OVIS layout)")
    parser.add_argument("--results", required=True, help="results JSON: a list of {video_id, category_id, score, segmentations}")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=None,
        help="which official evaluator to reproduce (default: lvvis when the GT categories carry 'partition', else ytvis)",
    )
    parser.add_argument("--out", default=None,
                        help=f"write the metrics JSON to this file, or to {METRICS_FILE} inside it when it is a folder "
                             "(an existing one, or a path ending in '/'); written atomically")


def check_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and make sure a file can be written there, before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".clipvis-write-test-", dir=str(folder))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ClipvisError(f"cannot write the metrics to {folder}: {e.strerror or e}; choose another --out") from None


def metrics_path(out: str) -> Path:
    """--out -> the metrics file: `out` itself, or `out/metrics.json` when `out` is (or ends like) a folder."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / METRICS_FILE
    return Path(out)


def run(args) -> int:
    """Evaluate, print the table, write --out. Returns the exit status (0)."""
    from clipvis.evaluation import evaluate_video_ap, format_metrics_table

    for flag, value in (("--gt", args.gt), ("--results", args.results)):
        if not Path(value).is_file():
            raise ClipvisError(f"{flag} file not found: {value}")
    out_path = metrics_path(args.out) if args.out else None
    if out_path is not None:
        if out_path.is_dir():
            raise ClipvisError(f"--out {out_path} is a folder with the name the metrics file needs; choose another --out")
        check_writable_folder(out_path.parent)
    start = time.perf_counter()
    metrics = evaluate_video_ap(args.gt, args.results, mode=args.mode)
    log.info("evaluated in %.2f s", time.perf_counter() - start)
    print(format_metrics_table(metrics))
    if args.out:
        out = {k: v for k, v in metrics.items() if k != "per_category"}
        out["per_category"] = {str(k): v for k, v in metrics["per_category"].items()}
        write_json_atomic(out_path, out)
        print(f"metrics written to {out_path}")
    return 0
