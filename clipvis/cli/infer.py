"""`clipvis infer VIDEO --vocab "person; dog, puppy"`: segment and track the named objects in a video.

Writes to --out: results.json (YouTube-VIS / LV-VIS result format), instances.csv, overlay.mp4, and
prints a one-screen summary.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from clipvis.cli.arg_types import device_name, positive_fps, score_threshold, video_id
from clipvis.errors import ClipvisError, VocabularyError

log = logging.getLogger("clipvis.infer")

DEFAULT_CONFIG = "clipvis_video_ConvNeXt-B.yaml"
# Every file a run may write into --out; a rerun removes the ones it does not write (e.g. overlay.mp4 with --no-overlay).
OUTPUT_FILES = ("results.json", "instances.csv", "overlay.mp4")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `infer` and `demo`: config, weights, device, outputs."""
    parser.add_argument("--config", default=None, help=f"YAML config (a path, or a shipped name; default {DEFAULT_CONFIG})")
    parser.add_argument("--weights", default=None, help="CLIP-VIS checkpoint (.pth, the original's format or ours)")
    parser.add_argument("--clip-weights", default=None, help="open_clip pretrained tag or local file for the CLIP towers (when --weights lacks them)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu, cuda or cuda:N (default: MODEL.DEVICE when CUDA is there, else cpu)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="inference arithmetic (TEST.PRECISION): fp32 = the original's numbers (default); "
                             "bf16 = 2-3x faster on CPUs with AVX512-BF16/AMX and on GPUs, small deviations "
                             "(refused on CPUs without bfloat16 arithmetic, e.g. AVX2 only)")
    parser.add_argument("--out", default="clipvis_output", help="output folder (default ./clipvis_output)")
    parser.add_argument("--vis-threshold", type=score_threshold, default=0.5, help="draw instances scoring at least this in the overlay video")
    parser.add_argument("--no-overlay", action="store_true", help="skip the overlay video")
    parser.add_argument("--video-id", type=video_id, default=1, help="video_id written in results.json")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides, last on the line: --opts TEST.NUM_FRAME 5 TEST.DETECTIONS_PER_IMAGE 20")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `infer` options: the video, its frame selection, the vocabulary, and the shared model options."""
    parser.add_argument("video", help="a video file (mp4, avi, mkv, webm, mov) or a folder of frames (jpg/png)")
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--vocab", help='classes separated by ";", synonyms by ",": "person; dog, puppy; red car"')
    vocab.add_argument("--vocab-file", help="a text file with one class per line (synonyms separated by ',')")
    vocab.add_argument("--vocab-json", help="the categories of a LV-VIS / YouTube-VIS annotation file")
    parser.add_argument("--frame-stride", type=int, default=1, help="use every N-th frame")
    parser.add_argument("--max-frames", type=int, default=None, help="use at most this many frames")
    parser.add_argument("--start", type=float, default=None, help="start time in seconds")
    parser.add_argument("--end", type=float, default=None, help="end time in seconds")
    parser.add_argument("--folder-fps", type=positive_fps, default=None,
                        help="frame rate of a frame folder, for --start/--end and the overlay (default 6: YouTube-VIS frames)")
    parser.add_argument("--random-weights", action="store_true",
                        help="run without --weights on purpose: an untrained (random) decoder, meaningless masks")
    add_model_arguments(parser)


