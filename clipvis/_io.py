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
from typing import TYPE_CHECKING, Any, Callable, Union

if TYPE_CHECKING:  # numpy and PIL are imported where images are read: `clipvis --help` stays light
    import numpy as np

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


def image_to_rgb8(img) -> "np.ndarray":
    """A PIL image -> uint8 RGB `[H, W, 3]`: palette, grayscale, RGBA (alpha dropped) and CMYK converted;
    16-bit (and 32-bit integer) grayscale scaled down to 8 bits (PIL's convert("RGB") would clip it: almost
    every pixel of a 16-bit image would be 255)."""
    import numpy as np

    if img.mode.startswith("I;16") or img.mode == "I":
        gray = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8
        return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"))


def read_rgb_image(path: PathLike) -> "np.ndarray":
    """An image file -> uint8 RGB `[H, W, 3]`, EXIF orientation applied (as detectron2's read_image). Raises
    the file's error (OSError, PIL's UnidentifiedImageError) for an unreadable file."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return image_to_rgb8(ImageOps.exif_transpose(img))


def completed_keys(part: PathLike, key: str) -> set:
    """The `key` values of the records of a JSON-lines progress file, up to the first line an interruption cut
    short (what a resumed run need not do again); empty if the file does not exist."""
    done = set()
    part = Path(part)
    if part.exists():
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                done.add(json.loads(line)[key])
            except (json.JSONDecodeError, KeyError):
                break  # a line cut short by an interruption: that item runs again
    return done


def truncate_to_complete_lines(part: PathLike) -> None:
    """Drop a last line that an interruption cut short, so appending starts on a fresh line."""
    part = Path(part)
    if part.exists():
        data = part.read_bytes()
        if data and not data.endswith(b"\n"):
            part.write_bytes(data[: data.rfind(b"\n") + 1])
