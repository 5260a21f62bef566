"""Our own open_clip model configs (tiny CLIPs for tests and CPU experiments), registered with open_clip.

`clipvis_tiny_convnext` mirrors `convnext_base_w_320` (a timm ConvNeXt trunk with `stem`, `stages`,
`norm_pre` and a NormMlp head, no pooling, a linear projection; a CLIP text transformer with context 77
and the usual 49408-token vocabulary) at a tiny size: timm `convnext_atto` trunk (stage widths 40/80/160/320),
text width 64, 2 layers, 2 heads, embed dim 64. It builds in well under a second on a CPU.
`clipvis_tiny_vit` is an OpenAI-style ViT (patch 16, QuickGELU) of 3 blocks of width 64 with the same tiny text
tower, for CLIPtrase tests and quick tries of `clipvis segment`.
"""
from __future__ import annotations

from pathlib import Path
from typing import List

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"


def our_open_clip_model_names() -> List[str]:
    """Names of the model configs we ship (file stems of `model_configs/*.json`)."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def register_open_clip_configs() -> List[str]:
    """Make our model configs known to open_clip (`open_clip.create_model(name)` then works).
    Idempotent: a second call changes nothing. Returns the registered names."""
    import open_clip

    names = our_open_clip_model_names()
    known = set(open_clip.list_models())
    if any(name not in known for name in names):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    return names
