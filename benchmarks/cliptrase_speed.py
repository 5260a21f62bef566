"""CLIPtrase speed: images/s and seconds per stage (text, image tower, clustering, smoothing + vote), peak memory.

    python benchmarks/cliptrase_speed.py --threads 2 [--images 8] [--precision bf16]

Cases: the paper's protocol at S = 224 and 336 (one S x S crop per image) and a 480x640 frame in the whole-image
protocol (S = 224: three windows). ViT-B/16 with the reference's synthetic CLIPtrase weights (`cliptrase/*.pt`
manifest), loaded from a local file through the real loader, and the fixture's DBSCAN eps for its size (with
synthetic weights the paper's eps puts every patch in one cluster); a 9-text vocabulary. Text encoding is done
once per run (80 templates per text) and reported on its own. Prints one JSON line per case, with the machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from clipvis.memory import enable_huge_page_allocations

enable_huge_page_allocations()  # before torch is imported, as the `clipvis` command does
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_report, peak_rss_mb, reference_dir  # noqa: E402

LABELS = ["bottle", "sofa", "plant", "bird", "dog"]
BACKGROUND = ["chair", "person", "boat", "tree"]


def weights_file(folder: Path) -> Path:
    import importlib.util

    fx = torch.load(reference_dir() / "cliptrase" / "voc21_224.pt", weights_only=False)
    spec = importlib.util.spec_from_file_location("synthetic_weights", reference_dir() / "synthetic_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = folder / "vit_b16.pt"
    torch.save(module.synthesize(fx["manifest"], seed=fx["meta"]["weight_seed"]), path)
    return path


def run_case(segmenter, vocab, images, name: str) -> dict:
    from clipvis.inference import cliptrase_postprocess as post
    from clipvis.inference.cliptrase_preprocess import to_input_tensor

    stages = dict(image_tower=0.0, clustering=0.0, smoothing_and_vote=0.0, logits=0.0)
    start = time.perf_counter()
    for image in images:
        windows = segmenter.windows(image)
        t = time.perf_counter()
        with torch.no_grad(), segmenter._autocast():
            tokens, attn = segmenter.model.encode_image(to_input_tensor(windows))
        stages["image_tower"] += time.perf_counter() - t
        for i in range(len(windows)):
            t = time.perf_counter()
            patch, cls = post.patch_logits(tokens[i:i + 1].float(), vocab.text, segmenter.model.logit_scale)
            pred = post.pixel_prediction(post.pixel_logits(patch, segmenter.size)[0], vocab.num_classes, vocab.mode)
            recal = post.recalibrate(attn[i].float())
            stages["logits"] += time.perf_counter() - t
            t = time.perf_counter()
            labels = post.dbscan_labels(recal, segmenter.eps, segmenter.min_samples)
            stages["clustering"] += time.perf_counter() - t
            t = time.perf_counter()
            if labels.max() >= 0:
                maps = post.cluster_maps(recal, labels, segmenter.size)
                post.majority_vote(pred, maps.argmax, int(labels.max()) + 1)
            stages["smoothing_and_vote"] += time.perf_counter() - t
    total = time.perf_counter() - start
    return {"case": name, "images": len(images), "images_per_s": round(len(images) / total, 3),
            "seconds_per_image": {k: round(v / len(images), 4) for k, v in stages.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from clipvis.inference.semantic_segmenter import SemanticSegmenter

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        weights = weights_file(Path(folder))
        machine = machine_report()
        for name, size, eps, samples, protocol, shape in (
            ("paper_224", 224, 0.0902, 3, "paper", (224, 224)),
            ("paper_336", 336, 0.0801, 7, "paper", (336, 336)),
            ("whole_480x640", 224, 0.0902, 3, "whole", (480, 640)),
        ):
            segmenter = SemanticSegmenter.from_open_clip("ViT-B-16", weights=str(weights), size=size, protocol=protocol,
                                                         eps=eps, min_samples=samples, precision=args.precision)
            t = time.perf_counter()
            vocab = segmenter.encode_vocabulary(LABELS, BACKGROUND)
            text_s = time.perf_counter() - t
            images = [rng.integers(0, 255, (*shape, 3), dtype=np.uint8) for _ in range(args.images)]
            segmenter.segment(images[0], vocab)  # warm-up
            report = run_case(segmenter, vocab, images, name)
            report.update(precision=args.precision, text_s=round(text_s, 3), peak_rss_mb=round(peak_rss_mb(), 1),
                          machine=machine)
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
