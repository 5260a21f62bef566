"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

Each query looks at a few learned sampling points around its reference point on every feature
level, reads the value maps there by bilinear interpolation and mixes the samples with learned
softmax weights. The original runs a compiled CUDA kernel; this module computes the same thing
with one weighted `embedding_bag` over a zero-bordered table of every level's values (`_sample_and_mix`).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clipvis.errors import ClipvisError

__all__ = ["multi_scale_deformable_attention", "MSDeformAttn", "level_sizes"]

SpatialShapes = Union[Tensor, Sequence[Sequence[int]]]


def level_sizes(spatial_shapes: SpatialShapes) -> list[tuple[int, int]]:
    """The `(height, width)` of every level as python ints, from a `[L, 2]` tensor or a list of pairs."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Optional[Tensor],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level's value map at the given points and sum the samples with the given weights.

    Args:
        value: `[B, S, heads, C/heads]`, the levels' flattened value maps one after the other
            (S = sum of h*w over the levels).
        spatial_shapes: `[L, 2]` (h, w) of each level (tensor or list of pairs).
        level_start_index: `[L]` offset of each level in S; None means the levels are packed in order
            (the offsets follow from `spatial_shapes`).
        sampling_locations: `[B, Lq, heads, L, points, 2]`, (x, y) in [0, 1] of the level's
            extent; 0 and 1 are the outer edges of the border pixels (grid_sample with
            align_corners=False); points outside read zeros.
        attention_weights: `[B, Lq, heads, L, points]`, the weight of each sample.

    Returns:
        `[B, Lq, C]` with the heads' outputs concatenated along channels.
    """
    num_levels, num_points = sampling_locations.shape[3:5]
    sizes = level_sizes(spatial_shapes)
    starts = _level_starts(value, sizes, level_start_index, num_levels)
    # float32 (or float64) throughout, also under autocast: the row indices are computed with a matrix product
    with torch.autocast(device_type=value.device.type, enabled=False):
        locations = sampling_locations.reshape(*sampling_locations.shape[:3], num_levels * num_points * 2)
        pixel = _pixel_coordinates(locations, sizes, num_points, _sampling_dtype(value))
        return _sample_and_mix(value, sizes, starts, pixel, attention_weights)


def _sampling_dtype(value: Tensor) -> torch.dtype:
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def _pixel_coordinates(fractions: Tensor, sizes: list, num_points: int, dtype: torch.dtype) -> Tensor:
    """(x, y) fractions of each level's extent laid out like a query's sampling points, `[..., L*points*2]`, ->
    pixel coordinates of that level, pixel centres at integers (grid_sample's align_corners=False)."""
    extent = _per_point([[w, h] for h, w in sizes], num_points, dtype, fractions.device)
    return torch.addcmul(torch.tensor(-0.5, dtype=dtype, device=fractions.device), fractions.to(dtype), extent)


def _level_starts(value: Tensor, sizes: list, level_start_index: Optional[Tensor], num_levels: int) -> list:
    """Each level's offset in the flattened value maps, as ints (checked against the value maps' length)."""
    total = value.shape[1]
    if len(sizes) != num_levels or sum(h * w for h, w in sizes) != total:
        raise AssertionError(
            f"deformable attention got value maps of {total} positions and sampling points for "
            f"{num_levels} levels, which do not match the level sizes {sizes}; pass the value maps "
            "and spatial shapes of the same levels"
        )
    if level_start_index is not None:
        return [int(s) for s in level_start_index.tolist()]
    starts = [0]
    for h, w in sizes[:-1]:
        starts.append(starts[-1] + h * w)
    return starts


def _softmax_last(x: Tensor) -> Tensor:
    """Softmax over the last dimension, written out: 3.5x faster than `Tensor.softmax` on CPU for a last
    dimension as short as levels x points (12), equal to it within 2e-7."""
    exp = (x - x.amax(-1, keepdim=True)).exp()
    return exp / exp.sum(-1, keepdim=True)


def _per_point(values: list, num_points: int, dtype, device) -> Tensor:
    """Per-level pairs `[L][2]` -> a flat `[L*points*2]` constant laid out like a query's sampling points
    (so that elementwise ops with `[N, L*points*2]` tensors run contiguous, without 6-d broadcasting)."""
    table = torch.tensor(values, dtype=dtype, device=device)
    return table.view(-1, 1, 2).expand(-1, num_points, 2).reshape(-1)


