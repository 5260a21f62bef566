"""Private file helpers: every file clipvis writes appears whole or not at all.

A file is written under a temporary name in its target folder, given the mode the umask allows (mkstemp
makes 0600 files; results should be shareable), then renamed over the target in one step. If writing
fails, the temporary file is removed and the target is left as it was.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Union

from clipvis.errors import ClipvisError

PathLike = Union[str, Path]


def default_file_mode() -> int:
    """Read/write for whom the umask allows (0o666 & ~umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Create `path` atomically: `write_fn(tmp)` writes a temporary file in the same folder, which then
    replaces `path` in one step. If `write_fn` raises, the temporary file is removed, `path` is left as it
    was, and the error propagates. An unwritable folder raises ClipvisError. Returns `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise ClipvisError(f"cannot write {path}: {e.strerror or e}; choose a writable output folder") from None
    tmp = Path(tmp_name)
    try:
        write_fn(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise ClipvisError(f"cannot write {path}: {e.strerror or e}; check free space and permissions of the output folder") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """`text` (UTF-8) into `path`, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: PathLike, obj: Any, indent: Union[int, None] = 1) -> Path:
    """`obj` as JSON into `path`, atomically."""
    return write_text_atomic(path, json.dumps(obj, indent=indent))


def save_torch_atomic(obj: Any, path: PathLike) -> Path:
    """`torch.save(obj)` into `path`, atomically."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
