"""`VideoPredictor`: the public API for video inference.

    predictor = VideoPredictor.from_config(load_config(builtin_config("clipvis_video_ConvNeXt-B.yaml")), "model.pth")
    result = predictor.predict(frames, "person; dog, puppy; red car")   # frames: uint8 [T,H,W,3]
    result.scores, result.class_names, result.masks()                   # masks: bool [N,T,H,W]

The video is streamed by `clipvis.inference.streaming.stream_video` in windows of `window_size` frames, which are
resized and padded together as in the original; `ClipVisVideoStep` then runs each frame through the model, the
tracker and the CLIP head as soon as it is decoded, and keeps only compact per-(query, frame) statistics:
the class probabilities, object logits and IoUs, two numbers summarising each stride-4 mask, and each
query's mask at output resolution as a COCO RLE. Memory therefore does not grow with frames x queries x
pixels, and the final instance selection is exactly the original's (see `instance_selection`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from clipvis.errors import ClipvisError
from clipvis.data.video import progress_enabled
from clipvis.inference.instance_selection import (
    ClassScoreAccumulator,
    frame_keep,
    mask_scores,
    per_frame_mask_stats,
    top_query_class_pairs,
)
from clipvis.inference.onednn_linear import mkl_skips_avx512, use_onednn_linears
from clipvis.inference.precision import check_precision, precision_context, store_autocast_layers_in_bf16
from clipvis.mask_encoding import decode_rle, encode_rles, logits_to_output_masks
from clipvis.inference.streaming import Frames, StageTimer, as_uint8_frames, stream_video
from clipvis.memory import page_out, release_freed_memory
from clipvis.modeling.meta_arch import ClipVis
from clipvis.modeling.text_classifier import (
    PROMPT_TEMPLATES,
    Vocabulary,
    encode_vocabulary,
    mask_class_logits,
    parse_vocabulary,
)
from clipvis.modeling.tracker import TemporalTopKTracker

log = logging.getLogger(__name__)

# Frames the backbone takes at once, per precision (the decoder always takes one). bf16's products are bound by
# reading the weights, which a batch shares (2 frames: 0.158 -> 0.117 s/frame; 4: 0.129, the activations leave
# the cache); fp32 gains nothing (README "Speed" has the measurements).
FRAMES_PER_BACKBONE_FORWARD = {"fp32": 1, "bf16": 2}

# Queries whose masks are upsampled to output resolution at once (bounds peak memory at high resolution).
UPSAMPLE_CHUNK = 16


@dataclass
class VideoPrediction:
    """The instances found in one video, sorted by score (highest first).

    scores `[N]`, classes `[N]` (0-based index into the vocabulary), class_names (N strings),
    rles: N lists of T COCO RLEs at output resolution (None where the instance is absent),
    query_indices `[N]` (which decoder query / track each instance is), height, width, num_frames,
    mask_logits `[N,T,h4,w4]`: the original's stride-4 mask logits of the padded input (only when
    requested with `keep_mask_logits=True`; suppressed frames hold -1 as in the original),
    track_permutations `[T,Q]`: the tracker's permutation of each frame's queries (frame 0: identity),
    timings: seconds per stage.
    """

    scores: torch.Tensor
    classes: torch.Tensor
    class_names: List[str]
    rles: List[List[Optional[dict]]]
    query_indices: torch.Tensor
    height: int
    width: int
    num_frames: int
    mask_logits: Optional[torch.Tensor] = None
    track_permutations: Optional[torch.Tensor] = None
    timings: Dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def masks(self) -> np.ndarray:
        """All instance masks decoded: bool `[N, T, H, W]` at output resolution."""
        out = np.zeros((len(self), self.num_frames, self.height, self.width), dtype=bool)
        for n, track in enumerate(self.rles):
            for t, rle in enumerate(track):
                if rle is not None:
                    out[n, t] = decode_rle(rle)
        return out


class _VideoState:
    """What the streaming engine keeps per video: compact per-(query, frame) statistics."""

    def __init__(self, vocabulary: Vocabulary, output_size: Tuple[int, int], keep_mask_logits: bool):
        self.vocabulary = vocabulary
        self.output_size = output_size
        self.scores = ClassScoreAccumulator()
        self.class_probs: List[torch.Tensor] = []  # T x [Q,K]
        self.object_logits: List[torch.Tensor] = []  # T x [Q,2]
        self.sigmoid_sums: List[torch.Tensor] = []  # T x [Q]
        self.positive_counts: List[torch.Tensor] = []  # T x [Q]
        self.rles: List[List[Optional[dict]]] = []  # T x Q
        self.mask_logits: Optional[List[torch.Tensor]] = [] if keep_mask_logits else None
        self.permutations: List[torch.Tensor] = []  # windows x [w,Q] tracker permutations

    @property
    def num_frames(self) -> int:
        return len(self.rles)

    def add_frame(self, class_logits, iou, object_logits, masks, padded_size, image_size, timer: "StageTimer") -> None:
        """One tracked frame: class logits `[Q,K]`, iou `[Q,1]`, object logits `[Q,2]`, stride-4 masks `[Q,h4,w4]`."""
        with timer("instance selection"):
            probs = self.scores.add_frame(class_logits, iou, object_logits)  # this frame's class softmax [Q,K]
            self.class_probs.append(probs.cpu())
            self.object_logits.append(object_logits.cpu())
            sums, counts = per_frame_mask_stats(masks)
            self.sigmoid_sums.append(sums.cpu())
            self.positive_counts.append(counts.cpu())
            if self.mask_logits is not None:
                self.mask_logits.append(masks.cpu())
        with timer("mask encoding"):
            self._encode_masks(masks, counts, padded_size, image_size)

    def _encode_masks(self, masks, counts, padded_size, image_size) -> None:
        frame_rles: List[Optional[dict]] = [None] * masks.shape[0]
        # A query with no positive stride-4 logit has an empty mask at any resolution (bilinear
        # interpolation is a convex combination), so only the others are upsampled and encoded.
        nonempty = (counts > 0).nonzero().flatten().tolist()
        for i in range(0, len(nonempty), UPSAMPLE_CHUNK):
            chunk = nonempty[i : i + UPSAMPLE_CHUNK]
            binary = logits_to_output_masks(masks[chunk], padded_size, image_size, self.output_size)
            for q, rle in zip(chunk, encode_rles(binary)):
                frame_rles[q] = rle
        self.rles.append(frame_rles)

    def finalize(self, num_instances: int) -> VideoPrediction:
        """The original's instance selection over the whole video -> `VideoPrediction` sorted by score."""
        final_cls_score = self.scores.finalize()
        num = min(num_instances, final_cls_score.numel())
        scores, classes, queries = top_query_class_pairs(final_cls_score, num)
        probs = torch.stack([p[queries, classes] for p in self.class_probs], dim=1)  # [N,T]
        obj = torch.stack([o[queries] for o in self.object_logits], dim=1)  # [N,T,2]
        keep = frame_keep(probs, obj, scores)
        sums = torch.stack(self.sigmoid_sums, dim=1)[queries]
        counts = torch.stack(self.positive_counts, dim=1)[queries]
        final_scores = scores * mask_scores(sums, counts, keep)
        order = torch.sort(final_scores, descending=True, stable=True).indices
        final_scores, classes, queries, keep = final_scores[order], classes[order], queries[order], keep[order]
        rles = [
            [self.rles[t][q] if keep[n, t] else None for t in range(self.num_frames)]
            for n, q in enumerate(queries.tolist())
        ]
        mask_logits = None
        if self.mask_logits is not None:
            mask_logits = torch.stack(self.mask_logits, dim=1)[queries].clone()  # [N,T,h4,w4]
            mask_logits[~keep] = -1.0
        names = self.vocabulary.names
        return VideoPrediction(
            scores=final_scores,
            classes=classes,
            class_names=[names[c] for c in classes.tolist()],
            rles=rles,
            query_indices=queries,
            height=self.output_size[0],
            width=self.output_size[1],
            num_frames=self.num_frames,
            mask_logits=mask_logits,
            track_permutations=torch.cat(self.permutations),
        )