def _sample_and_mix(value: Tensor, sizes: list, starts: list, pixel: Tensor, attention_weights: Tensor) -> Tensor:
    """The computation behind `multi_scale_deformable_attention`, from the samples' pixel coordinates.

    Args:
        value: `[B, S, heads, D]`; sizes / starts: each level's (h, w) and offset in S, as ints.
        pixel: `[B, Lq, heads, L*points*2]` the samples' (x, y) in pixels of their level, pixel centres at
            integers (grid_sample's align_corners=False convention).
        attention_weights: `[B, Lq, heads, L, points]`.

    Bilinear sampling is written as a weighted sum of table rows: every level's value map gets a one-pixel
    zero border, each sampling point's pixel coordinate is clamped into that border (a point farther out
    reads zeros either way), and its four neighbours become rows of a `[frames*positions*heads, D]` table
    whose weights are the bilinear weights times the attention weight. One `embedding_bag` (sum with
    per-sample weights) then gathers and mixes all levels x points x 4 neighbours of a query at once,
    without materialising the samples (what grid_sample followed by a weighted sum would do).
    Returns `[B, Lq, heads*D]`.
    """
    batch, total, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points = attention_weights.shape
    device = value.device
    dtype = _sampling_dtype(value)
    num_samples = num_levels * num_points
    count = batch * num_queries * heads

    # the zero-bordered table, levels one after the other, row = (frame, padded position, head)
    padded_starts, padded_total = [], 0
    for h, w in sizes:
        padded_starts.append(padded_total)
        padded_total += (h + 2) * (w + 2)
    table = torch.zeros(batch, padded_total, heads * head_dim, dtype=dtype, device=device)
    for (h, w), start, padded_start in zip(sizes, starts, padded_starts):
        interior = table[:, padded_start:padded_start + (h + 2) * (w + 2)].view(batch, h + 2, w + 2, -1)[:, 1:-1, 1:-1]
        interior.copy_(value[:, start:start + h * w].reshape(batch, h, w, heads * head_dim))
    table = table.view(-1, head_dim)

    # clamped to the border; the integer corner and the fraction of the way to the next pixel
    extent = _per_point([[w, h] for h, w in sizes], num_points, dtype, device)
    pixel = pixel.to(dtype).view(batch * num_queries, heads, num_samples * 2)
    pixel = torch.clamp(pixel, min=torch.full_like(extent, -1.0), max=extent)
    corner = pixel.floor()
    fraction = (pixel - corner).view(count, num_samples, 2)

    # table row of each point's four neighbours, as one small matrix product of the integer corner coordinates
    # [count, samples*2] with the levels' (x, y) row strides, the neighbours' offsets and each level's start in
    # the bias: bag column k*samples + s is neighbour k (top-left, top-right, bottom-left, bottom-right) of sample
    # s, each at padded position (y0 + 1 + dy, x0 + 1 + dx). The head's row (+h, x's stride being `heads`) rides
    # on x as +h/heads, and the bias carries +0.5 so that truncating to int rounds to nearest (all terms are
    # non-negative; h/heads is inexact unless heads is a power of two). Exact below 2**23 (float32) / 2**52
    # (float64) rows; then the frame's rows.
    exact_limit = 2 ** 23 if dtype == torch.float32 else 2 ** 52
    table_rows = table.shape[0]
    if table_rows >= exact_limit:
        raise ClipvisError(f"deformable attention over {table_rows} value rows is too large for exact float32 indexing; use a smaller input size (INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST)")
    head_in_x = torch.zeros(heads, num_samples, 2, dtype=dtype)
    head_in_x[:, :, 0] = (torch.arange(heads, dtype=dtype) / heads).view(heads, 1)
    corner += head_in_x.view(heads, num_samples * 2).to(device)
    level_of_sample = [level for level in range(num_levels) for _ in range(num_points)]
    x_strides = torch.full((num_samples,), float(heads), dtype=dtype)
    y_strides = torch.tensor([(sizes[level][1] + 2) * heads for level in level_of_sample], dtype=dtype)
    strides = torch.stack([torch.diag(x_strides), torch.diag(y_strides)], 1).view(num_samples * 2, 1, num_samples)
    offsets = torch.tensor([[(padded_starts[level] + (1 + dy) * (sizes[level][1] + 2) + 1 + dx) * heads + 0.5
                             for level in level_of_sample]
                            for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))], dtype=dtype)
    strides = strides.expand(-1, 4, -1).reshape(num_samples * 2, 4 * num_samples)
    rows = torch.mm(corner.view(count, -1), strides.to(device)).add_(offsets.view(-1).to(device))  # not addmm: no bias copy
    if batch > 1:
        frame = torch.arange(batch, dtype=dtype, device=device).view(batch, 1) * (padded_total * heads)
        rows = (rows.view(batch, -1) + frame).view(count, -1)
    index_dtype = torch.int32 if table_rows < 2 ** 31 else torch.int64
    rows = rows.to(index_dtype).clamp_(0, table_rows - 1)

    # bilinear weight of each neighbour (in the bag's order) times the attention weight, written with
    # [count, samples] products: broadcasting over the tiny trailing dims would run unvectorised and cost 5x more
    fx, fy = fraction.unbind(-1)
    attention = attention_weights.to(dtype).reshape(count, num_samples)
    left, top, bottom = 1 - fx, (1 - fy) * attention, fy * attention
    weights = torch.cat([left * top, fx * top, left * bottom, fx * bottom], dim=1)
    output = F.embedding_bag(rows, table, mode="sum", per_sample_weights=weights)
    return output.view(batch, num_queries, heads * head_dim).to(value.dtype)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections (parameter names as in Deformable DETR).

    `sampling_offsets` predicts per head, level and point an (x, y) offset in pixels of that level,
    `attention_weights` the logits of a softmax over each head's levels x points, `value_proj` and
    `output_proj` are the value and output projections.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ClipvisError(f"d_model {d_model} is not divisible by n_heads {n_heads}; pick values that divide")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: the points of each head start on a ray in the head's own
        direction, 1..n_points pixels out; uniform attention; xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        offsets = directions.view(self.n_heads, 1, 1, 2) * distance
        offsets = offsets.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Optional[Tensor],
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Attend from each query to `n_points` points per head and level around its reference point.

        Args:
            query: `[B, Lq, C]` query features (position embedding already added).
            reference_points: `[B, Lq, L, 2]` (x, y) in [0, 1] per level.
            input_flatten: `[B, S, C]` the flattened feature maps of all levels.
            input_spatial_shapes: `[L, 2]` (h, w) per level.
            input_level_start_index: `[L]` offset of each level in S (or None).
            input_padding_mask: optional `[B, S]`, True where the input is padding (reads as zero).

        Returns:
            `[B, Lq, C]`.
        """
        batch, num_queries, _ = query.shape
        _, total, _ = input_flatten.shape
        if reference_points.shape[-1] != 2:
            raise AssertionError(
                f"reference points must be (x, y) pairs, got last dimension {reference_points.shape[-1]}"
            )
        sizes = level_sizes(input_spatial_shapes)
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, total, self.n_heads, self.d_model // self.n_heads)

        # Where to sample and with which weights stays in float32 under autocast (bf16 inference): a bf16
        # offset of 10 pixels would be off by up to 1/16 of a pixel. The sampling itself is float32 too.
        with torch.autocast(device_type=query.device.type, enabled=False):
            query = query.float() if query.dtype in (torch.float16, torch.bfloat16) else query
            offsets = self.sampling_offsets(query).view(
                batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)
            weights = self.attention_weights(query).view(
                batch, num_queries, self.n_heads, self.n_levels * self.n_points)
            weights = _softmax_last(weights).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)

            # offsets are in pixels of each level; the reference points' pixel coordinates are added per (query,
            # level), broadcast over heads and points: `[B*Lq, heads, L*P*2]` rows, contiguous
            reference = reference_points[:, :, :, None, :].expand(-1, -1, -1, self.n_points, -1)
            reference = _pixel_coordinates(reference.reshape(batch * num_queries, 1, -1), sizes, self.n_points,
                                           offsets.dtype)
            pixel = offsets.view(batch * num_queries, self.n_heads, -1) + reference
            starts = _level_starts(value, sizes, input_level_start_index, self.n_levels)
            output = _sample_and_mix(value, sizes, starts, pixel, weights)
        return self.output_proj(output)
