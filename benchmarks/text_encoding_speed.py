"""Text encoding speed: prompts/s of CLIP's text tower over the full 77-token context (as open_clip's
encode_text and the original run it) and cut after each batch's longest prompt (clipvis), same prompts.

    python benchmarks/text_encoding_speed.py --model convnext_base_w_320 --classes 100 --threads 2

The text tower's weights do not change the speed: it is built randomly initialised (nothing is fetched).
Prints one JSON line with the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="convnext_base_w_320")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from clipvis.modeling.clip_backbone import ClipBackbone
    from clipvis.modeling.text_classifier import templated_prompts

    backbone = ClipBackbone(args.model)
    words = ["person", "red car", "dog", "frisbee", "traffic light", "potted plant", "teddy bear", "surfboard"]
    classes = [[f"{words[i % len(words)]} {i}"] for i in range(args.classes)]
    prompts, _ = templated_prompts(classes)
    model = backbone.clip_model

    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            model.encode_text(backbone._tokenizer(prompts[i:i + args.batch_size]), normalize=False)
    full = time.perf_counter() - start
    start = time.perf_counter()
    backbone.encode_text(prompts, batch_size=args.batch_size)
    cut = time.perf_counter() - start
    print(json.dumps({
        "model": args.model, "prompts": len(prompts),
        "full_context_prompts_per_s": round(len(prompts) / full, 1),
        "cut_prompts_per_s": round(len(prompts) / cut, 1),
        "speedup": round(full / cut, 2),
        "machine": machine_report(),
    }))


if __name__ == "__main__":
    main()
