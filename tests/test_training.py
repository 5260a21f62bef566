"""Training: augmentation geometry, samplers, schedule, optimizer settings, and real CPU training runs.

The runs train the tiny config on a synthetic shapes dataset (COCO-format instances JSON + PNGs, and a
YouTube-VIS-layout clip dataset) written to a temporary CLIPVIS_DATASETS folder: the loss falls by at
least half in 60 iterations; `--resume` from a mid-run checkpoint continues with the same iteration, LR,
optimizer state and losses; our checkpoints load into a fresh model in the original's key layout;
a 2-process gloo DDP run through `train_net.py` matches a 1-process run with the same global batch.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from clipvis.config import builtin_config, load_config
from clipvis.data.augmentation import clip_polygon, sample_clip_frames, sample_lsj
from clipvis.mask_encoding import polygons_to_mask
from clipvis.data.synthetic import synthetic_video_and_masks
from clipvis.data.train_data import DistributedBatchSampler, RepeatFactorSampler, ShuffledSampler, build_train_loader, repeat_factors

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 128
SEED = 3


# ------------------------------------------------------------------------------------- synthetic data
def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_image_dataset(root: Path, num_images: int = 8, height: int = 96, width: int = 128, seed: int = 0) -> None:
    """COCO-format instances (RLE masks, 3 categories) of synthetic shapes under root/coco (coco_2017_train)."""
    images_dir = root / "coco" / "train2017"
    images_dir.mkdir(parents=True)
    (root / "coco" / "annotations").mkdir(parents=True)
    frames, masks = synthetic_video_and_masks(num_images, height, width, seed)
    images, annotations = [], []
    for i in range(num_images):
        name = f"{i:06d}.png"
        Image.fromarray(frames[i]).save(images_dir / name)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        for s in range(masks.shape[0]):
            if masks[s, i].any():
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": s % 3 + 1,
                                    "segmentation": _rle(masks[s, i]), "iscrowd": 0, "area": int(masks[s, i].sum())})
    data = {"images": images, "annotations": annotations, "categories": [{"id": c, "name": f"shape{c}"} for c in (1, 2, 3)]}
    (root / "coco" / "annotations" / "instances_train2017.json").write_text(json.dumps(data))


def write_video_dataset(root: Path, num_videos: int = 2, frames: int = 5, height: int = 64, width: int = 96) -> None:
    """A YouTube-VIS-layout training split (ytvis_2019_train) of synthetic clips, RLE per frame (None = absent)."""
    frames_root = root / "ytvis2019" / "train" / "JPEGImages"
    videos, annotations = [], []
    for v in range(num_videos):
        clip, masks = synthetic_video_and_masks(frames, height, width, seed=10 + v)
        (frames_root / f"v{v}").mkdir(parents=True)
        names = []
        for t in range(frames):
            Image.fromarray(clip[t]).save(frames_root / f"v{v}" / f"{t:05d}.png")
            names.append(f"v{v}/{t:05d}.png")
        videos.append({"id": v + 1, "file_names": names, "height": height, "width": width, "length": frames})
        for s in range(masks.shape[0]):
            segs = [_rle(masks[s, t]) if masks[s, t].any() and not (s == 0 and t == 1) else None for t in range(frames)]
            annotations.append({"id": len(annotations) + 1, "video_id": v + 1, "category_id": s % 2 + 1,
                                "segmentations": segs, "iscrowd": 0})
    data = {"videos": videos, "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "ytvis2019" / "train.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def datasets_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    write_image_dataset(root)
    write_video_dataset(root)
    old = os.environ.get("CLIPVIS_DATASETS")
    os.environ["CLIPVIS_DATASETS"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CLIPVIS_DATASETS", None)
    else:
        os.environ["CLIPVIS_DATASETS"] = old


def run_overrides(output_dir: Path, max_iter: int, **extra) -> list:
    """Overrides for a tiny CPU run on the synthetic image dataset."""
    values = {
        "DATASETS.TRAIN": '("coco_2017_train",)', "DATASETS.TEST": "()", "INPUT.IMAGE_SIZE": IMAGE_SIZE,
        "INPUT.MIN_SCALE": 0.5, "INPUT.MAX_SCALE": 1.5, "SOLVER.BASE_LR": 0.001, "SOLVER.MAX_ITER": max_iter,
        "SOLVER.LOG_PERIOD": 1, "SOLVER.CHECKPOINT_PERIOD": 1000, "OUTPUT_DIR": str(output_dir), "SEED": SEED,
        "DATALOADER.NUM_WORKERS": 0, **extra,
    }
    return [str(x) for kv in values.items() for x in kv]


def read_metrics(output_dir: Path) -> list:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("height,width", [(96, 128), (300, 200), (37, 251)])
def test_lsj_output_size_and_scale(height, width):
    """Every LSJ output is IMAGE_SIZE square; the resized image fits the drawn scaled square; padding is gray."""
    for seed in range(20):
        t = sample_lsj(np.random.default_rng(seed), height, width, IMAGE_SIZE, 0.1, 2.0)
        redraw = np.random.default_rng(seed)
        redraw.uniform()  # flip
        scale = redraw.uniform(0.1, 2.0)
        side = IMAGE_SIZE * scale
        assert max(abs(t.resized[0] - height * min(side / height, side / width)), abs(t.resized[1] - width * min(side / height, side / width))) <= 0.5 + 1e-9
        assert max(t.resized[0] / side, t.resized[1] / side) == pytest.approx(1.0, abs=0.5 / min(t.resized) + 1e-9)
        image = np.full((height, width, 3), 7, dtype=np.uint8)
        out = t.apply_image(image)
        assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        vh, vw = t.valid_size
        assert (out[:vh, :vw] == 7).all() and (out[vh:] == 128).all() and (out[:, vw:] == 128).all()
        for axis in range(2):
            assert 0 <= t.crop_offset[axis] <= max(t.resized[axis] - IMAGE_SIZE, 0)


def test_lsj_masks_align_with_the_image():
    """Polygon and RLE masks land on the same pixels as the image content they annotate (flip, scale, crop)."""
    height, width = 90, 140
    polygon = np.array([[20.0, 10.0], [110.0, 25.0], [95.0, 80.0], [30.0, 70.0]])
    truth = polygons_to_mask([polygon], height, width)
    image = np.repeat((truth * 255).astype(np.uint8)[:, :, None], 3, axis=2)
    flips = set()
    for seed in range(30):
        t = sample_lsj(np.random.default_rng(seed), height, width, IMAGE_SIZE, 0.3, 2.0)
        flips.add(t.flip)
        valid = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        valid[:t.valid_size[0], :t.valid_size[1]] = True
        bright = (t.apply_image(image)[:, :, 0] > 127) & valid  # the gray padding (128) is no content
        from_rle = t.apply_segmentation(_rle(truth))
        from_polygon = t.apply_segmentation([polygon.reshape(-1).tolist()])
        assert from_rle.shape == (IMAGE_SIZE, IMAGE_SIZE)
        for name, mask in (("rle", from_rle), ("polygon", from_polygon)):
            if mask is None:  # the polygon left the crop: the image holds nothing of it either
                assert bright.sum() == 0 and not from_rle.any(), name
                continue
            union = (mask | bright).sum()
            if union:
                assert (mask & bright).sum() / union > 0.85, f"seed {seed} {name}: IoU with the image"
    assert flips == {True, False}


def test_polygon_clipping_matches_rasterized_crop():
    """A polygon clipped to a window rasterizes like the full polygon's mask cut to that window (but at the border)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        poly = rng.uniform(-20, 120, size=(6, 2))
        poly = poly[np.argsort(np.arctan2(poly[:, 1] - 50, poly[:, 0] - 50))]  # a simple (star-shaped) polygon
        full = polygons_to_mask([poly + 20], 160, 160)[20:80, 20:90]
        clipped = clip_polygon(poly, 0, 0, 70, 60)
        ours = polygons_to_mask([clipped], 60, 70) if clipped is not None else np.zeros((60, 70), bool)
        inner = (slice(1, -1), slice(1, -1))
        assert (ours[inner] == full[inner]).mean() > 0.99


