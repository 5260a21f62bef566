"""Inference speed of the ORIGINAL CLIP-VIS video model (ConvNeXt-B) per stage, on the same synthetic video as
`infer_speed.py`, so that the two can be run side by side on one machine. Measurement only: the original's code
is imported from a checkout given on the command line and patched at run time, never copied here.

Sources: zwq456/CLIP-VIS at 677370f and detectron2 v0.6 (the search tool's `fetch` of github:zwq456/CLIP-VIS
and github:facebookresearch/detectron2 gives bare git directories under /work/.mirror/); only these folders
are needed, plus detectron2 0.6's two pinned pure-Python dependencies (they pull in portalocker, tabulate and
termcolor; nothing touches torch, open_clip or timm):

    mkdir -p /tmp/orig/CLIP-VIS /tmp/orig/detectron2
    git --git-dir=/work/.mirror/zwq456+CLIP-VIS/repo archive 677370f clipvis configs | tar -x -C /tmp/orig/CLIP-VIS
    git --git-dir=/work/.mirror/facebookresearch+detectron2/repo archive v0.6 detectron2 projects \\
        | tar -x -C /tmp/orig/detectron2
    pip install fvcore==0.1.5.post20221221 iopath==0.1.9

(git may complain about missing blobs under assert/, which is not extracted.)

detectron2 is not compiled: its source folder goes on sys.path (its inference path calls no C++ op). Then:

    python benchmarks/original_speed.py --original /tmp/orig/CLIP-VIS --detectron2 /tmp/orig/detectron2 \\
        --frames 24 --height 360 --width 480 --threads 2 --repeat 1

How the original is run (as the reference fixtures were made, see the reference README): its config
`configs/clipvis_video_ConvNeXt-B.yaml` set up as its `train_net_video.py` does, on CPU, with
`TEST.TEST_NUM_CLASSES 5` and the 5 classes "person; dog; red car, automobile; frisbee; tree" as the test
dataset's metadata (the original reads its test vocabulary from there); the reference's synthetic weights for
every one of its parameter names (CLIP included, so no pretrained CLIP is downloaded), loaded strictly; its window
inference (10 frames per backbone + decoder window) in fp32 under `torch.no_grad()` (its evaluation has autocast
commented out). The frames go straight to the model's `forward`, skipping its dataset mapper, where its test-time
resize lives: they are fed at their own size, padded by the model to a multiple of 32, like `infer_speed.py`'s
`INPUT.MIN_SIZE_TEST 0`.

Run-time patches, none of which changes what the original computes:
- `MultiScaleDeformableAttention` (the original's compiled CUDA op) is a stub whose forward raises, so the
  original falls back to its own pure-PyTorch `ms_deform_attn_core_pytorch`, as it does on CPU (where the
  compiled op raises too);
- `detectron2._C` is an empty stub (only imported by ops that inference does not call); `omegaconf`, `cv2` and
  `einops` are empty stubs (imported by lazy configs, data augmentation and training only); Pillow >= 10 lost
  `Image.LINEAR` and friends, used as default arguments by detectron2's transforms: aliased where missing;
- open_clip 3's text transformer is batch-first while the original's `encode_text` hands it sequence-first (LND)
  input: its transformer gets an adapter that transposes in and out (text encoding is not timed).

Stages (seconds, the best of `--repeat` forwards): "backbone + decoder" = `run_window_inference`, "tracker" =
`post_processing`, "instance selection" = `instance_inference`, "CLIP head classification" = the rest of
`forward` (normalization and padding included), less the text-classifier lookup. Text encoding is done once
before the timed forwards (the original caches it) and reported apart as `text_encoding_s`. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import json
import sys
import time
import types
import warnings
from collections import defaultdict
from pathlib import Path

from clipvis.memory import enable_huge_page_allocations

enable_huge_page_allocations()  # before torch is imported, as infer_speed.py does: same allocator conditions
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_report, peak_rss_report, reference_dir, start_inference_peak_rss  # noqa: E402

STAGES = ("backbone + decoder", "tracker", "CLIP head classification", "instance selection")
CONFIG = "configs/clipvis_video_ConvNeXt-B.yaml"
DATASET = "clipvis_speed_synthetic"  # the test dataset whose metadata carries the vocabulary
ALIAS = "clipvis_original"  # the original's package name is ours too: it is imported under this one


def stub_module(name: str, **attrs) -> types.ModuleType:
    """Put a module `name` holding only `attrs` in sys.modules, for an import that inference needs nothing real from."""
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def install_stubs() -> None:
    """Stubs and compatibility aliases the original and detectron2 0.6 need to import here (module docstring)."""

    def cuda_only(*args, **kwargs):
        raise NotImplementedError("MultiScaleDeformableAttention stub: CUDA op not built (CPU falls back)")

    stub_module("MultiScaleDeformableAttention", ms_deform_attn_forward=cuda_only, ms_deform_attn_backward=cuda_only)
    stub_module("detectron2._C")
    stub_module("omegaconf", **{n: type(n, (), {}) for n in ("DictConfig", "ListConfig", "OmegaConf")})
    stub_module("cv2", __version__="0")  # detectron2 reads the version at import and skips OpenCV setup
    stub_module("einops")
    from PIL import Image

    for old, new in {"LINEAR": "BILINEAR", "CUBIC": "BICUBIC", "ANTIALIAS": "LANCZOS"}.items():
        if not hasattr(Image, old):
            setattr(Image, old, getattr(Image, new))


def import_original(original: Path, detectron2: Path) -> types.ModuleType:
    """Import detectron2 from its source folder and the original's `clipvis` package under ALIAS (which
    registers its model, backbone, heads and datasets, as `train_net_video.py`'s import does)."""
    install_stubs()
    sys.path.insert(0, str(detectron2))
    package = original / "clipvis"
    spec = importlib.util.spec_from_file_location(
        ALIAS, package / "__init__.py", submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[ALIAS] = module
    spec.loader.exec_module(module)
    return module


def original_config(original: Path, original_module: types.ModuleType, vocab: str):
    """The original's video ConvNeXt-B config, set up as its `train_net_video.setup` does, on CPU with the
    5-class synthetic test dataset and no pretrained CLIP download (all weights are synthetic)."""
    # detectron2 is the original's framework, imported from its source checkout for this measurement only;
    # clipvis itself never imports it
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.projects.deeplab import add_deeplab_config

    classes = [c.strip() for c in vocab.split(";")]
    MetadataCatalog.get(DATASET).set(thing_classes=classes)
    cfg = get_cfg()
    add_deeplab_config(cfg)
    original_module.add_clipvis_config(cfg)
    cfg.merge_from_file(str(original / CONFIG))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", "",
        "DATASETS.TEST", f"('{DATASET}',)",
        "TEST.TEST_NUM_CLASSES", str(len(classes)),
    ])
    cfg.freeze()
    return cfg


