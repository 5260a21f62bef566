"""CLIPtrase post-processing: from image-tower tokens and the block correlation map to a label map.

Per image: recalibrate the correlation map, patch logits against the text features, bilinear upsample,
(VOC20 only: multiply by the CLS logits), argmax, background mapping, DBSCAN on the recalibrated rows,
one map per cluster (mean rows, bilinear x4, 7x7 median, bilinear to S x S, argmax), and a majority vote
of the pixel prediction inside each cluster's region. Tie rules follow the original: argmaxes take the
first index, the vote takes the smallest of the tied values.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from clipvis.data.semseg import MODES  # the original's code paths; each dataset's is registered with it
from clipvis.errors import ClipvisError


class CLIPtraseModeError(ClipvisError):
    """An unknown CLIPtrase mode, or background texts given where the mode has none."""


def check_mode(mode: str) -> str:
    """`mode` if it is one of MODES, else CLIPtraseModeError."""
    if mode not in MODES:
        raise CLIPtraseModeError(f"unknown CLIPtrase mode {mode!r}; use one of {', '.join(MODES)}")
    return mode


def recalibrate(attn: torch.Tensor) -> torch.Tensor:
    """Correlation map [..., hw + 1, hw + 1] (CLS first) -> recalibrated patch map [..., hw, hw]:
    R[i, j] = A[1 + i, 1 + j] - A[0, 1 + j], negative entries set to 0 (not symmetric)."""
    return (attn[..., 1:, 1:] - attn[..., :1, 1:]).clamp_min(0)


def patch_logits(tokens: torch.Tensor, text: torch.Tensor, logit_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B, hw + 1, D] (CLS first), text features [C', D] ->
    (patch logits [B, C', p, p], CLS logits [B, C']), both times logit_scale."""
    b, t, _ = tokens.shape
    grid = int(round((t - 1) ** 0.5))
    if grid * grid != t - 1:
        raise AssertionError(f"{t - 1} patch tokens are not a square grid")
    logits = (tokens @ text.t()) * logit_scale                     # [B, hw + 1, C']
    return logits[:, 1:].transpose(1, 2).reshape(b, -1, grid, grid), logits[:, 0]