def test_clip_frame_sampling_stays_in_range():
    for seed in range(50):
        rng = np.random.default_rng(seed)
        frames = sample_clip_frames(rng, 30, 3, 4, shuffle=False)
        assert len(frames) == 3 and frames == sorted(frames)
        assert max(frames) - min(frames) <= 8 and all(0 <= f < 30 for f in frames)
    assert sample_clip_frames(np.random.default_rng(0), 1, 2, 5, shuffle=False) == [0, 0]


# ------------------------------------------------------------------------------------------ sampling
def test_repeat_factors_follow_the_formula():
    category_sets = [{1}, {1, 2}, {1}, {3}, set(), {1, 3}, {1}, {1}, {1}, {1}]
    threshold = 0.3
    got = repeat_factors(category_sets, threshold)
    n = len(category_sets)
    for i, cats in enumerate(category_sets):
        per_category = [max(1.0, math.sqrt(threshold / (sum(c in s for s in category_sets) / n))) for c in cats]
        assert got[i].item() == pytest.approx(max(per_category, default=1.0), rel=1e-6)
    # the stream repeats each sample r_i times per epoch on average (stochastic rounding)
    stream = iter(RepeatFactorSampler(got, seed=0))
    counts = np.bincount([next(stream) for _ in range(int(got.sum().item() * 400))], minlength=n)
    np.testing.assert_allclose(counts / counts.sum(), (got / got.sum()).numpy(), rtol=0.08)


