"""`clipvis demo`: the whole `infer` path on a short synthetic clip, with no downloads.

It synthesizes a clip of moving shapes, writes it as an mp4 (so the real decoder reads it back), and runs
inference with synthetic (randomly initialised, seeded) weights unless --weights is given.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clipvis.cli.infer import (add_model_arguments, build_config, check_config_values, check_output_folder,
                               check_weights_path, run_inference)

log = logging.getLogger("clipvis.demo")

DEMO_VOCABULARY = "circle, disc; square, rectangle; triangle"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `demo` options (clip size and length, vocabulary, seed, and `infer`'s model options)."""
    parser.add_argument("--frames", type=int, default=16, help="frames in the synthetic clip (default 16)")
    parser.add_argument("--height", type=int, default=128, help="clip height (default 128)")
    parser.add_argument("--width", type=int, default=160, help="clip width (default 160)")
    parser.add_argument("--vocab", default=DEMO_VOCABULARY, help=f'vocabulary (default "{DEMO_VOCABULARY}")')
    parser.add_argument("--seed", type=int, default=0, help="seed of the clip and of the synthetic weights")
    add_model_arguments(parser)
    # Synthetic weights score every instance around 1/3: the default 0.5 of `infer` would leave the overlay empty.
    parser.set_defaults(out="clipvis_demo", vis_threshold=0.2)
    parser.add_argument("--overlay-top", type=int, default=5, help="draw only this many instances, the highest-scoring (default 5)")


def write_sample(frames, path: Path) -> Path:
    """The demo clip as an H.264 mp4 in yuv420p, which every player shows (an odd size is padded by one edge row/column)."""
    from clipvis.data.video import Mp4Writer

    with Mp4Writer(path, 10.0, crf=8) as writer:
        for frame in frames:
            writer.write(frame)
    return path


def run(args) -> int:
    """Synthesize the clip, write it as `--out/sample.mp4`, run `infer` on it. Returns the exit status (0)."""
    from clipvis.data.synthetic import synthetic_video
    from clipvis.data.video import open_video
    from clipvis.modeling.text_classifier import parse_vocabulary

    import torch

    from clipvis.cli.infer import check_duplicate_classes

    check_duplicate_classes(parse_vocabulary(args.vocab))
    check_weights_path(args.weights)
    # The clip is small: feed it at its own size instead of resizing its short side to 480.
    cfg = build_config(args, extra=["INPUT.MIN_SIZE_TEST", str(min(args.height, args.width))])
    check_config_values(cfg)
    out = Path(args.out)
    check_output_folder(out)
    clip_path = write_sample(synthetic_video(args.frames, args.height, args.width, seed=args.seed), out / "sample.mp4")
    log.info("wrote the sample clip %s (%d frames, %dx%d)", clip_path, args.frames, args.width, args.height)
    if args.weights is None:
        print(
            "clipvis demo: running with SYNTHETIC (random) weights, so the masks and classes are meaningless; "
            "pass --weights model.pth for real predictions."
        )
        torch.manual_seed(args.seed)
    source = open_video(clip_path)
    return run_inference(args, source, args.vocab, None, cfg, args.weights)
