"""Shared pieces of the benchmarks: a video predictor with synthetic weights, peak memory."""
from __future__ import annotations

import importlib.util
import os
import resource
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from clipvis.memory import HUGE_PAGES_VARIABLE

REPO = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    return Path(os.environ.get("CLIPVIS_REFERENCE", REPO.parent / "shared" / "reference"))


def _synthetic_weights_module():
    path = reference_dir() / "synthetic_weights.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("synthetic_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_state_dict(model: torch.nn.Module, seed: int = 0) -> dict:
    """The reference's deterministic synthetic weights for our model's official-format keys
    (falls back to the model's own seeded random init when the reference folder is absent)."""
    module = _synthetic_weights_module()
    if module is None:
        return model.state_dict()
    return module.synthesize([(k, tuple(v.shape)) for k, v in model.state_dict().items()], seed=seed)


def write_synthetic_checkpoint(config: str, overrides: Sequence[str], path: Path, seed: int = 0) -> Path:
    """Write the reference's synthetic weights for `config`'s model as an official-format checkpoint, in a child
    process (so the benchmark's own peak memory is that of loading a real checkpoint)."""
    import subprocess
    import sys

    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); from common import synthetic_checkpoint_in_this_process; "
        "synthetic_checkpoint_in_this_process(sys.argv[2], sys.argv[5:], sys.argv[3], int(sys.argv[4]))"
    )
    subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), config, str(path), str(seed), *overrides], check=True)
    return path


def synthetic_checkpoint_in_this_process(config: str, overrides: Sequence[str], path: str, seed: int) -> None:
    """Child-process side of `write_synthetic_checkpoint`."""
    from clipvis.config import builtin_config, load_config
    from clipvis.modeling.meta_arch import build_model

    cfg = load_config(builtin_config(config), ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", "", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg)
    torch.save({"model": synthetic_state_dict(model, seed)}, path)


def build_predictor(config: str, overrides: Sequence[str] = (), device: str = "cpu", seed: int = 0):
    """A VideoPredictor for a shipped config with the reference's synthetic weights, loaded through the real
    checkpoint loader from an official-format file (written by a child process)."""
    from clipvis.config import builtin_config, load_config
    from clipvis.inference.predictor import VideoPredictor

    cfg = load_config(builtin_config(config), ["MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS", "", *overrides])
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_synthetic_checkpoint(config, overrides, Path(tmp) / "synthetic.pth", seed)
        predictor = VideoPredictor.from_config(cfg, weights=weights, device=device, progress=False)
    return predictor, cfg


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def start_inference_peak_rss() -> float:
    """The peak RSS so far (MB), then a new peak measurement for `peak_rss_report` (Linux: writing 5 to
    /proc/self/clear_refs resets VmHWM, and with it getrusage's ru_maxrss; elsewhere nothing is reset)."""
    before = peak_rss_mb()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return before


def peak_rss_since_reset_mb() -> Optional[float]:
    """Peak resident memory since `start_inference_peak_rss` (VmHWM), in MB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_report(before_inference_mb: float) -> dict:
    """Peak RSS of the whole process, before inference (`before_inference_mb`, from `start_inference_peak_rss`)
    and of inference alone (since then, where the OS can tell), in MB, rounded."""
    inference = peak_rss_since_reset_mb()
    whole = max(before_inference_mb, inference if inference is not None else peak_rss_mb())
    return {
        "peak_rss_mb": round(whole, 1),
        "peak_rss_before_inference_mb": round(before_inference_mb, 1),
        "peak_rss_inference_mb": None if inference is None else round(inference, 1),
    }


def parse_overrides(opts: List[str]) -> List[str]:
    if len(opts) % 2:
        raise SystemExit("overrides must be KEY VALUE pairs")
    return list(opts)


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo, else platform), so a number is never quoted without its machine."""
    import platform

    from clipvis.inference.onednn_linear import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def matmul_peak_gflops(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    """Best GFLOP/s of a size x size matmul at the current thread count (a warm-up call first)."""
    import time

    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2 * size ** 3 / best / 1e9


def machine_report() -> dict:
    """CPU model, torch's CPU capability, threads, and the measured fp32 / bf16 matmul peaks."""
    return {
        "cpu": cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "huge_page_allocations": os.environ.get(HUGE_PAGES_VARIABLE) == "1",
        "matmul_gflops_fp32": round(matmul_peak_gflops(torch.float32), 1),
        "matmul_gflops_bf16": round(matmul_peak_gflops(torch.bfloat16), 1),
    }