def read_vocabulary(args) -> tuple:
    """The vocabulary from --vocab / --vocab-file / --vocab-json -> (class names, category ids or None)."""
    if args.vocab is not None:
        return args.vocab, None
    if args.vocab_file is not None:
        path = Path(args.vocab_file)
        if not path.is_file():
            raise VocabularyError(f"vocabulary file not found: {path}")
        names = [line.strip() for line in read_text_file(path).splitlines()]
        names = [name for name in names if name and not name.startswith("#")]  # blank lines and # comments
        if not names:
            raise VocabularyError(f"vocabulary file {path} has no class names (one class per line; '#' starts a comment)")
        return names, None
    path = Path(args.vocab_json)
    try:
        categories = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VocabularyError(f"vocabulary json not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VocabularyError(f"{path} is not valid JSON: {e}") from None
    if isinstance(categories, dict):
        categories = categories.get("categories")
    if not isinstance(categories, list) or not categories or not all(isinstance(c, dict) and "name" in c for c in categories):
        raise VocabularyError(f"{path} has no 'categories' list with 'name' fields (expected a LV-VIS / YouTube-VIS annotation file)")
    from clipvis.data.datasets import category_vocabulary

    return category_vocabulary(categories)


def read_text_file(path: Path) -> str:
    """A text file as str: UTF-8, or UTF-16 / UTF-32 / UTF-8 with a byte-order mark (as Windows editors save)."""
    import codecs

    data = path.read_bytes()
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if data.startswith(bom):
            break
    else:
        encoding = "utf-8"
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        raise VocabularyError(
            f"{path} is not valid {encoding.upper()} text (byte {e.start}); save it as UTF-8 (or UTF-16 with a byte-order mark)"
        ) from None


def check_duplicate_classes(classes: List[List[str]]) -> None:
    """Refuse a name (class or synonym, case-insensitive) given for two classes: the classes would split its score."""
    seen = {}
    for position, synonyms in enumerate(classes, start=1):
        for name in dict.fromkeys(s.lower() for s in synonyms):
            if name in seen:
                raise VocabularyError(
                    f"{name!r} is given for class {seen[name]} and class {position} of the vocabulary; "
                    f"name each class once (synonyms of one class go in one entry, separated by ',')"
                )
            seen[name] = position


def check_output_folder(out: Path) -> None:
    """Create `out` and make sure it is writable, before any expensive work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".clipvis-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ClipvisError(f"cannot write to output folder {out}: {e.strerror or e}; choose another --out") from None


def build_config(args, extra: Optional[List[str]] = None):
    """Config from --config (default the ConvNeXt-B video config) + --weights/--clip-weights + KEY VALUE overrides."""
    from clipvis.config import builtin_config, load_config

    path = args.config or DEFAULT_CONFIG
    if not Path(path).exists():
        if Path(path).name != path:  # a path, not a shipped config's name
            raise ClipvisError(f"config file not found: {path}")
        path = builtin_config(path)
    overrides = list(extra or [])
    if args.clip_weights:
        overrides += ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", args.clip_weights]
    else:  # the CLIP-VIS checkpoint carries CLIP's weights; never download them
        overrides += ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", ""]
    if getattr(args, "precision", None):
        overrides += ["TEST.PRECISION", args.precision]
    opts = [o for o in (args.opts or []) if o != "--"]
    if len(opts) % 2:
        raise ClipvisError(f"config overrides must be KEY VALUE pairs, got an odd number: {' '.join(opts)}")
    return load_config(path, overrides + opts)


def check_weights_path(weights) -> None:
    """A weights path that is not there is refused now, not after the model is built."""
    if weights and not Path(weights).expanduser().is_file():
        what = "a folder, not a checkpoint file" if Path(weights).expanduser().is_dir() else "not found"
        raise ClipvisError(f"weights file {weights}: {what}; pass the CLIP-VIS checkpoint (.pth) with --weights")


POSITIVE_CONFIG_KEYS = (
    "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "TEST.NUM_FRAME", "TEST.DETECTIONS_PER_IMAGE",
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "MODEL.MASK_FORMER.DEC_LAYERS", "MODEL.MASK_FORMER.HIDDEN_DIM",
    "MODEL.MASK_FORMER.NHEADS", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "MODEL.SEM_SEG_HEAD.CONVS_DIM",
    "MODEL.SEM_SEG_HEAD.MASK_DIM", "SOLVER.IMS_PER_BATCH", "SOLVER.MAX_ITER", "SOLVER.CHECKPOINT_PERIOD",
    "INPUT.SAMPLING_FRAME_NUM",
)


def check_config_values(cfg) -> None:
    """Values that cannot work (zero or negative sizes and counts), refused before anything is built."""
    for key in POSITIVE_CONFIG_KEYS:
        node = cfg
        try:
            for part in key.split("."):
                node = node[part]
        except (KeyError, TypeError, AttributeError):
            continue
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            continue
        if not (math.isfinite(node) and node > 0):
            raise ClipvisError(f"config value {key} = {node!r} must be positive; fix it in the config or with --opts {key} N")


def check_device(device: str, precision: str = "fp32") -> None:
    """The device exists here (CUDA present, index in range) and can run `precision` (bf16 needs bfloat16
    arithmetic), checked before the model is built."""
    from clipvis.inference.precision import check_precision
    from clipvis.inference.predictor import resolve_device

    check_precision(precision, resolve_device(device))


class OutputStage:
    """Result files are written into a hidden folder inside --out and moved into place together at the end,
    so a failed run leaves the previous run's files untouched and a finished one leaves no stale file
    of an earlier run (OUTPUT_FILES it did not write are removed)."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = Path(tempfile.mkdtemp(prefix=".clipvis-partial-", dir=str(out)))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def commit(self) -> None:
        written = {p.name for p in self.tmp.iterdir()}
        for name in OUTPUT_FILES:
            if name not in written and (self.out / name).is_file():
                (self.out / name).unlink()
        for name in written:
            os.replace(self.tmp / name, self.out / name)
        self.tmp.rmdir()

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_inference(args, source, vocabulary, category_ids, cfg, weights) -> int:
    """Shared by `infer` and `demo`: model -> prediction -> result files -> summary."""
    from clipvis.inference.predictor import default_device

    out = Path(args.out)
    device = args.device or default_device(cfg.MODEL.DEVICE)
    check_device(device)
    stage = OutputStage(out)
    try:
        code = _run_inference(args, source, vocabulary, category_ids, cfg, weights, device, stage)
    except BaseException:
        stage.discard()
        raise
    return code


def _run_inference(args, source, vocabulary, category_ids, cfg, weights, device, stage) -> int:
    from clipvis.inference.outputs import VideoInstance, write_instances_csv, write_results_json
    from clipvis.inference.predictor import VideoPredictor

    out = Path(args.out)
    t0 = time.perf_counter()
    log.info("building the model (%s) on %s", cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME, device)
    predictor = VideoPredictor.from_config(
        cfg, weights=weights, device=device, text_cache_dir=text_cache_dir(), progress=not args.quiet
    )
    t_build = time.perf_counter() - t0
    t_text0 = time.perf_counter()
    vocab = predictor.encode_vocabulary(vocabulary)
    if category_ids is not None and len(category_ids) != len(vocab):
        raise VocabularyError("the vocabulary json has categories without names")
    t_text = time.perf_counter() - t_text0
    info = source.info
    log.info("running on %d frames of %dx%d (%s)", info.num_frames, info.width, info.height, info.path)
    t1 = time.perf_counter()
    prediction = predictor.predict_windows(source.windows(predictor.window_size), vocab, num_frames=len(source))
    t_infer = time.perf_counter() - t1
    ids = category_ids or list(range(1, len(vocab) + 1))
    unreadable = set(getattr(source, "unreadable", ()))
    lost = [t for t, i in enumerate(info.frame_indices) if i in unreadable]
    if lost:
        log.warning("%s: %d of %d frames could not be decoded (video frames %s, 0-based); their masks are left empty "
                    "(null) in results.json; re-encode or re-download the video for complete results",
                    info.path, len(lost), info.num_frames, frame_ranges(sorted(unreadable)))
    instances = [
        VideoInstance(
            track_id=int(q), score=float(s), category_id=ids[c], class_name=vocab.names[c], rles=list(r)
        )
        for q, s, c, r in zip(prediction.query_indices.tolist(), prediction.scores.tolist(), prediction.classes.tolist(), prediction.rles)
    ]
    for inst in instances:
        for t in lost:
            inst.rles[t] = None
    write_results_json(instances, args.video_id, stage.path("results.json"))
    write_instances_csv(instances, stage.path("instances.csv"), frame_indices=info.frame_indices)
    t2 = time.perf_counter()
    if not args.no_overlay:
        from clipvis.visualization import write_overlay_video

        write_overlay_video(source, instances, stage.path("overlay.mp4"), threshold=args.vis_threshold,
                            max_instances=getattr(args, "overlay_top", None))
    t_overlay = time.perf_counter() - t2
    stage.commit()
    print_summary(out, info, prediction, instances, args, t_build, t_infer, t_overlay, t_text=t_text, num_classes=len(vocab))
    return 0


def frame_ranges(indices: List[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ", ".join(parts)


def text_cache_dir() -> Path:
    """Where text embeddings are cached: $CLIPVIS_CACHE/text or ~/.cache/clipvis/text."""
    root = os.environ.get("CLIPVIS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "clipvis")
    return Path(root) / "text"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def print_summary(out, info, prediction, instances, args, t_build, t_infer, t_overlay, t_text=None, num_classes=None) -> None:
    """Print the one-screen summary: instances found (the top 5), time per stage, frames/s, peak memory, outputs."""
    shown = [i for i in instances if i.score >= args.vis_threshold]
    lines = [
        "",
        f"clipvis: {len(instances)} instances in {info.num_frames} frames ({len(shown)} with score >= {args.vis_threshold})",
    ]
    for inst in instances[:5]:
        present = [t for t, r in enumerate(inst.rles) if r is not None]
        span = f"frames {present[0]}-{present[-1]}" if present else "no frames"
        lines.append(f"  track {inst.track_id:3d}  {inst.class_name:<24.24} {inst.score:.3f}  {span}")
    if len(instances) > 5:
        lines.append(f"  ... {len(instances) - 5} more in instances.csv")
    stages = "  ".join(f"{k} {v:.2f}s" for k, v in prediction.timings.items())
    lines += [
        f"time: model build {t_build:.1f}s, "
        + ("" if t_text is None else f"text encoding {t_text:.1f}s ({num_classes} classes), ")
        + f"inference {t_infer:.1f}s ({info.num_frames / max(t_infer, 1e-9):.2f} frames/s), overlay {t_overlay:.1f}s",
        f"stages: {stages}",
        f"peak memory: {peak_rss_mb():.0f} MB",
        f"outputs: {out / 'results.json'}, {out / 'instances.csv'}" + ("" if args.no_overlay else f", {out / 'overlay.mp4'}"),
    ]
    print("\n".join(lines), file=sys.stdout)


def run(args) -> int:
    """`clipvis infer`: check every input first (vocabulary, video, output folder, config), then run."""
    from clipvis.data.video import open_video
    from clipvis.modeling.text_classifier import parse_vocabulary

    from clipvis.data.video import DEFAULT_FOLDER_FPS

    vocabulary, category_ids = read_vocabulary(args)
    check_duplicate_classes(parse_vocabulary(vocabulary))  # fail on a bad vocabulary before any expensive work
    check_weights_path(args.weights)
    folder = Path(args.video).expanduser().is_dir()
    if folder and args.folder_fps is None and (args.start is not None or args.end is not None):
        log.warning("%s is a frame folder, which has no frame rate: --start/--end are read at %g fps (frame = seconds x %g, "
                    "YouTube-VIS frames); pass --folder-fps to set it", args.video, DEFAULT_FOLDER_FPS, DEFAULT_FOLDER_FPS)
    source = open_video(args.video, frame_stride=args.frame_stride, max_frames=args.max_frames, start=args.start, end=args.end,
                        folder_fps=args.folder_fps or DEFAULT_FOLDER_FPS)
    cfg = build_config(args)
    check_config_values(cfg)
    check_weights_path(cfg.MODEL.WEIGHTS)
    from clipvis.inference.predictor import default_device

    check_device(args.device or default_device(cfg.MODEL.DEVICE), cfg.TEST.PRECISION)
    if not (args.weights or cfg.MODEL.WEIGHTS) and not args.random_weights:
        raise ClipvisError("no --weights given: without a CLIP-VIS checkpoint the decoder is random and the results meaningless; "
                           "pass --weights model.pth (README: 'Weights'), or --random-weights to run untrained on purpose")
    out = Path(args.out)
    existed = out.exists()
    check_output_folder(out)
    try:
        return run_inference(args, source, vocabulary, category_ids, cfg, args.weights)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a folder made by this run and left empty by its failure
        raise
