"""Final score fusion and instance selection of CLIP-VIS video inference.

After tracking and per-frame open-vocabulary classification, each tracked query ``q`` has, for
every frame ``t``: class logits ``[K]``, a predicted mask IoU, object logits ``[2]`` (object,
no-object) and a stride-4 mask. This module turns them into the video's instances:

* score fusion: ``final[q, k] = sqrt( mean_t sqrt(softmax_t[q, k] * iou[q, t]) * obj[q] )`` where
  ``obj[q]`` is the object probability of the MEAN object logits over frames;
* selection: the ``num`` best (query, class) pairs over the flattened ``[Q, K]`` scores;
* per-frame suppression: a frame's mask becomes all ``-1`` when
  ``sqrt(sigmoid(softmax_t[q, k]) * obj_t[q]) < 0.1 * score``. The sigmoid is applied to a
  probability (a quirk of the original, reproduced on purpose);
* mask score: mean of ``sigmoid(logit)`` over the positive pixels of the kept frames (+1e-6 in
  the denominator); the instance score is ``score * mask score``.

Everything is also available in a streaming form that needs only small per-(query, frame)
statistics instead of all masks: :class:`ClassScoreAccumulator` for the fusion and
:func:`per_frame_mask_stats` + :func:`frame_keep` + :func:`mask_scores` for the mask scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clipvis.errors import ClipvisError

__all__ = [
    "SUPPRESSION_RATIO",
    "MASK_SCORE_EPS",
    "fuse_class_scores",
    "ClassScoreAccumulator",
    "top_query_class_pairs",
    "frame_keep",
    "mask_scores",
    "per_frame_mask_stats",
    "select_instances",
    "compare_instance_sets",
]

SUPPRESSION_RATIO = 0.1
"""A frame is suppressed when its per-frame score is below this fraction of the pair's score."""

MASK_SCORE_EPS = 1e-6
"""Added to the positive-pixel count in the mask score's denominator."""


def _object_probability(object_logits: Tensor) -> Tensor:
    """[..., 2] (object, no-object) logits -> [..., 1] probability of "object" (softmax without the last entry)."""
    return F.softmax(object_logits, dim=-1)[..., :-1]


def fuse_class_scores(
    per_frame_class_logits: Tensor, per_frame_ious: Tensor, per_frame_object_logits: Tensor
) -> tuple[Tensor, Tensor]:
    """Fuse per-frame classification, mask-IoU and objectness into one score per (query, class).

    Args:
        per_frame_class_logits: [Q, T, K] class logits of each tracked query in each frame.
        per_frame_ious: [Q, T, 1] predicted mask IoUs.
        per_frame_object_logits: [Q, T, 2] (object, no-object) logits.
    Returns:
        ``(final_cls_score [Q, K], per_frame_cls_prob [Q, T, K])`` where ``per_frame_cls_prob`` is
        the per-frame softmax over classes and ``final_cls_score`` is
        ``sqrt(mean_t sqrt(prob * iou) * object_prob(mean_t object_logits))``.
    """
    _check_fusion_shapes(per_frame_class_logits, per_frame_ious, per_frame_object_logits)
    per_frame_cls_prob = per_frame_class_logits.softmax(-1)
    quality = ((per_frame_cls_prob * per_frame_ious) ** 0.5).mean(1)  # [Q, K]
    mean_object_logits = per_frame_object_logits.sum(1) / per_frame_object_logits.shape[1]  # [Q, 2]
    final_cls_score = (quality * _object_probability(mean_object_logits)) ** 0.5
    return final_cls_score, per_frame_cls_prob


def _check_fusion_shapes(class_logits: Tensor, ious: Tensor, object_logits: Tensor) -> None:
    """Raise ClipvisError unless the three inputs share their leading dims and have trailing 1 / 2."""
    lead = class_logits.shape[:-1]
    if ious.shape != (*lead, 1) or object_logits.shape != (*lead, 2):
        raise AssertionError(
            f"score fusion got class logits {tuple(class_logits.shape)}, ious {tuple(ious.shape)} and object logits "
            f"{tuple(object_logits.shape)}; expected [..., K], [..., 1] and [..., 2] with the same leading dims"
        )