def test_process_slices_make_the_global_batch():
    """Every process takes its slice of the same global batch, with the same per-sample augmentation seeds."""
    groups = [i % 2 for i in range(10)]
    single = iter(DistributedBatchSampler(ShuffledSampler(10, 5), 4, 0, 1, seed=5, group_of=groups.__getitem__))
    ranks = [iter(DistributedBatchSampler(ShuffledSampler(10, 5), 4, r, 2, seed=5, group_of=groups.__getitem__)) for r in range(2)]
    for _ in range(6):
        whole = next(single)
        assert next(ranks[0]) + next(ranks[1]) == whole
        assert len({groups[i] for i, _ in whole}) == 1  # aspect-ratio grouping
    late = iter(DistributedBatchSampler(ShuffledSampler(10, 5), 4, 0, 1, seed=5, start_iter=6, group_of=groups.__getitem__))
    assert next(late) == next(single)


def test_loader_samples(datasets_root):
    """Image samples are IMAGE_SIZE squares with aligned masks; clip samples keep the same instances in every
    frame, -1 where absent."""
    cfg = load_config(builtin_config("clipvis_tiny.yaml"), run_overrides(datasets_root / "unused", 1))
    batch = next(iter(build_train_loader(cfg, seed=1)))
    assert len(batch) == cfg.SOLVER.IMS_PER_BATCH
    for s in batch:
        assert s["image"].shape == (3, IMAGE_SIZE, IMAGE_SIZE) and s["image"].dtype == torch.uint8
        assert s["masks"].shape[1:] == (IMAGE_SIZE, IMAGE_SIZE) and s["masks"].shape[0] > 0
        gray = (s["image"] == 128).all(dim=0)
        assert not (s["masks"] & gray).any()  # no instance pixel in the padding

    vcfg = load_config(builtin_config("clipvis_video_tiny.yaml"), [
        "DATASETS.TRAIN", '("ytvis_2019_train",)', "INPUT.SAMPLING_FRAME_NUM", "3", "INPUT.SAMPLING_FRAME_RANGE", "2",
        "INPUT.MIN_SIZE_TRAIN", "(48,)", "INPUT.MAX_SIZE_TRAIN", "200", "DATALOADER.SAMPLER_TRAIN", "TrainingSampler"])
    clips = next(iter(build_train_loader(vcfg, seed=2)))
    for clip in clips:
        assert len(clip["frames"]) == len(clip["ids"]) == len(clip["masks"]) == 3
        num = {len(i) for i in clip["ids"]}
        assert len(num) == 1
        for frame, ids, masks in zip(clip["frames"], clip["ids"], clip["masks"]):
            assert min(frame.shape[-2:]) == 48 and masks.shape[-2:] == frame.shape[-2:]
            assert torch.equal(ids == -1, ~masks.flatten(1).any(1))


