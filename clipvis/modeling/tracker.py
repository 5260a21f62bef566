"""Temporal top-K matching: align each frame's queries to the tracks of the previous frames.

CLIP-VIS runs its decoder frame by frame, so query ``q`` of frame ``t`` need not be the same
object as query ``q`` of frame ``t - 1``. The tracker keeps the query embeddings of the last
``memory`` frames, already put in track order, and finds for every new frame the permutation of
its queries that best fits that memory:

1. For each memory frame ``i`` (0 = oldest) the cost of pairing current query ``a`` with track
   ``b`` is ``1 - cos(current[a], memory_i[b])``; a Hungarian assignment on that cost gives one
   candidate permutation and its total cost.
2. While the memory holds fewer than ``topk`` frames, the candidate of the cheapest frame wins.
3. Otherwise the costs of the ``topk`` cheapest frames, each weighted by its recency ``i + 1``,
   are averaged and the Hungarian assignment is solved once more on the average.

The memory then receives the current embeddings in track order. The first frame defines the
tracks (identity permutation).
"""
from __future__ import annotations

from collections import deque

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from clipvis.errors import ClipvisError

__all__ = ["TemporalTopKTracker", "track_queries", "apply_permutations"]


def _unit_rows(x: Tensor) -> Tensor:
    """[..., C] -> the same rows divided by their L2 norm (no epsilon, as the original)."""
    return x / x.norm(dim=-1, keepdim=True)


def _hungarian(cost_current_by_track: Tensor) -> Tensor:
    """Cost [Q_cur, Q_track] (CPU) -> LongTensor [Q_track]: for each track, the current query assigned.

    The assignment is solved on the transposed matrix (tracks as rows), so entry ``j`` of the
    result is the current query that goes to track ``j``.
    """
    tracks_by_current = cost_current_by_track.t().numpy()
    _, current_of_track = linear_sum_assignment(tracks_by_current)
    return torch.from_numpy(np.asarray(current_of_track, dtype=np.int64))


class TemporalTopKTracker:
    """Streaming temporal top-K matcher: feed one frame's query embeddings at a time.

    Args:
        memory: how many past frames (in track order) are kept to match against (TEST.NUM_FRAME).
        topk: how many of the cheapest memory frames are averaged (TEST.NUM_TOPK).
    """

    def __init__(self, memory: int = 9, topk: int = 5) -> None:
        if int(memory) < 1:
            raise ClipvisError(f"tracker memory must be at least 1 frame, got {memory}; set TEST.NUM_FRAME >= 1")
        if int(topk) < 1:
            raise ClipvisError(f"tracker topk must be at least 1, got {topk}; set TEST.NUM_TOPK >= 1")
        self.memory = int(memory)
        self.topk = int(topk)
        self._unit_memory: deque[Tensor] = deque(maxlen=self.memory)

    def reset(self) -> None:
        """Forget all tracks (call before a new video)."""
        self._unit_memory.clear()

    def step(self, embeddings: Tensor) -> Tensor:
        """Match one frame.

        Args:
            embeddings: [Q, C] query embeddings of the current frame (decoder output order).
        Returns:
            LongTensor [Q] on CPU: ``perm`` such that ``embeddings[perm][j]`` belongs to track ``j``
            (identity on the first frame). The memory is updated with ``embeddings[perm]``.
        """
        if embeddings.dim() != 2:
            raise AssertionError(f"tracker expects one frame's embeddings [Q, C], got shape {tuple(embeddings.shape)}")
        unit_current = _unit_rows(embeddings.detach())
        if not self._unit_memory:
            perm = torch.arange(embeddings.shape[0], dtype=torch.long)
        else:
            expected = self._unit_memory[-1].shape
            if unit_current.shape != expected:
                raise AssertionError(
                    f"frame embeddings have shape {tuple(unit_current.shape)} but the tracks have {tuple(expected)}; "
                    "every frame of a video must have the same number of queries and channels (call reset() between videos)"
                )
            perm = self._match(unit_current)
        # Normalizing on entry is the same computation the original repeats at every use.
        self._unit_memory.append(unit_current[perm.to(unit_current.device)])
        return perm

    def _match(self, unit_current: Tensor) -> Tensor:
        """[Q, C] unit-norm current embeddings -> LongTensor [Q] permutation (see module docstring)."""
        unit_memory = torch.stack(tuple(self._unit_memory))  # [M, Q, C], oldest first
        # One batched product for all memory frames: cost[i, a, b] = 1 - cos(current[a], memory_i[b]).
        costs = (1 - torch.matmul(unit_current, unit_memory.transpose(1, 2))).cpu()  # [M, Q, Q]

        track_ids = torch.arange(costs.shape[-1])
        candidates = []
        totals = []
        for cost in costs:
            current_of_track = _hungarian(cost)
            candidates.append(current_of_track)
            totals.append(cost[current_of_track, track_ids].sum())
        totals = torch.stack(totals)  # [M]

        if totals.shape[0] < self.topk:
            best = torch.topk(totals, k=1, largest=False).indices
            return candidates[int(best)]

        cheapest = torch.topk(totals, k=self.topk, largest=False).indices
        recency = torch.arange(1, costs.shape[0] + 1, dtype=costs.dtype)[:, None, None]  # memory frame i weighs i + 1
        voted = (costs * recency)[cheapest].mean(0)
        return _hungarian(voted)


def track_queries(embeddings: Tensor, memory: int = 9, topk: int = 5) -> Tensor:
    """Track a whole video's queries.

    Args:
        embeddings: [T, Q, C] query embeddings of every frame.
        memory, topk: as in :class:`TemporalTopKTracker`.
    Returns:
        LongTensor [T, Q] (CPU): row ``t`` is the permutation aligning frame ``t`` to the tracks
        (row 0 is the identity); use :func:`apply_permutations` to reorder per-query outputs.
    """
    if embeddings.dim() != 3:
        raise AssertionError(f"track_queries expects embeddings [T, Q, C], got shape {tuple(embeddings.shape)}")
    if embeddings.shape[0] == 0:
        raise AssertionError("track_queries got a video with no frames; give at least one frame")
    tracker = TemporalTopKTracker(memory=memory, topk=topk)
    return torch.stack([tracker.step(frame) for frame in embeddings])


def apply_permutations(x: Tensor, perms: Tensor) -> Tensor:
    """Reorder per-frame query outputs into track order.

    Args:
        x: [T, Q, ...] any per-frame, per-query tensor (logits, masks, ious, embeddings).
        perms: [T, Q] permutations from :func:`track_queries` / :meth:`TemporalTopKTracker.step`.
    Returns:
        [T, Q, ...] with ``out[t] = x[t][perms[t]]``.
    """
    if x.shape[:2] != perms.shape:
        raise AssertionError(
            f"apply_permutations: x has leading shape {tuple(x.shape[:2])} but perms has shape {tuple(perms.shape)}; "
            "both must be [T, Q]"
        )
    index = perms.to(device=x.device, dtype=torch.long)
    index = index.reshape(*index.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)
