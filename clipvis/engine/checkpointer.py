"""Training checkpoints: periodic saves in the original's layout, resume with exact continuation, fine-tuning.

A checkpoint file ``OUTPUT_DIR/model_XXXXXXX.pth`` (XXXXXXX = the iteration just finished, as detectron2
names them; ``model_final.pth`` at the end) holds::

    {"model": official-format state dict (loads into the original CLIP-VIS, and into ours),
     "optimizer": ..., "scheduler": ..., "iteration": int, "grad_scaler": ... (AMP),
     "data_seed": int, "world_size": int, "rng": [per-process RNG states]}

``OUTPUT_DIR/last_checkpoint`` names the newest file. Both are written atomically (temporary file, then
rename), so an interrupted save never leaves a truncated checkpoint behind.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from clipvis._io import save_torch_atomic, write_text_atomic
from clipvis.checkpoint import load_checkpoint, model_to_official_keys
from clipvis.engine import distributed as comm
from clipvis.errors import CheckpointError

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint saved after `iteration` (0-based): ``model_0004999.pth``."""
    return f"model_{iteration:07d}.pth"


def rng_state() -> dict:
    """This process's RNG states: torch CPU (and CUDA when available), numpy global, python `random`."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore states from :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores the training state of `model` (DDP-wrapped or not), its optimizer, LR scheduler and
    AMP grad scaler in `output_dir`. All processes call :meth:`save` (it gathers RNG states); rank 0 writes."""

    def __init__(self, output_dir, model, optimizer=None, scheduler=None, grad_scaler=None):
        self.output_dir = Path(output_dir)
        self.model, self.optimizer, self.scheduler, self.grad_scaler = model, optimizer, scheduler, grad_scaler

    def save(self, name: str, iteration: int, **extra) -> Optional[Path]:
        """Write `name` (e.g. :func:`checkpoint_name`) with the full state after `iteration` and point
        last_checkpoint at it. Returns the path on rank 0, None elsewhere."""
        states = [rng_state()]
        if comm.is_distributed():
            states = [None] * comm.world_size()
            torch.distributed.all_gather_object(states, rng_state())
        if not comm.is_main_process():
            return None
        data = {
            "model": model_to_official_keys(comm.unwrap_model(self.model).state_dict()),
            "iteration": int(iteration),
            "world_size": comm.world_size(),
            "rng": states,
            **extra,
        }
        if self.optimizer is not None:
            data["optimizer"] = self.optimizer.state_dict()
        if self.scheduler is not None:
            data["scheduler"] = self.scheduler.state_dict()
        if self.grad_scaler is not None:
            data["grad_scaler"] = self.grad_scaler.state_dict()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / name
        save_torch_atomic(data, path)
        write_text_atomic(self.output_dir / LAST_CHECKPOINT, name)
        log.info("saved checkpoint %s (iteration %d)", path, iteration)
        return path

    def last_checkpoint(self) -> Optional[Path]:
        """The checkpoint named by OUTPUT_DIR/last_checkpoint, or None when there is none."""
        marker = self.output_dir / LAST_CHECKPOINT
        if not marker.is_file():
            return None
        path = self.output_dir / marker.read_text(encoding="utf-8").strip()
        if not path.is_file():
            raise CheckpointError(f"{marker} names {path.name}, which does not exist; delete {marker} or restore the file")
        return path

    def resume(self) -> Optional[dict]:
        """Restore model, optimizer, scheduler and grad scaler from the last checkpoint (every process reads
        it). Returns the checkpoint dict (``iteration``, ``data_seed``, ``rng``, ...) or None when none exists.
        RNG states are *not* applied here: call :func:`restore_rng` right before the first resumed step."""
        path = self.last_checkpoint()
        if path is None:
            return None
        try:
            data = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
        load_checkpoint(comm.unwrap_model(self.model), data["model"], source=str(path))
        for key, target in (("optimizer", self.optimizer), ("scheduler", self.scheduler), ("grad_scaler", self.grad_scaler)):
            if target is None:
                continue
            if key not in data:
                raise CheckpointError(f"{path} has no {key} state to resume from; start a new run (without --resume) "
                                      "and pass it as MODEL.WEIGHTS to fine-tune")
            target.load_state_dict(data[key])
        log.info("resumed from %s: iteration %d done", path, data["iteration"])
        return data


def restore_rng(checkpoint: dict) -> None:
    """Apply this process's RNG state saved in `checkpoint` (when the process count matches the saving run;
    otherwise the run continues with fresh RNG states and says so)."""
    states = checkpoint.get("rng") or []
    if len(states) != comm.world_size():
        log.warning("checkpoint saved by %d process(es), resuming with %d: random draws will not continue exactly",
                    len(states), comm.world_size())
        return
    set_rng_state(states[comm.rank()])


def load_weights(model: torch.nn.Module, path) -> None:
    """Fine-tuning start: load MODEL.WEIGHTS (an original CLIP-VIS checkpoint or one of ours) into the model,
    strictly (every key must fit; the CheckpointError says which config value to change)."""
    load_checkpoint(comm.unwrap_model(model), str(path))
