"""Building the config a run uses: defaults, then a YAML file (with `_BASE_`), then KEY VALUE overrides."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

import logging

from clipvis.config.defaults import UNUSED_KEYS, get_default_config
from clipvis.config.node import CfgNode
from clipvis.errors import ConfigError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../clipvis


def load_config(path: Union[str, Path, None] = None, overrides: Sequence[str] = ()) -> CfgNode:
    """The frozen config for a run: `get_default_config()`, then the YAML file at `path` (its `_BASE_`
    chain first; None = defaults only), then `overrides` = ["A.B.KEY", "VALUE", ...] in order.

    Raises `ConfigError` for a missing/invalid file, an unknown key or a value of the wrong type."""
    cfg = get_default_config()
    if path is not None:
        cfg.merge_from_file(path)
    cfg.merge_from_list(overrides)
    _warn_unused_values(cfg, path or "the overrides")
    if cfg.VERSION != 2:
        raise ConfigError(
            f"Config VERSION {cfg.VERSION!r} (from {path or 'the overrides'}) is not supported: only detectron2's "
            f"version-2 configs are read, as all CLIP-VIS configs are. Set VERSION: 2 after updating the keys."
        )
    cfg.freeze()
    return cfg


def builtin_config_dirs() -> List[Path]:
    """Folders searched for shipped configs: the package's `clipvis/configs/` (the one source of truth; the
    repository's top-level `configs/` is a link to it, for users of the original's command lines)."""
    folder = _PACKAGE_DIR / "configs"
    return [folder] if folder.is_dir() else []


def available_builtin_configs() -> List[str]:
    """File names of the shipped configs, e.g. ['Base-COCO-InstanceSegmentation.yaml', ...]."""
    names = {p.name for d in builtin_config_dirs() for p in d.glob("*.yaml")}
    return sorted(names)


def builtin_config(name: str) -> Path:
    """Path of a shipped config by file name, e.g. "clipvis_video_ConvNeXt-B.yaml" (the ".yaml" may be
    left out; a leading folder such as "configs/" is ignored). Works from any working directory.

    Raises `ConfigError` listing the available names when there is no such config."""
    file_name = Path(str(name)).name
    wanted = [file_name] if file_name.endswith((".yaml", ".yml")) else [f"{file_name}.yaml", file_name]
    for folder in builtin_config_dirs():
        for candidate in wanted:
            path = folder / candidate
            if path.is_file():
                return path
    available = available_builtin_configs()
    listing = ", ".join(available) if available else "none found (clipvis/configs/ is missing from this installation: reinstall clipvis)"
    raise ConfigError(f"No shipped config named {name!r}. Available: {listing}.")


# Unused keys that the original's configs and command lines set: loading those must not warn.
_SET_BY_SHIPPED_CONFIGS = frozenset("""
    TEST.TEST_NUM_CLASSES TEST.WINDOW_INFERENCE MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
    MODEL.MASK_FORMER.TEST.SEMANTIC_ON MODEL.MASK_FORMER.TEST.INSTANCE_ON MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD
    MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD MODEL.FC_CLIP.EMBED_DIM
""".split())


def _warn_unused_values(cfg: CfgNode, path) -> None:
    """Warn about unused keys set (in the file or the overrides) to something other than their default (a value
    someone may expect to matter), except those the original's own configs and command lines set."""
    defaults = get_default_config()
    for key in sorted(UNUSED_KEYS - _SET_BY_SHIPPED_CONFIGS):
        value, default = cfg, defaults
        for part in key.split("."):
            value, default = value[part], default[part]
        if value != default:
            logging.getLogger("clipvis.config").warning(
                "config %s sets %s = %r, which clipvis does not use (detectron2/Mask2Former options for other "
                "models and tasks); it has no effect", path, key, value)