class ClipVisVideoStep:
    """CLIP-VIS's model-specific part of `stream_video`: each window is resized and padded together (as the
    original), then each frame goes through the model, the tracker, the CLIP head and mask encoding before
    the next one, so only one frame's activations and outputs are ever alive (hundreds of MB at 480p,
    whatever the window size). In bf16 the backbone takes two frames at once (`FRAMES_PER_BACKBONE_FORWARD`: they share
    each read of its weights, which bounds bf16's products on CPU); outputs do not depend on it.
    `finish` runs the original's instance selection over the whole video -> `VideoPrediction`."""

    def __init__(self, predictor: "VideoPredictor", vocabulary: Vocabulary, keep_mask_logits: bool = False):
        self.predictor = predictor
        self.vocabulary = vocabulary
        self.keep_mask_logits = keep_mask_logits
        self.tracker = TemporalTopKTracker(memory=predictor.memory, topk=predictor.topk)
        self.state: Optional[_VideoState] = None

    def start(self, frame_size: Tuple[int, int]) -> None:
        """A new video of frames `frame_size` (H, W): outputs are at that size."""
        self.state = _VideoState(self.vocabulary, output_size=tuple(frame_size), keep_mask_logits=self.keep_mask_logits)

    def process_window(self, window: torch.Tensor, timer: StageTimer) -> None:
        """uint8 frames `[w,H,W,3]` -> the state extended by w tracked, classified, encoded frames."""
        predictor, model, vocab, state = self.predictor, self.predictor.model, self.vocabulary, self.state
        with timer("backbone + decoder"):
            resized = predictor._resize(window)
            images, image_size = model.preprocess(resized.permute(0, 3, 1, 2))
        padded_size = tuple(images.shape[-2:])
        permutations = []
        frames_per_forward = FRAMES_PER_BACKBONE_FORWARD[predictor.precision]
        decoded: List[Tuple[Dict[str, torch.Tensor], torch.Tensor]] = []
        for t in range(len(images)):
            if not decoded:
                with timer("backbone + decoder"):
                    decoded = predictor._run_model(images[t : t + frames_per_forward])
            outputs, dense = decoded.pop(0)
            with timer("tracker"):
                index = self.tracker.step(outputs["pred_embds"][0]).to(images.device)  # [Q]
                obj = outputs["pred_object_logits"][0, index]  # [Q,2]
                ious = outputs["pred_ious"][0, index]  # [Q,1]
                masks = outputs["pred_masks"][:, index]  # [1,Q,h4,w4]
            with timer("CLIP head classification"):
                class_logits = mask_class_logits(model.backbone, dense, masks, vocab.classifier, vocab.num_synonyms)
            state.add_frame(class_logits[0], ious, obj, masks[0], padded_size, image_size, timer)
            permutations.append(index.cpu())
        state.permutations.append(torch.stack(permutations))

    def finish(self, timer: StageTimer) -> VideoPrediction:
        """The video's instances, sorted by score."""
        with timer("instance selection"):
            return self.state.finalize(self.predictor.num_instances)