def pixel_logits(patch: torch.Tensor, size: int, cls_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Patch logits [B, C', p, p] -> pixel logits [B, C', S, S] (bilinear, align_corners=False); with
    ``cls_logits`` [B, C'] (VOC20 mode) each upsampled class map is multiplied by its CLS logit."""
    up = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False)
    if cls_logits is not None:
        up = up * cls_logits[:, :, None, None]
    return up


def map_background(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Background mode: every index >= C (a background text) becomes C. Any shape, integer tensor."""
    return pred.clamp_max(num_classes)


def pixel_prediction(logits: torch.Tensor, num_classes: int, mode: str) -> torch.Tensor:
    """Pixel logits [..., C', S, S] -> prediction [..., S, S] (int64): argmax (first on ties), then the
    background mapping in 'with_background' mode."""
    pred = logits.argmax(dim=-3)
    return map_background(pred, num_classes) if check_mode(mode) == "with_background" else pred


def dbscan_labels(recalibrated: torch.Tensor | np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Recalibrated map [hw, hw] -> DBSCAN labels [hw] (int64, -1 = noise), scikit-learn's DBSCAN with its
    defaults (euclidean, algorithm auto, leaf_size 30) on the rows as float32."""
    from sklearn.cluster import DBSCAN

    rows = recalibrated.detach().cpu().numpy() if torch.is_tensor(recalibrated) else np.asarray(recalibrated)
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return DBSCAN(eps=eps, min_samples=min_samples).fit_predict(rows).astype(np.int64)


@dataclass
class ClusterMaps:
    """Per-cluster maps of one image (n = number of clusters, labels 0..n-1)."""

    mean: torch.Tensor       # [n, p, p] mean of the cluster's rows of R
    up4: torch.Tensor        # [n, 4p, 4p] bilinear x4
    median: torch.Tensor     # [n, 4p, 4p] scipy 7x7 median filter (reflect), float32
    argmax: torch.Tensor     # [S, S] int64, index of the highest map after bilinear to S x S


def cluster_maps(recalibrated: torch.Tensor, labels: np.ndarray, size: int) -> ClusterMaps:
    """Recalibrated map [hw, hw], DBSCAN labels [hw] with at least one cluster, output size S -> ClusterMaps."""
    from scipy.ndimage import median_filter

    hw = recalibrated.shape[-1]
    grid = int(round(hw ** 0.5))
    labels_t = torch.as_tensor(labels, dtype=torch.long, device=recalibrated.device)
    n = int(labels_t.max()) + 1
    if n < 1:
        raise AssertionError("cluster_maps needs at least one cluster")
    mean = torch.stack([recalibrated[labels_t == c].mean(dim=0) for c in range(n)]).reshape(n, grid, grid)
    up4 = F.interpolate(mean[None], size=(4 * grid, 4 * grid), mode="bilinear", align_corners=False)[0]
    up4_np = up4.detach().cpu().numpy().astype(np.float32)
    median_np = np.stack([median_filter(m, size=7) for m in up4_np])
    median = torch.from_numpy(median_np).to(recalibrated.device)
    full = F.interpolate(median[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return ClusterMaps(mean=mean, up4=up4, median=median, argmax=full.argmax(dim=0))


@dataclass
class VoteResult:
    """The vote's outcome: ``pred`` [S, S] and, per non-empty cluster region, the winner."""

    pred: torch.Tensor
    chosen: dict[int, int] = field(default_factory=dict)
    margins: dict[int, int] = field(default_factory=dict)    # top count minus the second (count if alone)


def majority_vote(pred: torch.Tensor, region: torch.Tensor, num_regions: int) -> VoteResult:
    """Pixel prediction [S, S] (values >= 0) and cluster region map [S, S] (values 0..n-1) -> every
    pixel of a region gets the region's most frequent prediction, ties to the smallest value. Vectorised:
    one bincount over region * V + prediction."""
    p = pred.reshape(-1).long().cpu().numpy()
    r = region.reshape(-1).long().cpu().numpy()
    if p.size and p.min() < 0:
        raise AssertionError("predictions must be non-negative")
    values = int(p.max()) + 1 if p.size else 1
    counts = np.bincount(r * values + p, minlength=num_regions * values).reshape(num_regions, values)
    winner = counts.argmax(axis=1)                     # first maximum = smallest tied value
    present = counts.sum(axis=1) > 0
    out = torch.from_numpy(winner[r]).reshape(pred.shape).to(pred.device, pred.dtype)
    top2 = np.sort(counts, axis=1)[:, ::-1]
    margins = top2[:, 0] - (top2[:, 1] if values > 1 else 0)
    chosen = {int(c): int(winner[c]) for c in np.flatnonzero(present)}
    return VoteResult(pred=out, chosen=chosen, margins={c: int(margins[c]) for c in chosen})


@dataclass
class ImageSegmentation:
    """Everything computed for one image (labels and maps in the original's conventions)."""

    patch_logits: torch.Tensor        # [C', p, p]
    cls_logits: torch.Tensor          # [C']
    pred_pixel: torch.Tensor          # [S, S] int64
    dbscan_labels: np.ndarray         # [hw] int64
    n_clusters: int
    clusters: ClusterMaps | None      # None when DBSCAN finds no cluster
    vote: VoteResult | None
    pred_final: torch.Tensor          # [S, S] int64


def segment_image(tokens: torch.Tensor, attn: torch.Tensor, text: torch.Tensor, logit_scale: float,
                  num_classes: int, size: int, mode: str, eps: float, min_samples: int) -> ImageSegmentation:
    """One image -> ImageSegmentation.

    tokens [hw + 1, D] (L2-normalised, CLS first), attn: the second-to-last block's correlation map
    [hw + 1, hw + 1], text [C', D] (C classes, then background texts in 'with_background' mode),
    num_classes C, output size S, mode ('with_background', 'voc20', 'plain'), DBSCAN eps and min_samples."""
    check_mode(mode)
    if mode != "with_background" and text.shape[0] != num_classes:
        raise CLIPtraseModeError(f"mode {mode!r} uses no background texts: got {text.shape[0]} text features "
                                 f"for {num_classes} classes")
    patch, cls = patch_logits(tokens[None], text, logit_scale)
    logits = pixel_logits(patch, size, cls if mode == "voc20" else None)[0]
    pred = pixel_prediction(logits, num_classes, mode)
    recal = recalibrate(attn)
    labels = dbscan_labels(recal, eps, min_samples)
    n = int(labels.max()) + 1 if labels.size else 0
    clusters = vote = None
    final = pred
    if n > 0:
        clusters = cluster_maps(recal, labels, size)
        vote = majority_vote(pred, clusters.argmax, n)
        final = vote.pred
    return ImageSegmentation(patch_logits=patch[0], cls_logits=cls[0], pred_pixel=pred, dbscan_labels=labels,
                             n_clusters=n, clusters=clusters, vote=vote, pred_final=final)
