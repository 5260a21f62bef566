"""clipvis: open-vocabulary video instance segmentation (CLIP-VIS) in plain PyTorch.

The public API (imported on first use, so `import clipvis` stays light):

- `load_config(path, overrides)`, `builtin_config(name)`: the original's YAML configs, shipped in the package.
- `build_model(cfg)`: the CLIP-VIS per-frame model from a config.
- `VideoPredictor`: video inference (`VideoPredictor.from_config(cfg, weights).predict(frames, vocabulary)`).
- `register_video_dataset(name, metadata, json_file, image_root)` / `register_image_dataset(...)`: make a
  dataset known by name to `DATASETS.TRAIN` / `DATASETS.TEST`, as detectron2's registration does.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_config": "clipvis.config",
    "builtin_config": "clipvis.config",
    "build_model": "clipvis.modeling.meta_arch",
    "VideoPredictor": "clipvis.inference.predictor",
    "register_video_dataset": "clipvis.data.datasets",
    "register_image_dataset": "clipvis.data.datasets",
}
__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'clipvis' has no attribute {name!r}")


def __dir__():
    return __all__
