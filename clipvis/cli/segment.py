"""`clipvis segment`: training-free open-vocabulary semantic segmentation (CLIPtrase) of an image, a folder of
images or a video; only CLIP's weights are needed.

Outputs in --out: a label PNG per image (or per frame, in labels/; a palette PNG, 16-bit for more than 256
classes), a colour overlay with a legend (`<name>_overlay.png`, or overlay.mp4 for a video), and segments.json
(class names, and the fraction of pixels of each class per image / frame and overall). Files are written into
a hidden folder and moved into --out together at the end: a failed run leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import List

from clipvis.cli.arg_types import device_name, positive_float, positive_int
from clipvis.errors import ClipvisError, VocabularyError

log = logging.getLogger("clipvis.segment")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `segment` options."""
    parser.add_argument("input", help="an image, a folder of images, or a video file")
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", help='classes separated by ";", each used verbatim as one text: "cat; sofa; floor"')
    vocab.add_argument("--vocab-file", help="one class per line ('#' starts a comment)")
    parser.add_argument("--background", default=None,
                        help='background texts (";"-separated): pixels they win are labelled "background"')
    parser.add_argument("--out", default="clipvis_segment", help="output folder (default clipvis_segment)")
    parser.add_argument("--size", type=positive_int, default=224, help="short side S in pixels (default 224; the paper: 224 or 336)")
    parser.add_argument("--protocol", choices=("whole", "paper"), default="whole",
                        help="whole: every pixel, any aspect ratio (default); paper: short side S, centre crop S x S")
    parser.add_argument("--eps", type=positive_float, default=None, help="DBSCAN eps (default the paper's: 0.7 at 224, 1.1 at 336)")
    parser.add_argument("--min-samples", type=positive_int, default=None, help="DBSCAN min_samples (default 3 at 224, 7 at 336)")
    parser.add_argument("--clip-model", default="ViT-B-16", help="open_clip ViT model (default ViT-B-16)")
    parser.add_argument("--clip-weights", default="openai",
                        help="an open_clip pretrained tag already in the local cache (default openai) or a local file of "
                             "OpenAI-format weights")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32 (default, the original's numbers) or bf16 (towers under bfloat16 autocast; "
                             "refused on CPUs without bfloat16 arithmetic)")
    parser.add_argument("--max-frames", type=positive_int, default=None, help="a video: segment at most this many frames")


def _read_classes(args) -> List[str]:
    if args.vocab is not None:
        classes = [c.strip() for c in args.vocab.split(";")]
    else:
        from clipvis.cli.infer import read_text_file

        path = Path(args.vocab_file)
        if not path.is_file():
            raise VocabularyError(f"vocabulary file not found: {path}")
        classes = [line.strip() for line in read_text_file(path).splitlines()]
        classes = [c for c in classes if not c.startswith("#")]
    classes = [c for c in classes if c]
    if not classes:
        raise VocabularyError("the vocabulary is empty: give at least one class, e.g. --vocab \"cat; sofa; floor\"")
    return classes


