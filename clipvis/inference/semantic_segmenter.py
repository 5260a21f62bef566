"""`SemanticSegmenter`: training-free open-vocabulary semantic segmentation of images and frames (CLIPtrase).

    segmenter = SemanticSegmenter.from_open_clip("ViT-B-16", weights="openai")    # or a local OpenAI-format file
    vocab = segmenter.encode_vocabulary(["cat", "sofa", "floor"])
    result = segmenter.segment(image, vocab)        # image: uint8 [H, W, 3]
    result.labels                                    # int64 [H, W], class index per pixel
    result.fractions()                               # {class name: fraction of pixels}

Two input protocols:

- ``paper``: the paper's benchmark protocol: short side resized to S (PIL bicubic), centre crop S x S. The
  result covers the crop only (``result.labels`` is S x S, ``result.image`` the crop).
- ``whole`` (default): every pixel of an image of any aspect ratio. The image is resized so that its short
  side is S, and S x S windows are laid along its long side (as few as cover it, evenly spaced, overlapping);
  each window is segmented as in the paper, every pixel takes the label of the window whose centre is
  nearest, and the label map is resized back to the image (nearest). Windows rather than one interpolated
  positional grid over the whole image: DBSCAN runs on rows of the recalibrated patch-to-patch map, whose
  length (and so every distance, and the meaning of eps) grows with the number of patches; a window keeps the
  grid the paper's eps and min_samples were chosen for.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from clipvis.errors import CheckpointError, ClipvisError
from clipvis.inference.precision import check_precision

log = logging.getLogger(__name__)

PROTOCOLS = ("whole", "paper")
PAPER_SETTINGS = {224: (0.7, 3), 336: (1.1, 7)}  # S: (DBSCAN eps, min_samples), the paper's
DEFAULT_CLIP_MODEL = "ViT-B-16"


@dataclass
class SemanticVocabulary:
    """Class texts (each string one class, used verbatim) and optional background texts, with their text
    features `[C', D]` (classes first). mode: "with_background" when background texts are given, else
    "plain" ("voc20" weights patch logits by the CLS token's logits, as the original does for VOC20)."""

    labels: List[str]
    background: Optional[List[str]]
    text: torch.Tensor
    mode: str

    @property
    def num_classes(self) -> int:
        """C: label values 0..C-1 (with background texts, C is the background class)."""
        return len(self.labels)

    @property
    def names(self) -> List[str]:
        """Name of every label value (with background texts: "background" last)."""
        return list(self.labels) + (["background"] if self.mode == "with_background" else [])


@dataclass
class SemanticSegmentation:
    """One image's result: labels int64 `[H, W]` (index into class_names), the image it refers to (the
    original image, or in the paper protocol the S x S crop), and the number of clusters per window."""

    labels: np.ndarray
    class_names: List[str]
    image: np.ndarray
    clusters: List[int] = field(default_factory=list)

    def counts(self) -> np.ndarray:
        """Pixels per class, int64 `[len(class_names)]`."""
        return np.bincount(self.labels.reshape(-1), minlength=len(self.class_names))

    def fractions(self) -> Dict[str, float]:
        """{class name: fraction of the image's pixels}, for the classes present, largest first."""
        return class_fractions(self.counts(), self.class_names)


def class_fractions(counts: np.ndarray, names: Sequence[str]) -> Dict[str, float]:
    """Pixel counts per class `[K]` -> {name: fraction of all pixels} for the classes present, largest first."""
    total = max(int(counts.sum()), 1)
    order = np.argsort(-counts, kind="stable")
    return {names[i]: round(float(counts[i]) / total, 6) for i in order if counts[i]}


def window_starts(length: int, size: int) -> List[int]:
    """Start offsets of the fewest `size` windows covering `length` (>= size), evenly spaced, first at 0 and
    last at length - size."""
    count = max(1, math.ceil(length / size))
    if count == 1:
        return [0]
    return [round(i * (length - size) / (count - 1)) for i in range(count)]


class SemanticSegmenter:
    """CLIPtrase on a CLIP ViT: `encode_vocabulary` then `segment` images (uint8 RGB `[H, W, 3]`).

    model: a `CLIPtraseSegmenter`; size: S (short side); protocol: "whole" or "paper"; eps / min_samples:
    DBSCAN's (default: the paper's for S = 224 or 336; required for other sizes); precision: "fp32" (the
    original's numbers) or "bf16" (the image and text towers under bfloat16 autocast; post-processing in float32).
    """

    def __init__(self, model, *, size: int = 224, protocol: str = "whole", eps: Optional[float] = None,
                 min_samples: Optional[int] = None, precision: str = "fp32"):
        check_precision(precision, model.visual.conv1.weight.device)
        if protocol not in PROTOCOLS:
            raise ClipvisError(f"unknown protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
        eps, min_samples = dbscan_settings(size, model.patch_size, eps, min_samples)
        self.model = model.eval()
        self.size, self.protocol = int(size), protocol
        self.eps, self.min_samples = eps, min_samples
        self.precision = precision

    @classmethod
    def from_open_clip(cls, model_name: str = DEFAULT_CLIP_MODEL, weights: Optional[str] = "openai",
                       device: str = "cpu", **kwargs) -> "SemanticSegmenter":
        """Build on an open_clip ViT: `weights` an open_clip pretrained tag already in the local cache, a local
        file of OpenAI-format weights (OpenAI's release, the original's CLIP copy; run with QuickGELU), or None
        for random weights (only to try the pipeline). Checked before anything is built: the model must have a
        ViT tower."""
        from clipvis.inference.predictor import resolve_device

        check_precision(kwargs.get("precision", "fp32"), resolve_device(device))  # before the weights are read
        model = build_clip_vit(model_name, weights)
        from clipvis.modeling.cliptrase import CLIPtraseSegmenter
        import open_clip

        segmenter = CLIPtraseSegmenter(model.to(device).eval(), open_clip.get_tokenizer(model_name))
        return cls(segmenter, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    # ------------------------------------------------------------------ vocabulary
    @torch.no_grad()
    def encode_vocabulary(self, labels: Sequence[str], background: Optional[Sequence[str]] = None,
                          mode: Optional[str] = None) -> SemanticVocabulary:
        """Class texts (+ background texts) -> `SemanticVocabulary` (80 templates each, as the original)."""
        labels = [str(t) for t in labels]
        if not labels:
            raise ClipvisError("the vocabulary is empty: give at least one class")
        lowered = [t.strip().lower() for t in labels]
        duplicates = sorted({t for t in lowered if lowered.count(t) > 1})
        if duplicates:
            raise ClipvisError(f"classes given twice: {', '.join(duplicates)}; name each class once")
        background = [str(t) for t in background] if background else None
        mode = mode or ("with_background" if background else "plain")
        texts = labels + (background or [])
        with self._autocast():
            text = self.model.encode_text(texts).float().to(self.device)
        return SemanticVocabulary(labels, background, text, mode)

    # ------------------------------------------------------------------ images
    def windows(self, image: np.ndarray) -> np.ndarray:
        """The S x S inputs of an image, uint8 `[N, S, S, 3]`: the paper's crop (N = 1), or the windows laid along
        the long side of the image resized to short side S (whole protocol)."""
        image = _check_image(image, self.model.patch_size)
        if self.protocol == "paper":
            from clipvis.inference.cliptrase_preprocess import preprocess_image

            return preprocess_image(Image.fromarray(image), self.size)[None]
        h, w = image.shape[:2]
        rh, rw, tall, starts = self._whole_geometry(h, w)
        resized = np.asarray(Image.fromarray(image).resize((rw, rh), Image.BICUBIC)) if (rh, rw) != (h, w) else image
        return np.stack([resized[s:s + self.size] if tall else resized[:, s:s + self.size] for s in starts])

    def _whole_geometry(self, height: int, width: int) -> Tuple[int, int, bool, List[int]]:
        """The whole protocol's layout: (resized height, resized width, whether the long side is the height,
        window starts along the long side)."""
        from clipvis.inference.cliptrase_preprocess import resized_size

        rh, rw = resized_size(height, width, self.size)
        tall = rh > rw
        return rh, rw, tall, window_starts(rh if tall else rw, self.size)

    @torch.no_grad()
    def segment(self, image: np.ndarray, vocabulary: SemanticVocabulary) -> SemanticSegmentation:
        """uint8 RGB `[H, W, 3]` -> `SemanticSegmentation` (see the protocols in the module docstring)."""
        image = _check_image(image, self.model.patch_size)
        windows = self.windows(image)
        window_labels, clusters = self._segment_windows(windows, vocabulary)
        if self.protocol == "paper":
            return SemanticSegmentation(window_labels[0], vocabulary.names, windows[0], clusters)
        h, w = image.shape[:2]
        rh, rw, tall, starts = self._whole_geometry(h, w)
        long_side = rh if tall else rw
        # every position along the long side takes the window whose centre is nearest
        centres = np.asarray(starts) + self.size / 2
        owner = np.abs(np.arange(long_side)[:, None] + 0.5 - centres[None]).argmin(axis=1)
        offset = np.arange(long_side) - np.asarray(starts)[owner]
        merged = window_labels[owner, offset] if tall else window_labels[owner, :, offset].T
        labels = merged
        if merged.shape != (h, w):
            labels = np.asarray(Image.fromarray(merged.astype(np.int32), mode="I").resize((w, h), Image.NEAREST))
        return SemanticSegmentation(labels.astype(np.int64), vocabulary.names, image, clusters)

    @torch.no_grad()
    def segment_crop(self, crop: np.ndarray, vocabulary: SemanticVocabulary) -> np.ndarray:
        """An already resized and cropped uint8 `[S, S, 3]` image (the paper's protocol) -> labels int64 `[S, S]`."""
        if crop.shape != (self.size, self.size, 3):
            raise ClipvisError(f"a crop must be [{self.size}, {self.size}, 3], got {tuple(crop.shape)}")
        return self._segment_windows(np.ascontiguousarray(crop)[None], vocabulary)[0][0]

    def _autocast(self):
        import contextlib

        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _segment_windows(self, windows: np.ndarray, vocabulary: SemanticVocabulary) -> Tuple[np.ndarray, List[int]]:
        """uint8 `[N, S, S, 3]` -> (labels int64 `[N, S, S]`, clusters per window)."""
        from clipvis.inference.cliptrase_postprocess import segment_image
        from clipvis.inference.cliptrase_preprocess import to_input_tensor

        with self._autocast():
            tokens, attn = self.model.encode_image(to_input_tensor(windows).to(self.device))
        out, clusters = [], []
        for i in range(len(windows)):
            seg = segment_image(tokens[i].float().cpu(), attn[i].float().cpu(), vocabulary.text.float().cpu(),
                                self.model.logit_scale, vocabulary.num_classes, self.size, vocabulary.mode,
                                self.eps, self.min_samples)
            out.append(seg.pred_final.numpy())
            clusters.append(int(seg.n_clusters))
        return np.stack(out).astype(np.int64), clusters


def dbscan_settings(size: int, patch: int, eps: Optional[float], min_samples: Optional[int]) -> Tuple[float, int]:
    """Check S against the patch size and fill in DBSCAN's (eps, min_samples): the paper's for S = 224 or 336 where
    not given; ClipvisError for another S without both, or values out of range."""
    if size < patch or size % patch:
        raise ClipvisError(f"size {size} must be a positive multiple of the model's {patch}-pixel patch")
    if eps is None or min_samples is None:
        if size not in PAPER_SETTINGS:
            raise ClipvisError(
                f"no DBSCAN setting is known for size {size}: give eps and min_samples (the paper's: "
                + ", ".join(f"{s} -> eps {e}, min_samples {m}" for s, (e, m) in PAPER_SETTINGS.items()) + ")")
        default_eps, default_min = PAPER_SETTINGS[size]
        eps = default_eps if eps is None else eps
        min_samples = default_min if min_samples is None else min_samples
    if not (eps > 0 and math.isfinite(eps)) or int(min_samples) < 1:
        raise ClipvisError(f"DBSCAN needs eps > 0 and min_samples >= 1, got eps {eps}, min_samples {min_samples}")
    return float(eps), int(min_samples)


def check_settings(model_name: str, weights: Optional[str], size: int, eps: Optional[float],
                   min_samples: Optional[int]) -> None:
    """Everything `from_open_clip` would refuse that can be checked before building: the model and weights
    (`check_clip_vit`), S and DBSCAN's settings (`dbscan_settings`)."""
    patch, _ = check_clip_vit(model_name, weights)
    dbscan_settings(size, patch, eps, min_samples)


def _check_image(image, patch: int) -> np.ndarray:
    if torch.is_tensor(image):
        image = image.cpu().numpy()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ClipvisError(f"an image must be uint8 RGB [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if min(image.shape[:2]) < patch:
        raise ClipvisError(f"the image is {image.shape[1]}x{image.shape[0]}, smaller than one {patch}-pixel patch")
    return np.ascontiguousarray(image)


def check_clip_vit(model_name: str, weights: Optional[str]) -> Tuple[int, Optional[Path]]:
    """Cheap checks before anything is built: `model_name` is an open_clip model with a ViT image tower, and
    `weights` a local file or an open_clip tag in the local cache. Returns (patch size, weights file or None)."""
    import open_clip

    from clipvis.config.open_clip_models import register_open_clip_configs
    from clipvis.modeling.clip_backbone import _resolve_pretrained

    register_open_clip_configs()  # our tiny ViT (clipvis_tiny_vit) for tests and quick tries
    if model_name not in open_clip.list_models():
        raise ClipvisError(f"unknown CLIP model {model_name!r}; use an open_clip ViT such as ViT-B-16, ViT-L-14 or ViT-H-14")
    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    if "timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple)):
        raise ClipvisError(f"CLIP model {model_name!r} has no ViT image tower (CLIPtrase needs one): use e.g. ViT-B-16")
    path = _resolve_pretrained(model_name, weights) if weights else None
    return int(vision.get("patch_size", 16)), path


def build_clip_vit(model_name: str, weights: Optional[str]):
    """An open_clip CLIP model with a ViT image tower and `weights` loaded (see `from_open_clip`); ClipvisError for
    a model without a ViT tower, weights that are neither a file nor a cached tag, or weights of another model."""
    import open_clip

    from clipvis.modeling.clip_backbone import _quiet_open_clip

    _, path = check_clip_vit(model_name, weights)
    # OpenAI's weights (the tag, or a local file in their format, as the original's CLIP copy) use QuickGELU;
    # other open_clip tags name their own activation (models with it end in -quickgelu)
    openai_format = weights == "openai" or (weights is not None and Path(weights).expanduser().is_file())
    with _quiet_open_clip():
        model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=openai_format)
    if path is not None:
        try:
            open_clip.load_checkpoint(model, str(path))
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CheckpointError(f"the CLIP weights {path} do not fit {model_name} ({first[:200]}); give the weights "
                                  "of that model, or the --clip-model they belong to") from None
    return model
