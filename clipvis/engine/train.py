"""The training loop of CLIP-VIS: class-agnostic decoder training on a frozen CLIP.

One iteration: a batch of augmented images (or clips, every frame its own target set) -> normalized,
zero-padded batch -> model (CLIP under no_grad in eval mode, decoder in train mode) -> SetCriterion ->
weighted sum -> backward -> gradient clipping -> optimizer step -> LR schedule step. Multi-process runs
use DistributedDataParallel (gloo on CPU, NCCL on CUDA); CUDA runs use float16 autocast with a grad
scaler when SOLVER.AMP.ENABLED. Every SOLVER.LOG_PERIOD iterations the losses (averaged over processes),
lr, time per iteration and ETA go to the log and to OUTPUT_DIR/metrics.jsonl (and TensorBoard when it is
installed); checkpoints every SOLVER.CHECKPOINT_PERIOD (see `clipvis.engine.checkpointer`); video
evaluation every TEST.EVAL_PERIOD when DATASETS.TEST names video datasets.
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from clipvis.engine import distributed as comm

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ the step
def padded_batch(frames: Sequence[torch.Tensor], pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                 size_divisibility: int) -> torch.Tensor:
    """uint8 frames ``[3, H_i, W_i]`` -> normalized float batch ``[B, 3, H, W]``, each zero-padded bottom/right
    to the largest size rounded up to `size_divisibility` (the original's ImageList.from_tensors)."""
    d = max(int(size_divisibility), 1)
    height = -(-max(f.shape[-2] for f in frames) // d) * d
    width = -(-max(f.shape[-1] for f in frames) // d) * d
    out = torch.zeros((len(frames), 3, height, width), dtype=torch.float32, device=pixel_mean.device)
    for i, f in enumerate(frames):
        h, w = f.shape[-2:]
        out[i, :, :h, :w] = (f.to(pixel_mean.device, torch.float32) - pixel_mean) / pixel_std
    return out


def batch_inputs(samples: List[dict], pixel_mean: torch.Tensor, pixel_std: torch.Tensor,
                 size_divisibility: int) -> Tuple[torch.Tensor, List[dict]]:
    """Loader samples (images or clips, `clipvis.data.train_data`) -> (normalized padded frames ``[S, 3, H, W]``,
    S target sets for the criterion). Clips contribute their frames in order (set = clip * T + frame)."""
    from clipvis.modeling.criterion import image_targets, video_frame_targets

    device = pixel_mean.device
    if "image" in samples[0]:
        images = padded_batch([s["image"] for s in samples], pixel_mean, pixel_std, size_divisibility)
        size = tuple(images.shape[-2:])
        return images, [image_targets(s["masks"].to(device), size) for s in samples]
    frames = [f for s in samples for f in s["frames"]]
    images = padded_batch(frames, pixel_mean, pixel_std, size_divisibility)
    size = tuple(images.shape[-2:])
    targets = []
    for s in samples:
        targets += video_frame_targets([i.to(device) for i in s["ids"]], [m.to(device) for m in s["masks"]], size)
    return images, targets


def training_losses(model, criterion, samples: List[dict], amp: bool = False) -> Dict[str, torch.Tensor]:
    """Weighted losses (``criterion.weight_dict`` keys) of one batch of loader samples.

    model: a `ClipVis` in training mode (or its DDP wrapper); criterion: `SetCriterion`. With `amp`,
    the forward and losses run under CUDA float16 autocast (as the original's AMP trainer)."""
    core = comm.unwrap_model(model)
    images, targets = batch_inputs(samples, core.pixel_mean, core.pixel_std, core.size_divisibility)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        outputs, _ = model(images)
        losses = criterion(outputs, targets)
    return criterion.weigh(losses)


# ----------------------------------------------------------------------------------------- logging
class MetricsLogger:
    """Writes metrics records to OUTPUT_DIR/metrics.jsonl, a plot of them (training_curves.png) and TensorBoard
    (when installed); rank 0 only."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(output_dir))
            except ImportError:
                pass

    def write(self, record: dict) -> None:
        """Append `record` ({"iteration": int, name: float, ...}) as one JSON line, and its numbers to TensorBoard."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["iteration"])

    def plot(self) -> None:
        """Redraw OUTPUT_DIR/training_curves.png (losses and learning rate so far)."""
        if self.enabled and self.path.exists():
            from clipvis.visualization import plot_training_curves

            plot_training_curves(self.path, self.path.with_name("training_curves.png"))

    def close(self) -> None:
        """Draw the final training curves; flush and close the TensorBoard writer, if any."""
        self.plot()
        if self.tensorboard is not None:
            self.tensorboard.close()


def optimizer_step(cfg, optimizer: torch.optim.Optimizer, total: torch.Tensor, scaler=None) -> None:
    """One update from the total loss: backward (scaled under AMP), full-model gradient clipping on the
    unscaled gradients as SOLVER.CLIP_GRADIENTS says, optimizer step."""
    from clipvis.engine.solver import clip_gradients

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        clip_gradients(cfg, optimizer)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        clip_gradients(cfg, optimizer)
        optimizer.step()


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if comm.is_distributed():
        values = values.clone()
        torch.distributed.all_reduce(values)
        values /= comm.world_size()
    return values


# -------------------------------------------------------------------------------------------- setup
def _seed_everything(cfg) -> int:
    """Seed python/numpy/torch with SEED + rank (a random seed shared by all processes when SEED < 0, as
    detectron2) and return the shared data seed."""
    seed = int(cfg.SEED)
    if seed < 0:
        seed = int(np.random.SeedSequence().generate_state(1)[0] % (2 ** 31))
        if comm.is_distributed():
            box = [seed]
            torch.distributed.broadcast_object_list(box, src=0)
            seed = int(box[0])
    rank_seed = seed + comm.rank()
    random.seed(rank_seed)
    np.random.seed(rank_seed % (2 ** 32))
    torch.manual_seed(rank_seed)
    return seed


def _video_test_config(cfg, output_dir: Path):
    """A copy of cfg evaluating only the video datasets of DATASETS.TEST, writing under `output_dir`
    (None when there is nothing to evaluate)."""
    from clipvis.data.datasets import is_video_dataset, list_datasets

    names = [n for n in cfg.DATASETS.TEST if is_video_dataset(n)]
    skipped = [n for n in cfg.DATASETS.TEST if not is_video_dataset(n)]
    if skipped and comm.is_main_process():
        log.warning("periodic evaluation skips %s: only video datasets (%s) can be evaluated", skipped, ", ".join(filter(is_video_dataset, list_datasets())))
    if not names:
        return None
    test_cfg = cfg.clone()
    test_cfg.defrost()
    test_cfg.DATASETS.TEST = tuple(names)
    test_cfg.OUTPUT_DIR = str(output_dir)
    test_cfg.freeze()
    return test_cfg


def _evaluate(cfg, model, device: str, iteration: int) -> dict:
    from clipvis.engine.evaluation import evaluate_datasets

    test_cfg = _video_test_config(cfg, Path(cfg.OUTPUT_DIR) / "eval" / f"iter_{iteration:07d}")
    if test_cfg is None:
        return {}
    core = comm.unwrap_model(model)
    core.eval()
    try:
        with torch.no_grad():
            metrics = evaluate_datasets(test_cfg, device=device, model=core)
    finally:
        core.train()
    comm.barrier()
    return metrics


# ------------------------------------------------------------------------------------------ the loop
def train(cfg, device: str = "cpu", resume: bool = False) -> dict:
    """Train the decoder of the model described by `cfg` for SOLVER.MAX_ITER iterations.

    device: "cpu" or "cuda[:i]" (this process's device); resume: continue from OUTPUT_DIR/last_checkpoint
    (model, optimizer, scheduler, iteration, RNG and data stream) when it exists, else start fresh
    (loading MODEL.WEIGHTS when set). Returns ``{"iteration": last iteration done, "losses": its averaged
    losses, "eval": last evaluation metrics}``."""
    from clipvis.data.train_data import build_train_loader
    from clipvis.engine.checkpointer import Checkpointer, checkpoint_name, load_weights, restore_rng
    from clipvis.engine.solver import build_lr_scheduler, build_optimizer
    from clipvis.modeling.criterion import criterion_from_config
    from clipvis.modeling.meta_arch import build_model

    output_dir = Path(cfg.OUTPUT_DIR)
    if comm.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(cfg.dump(), encoding="utf-8")
    data_seed = _seed_everything(cfg)
    torch_device = torch.device(device)
    amp = bool(cfg.SOLVER.AMP.ENABLED) and torch_device.type == "cuda"
    if cfg.SOLVER.AMP.ENABLED and not amp:
        log.info("SOLVER.AMP.ENABLED is ignored on %s (float16 autocast needs CUDA)", torch_device)

    model = build_model(cfg).to(torch_device)
    if cfg.MODEL.WEIGHTS:
        load_weights(model, cfg.MODEL.WEIGHTS)
    model.train()  # the CLIP backbone stays in eval mode (ClipBackbone.train is a no-op)
    criterion = criterion_from_config(cfg).to(torch_device)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_lr_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    trained = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    log.info("training %d parameters (%d frozen) on %s, %d process(es)%s", trained,
             sum(p.numel() for p in model.parameters()) - trained, torch_device, comm.world_size(), ", AMP" if amp else "")

    ddp_model = model
    if comm.world_size() > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[torch_device.index] if torch_device.type == "cuda" else None, broadcast_buffers=False,
        )
    checkpointer = Checkpointer(output_dir, ddp_model, optimizer, scheduler, scaler)
    start_iter, resumed = 0, None
    if resume:
        resumed = checkpointer.resume()
        if resumed is not None:
            start_iter = int(resumed["iteration"]) + 1
            data_seed = int(resumed.get("data_seed", data_seed))
        else:
            log.info("--resume: no checkpoint in %s, starting from scratch", output_dir)

    max_iter = int(cfg.SOLVER.MAX_ITER)
    period = int(cfg.SOLVER.CHECKPOINT_PERIOD)
    eval_period = int(cfg.TEST.EVAL_PERIOD)
    log_period = max(int(cfg.SOLVER.LOG_PERIOD), 1)
    if start_iter >= max_iter:
        log.info("nothing to do: iteration %d of SOLVER.MAX_ITER %d already done", start_iter - 1, max_iter)
        return {"iteration": start_iter - 1, "losses": {}, "eval": {}}

    loader = build_train_loader(cfg, comm.rank(), comm.world_size(), seed=data_seed, start_iter=start_iter)
    batches = iter(loader)
    metrics = MetricsLogger(output_dir, comm.is_main_process())
    if resumed is not None:
        restore_rng(resumed)

    last_losses: Dict[str, float] = {}
    last_eval: dict = {}
    window_start, window_iters, data_time = time.perf_counter(), 0, 0.0
    log.info("starting training at iteration %d of %d", start_iter, max_iter)
    for iteration in range(start_iter, max_iter):
        t0 = time.perf_counter()
        samples = next(batches)
        data_time += time.perf_counter() - t0

        losses = training_losses(ddp_model, criterion, samples, amp=amp)
        total = sum(losses.values())
        reduced = _reduce_mean(torch.stack([total.detach().float()] + [v.detach().float() for v in losses.values()]))
        if not torch.isfinite(reduced[0]):
            raise FloatingPointError(f"loss became infinite or NaN at iteration {iteration}: "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, reduced[1:].tolist())))
        lr = optimizer.param_groups[0]["lr"]
        optimizer_step(cfg, optimizer, total, scaler)
        scheduler.step()
        window_iters += 1

        done = iteration + 1
        if period > 0 and done % period == 0 and done < max_iter:
            checkpointer.save(checkpoint_name(iteration), iteration, data_seed=data_seed)
            metrics.plot()
        if done % log_period == 0 or done == max_iter:
            elapsed = time.perf_counter() - window_start
            per_iter = elapsed / window_iters
            values = reduced.tolist()
            last_losses = {"total_loss": values[0], **dict(zip(losses, values[1:]))}
            record = {"iteration": iteration, **last_losses, "lr": lr, "time": per_iter,
                      "data_time": data_time / window_iters, "eta_seconds": per_iter * (max_iter - done)}
            if torch_device.type == "cuda":
                record["max_mem_mb"] = torch.cuda.max_memory_allocated(torch_device) / 2 ** 20
            metrics.write(record)
            if comm.is_main_process():
                main = " ".join(f"{k}: {last_losses[k]:.4g}" for k in ("total_loss", "loss_object_ce", "loss_mask", "loss_dice", "loss_iou") if k in last_losses)
                log.info("iter %d/%d  %s  lr: %.3g  time: %.3fs  data: %.3fs  eta: %s", done, max_iter, main, lr, per_iter,
                         data_time / window_iters, _format_eta(per_iter * (max_iter - done)))
            window_start, window_iters, data_time = time.perf_counter(), 0, 0.0
        if eval_period > 0 and cfg.DATASETS.TEST and (done % eval_period == 0 or done == max_iter):
            last_eval = _evaluate(cfg, ddp_model, device, iteration)
            if last_eval:
                metrics.write({"iteration": iteration, **{f"{name}/{k}": v for name, m in last_eval.items()
                                                           for k, v in m.items() if isinstance(v, (int, float))}})
            window_start = time.perf_counter()

    checkpointer.save("model_final.pth", max_iter - 1, data_seed=data_seed)
    metrics.close()
    return {"iteration": max_iter - 1, "losses": last_losses, "eval": last_eval}