def _inputs(path: Path) -> tuple:
    """("images", [files]) or ("video", path); ClipvisError for anything else."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not p.name.startswith("."))
        if not files:
            raise ClipvisError(f"{path}: the folder has no images ({', '.join(IMAGE_SUFFIXES)})")
        return "images", files
    if not path.is_file():
        raise ClipvisError(f"input not found: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "images", [path]
    if path.suffix.lower() in VIDEO_SUFFIXES:
        return "video", path
    raise ClipvisError(f"{path}: not an image ({', '.join(IMAGE_SUFFIXES)}) or a video ({', '.join(VIDEO_SUFFIXES)})")


def _write_labels(labels, num_names: int, path: Path) -> None:
    """A label map as a palette PNG (<= 256 classes) or a 16-bit grayscale PNG."""
    import numpy as np
    from PIL import Image

    from clipvis.visualization import track_colors

    if num_names <= 256:
        png = Image.fromarray(labels.astype(np.uint8), mode="P")
        png.putpalette(track_colors(num_names).reshape(-1).tolist())
    else:
        png = Image.fromarray(labels.astype(np.uint16))
    png.save(path)


def run(args) -> int:
    """Check everything cheap first (input, vocabulary, output folder, model name), then segment."""
    from clipvis.cli.infer import check_device, check_output_folder

    source = Path(args.input)
    kind, items = _inputs(source)
    classes = _read_classes(args)
    background = [c.strip() for c in args.background.split(";") if c.strip()] if args.background else None
    check_device(args.device, args.precision)
    from clipvis.inference.semantic_segmenter import check_settings

    check_settings(args.clip_model, args.clip_weights, args.size, args.eps, args.min_samples)
    out = Path(args.out)
    created = not out.exists()
    check_output_folder(out)
    try:
        return _run(args, kind, items, classes, background, out)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a failed run leaves no empty folder it made
        raise


def _run(args, kind, items, classes, background, out: Path) -> int:
    from clipvis.inference.semantic_segmenter import SemanticSegmenter

    started = time.perf_counter()
    segmenter = SemanticSegmenter.from_open_clip(args.clip_model, weights=args.clip_weights, device=args.device,
                                                 size=args.size, protocol=args.protocol, eps=args.eps,
                                                 min_samples=args.min_samples, precision=args.precision)
    vocab = segmenter.encode_vocabulary(classes, background)
    log.info("%s on %s: %d classes%s, S %d, %s protocol, DBSCAN eps %g min_samples %d", args.clip_model,
             args.clip_weights, len(classes), f" + {len(background)} background texts" if background else "",
             segmenter.size, segmenter.protocol, segmenter.eps, segmenter.min_samples)
    stage = Path(tempfile.mkdtemp(prefix=".clipvis-partial-", dir=str(out)))
    try:
        if kind == "images":
            summary = _segment_images(segmenter, vocab, items, stage, quiet=args.quiet)
        else:
            summary = _segment_video(segmenter, vocab, items, stage, args)
        summary.update(classes=vocab.names, clip_model=args.clip_model, clip_weights=str(args.clip_weights),
                       size=segmenter.size, protocol=segmenter.protocol, eps=segmenter.eps,
                       min_samples=segmenter.min_samples, seconds=round(time.perf_counter() - started, 2))
        (stage / "segments.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
        for entry in stage.iterdir():  # move everything in together
            target = out / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        stage.rmdir()
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    overall = summary["overall"]
    top = ", ".join(f"{name} {100 * share:.1f}%" for name, share in list(overall.items())[:5])
    print(f"segmented {summary['count']} {'frame' if kind == 'video' else 'image'}(s) in {summary['seconds']:.1f} s: {top}")
    print(f"outputs in {out}/: segments.json, " + ("labels/, overlay.mp4" if kind == "video" else "<name>.png, <name>_overlay.png"))
    return 0


def _segment_images(segmenter, vocab, files: List[Path], stage: Path, quiet: bool) -> dict:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from clipvis._io import read_rgb_image
    from clipvis.inference.semantic_segmenter import class_fractions
    from clipvis.visualization import draw_semantic_overlay

    per_image, totals = {}, np.zeros(len(vocab.names), dtype=np.int64)
    stems = {}
    for path in tqdm(files, unit="image", desc="segment", disable=quiet or len(files) < 2, leave=False):
        try:
            image = read_rgb_image(path)
        except Exception as e:
            raise ClipvisError(f"{path}: cannot read this image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        result = segmenter.segment(image, vocab)
        stem = path.stem if path.stem not in stems else f"{path.stem}_{path.suffix.lstrip('.')}"
        stems[stem] = path
        _write_labels(result.labels, len(vocab.names), stage / f"{stem}.png")
        Image.fromarray(draw_semantic_overlay(result.image, result.labels, vocab.names)).save(stage / f"{stem}_overlay.png")
        per_image[path.name] = {"labels": f"{stem}.png", "height": int(result.labels.shape[0]),
                                "width": int(result.labels.shape[1]), "fractions": result.fractions()}
        totals += result.counts()
    return {"count": len(files), "images": per_image, "overall": class_fractions(totals, vocab.names)}


def _segment_video(segmenter, vocab, path: Path, stage: Path, args) -> dict:
    """Frames streamed by the video driver (flat memory): a label PNG per frame and the overlay video."""
    import numpy as np

    from clipvis.data.video import Mp4Writer, open_video
    from clipvis.inference.semantic_segmenter import class_fractions
    from clipvis.inference.streaming import stream_video
    from clipvis.visualization import draw_semantic_overlay

    source = open_video(path, max_frames=args.max_frames)
    (stage / "labels").mkdir()

    class SegmentFrames:
        def __init__(self):
            self.frames, self.totals, self.writer = [], np.zeros(len(vocab.names), dtype=np.int64), None

        def start(self, frame_size):
            self.writer = Mp4Writer(stage / "overlay.mp4", fps=source.info.fps or 10.0).__enter__()

        def process_window(self, window, timer):
            for frame in window.numpy():
                with timer("segmentation"):
                    result = segmenter.segment(frame, vocab)
                index = len(self.frames)
                _write_labels(result.labels, len(vocab.names), stage / "labels" / f"{index:06d}.png")
                with timer("overlay"):
                    self.writer.write(draw_semantic_overlay(result.image, result.labels, vocab.names))
                self.frames.append(result.fractions())
                self.totals += result.counts()

        def finish(self, timer):
            self.writer.__exit__(None, None, None)
            return self.frames

    step = SegmentFrames()
    try:
        frames, timings = stream_video(source.windows(8), step, window_size=8, num_frames=len(source),
                                       progress=not args.quiet)
    except BaseException as error:
        if step.writer is not None:
            step.writer.__exit__(type(error), error, None)
        raise
    log.info("stages: %s", "  ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return {"count": len(frames), "frames": frames, "frame_indices": list(source.info.frame_indices),
            "overall": class_fractions(step.totals, vocab.names)}
