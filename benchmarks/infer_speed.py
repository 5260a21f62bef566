"""Inference speed of the ConvNeXt-B video model on a synthetic video, per stage.

    python benchmarks/infer_speed.py --frames 24 --height 360 --width 480 --threads 2 [--precision bf16] [--repeat 3]

Prints one JSON line: total seconds (the wall time of `predict`), frames/s, seconds per stage (backbone +
decoder, tracker, CLIP head classification, instance selection, and mask encoding to output-resolution RLE),
the sum of the first four (the original's table: it has no mask encoding, which it does for the selected
masks in its evaluator), peak RSS of the whole process, before inference (model building, weight loading,
text encoding) and of inference alone, and the CPU time of `predict` in user and system (kernel: page faults,
zeroing fresh pages) mode with its minor page faults. Text encoding is excluded from the timings (done before). With them:
the CPU model, torch's CPU capability and the measured fp32 / bf16 matmul peak of this machine (`machine`).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

from clipvis.memory import enable_huge_page_allocations

enable_huge_page_allocations()  # before torch is imported, as the `clipvis` command does
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import build_predictor, machine_report, parse_overrides, peak_rss_report, start_inference_peak_rss  # noqa: E402

STAGES = ("backbone + decoder", "tracker", "CLIP head classification", "instance selection")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--config", default="clipvis_video_ConvNeXt-B.yaml")
    p.add_argument("--vocab", default="person; dog; red car, automobile; frisbee; tree")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeat", type=int, default=1, help="take the best of N runs")
    p.add_argument("opts", nargs="*", help="config overrides KEY VALUE ...")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from clipvis.data.synthetic import synthetic_video

    overrides = ["INPUT.MIN_SIZE_TEST", "0", "TEST.WINDOW_SIZE", "10", *parse_overrides(args.opts)]
    if args.precision != "fp32":
        overrides += ["TEST.PRECISION", args.precision]
    predictor, cfg = build_predictor(args.config, overrides, device=args.device)
    frames = synthetic_video(args.frames, args.height, args.width, seed=0)
    vocab = predictor.encode_vocabulary(args.vocab)
    rss_before = start_inference_peak_rss()
    best = None
    for _ in range(args.repeat):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        result = predictor.predict(frames, vocab)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        cpu = {"user_s": round(after.ru_utime - usage.ru_utime, 2), "system_s": round(after.ru_stime - usage.ru_stime, 2),
               "minor_page_faults": after.ru_minflt - usage.ru_minflt}
        if best is None or total < best[0]:
            best = (total, result.timings, cpu)
    total, timings, cpu = best
    report = {
        "frames": args.frames, "height": args.height, "width": args.width, "device": args.device,
        "threads": args.threads, "precision": args.precision,
        "total_s": round(total, 3), "frames_per_s": round(args.frames / total, 3),
        "original_stages_total_s": round(sum(timings.get(k, 0.0) for k in STAGES), 3),
        "stages_s": {k: round(timings.get(k, 0.0), 4) for k in STAGES},
        "mask_encoding_s": round(timings.get("mask encoding", 0.0), 4),
        "cpu_time_of_predict": cpu,
        **peak_rss_report(rss_before),
        "machine": machine_report(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
