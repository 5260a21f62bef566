"""Configs: the original CLIP-VIS's detectron2/yacs YAML files, read as they are.

`load_config(path, overrides)` gives the frozen config of a run (defaults, then the file with its
`_BASE_` chain, then KEY VALUE overrides); `builtin_config(name)` finds a YAML shipped in the package (`clipvis/configs/`);
`get_default_config()` lists every key; `register_open_clip_configs()` makes our tiny open_clip models
(e.g. `clipvis_tiny_convnext`, used by `configs/*_tiny.yaml`) known to open_clip.
"""
from clipvis.config.defaults import get_default_config
from clipvis.config.loader import available_builtin_configs, builtin_config, builtin_config_dirs, load_config
from clipvis.config.node import CfgNode
from clipvis.config.open_clip_models import MODEL_CONFIG_DIR, our_open_clip_model_names, register_open_clip_configs

__all__ = [
    "CfgNode",
    "MODEL_CONFIG_DIR",
    "available_builtin_configs",
    "builtin_config",
    "builtin_config_dirs",
    "get_default_config",
    "load_config",
    "our_open_clip_model_names",
    "register_open_clip_configs",
]
