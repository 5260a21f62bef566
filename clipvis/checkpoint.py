"""Official CLIP-VIS checkpoints <-> our modules.

The original saves `{"model": state_dict, ...}` (detectron2 Checkpointer) with keys such as
`backbone.clip_model.visual.trunk.stem.0.weight`, `sem_seg_head.predictor.query_feat.weight` and the
criterion's `criterion.empty_object_weight` buffer. Our module tree uses the same names, so the mapping
is one function (`official_to_model_keys`) that drops what the model does not hold.

Any disagreement (missing, unexpected or wrongly shaped keys) is one `CheckpointError` that lists a few
keys, counts the rest, and — for the classic mistakes (decoder depth, query count, CLIP model) — names
the config override that fixes it.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from clipvis.errors import CheckpointError
from clipvis.memory import release_freed_memory

log = logging.getLogger(__name__)

# Keys of the original checkpoint that are not model weights: the loss's object / no-object class weights
# (a buffer of the original's criterion, always [1, 0.4] in its checkpoints) and the pixel statistics.
IGNORED_OFFICIAL_KEYS = ("criterion.empty_object_weight", "pixel_mean", "pixel_std")

StateDict = Dict[str, torch.Tensor]


def read_checkpoint(path: Union[str, Path]) -> StateDict:
    """Read a `.pth`/`.pt` file: the original's `{"model": state_dict, ...}` or a bare state dict -> state dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give the path of a .pth file with --weights / MODEL.WEIGHTS)")
    try:
        obj = _torch_load(path)
    except Exception as e:  # corrupt, truncated, or not a torch file
        reason = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({reason}); give a PyTorch .pth file (the original's or ours)") from None
    return unwrap_state_dict(obj, source=str(path))


def _torch_load(path: Path):
    """torch.load, memory-mapped when the file's format allows it (the tensors then stay in the file until used
    and loading does not hold a second copy of the weights); older formats load into memory."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=False)


def unwrap_state_dict(obj, source: str = "checkpoint") -> StateDict:
    """The state dict inside a loaded checkpoint object (`{"model": sd}`, `{"state_dict": sd}` or `sd`)."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if torch.is_tensor(v)}
        if tensors:
            return {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
    raise CheckpointError(
        f"{source} holds no state dict (expected {{'model': state_dict}} as the original saves, or a bare state dict)"
    )


def official_to_model_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Official-format state dict -> our `ClipVis` state dict (same names, minus non-weight entries)."""
    return {k: v for k, v in state_dict.items() if k not in IGNORED_OFFICIAL_KEYS}


def model_to_official_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Our state dict -> the original's key layout (adds the criterion's `empty_object_weight` buffer), so the
    original code can load weights we train with strict loading."""
    from clipvis.modeling.criterion import ORIGINAL_NO_OBJECT_WEIGHT

    out = dict(state_dict)
    out["criterion.empty_object_weight"] = torch.tensor([1.0, ORIGINAL_NO_OBJECT_WEIGHT])
    return out


def load_checkpoint(model: nn.Module, checkpoint: Union[str, Path, Mapping], source: Optional[str] = None) -> None:
    """Load an official-format checkpoint (path or state dict) into `model` strictly.

    Raises `CheckpointError` naming missing / unexpected / wrongly shaped keys, and the config override
    that fixes a decoder-depth, query-count or CLIP-model disagreement.
    """
    if isinstance(checkpoint, (str, Path)):
        source = source or str(checkpoint)
        state = read_checkpoint(checkpoint)
    else:
        source = source or "checkpoint"
        state = unwrap_state_dict(checkpoint, source)
    state = official_to_model_keys(state)
    expected = model.state_dict()
    problems = diagnose(expected, state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    del expected
    count = len(state)
    _swap_in(model, state)
    del state  # the last references to the replaced initial weights ...
    release_freed_memory()  # ... which (~0.8 GB for ConvNeXt-B) go back to the system
    log.info("loaded %d tensors from %s", count, source)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While a model whose weights all come from a checkpoint next is built: every parameter a module registers
    is moved to the meta device (no memory; initialising it is a no-op), buffers are built as usual (some, such
    as CLIP's causal attention mask, are not in checkpoints). `load_checkpoint` then gives each parameter its
    checkpoint tensor. Without this, ConvNeXt-B's random initialisation (760 MB) was written, then thrown away
    by the loader: it set the process's peak memory. A parameter the checkpoint lacks is a `CheckpointError`
    of the loader, as always, so none stays on meta unnoticed."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


@torch.no_grad()
def _swap_in(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Point each parameter / buffer of `model` at the checkpoint's tensor instead of copying into it (no second
    copy of the weights in memory; the Parameter objects stay the same, so an optimizer built before still
    holds them). A tensor of another dtype (e.g. half-precision weights) is copied and converted instead. A
    parameter built on the meta device (`parameters_on_meta`) is replaced by a Parameter of the checkpoint's
    tensor, in every module that shares it."""
    targets = dict(model.named_parameters(remove_duplicate=False))
    targets.update(model.named_buffers(remove_duplicate=False))
    replaced: Dict[int, nn.Parameter] = {}
    for name, value in state.items():
        target = targets[name]
        if target.is_meta:
            replaced.setdefault(id(target), nn.Parameter(value.to(target.dtype), requires_grad=target.requires_grad))
        elif value.dtype == target.dtype and value.device == target.device:
            target.data = value
        else:
            target.copy_(value)
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) in replaced:
                module._parameters[name] = replaced[id(param)]


def _listing(keys: List[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def diagnose(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> List[str]:
    """Human-readable differences between the model's state dict and a checkpoint's (empty when they fit)."""
    problems = _architecture_hints(expected, given)
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shape = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shape:
        shown = [f"{k} {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}" for k in shape]
        problems.append(f"{len(shape)} key(s) with the wrong shape: {_listing(shown, 3)}")
    return problems


_DECODER_LAYER = re.compile(r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.")


def decoder_depth(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """MODEL.MASK_FORMER.DEC_LAYERS implied by a state dict (decoder layers + 1), or None."""
    layers = {int(m.group(1)) for k in state if (m := _DECODER_LAYER.match(k))}
    return max(layers) + 2 if layers else None


def num_queries(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """MODEL.MASK_FORMER.NUM_OBJECT_QUERIES implied by a state dict, or None."""
    t = state.get("sem_seg_head.predictor.query_feat.weight")
    return int(t.shape[0]) if t is not None else None


def clip_signature(state: Mapping[str, torch.Tensor]) -> Optional[Tuple]:
    """A few shapes that identify the CLIP model of a state dict (image tower kind and widths, embed dim)."""
    p = "backbone.clip_model."
    if p + "text_projection" not in state:
        return None
    kind = "convnext" if any(k.startswith(p + "visual.trunk.") for k in state) else "resnet" if p + "visual.conv1.weight" in state else "other"
    vis = [tuple(v.shape) for k, v in sorted(state.items()) if k.startswith(p + "visual.") and v.ndim >= 2][:1]
    return (kind, tuple(state[p + "text_projection"].shape), tuple(vis))


def _architecture_hints(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> List[str]:
    hints = []
    want, have = decoder_depth(expected), decoder_depth(given)
    if want is not None and have is not None and want != have:
        hints.append(
            f"the checkpoint's transformer decoder has {have - 1} layers but the config builds {want - 1}: "
            f"set MODEL.MASK_FORMER.DEC_LAYERS {have}"
        )
    want, have = num_queries(expected), num_queries(given)
    if want is not None and have is not None and want != have:
        hints.append(f"the checkpoint has {have} queries but the config builds {want}: set MODEL.MASK_FORMER.NUM_OBJECT_QUERIES {have}")
    want, have = clip_signature(expected), clip_signature(given)
    if want is not None and have is not None and want != have:
        guess = guess_clip_model(given)
        fix = f"set MODEL.FC_CLIP.CLIP_MODEL_NAME {guess}" if guess else "set MODEL.FC_CLIP.CLIP_MODEL_NAME to the CLIP model it was trained with"
        configs = _configs_for_clip_model(guess) if guess else []
        if configs:
            fix += f" (or start from a config made for it: --config {' / '.join(configs)})"
        hints.append(f"the checkpoint's CLIP model differs from the config's (config: {_describe_clip(want)}; checkpoint: {_describe_clip(have)}): {fix}")
    # The heads' sizes, so that the fixes above, once applied, do not lead to a second error without advice.
    for key, option, what in (("sem_seg_head.pixel_decoder.adapter_1.weight", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "pixel decoder width"),
                              ("sem_seg_head.pixel_decoder.mask_features.weight", "MODEL.SEM_SEG_HEAD.MASK_DIM", "mask feature width"),
                              ("sem_seg_head.predictor.decoder_norm.weight", "MODEL.MASK_FORMER.HIDDEN_DIM", "transformer decoder width"),
                              ("sem_seg_head.predictor.transformer_ffn_layers.0.linear1.weight", "MODEL.MASK_FORMER.DIM_FEEDFORWARD",
                               "transformer decoder feed-forward width")):
        if key in expected and key in given and expected[key].shape[0] != given[key].shape[0]:
            hints.append(f"the checkpoint's {what} is {given[key].shape[0]} but the config builds {expected[key].shape[0]}: "
                         f"set {option} {given[key].shape[0]}")
    want, have = _encoder_layers(expected), _encoder_layers(given)
    if want and have and want != have:
        hints.append(f"the checkpoint's pixel decoder has {have} encoder layers but the config builds {want}: "
                     f"set MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS {have}")
    return hints


_ENCODER_LAYER = re.compile(r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.(\d+)\.")


def _encoder_layers(state: Mapping[str, torch.Tensor]) -> int:
    """Number of deformable encoder layers of the pixel decoder in a state dict (0 when none are found)."""
    found = {int(m.group(1)) for m in map(_ENCODER_LAYER.match, state) if m}
    return max(found) + 1 if found else 0


def _configs_for_clip_model(name: str) -> List[str]:
    """Shipped video configs whose CLIP model is `name` (the image configs' twins are left out)."""
    try:
        from clipvis.config import builtin_config, load_config
        from clipvis.config.loader import available_builtin_configs

        names = [n for n in available_builtin_configs() if n.startswith("clipvis_video_")]
        return [n for n in names if load_config(builtin_config(n)).MODEL.FC_CLIP.CLIP_MODEL_NAME == name]
    except Exception:  # advice only: never fail the diagnosis over it
        return []


def _describe_clip(signature: Tuple) -> str:
    """'convnext image tower, text width 640, embed dim 640' from a `clip_signature`."""
    kind, (text_width, embed_dim), _ = signature
    return f"{kind} image tower, text width {text_width}, embed dim {embed_dim}"


# CLIP models CLIP-VIS / FC-CLIP checkpoints are known to use, tried in this order when guessing.
KNOWN_CLIP_MODELS = ("convnext_base_w_320", "convnext_large_d_320", "RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")


class _NoRandomInitNotice(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded ... initialized randomly" (logged on the root logger for
    every model built without weights): models built only to compare shapes are meant to be random."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("initialized randomly" in message or "initialized partially" in message)


def guess_clip_model(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The open_clip model name whose CLIP state-dict shapes equal the checkpoint's, among KNOWN_CLIP_MODELS
    and our tiny model configs; None when none fits."""
    from clipvis.config.open_clip_models import register_open_clip_configs

    p = "backbone.clip_model."
    given = {k[len(p):]: tuple(v.shape) for k, v in state.items() if k.startswith(p)}
    quiet = _NoRandomInitNotice()
    logging.getLogger().addFilter(quiet)
    try:
        return _first_model_with_shapes(given, KNOWN_CLIP_MODELS + tuple(register_open_clip_configs()))
    finally:
        logging.getLogger().removeFilter(quiet)


def _first_model_with_shapes(given: Dict[str, tuple], names) -> Optional[str]:
    import open_clip

    for name in names:
        try:  # shapes only: build on the meta device (open_clip moves the model to `device` at the end)
            with torch.device("meta"):
                model = open_clip.create_model(name, pretrained=None, device="meta")
        except Exception:  # model config unavailable in this open_clip version
            continue
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes == given:
            return name
    return None