class ClassScoreAccumulator:
    """Streaming :func:`fuse_class_scores`: add one frame at a time, keep only running sums.

    Memory is ``O(Q * K)`` whatever the video length. ``finalize()`` equals the whole-video
    ``fuse_class_scores(...)[0]`` within float rounding.
    """

    def __init__(self) -> None:
        self.num_frames = 0
        self._quality_sum: Tensor | None = None  # [Q, K] sum over frames of sqrt(prob * iou)
        self._object_logit_sum: Tensor | None = None  # [Q, 2]

    def add_frame(self, class_logits: Tensor, iou: Tensor, object_logits: Tensor) -> Tensor:
        """Add one frame of tracked queries.

        Args:
            class_logits: [Q, K] class logits; iou: [Q, 1] predicted mask IoU; object_logits: [Q, 2].
        Returns:
            [Q, K] this frame's class probabilities (softmax), which the caller may keep for
            :func:`frame_keep`.
        """
        _check_fusion_shapes(class_logits, iou, object_logits)
        if self._quality_sum is not None and class_logits.shape != self._quality_sum.shape:
            raise AssertionError(
                f"frame class logits have shape {tuple(class_logits.shape)} but earlier frames had "
                f"{tuple(self._quality_sum.shape)}; every frame needs the same queries and vocabulary"
            )
        prob = class_logits.softmax(-1)
        quality = (prob * iou) ** 0.5
        if self._quality_sum is None:
            self._quality_sum = quality.clone()
            self._object_logit_sum = object_logits.clone()
        else:
            self._quality_sum += quality
            self._object_logit_sum += object_logits
        self.num_frames += 1
        return prob

    def finalize(self) -> Tensor:
        """-> [Q, K] final class scores of the frames added so far."""
        if self._quality_sum is None:
            raise AssertionError("ClassScoreAccumulator.finalize() called before any frame was added")
        quality = self._quality_sum / self.num_frames
        mean_object_logits = self._object_logit_sum / self.num_frames
        return (quality * _object_probability(mean_object_logits)) ** 0.5