class VideoPredictor:
    """Runs CLIP-VIS over videos: windows of frames -> per-frame decoder -> tracker -> CLIP classification
    -> the original's instance selection.

    model: a `ClipVis` with weights loaded; memory / topk: TEST.NUM_FRAME / TEST.NUM_TOPK;
    num_instances: TEST.DETECTIONS_PER_IMAGE; window_size: frames decoded, resized and padded together (each
    still goes through the decoder alone; outputs do not depend on it); min_size / max_size: INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST (0 = feed frames unresized);
    precision: TEST.PRECISION, "fp32" (the original's numbers) or "bf16" (backbone + decoder under bfloat16
    autocast; deviations measured in README "Speed").
    """

    def __init__(
        self,
        model: ClipVis,
        *,
        memory: int = 9,
        topk: int = 5,
        num_instances: int = 50,
        window_size: int = 10,
        min_size: int = 480,
        max_size: int = 1333,
        text_cache_dir: Optional[Union[str, Path]] = None,
        progress: bool = True,
        precision: str = "fp32",
    ):
        if window_size < 1:
            raise ClipvisError(f"window size must be >= 1, got {window_size}")
        check_precision(precision, model.device)
        self.precision = precision
        self.model = model.eval()
        self.memory, self.topk = memory, topk
        self.num_instances = num_instances
        self.window_size = window_size
        self.min_size, self.max_size = min_size, max_size
        self.text_cache_dir = Path(text_cache_dir) if text_cache_dir else None
        self.progress = progress
        self._vocabularies: Dict[Tuple[Tuple[str, ...], ...], Vocabulary] = {}
        self._text_encoding_s = 0.0  # seconds spent encoding vocabularies since the last predict started

    @classmethod
    def from_model(cls, model: ClipVis, cfg, **kwargs) -> "VideoPredictor":
        """A predictor for an existing model with the config's inference settings (TEST.NUM_FRAME, NUM_TOPK,
        DETECTIONS_PER_IMAGE, WINDOW_SIZE, PRECISION, INPUT.MIN/MAX_SIZE_TEST); `kwargs` override them."""
        settings = dict(
            memory=cfg.TEST.NUM_FRAME,
            topk=cfg.TEST.NUM_TOPK,
            num_instances=cfg.TEST.DETECTIONS_PER_IMAGE,
            window_size=cfg.TEST.WINDOW_SIZE,
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            precision=cfg.TEST.PRECISION,
        )
        return cls(model, **{**settings, **kwargs})

    @classmethod
    def from_config(cls, cfg, weights: Optional[Union[str, Path, dict]] = None, device: Union[str, torch.device] = "cpu", **kwargs) -> "VideoPredictor":
        """Build the model from a config, load `weights` (path or state dict in the original's format; default
        MODEL.WEIGHTS) and move it to `device`. A CLIP-VIS checkpoint carries CLIP's weights, so with `weights`
        the config's open_clip pretrained tag is not loaded (nothing is fetched)."""
        from clipvis.checkpoint import load_checkpoint, parameters_on_meta
        from clipvis.modeling.meta_arch import build_model

        check_precision(kwargs.get("precision", cfg.TEST.PRECISION), resolve_device(device))  # before anything is built
        weights = weights if weights is not None else (cfg.MODEL.WEIGHTS or None)
        with parameters_on_meta() if weights is not None else contextlib.nullcontext():  # all weights come next
            model = build_model(cfg, load_clip_weights=weights is None)
        if weights is None and not cfg.MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS:
            kwargs["text_cache_dir"] = None  # a randomly initialised text tower: caching its embeddings only fills the disk
        if weights is None:
            log.warning("no weights given: the decoder is randomly initialised and its masks are meaningless")
        else:
            load_checkpoint(model, weights)
        model.to(resolve_device(device))
        predictor = cls.from_model(model, cfg, **kwargs)
        # this model is only for inference: cast its bf16 layers once, and run its Linear layers through oneDNN
        # where that is faster than torch's default (bf16 on CPU; fp32 where MKL leaves AVX-512 unused)
        if predictor.precision == "bf16":
            converted = store_autocast_layers_in_bf16(model, predictor._blank_frame_pass, model.device.type)
            release_freed_memory()
            log.info("bf16: %d layers stored in bfloat16", converted)
        onednn_dtype = torch.bfloat16 if predictor.precision == "bf16" else torch.float32 if mkl_skips_avx512() else None
        if onednn_dtype is not None:
            replaced, fused = use_onednn_linears(model, onednn_dtype)
            log.info("%d %s Linear layers run as oneDNN calls, %d with their activation fused", replaced,
                     predictor.precision, fused)
        return predictor

    # ---------------------------------------------------------------- vocabulary
    def encode_vocabulary(self, vocabulary: Union[str, Sequence[str], Vocabulary]) -> Vocabulary:
        """Class names ("person; dog, puppy" or a list; ',' separates synonyms) -> `Vocabulary` with text
        embeddings, cached per vocabulary (in memory, and on disk when `text_cache_dir` is set)."""
        if isinstance(vocabulary, Vocabulary):
            return vocabulary
        classes = parse_vocabulary(vocabulary)
        key = tuple(tuple(c) for c in classes)
        if key not in self._vocabularies:
            backbone = self.model.backbone
            start = time.perf_counter()
            log.info("encoding %d classes (%d prompts)", len(classes), sum(map(len, classes)) * len(PROMPT_TEMPLATES))
            with torch.inference_mode():
                vocab = encode_vocabulary(backbone, vocabulary, self.text_cache_dir, progress=progress_enabled(self.progress))
            vocab.classifier = vocab.classifier.to(self.model.device)
            self._vocabularies[key] = vocab
            self._text_encoding_s += time.perf_counter() - start
            page_out(backbone.text_tensors())  # not needed again until the next vocabulary
        return self._vocabularies[key]

    # ---------------------------------------------------------------- inference
    def predict(
        self,
        frames: Frames,
        vocabulary: Union[str, Sequence[str], Vocabulary],
        *,
        keep_mask_logits: bool = False,
    ) -> VideoPrediction:
        """uint8 RGB frames `[T,H,W,3]` (numpy or torch) + vocabulary -> `VideoPrediction` with masks at `[H,W]`."""
        frames = as_uint8_frames(frames)
        windows = (frames[i : i + self.window_size] for i in range(0, len(frames), self.window_size))
        return self.predict_windows(windows, vocabulary, num_frames=len(frames), keep_mask_logits=keep_mask_logits)

    def predict_windows(
        self,
        windows: Iterable[Frames],
        vocabulary: Union[str, Sequence[str], Vocabulary],
        *,
        num_frames: Optional[int] = None,
        keep_mask_logits: bool = False,
    ) -> VideoPrediction:
        """Streaming form of `predict`: `windows` yields consecutive uint8 frame chunks `[w,H,W,3]` (e.g.
        `VideoSource.windows`); `num_frames` only sizes the progress bar."""
        self._text_encoding_s = 0.0
        vocab = self.encode_vocabulary(vocabulary)
        text_encoding_s = self._text_encoding_s
        step = ClipVisVideoStep(self, vocab, keep_mask_logits=keep_mask_logits)
        with torch.inference_mode():
            result, timings = stream_video(windows, step, window_size=self.window_size, num_frames=num_frames,
                                           progress=self.progress)
        result.timings = ({"text encoding": text_encoding_s} if text_encoding_s else {}) | timings
        return result

    def _run_model(self, images: torch.Tensor) -> List[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
        """Normalized padded frames `[b,3,H,W]` -> per frame (final decoder outputs, clip_vis_dense
        `[1,C,h32,w32]`), float32, at the predictor's precision. The backbone takes the b frames as one batch,
        the decoder one frame at a time; its earlier-layer predictions are not computed into the outputs."""
        model = self.model
        keys = ("pred_object_logits", "pred_masks", "pred_ious", "pred_embds")
        decoded = []
        with model.sem_seg_head.predictor.final_predictions_only(), precision_context(self.precision, images.device):
            features = model.backbone(images)
            for i in range(len(images)):
                frame = {name: feature[i : i + 1] for name, feature in features.items()}
                outputs = model.sem_seg_head(frame)
                decoded.append(({k: outputs[k].float() for k in keys}, frame["clip_vis_dense"].float()))
        return decoded

    def _blank_frame_pass(self) -> None:
        """Run every model layer that `predict` uses, on one small blank frame (to find which run under autocast)."""
        with torch.inference_mode():
            image = torch.zeros(1, 3, 64, 64, device=self.model.device)
            (outputs, dense), = self._run_model(image)
            classifier = torch.zeros(1, self.model.backbone.embed_dim, device=image.device)
            mask_class_logits(self.model.backbone, dense, outputs["pred_masks"], classifier, [1])

    def _resize(self, window: torch.Tensor) -> torch.Tensor:
        """uint8 `[w,H,W,3]` -> resized as the original's test mapper (short side min_size, long side <= max_size)."""
        if self.min_size <= 0:
            return window
        from clipvis.data.video import resize_shortest_edge

        h, w = window.shape[1:3]
        resized = resize_shortest_edge(window.cpu().numpy(), self.min_size, self.max_size)
        if resized.shape[1:3] == (h, w):
            return window
        return torch.from_numpy(resized).to(window.device)


def default_device(model_device: str) -> str:
    """The device when none is asked for: MODEL.DEVICE (detectron2's default "cuda"), or "cpu" when it names
    CUDA and there is none here."""
    device = str(model_device or "cpu")
    return device if device == "cpu" or torch.cuda.is_available() else "cpu"


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' -> torch.device, with a clear error when CUDA is asked for but absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ClipvisError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ClipvisError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ClipvisError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ClipvisError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return dev