# ---------------------------------------------------------------------------------------- the solver
def test_warmup_multistep_schedule():
    from clipvis.engine.solver import build_lr_scheduler

    cfg = load_config(builtin_config("clipvis_tiny.yaml"), [
        "SOLVER.BASE_LR", "0.5", "SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(30, 60)", "SOLVER.GAMMA", "0.1",
        "SOLVER.WARMUP_ITERS", "10", "SOLVER.WARMUP_FACTOR", "0.2", "SOLVER.WARMUP_METHOD", "linear"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for i in range(100):
        expected = 0.5 * (0.2 + 0.8 * i / 10 if i < 10 else 1.0 if i < 30 else 0.1 if i < 60 else 0.01)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9), f"iteration {i}"
        optimizer.step()
        scheduler.step()


def test_optimizer_groups_and_full_model_clipping():
    from clipvis.engine.solver import build_optimizer, clip_gradients
    from clipvis.modeling.meta_arch import build_model

    cfg = load_config(builtin_config("clipvis_tiny.yaml"), [
        "SOLVER.WEIGHT_DECAY", "0.05", "SOLVER.WEIGHT_DECAY_NORM", "0.003", "SOLVER.WEIGHT_DECAY_EMBED", "0.007"])
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {n: g["weight_decay"] for g in optimizer.param_groups for n in g["names"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(names) == trainable and trainable and all(n.startswith("sem_seg_head.") for n in trainable)
    modules = dict(model.named_modules())
    for name, wd in names.items():
        module = modules[name.rsplit(".", 1)[0]]
        expected = 0.003 if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)) else 0.007 if isinstance(module, torch.nn.Embedding) else 0.05
        assert wd == expected, name
    assert any(wd == 0.007 for wd in names.values()) and any(wd == 0.003 for wd in names.values())
    for g in optimizer.param_groups:
        for p in g["params"]:
            p.grad = torch.full_like(p, 3.0)
    clip_gradients(cfg, optimizer)  # CLIP_TYPE full_model, CLIP_VALUE 0.01 from the base config
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for g in optimizer.param_groups for p in g["params"]))
    assert norm.item() == pytest.approx(cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE, rel=1e-4)


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(datasets_root, tmp_path_factory):
    """60 iterations of the tiny config, checkpoint at iteration 30 (index 29)."""
    from clipvis.engine.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(builtin_config("clipvis_tiny.yaml"), run_overrides(out, 60, **{"SOLVER.CHECKPOINT_PERIOD": 30}))
    result = train(cfg, device="cpu", resume=False)
    return cfg, out, result


def test_loss_falls_by_half(trained):
    _, out, result = trained
    losses = [r["total_loss"] for r in read_metrics(out)]
    assert len(losses) == 60 and result["iteration"] == 59
    assert np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:5]), losses