def top_query_class_pairs(final_cls_score: Tensor, num: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``num`` best (query, class) pairs of the flattened score matrix.

    Args:
        final_cls_score: [Q, K] fused scores.
        num: how many pairs (TEST.DETECTIONS_PER_IMAGE); capped at ``Q * K``.
    Returns:
        ``(scores [N], classes [N], query_indices [N])``. The set is the one the original's
        unsorted top-k picks (ties resolved the same way); it is returned ordered by
        decreasing score.
    """
    if final_cls_score.dim() != 2:
        raise AssertionError(f"final class scores must be [Q, K], got shape {tuple(final_cls_score.shape)}")
    if int(num) < 1:
        raise ClipvisError(f"number of instances per video must be at least 1, got {num}; set TEST.DETECTIONS_PER_IMAGE")
    num_classes = final_cls_score.shape[1]
    flat = final_cls_score.flatten()
    scores, flat_indices = flat.topk(min(int(num), flat.numel()), sorted=False)
    order = torch.sort(scores, descending=True, stable=True).indices
    scores, flat_indices = scores[order], flat_indices[order]
    classes = flat_indices % num_classes
    query_indices = torch.div(flat_indices, num_classes, rounding_mode="trunc")
    return scores, classes, query_indices


def frame_keep(
    per_frame_cls_prob_of_pairs: Tensor, per_frame_object_logits_of_pairs: Tensor, scores: Tensor
) -> Tensor:
    """Which frames of each selected pair keep their mask.

    Args:
        per_frame_cls_prob_of_pairs: [N, T] per-frame softmax probability of the pair's class.
        per_frame_object_logits_of_pairs: [N, T, 2] per-frame object logits of the pair's query.
        scores: [N] the pairs' fused scores.
    Returns:
        bool [N, T]: False where ``sqrt(sigmoid(prob) * object_prob) < 0.1 * score`` (the original
        then sets that frame's mask logits to -1). The sigmoid of a probability is the original's.
    """
    object_prob = _object_probability(per_frame_object_logits_of_pairs).squeeze(-1)  # [N, T]
    per_frame_score = (per_frame_cls_prob_of_pairs.sigmoid() * object_prob) ** 0.5
    return ~(per_frame_score < scores[:, None] * SUPPRESSION_RATIO)


def per_frame_mask_stats(mask_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Statistics of mask logits that the mask score needs.

    Args:
        mask_logits: [..., h, w] stride-4 mask logits.
    Returns:
        ``(sigmoid_sums [...], positive_counts [...])``: the sum of ``sigmoid(logit)`` over pixels
        with ``logit > 0``, and the number of such pixels (float, the logits' dtype).
    """
    positive = mask_logits > 0
    sigmoid_sums = (mask_logits.sigmoid() * positive).sum(dim=(-2, -1))
    positive_counts = positive.sum(dim=(-2, -1)).to(mask_logits.dtype)
    return sigmoid_sums, positive_counts


def mask_scores(sigmoid_sums: Tensor, positive_counts: Tensor, keep: Tensor) -> Tensor:
    """Mask score of each pair: mean sigmoid over the positive pixels of its kept frames.

    Args:
        sigmoid_sums, positive_counts: [N, T] from :func:`per_frame_mask_stats` of each pair's
            (unsuppressed) masks.
        keep: bool [N, T] from :func:`frame_keep`; suppressed frames (all -1) count nothing.
    Returns:
        [N]: ``sum_kept sigmoid_sums / (sum_kept positive_counts + 1e-6)``.
    """
    kept = keep.to(sigmoid_sums.dtype)
    return (sigmoid_sums * kept).sum(-1) / ((positive_counts * kept).sum(-1) + MASK_SCORE_EPS)


def select_instances(
    final_cls_score: Tensor,
    per_frame_cls_prob: Tensor,
    per_frame_object_logits: Tensor,
    masks: Tensor,
    num: int,
) -> dict:
    """Whole-video instance selection.

    Args:
        final_cls_score: [Q, K] from :func:`fuse_class_scores`.
        per_frame_cls_prob: [Q, T, K] per-frame class softmax.
        per_frame_object_logits: [Q, T, 2] per-frame object logits (tracked).
        masks: [Q, T, h, w] tracked stride-4 mask logits.
        num: instances per video (TEST.DETECTIONS_PER_IMAGE).
    Returns:
        dict with ``scores [N]`` (class score x mask score), ``pred_classes [N]``,
        ``query_indices [N]``, ``frame_keep`` bool ``[N, T]`` and ``pred_masks [N, T, h, w]``
        (the pair's query masks, suppressed frames set to -1); ordered by decreasing final score.
    """
    num_queries, num_frames, _ = per_frame_cls_prob.shape
    if (
        final_cls_score.shape != (num_queries, per_frame_cls_prob.shape[2])
        or per_frame_object_logits.shape != (num_queries, num_frames, 2)
        or masks.dim() != 4
        or masks.shape[:2] != (num_queries, num_frames)
    ):
        raise AssertionError(
            f"select_instances got final scores {tuple(final_cls_score.shape)}, per-frame probs "
            f"{tuple(per_frame_cls_prob.shape)}, object logits {tuple(per_frame_object_logits.shape)} and masks "
            f"{tuple(masks.shape)}; expected [Q, K], [Q, T, K], [Q, T, 2] and [Q, T, h, w]"
        )
    scores, classes, query_indices = top_query_class_pairs(final_cls_score, num)
    prob_of_pairs = per_frame_cls_prob[query_indices, :, classes]  # [N, T]
    keep = frame_keep(prob_of_pairs, per_frame_object_logits[query_indices], scores)

    pred_masks = masks[query_indices]  # [N, T, h, w], a copy (advanced indexing)
    pred_masks[~keep] = -1
    sigmoid_sums, positive_counts = per_frame_mask_stats(pred_masks)
    final_scores = scores * mask_scores(sigmoid_sums, positive_counts, keep)
    order = torch.sort(final_scores, descending=True, stable=True).indices
    return {
        "scores": final_scores[order],
        "pred_classes": classes[order],
        "query_indices": query_indices[order],
        "frame_keep": keep[order],
        "pred_masks": pred_masks[order],
    }


def compare_instance_sets(
    masks: Tensor, classes: Tensor, reference_masks: Tensor, reference_classes: Tensor
) -> dict:
    """How close one video's final instances are to a reference set (e.g. bf16 inference vs fp32).

    Args:
        masks: `[N, ...]` bool (or logits, binarised at > 0) masks of the instances, any per-instance shape
            (e.g. `[N, T, h, w]`); classes: `[N]` class indices.
        reference_masks, reference_classes: the same for the reference set, `[M, ...]` and `[M]`.
    Returns:
        `{"matched": min(N, M), "class_agreement": fraction of matched pairs with the same class,
        "mean_iou": mean mask IoU over matched pairs, "min_iou": the smallest}`. Instances are paired one
        to one by a Hungarian matching that maximises the summed mask IoU (a small bonus for the same class
        breaks ties between the entries of one query with several classes); two empty masks have IoU 1.
    """
    from scipy.optimize import linear_sum_assignment

    a = (masks > 0 if masks.dtype != torch.bool else masks).flatten(1).float()
    b = (reference_masks > 0 if reference_masks.dtype != torch.bool else reference_masks).flatten(1).float()
    if len(a) == 0 or len(b) == 0:
        return {"matched": 0, "class_agreement": 1.0, "mean_iou": 1.0, "min_iou": 1.0}
    intersection = a @ b.T
    union = a.sum(1, keepdim=True) + b.sum(1)[None] - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
    same = (classes.view(-1, 1) == reference_classes.view(1, -1)).float()
    rows, cols = linear_sum_assignment((-(iou + 1e-3 * same)).double().numpy())
    matched_iou = iou[rows, cols]
    return {
        "matched": len(rows),
        "class_agreement": float(same[rows, cols].mean()),
        "mean_iou": float(matched_iou.mean()),
        "min_iou": float(matched_iou.min()),
    }