def synthetic_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """The reference's synthetic weights for the original model's own parameter names and shapes."""
    spec = importlib.util.spec_from_file_location("synthetic_weights", reference_dir() / "synthetic_weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    return weights.synthesize([(k, tuple(v.shape)) for k, v in model.state_dict().items()], seed=seed)


def fixture_manifest_matches(model: torch.nn.Module):
    """Whether the model's parameter names and shapes equal the manifest of the reference fixture made with the
    original's ConvNeXt-B video model (None when the fixture is not there)."""
    path = reference_dir() / "fixtures" / "convnext_b_default.pt"
    if not path.exists():
        return None
    manifest = torch.load(path, map_location="cpu", weights_only=False)["manifest"]
    ours = sorted((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return sorted((k, tuple(s)) for k, s in manifest) == ours


def adapt_text_transformer(model: torch.nn.Module) -> None:
    """The original's `encode_text` feeds CLIP's text transformer sequence-first (LND), as open_clip 2 wanted;
    open_clip 3's is batch-first: transpose in and out around it."""
    transformer = model.backbone.clip_model.transformer
    batch_first = type(transformer).forward

    def sequence_first(x, attn_mask=None):
        return batch_first(transformer, x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)

    transformer.forward = sequence_first


class StageTimer:
    """Wall-clock seconds spent in wrapped methods, added up per stage name."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def wrap(self, obj, method: str, stage: str) -> None:
        """Replace `obj.method` (on the instance only) with a version that adds its wall time to `stage`."""
        inner = getattr(obj, method)

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start

        setattr(obj, method, timed)


def video_input(frames: np.ndarray) -> list:
    """`[T,H,W,3]` uint8 RGB frames as the original's test mapper hands them to `forward` (one video: a list of
    uint8 `[3,H,W]` tensors, its output height and width), without the mapper's resize."""
    images = [torch.as_tensor(np.ascontiguousarray(f.transpose(2, 0, 1))) for f in frames]
    return [{"image": images, "height": frames.shape[1], "width": frames.shape[2]}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", type=Path, required=True, help="CLIP-VIS checkout (677370f)")
    p.add_argument("--detectron2", type=Path, required=True, help="detectron2 source checkout (v0.6), not built")
    p.add_argument("--frames", type=int, default=24)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--vocab", default="person; dog; red car, automobile; frisbee; tree")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=1, help="take the best of N runs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm's and torch's deprecations, on import
    from clipvis.data.synthetic import synthetic_video

    original_module = import_original(args.original.resolve(), args.detectron2.resolve())
    from detectron2.modeling import build_model

    cfg = original_config(args.original.resolve(), original_module, args.vocab)
    model = build_model(cfg).eval()
    incompatible = model.load_state_dict(synthetic_state_dict(model, seed=0), strict=True)  # raises on any mismatch
    weights = {
        "keys": len(model.state_dict()),
        "all_matched": not incompatible.missing_keys and not incompatible.unexpected_keys,
        "same_names_and_shapes_as_fixture_manifest": fixture_manifest_matches(model),
    }
    adapt_text_transformer(model)

    with torch.no_grad():
        start = time.perf_counter()
        model.get_text_classifier()  # cached by the model: the timed forwards reuse it
        text_encoding_s = time.perf_counter() - start

    window = inspect.signature(model.run_window_inference).parameters["window_size"].default  # forward passes none
    timer = StageTimer()
    timer.wrap(model, "run_window_inference", "backbone + decoder")
    timer.wrap(model, "post_processing", "tracker")
    timer.wrap(model, "instance_inference", "instance selection")
    timer.wrap(model, "get_text_classifier", "text classifier lookup")
    inputs = video_input(synthetic_video(args.frames, args.height, args.width, seed=0))

    rss_before = start_inference_peak_rss()
    best = None
    for _ in range(args.repeat):
        timer.seconds.clear()
        with torch.no_grad():
            start = time.perf_counter()
            results = model(inputs)
            total = time.perf_counter() - start
        stages = dict(timer.seconds)
        stages["CLIP head classification"] = total - sum(timer.seconds.values())
        if best is None or total < best[0]:
            best = (total, stages)
    total, stages = best
    report = {
        "frames": args.frames, "height": args.height, "width": args.width, "device": "cpu",
        "threads": args.threads, "precision": "fp32", "window": window, "classes": int(cfg.TEST.TEST_NUM_CLASSES),
        "original_stages_total_s": round(sum(stages[k] for k in STAGES), 3),
        "stages_s": {k: round(stages[k], 4) for k in STAGES},
        "total_forward_s": round(total, 3),
        "text_encoding_s": round(text_encoding_s, 3),
        "instances": len(results[0]["instances"]),
        "weights": weights,
        **peak_rss_report(rss_before),
        "machine": machine_report(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