def test_resume_continues_exactly(trained, tmp_path):
    """--resume from the mid-run checkpoint: same iteration, LR, optimizer state, losses and final weights."""
    from clipvis.engine.train import train

    cfg, out, _ = trained
    saved = torch.load(out / "model_0000029.pth", weights_only=False)
    assert saved["iteration"] == 29 and saved["scheduler"]["last_epoch"] == 30
    resume_dir = tmp_path / "resumed"
    resume_dir.mkdir()
    shutil.copy(out / "model_0000029.pth", resume_dir)
    (resume_dir / "last_checkpoint").write_text("model_0000029.pth")
    cfg2 = load_config(builtin_config("clipvis_tiny.yaml"), run_overrides(resume_dir, 60, **{"SOLVER.CHECKPOINT_PERIOD": 30}))
    torch.manual_seed(12345)  # whatever the state before: the checkpoint's RNG state takes over
    train(cfg2, device="cpu", resume=True)

    original, resumed = read_metrics(out)[30:], read_metrics(resume_dir)
    assert [r["iteration"] for r in resumed] == list(range(30, 60))
    for a, b in zip(original, resumed):
        assert a["lr"] == b["lr"]
        for key in a:
            if key.startswith("loss") or key == "total_loss":
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), (a["iteration"], key)
    final_a = torch.load(out / "model_final.pth", weights_only=False)
    final_b = torch.load(resume_dir / "model_final.pth", weights_only=False)
    for key, value in final_a["model"].items():
        assert torch.allclose(value, final_b["model"][key], rtol=1e-5, atol=1e-7), key
    state_a, state_b = final_a["optimizer"]["state"], final_b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.equal(state_a[k]["step"], state_b[k]["step"])
        assert torch.allclose(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_checkpoint_loads_into_a_fresh_model(trained):
    """Our checkpoint holds the original's key layout; every key loads into a fresh model, strictly."""
    from clipvis.checkpoint import load_checkpoint
    from clipvis.modeling.meta_arch import build_model

    cfg, out, _ = trained
    saved = torch.load(out / "model_final.pth", weights_only=False)
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    state = saved["model"]
    assert torch.equal(state["criterion.empty_object_weight"], torch.tensor([1.0, 0.4]))
    prefixes = ("backbone.clip_model.", "sem_seg_head.pixel_decoder.", "sem_seg_head.predictor.", "criterion.")
    assert all(k.startswith(prefixes) for k in state)
    torch.manual_seed(99)
    fresh = build_model(cfg)
    assert set(state) - {"criterion.empty_object_weight"} == set(fresh.state_dict())
    load_checkpoint(fresh, out / "model_final.pth")
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_video_clip_training_runs(datasets_root, tmp_path):
    """A few iterations of clip training (2-frame clips, every frame its own target set) give finite losses."""
    from clipvis.engine.train import train

    cfg = load_config(builtin_config("clipvis_video_tiny.yaml"), [
        "DATASETS.TRAIN", '("ytvis_2019_train",)', "DATASETS.TEST", "()", "INPUT.SAMPLING_FRAME_NUM", "2",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.MAX_ITER", "3", "SOLVER.LOG_PERIOD", "1",
        "OUTPUT_DIR", str(tmp_path), "SEED", "0"])
    result = train(cfg, device="cpu")
    records = read_metrics(tmp_path)
    assert len(records) == 3 and all(math.isfinite(r["total_loss"]) and r["total_loss"] > 0 for r in records)
    assert result["iteration"] == 2


def test_ddp_matches_single_process(datasets_root, tmp_path):
    """train_net.py with 2 gloo processes vs 1 process, same global batch (4): same losses (up to the
    criterion's random point sampling, drawn per process) and nearly the same weights."""
    env = dict(os.environ, CLIPVIS_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    finals = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(builtin_config("clipvis_tiny.yaml")),
               "--device", "cpu", "--num-gpus", str(procs),
               *run_overrides(out, 4, **{"SOLVER.IMS_PER_BATCH": 4, "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 4096,
                                          "SOLVER.CHECKPOINT_PERIOD": 2})]
        done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
        assert (out / "model_0000001.pth").is_file() and (out / "config.yaml").is_file()
        finals[procs] = torch.load(out / "model_final.pth", weights_only=False)
        assert finals[procs]["world_size"] == procs
        finals[procs]["metrics"] = read_metrics(out)
    one, two = finals[1]["metrics"], finals[2]["metrics"]
    assert [r["iteration"] for r in one] == [r["iteration"] for r in two] == [0, 1, 2, 3]
    for a, b in zip(one, two):
        assert a["lr"] == b["lr"]
        assert b["total_loss"] == pytest.approx(a["total_loss"], rel=0.03), a["iteration"]
    # distance between the runs' weights, relative to how far training moved them from the initialization
    from clipvis.modeling.meta_arch import build_model

    cfg = load_config(builtin_config("clipvis_tiny.yaml"))
    torch.manual_seed(SEED)
    init = build_model(cfg).state_dict()
    head = [k for k in init if k.startswith("sem_seg_head.")]
    apart = sum((finals[1]["model"][k] - finals[2]["model"][k]).double().pow(2).sum() for k in head).sqrt()
    moved = sum((finals[1]["model"][k] - init[k]).double().pow(2).sum() for k in head).sqrt()
    assert moved > 0 and apart / moved < 0.25, (apart.item(), moved.item())


def test_training_curves_plot(tmp_path):
    """metrics.jsonl records (loss and evaluation lines mixed) -> a PNG of the curves."""
    import json

    from PIL import Image

    from clipvis.visualization import plot_training_curves

    lines = [{"iteration": i, "total_loss": 10.0 / (i + 1), "loss_object_ce": 1.0, "loss_mask": 2.0 / (i + 1),
              "loss_dice": 3.0, "loss_iou": 0.5, "lr": 1e-4} for i in range(20)]
    lines.insert(10, {"iteration": 9, "lvvis_val/AP": 0.1})
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    png = plot_training_curves(metrics, tmp_path / "training_curves.png")
    with Image.open(png) as image:
        assert image.size == (800, 600)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"iteration": 0, "lvvis_val/AP": 0.1}) + "\n")
    assert plot_training_curves(empty, tmp_path / "none.png") is None
