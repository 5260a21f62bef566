"""Inference precision: fp32 (the original's numbers) or bf16 (backbone + decoder under bfloat16 autocast)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Set

import torch
from torch import nn

from clipvis.errors import ConfigError
from clipvis.memory import evict_file_pages

PRECISIONS = ("fp32", "bf16")
"""TEST.PRECISION values."""


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices at hardware speed. On CPU that is oneDNN's bfloat16
    kernels (AVX-512 or AMX): without them torch falls back to scalar loops, hundreds of times slower than its
    float32 products (0.3 vs 180 GFLOP/s measured on an AVX2 AMD EPYC). On CUDA, the GPU's bfloat16 support."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ConfigError, before anything is built, for an unknown precision name or for "bf16" on a device
    without bfloat16 arithmetic (`bf16_supported`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown inference precision {precision!r} (TEST.PRECISION / --precision); use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(device):
        if device.type == "cuda":
            raise ConfigError(f"bf16 asked for, but {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic: use fp32 (the default)")
        raise ConfigError(
            f"bf16 asked for, but this CPU has no bfloat16 arithmetic for oneDNN (torch reports "
            f"{torch.backends.cpu.get_cpu_capability()}, bf16 needs AVX-512 or AMX): its bfloat16 products would run "
            f"hundreds of times slower than fp32. Use fp32 (the default) here, or bf16 on a CPU with AVX512-BF16 / AMX or on a GPU")


def precision_context(precision: str, device: torch.device):
    """The autocast context of an inference precision already validated by `check_precision`: nothing for
    "fp32", bfloat16 autocast on the device's type (CPU or CUDA) for "bf16"."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def layers_called_only_under_autocast(model: nn.Module, inference_pass: Callable[[], None], device_type: str) -> List[str]:
    """Names of the Linear / Conv2d layers of `model` that `inference_pass()` calls, every time, with autocast
    enabled on `device_type` (layers it calls outside autocast, or not at all, are left out)."""
    autocast_states: Dict[str, Set[bool]] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):

            def record(_module, _args, name=name):
                autocast_states.setdefault(name, set()).add(torch.is_autocast_enabled(device_type))

            hooks.append(module.register_forward_pre_hook(record))
    try:
        inference_pass()
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name, states in autocast_states.items() if states == {True}]


@torch.no_grad()
def store_autocast_layers_in_bf16(model: nn.Module, inference_pass: Callable[[], None], device_type: str) -> int:
    """Convert in place, to bfloat16, the weights and biases of the Linear / Conv2d layers that
    `inference_pass()` (one pass of the inference pipeline under bf16 autocast) only ever calls under autocast.
    Autocast casts exactly those to bfloat16 at every call, so results are unchanged; the cast is done once
    instead of per frame and those weights take half the memory (the float32 originals, when memory-mapped
    from a checkpoint, are evicted from resident memory). Layers also used outside autocast (CLIP's head in
    mask classification, the deformable attention's float32 sampling offsets) stay float32. The model is
    for bf16 inference afterwards. Returns how many layers were converted."""
    names = layers_called_only_under_autocast(model, inference_pass, device_type)
    modules = dict(model.named_modules())
    replaced = []
    for name in names:
        for param in modules[name].parameters(recurse=False):
            if param.dtype == torch.float32:
                replaced.append(param.data)
                param.data = param.data.to(torch.bfloat16)
    evict_file_pages(replaced, keep=[*model.parameters(), *model.buffers()])
    return len(names)
