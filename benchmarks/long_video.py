"""Peak memory and speed of streaming inference on long videos (300 and 1,000 frames by default).

    python benchmarks/long_video.py [--frames 300 1000] [--height 64 --width 96]

A synthetic clip of each length is written as an mp4; each length then runs in its own process (peak RSS
is per process), decoding window by window with decord through `VideoPredictor.predict_windows` with
synthetic weights. Prints one JSON line per length (peak RSS of the whole process, before inference, and of
inference alone) and the ratio of the inference peaks between the longest and the shortest.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clipvis.memory import enable_huge_page_allocations

enable_huge_page_allocations()  # before torch is imported, as the `clipvis` command does
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_predictor, peak_rss_report, start_inference_peak_rss  # noqa: E402


def run_one(video: Path, config: str, threads: int) -> dict:
    """Child process: stream `video` through the predictor and report time and peak memory."""
    torch.set_num_threads(threads)
    from clipvis.data.video import open_video

    predictor, _ = build_predictor(config, ["INPUT.MIN_SIZE_TEST", "0"])
    vocab = predictor.encode_vocabulary("circle; square; triangle")
    rss_before = start_inference_peak_rss()
    source = open_video(video)
    start = time.perf_counter()
    result = predictor.predict_windows(source.windows(predictor.window_size), vocab, num_frames=len(source))
    seconds = time.perf_counter() - start
    info = source.info
    return {
        "frames": info.num_frames, "height": info.height, "width": info.width, "seconds": round(seconds, 2),
        "frames_per_s": round(info.num_frames / seconds, 2), "instances": len(result),
        **peak_rss_report(rss_before),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[300, 1000])
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--config", default="clipvis_video_ConvNeXt-B.yaml")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(args.child, args.config, args.threads)))
        return
    from clipvis.data.synthetic import synthetic_video, write_video

    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.frames:
            video = write_video(synthetic_video(n, args.height, args.width, seed=0), Path(tmp) / f"clip_{n}.mp4")
            cmd = [sys.executable, __file__, "--child", str(video), "--config", args.config, "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            reports.append(json.loads(out))
            print(out, flush=True)
    if len(reports) > 1:
        # the inference-only peak where the OS can measure it: the whole-process peak is often model building's
        key = "peak_rss_inference_mb" if reports[0]["peak_rss_inference_mb"] else "peak_rss_mb"
        ratio = reports[-1][key] / reports[0][key]
        print(json.dumps({f"ratio_longest_vs_shortest_{key}": round(ratio, 3)}))


if __name__ == "__main__":
    main()
