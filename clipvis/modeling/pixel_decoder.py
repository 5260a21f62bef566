"""Mask2Former's multi-scale deformable-attention pixel decoder.

The coarsest backbone maps (res3..res5 by default) are projected to `conv_dim` channels and
refined together by a stack of deformable-attention encoder layers; an FPN step then adds the finer
maps (res2) on top, down to `common_stride`. Out come the per-pixel mask features (stride 4) and
three refined maps for the masked-attention transformer decoder.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clipvis.errors import ConfigError
from clipvis.modeling.ms_deform_attn import MSDeformAttn

__all__ = ["sine_position_encoding", "MSDeformAttnPixelDecoder"]


def sine_position_encoding(feature: Tensor, num_pos_feats: int, temperature: float = 10000.0,
                           scale: float = 2 * math.pi) -> Tensor:
    """DETR's normalised 2-d sine position encoding of an unpadded feature map.

    Row and column numbers 1..h and 1..w are divided by (h + 1e-6) and (w + 1e-6), times `scale`;
    each is encoded with `num_pos_feats` channels alternating sin / cos at frequencies
    temperature^(-2*(i//2)/num_pos_feats). The y channels come first, then the x channels.

    Args:
        feature: `[B, C, h, w]`, only its batch size, size, device (and dtype) are used.
        num_pos_feats: channels per axis (half the output channels).

    Returns:
        `[B, 2*num_pos_feats, h, w]` (float32).
    """
    batch, _, height, width = feature.shape
    device = feature.device
    eps = 1e-6
    rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    rows = rows / (rows[-1:] + eps) * scale
    cols = cols / (cols[-1:] + eps) * scale
    index = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    frequencies = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_pos_feats)
    is_even = (torch.arange(num_pos_feats, device=device) % 2 == 0)

    def encode(positions: Tensor) -> Tensor:  # [n] -> [n, num_pos_feats]
        angles = positions[:, None] / frequencies
        return torch.where(is_even, angles.sin(), angles.cos())

    y_code = encode(rows)[:, None, :].expand(height, width, num_pos_feats)
    x_code = encode(cols)[None, :, :].expand(height, width, num_pos_feats)
    code = torch.cat([y_code, x_code], dim=-1).permute(2, 0, 1)  # [2*num_pos_feats, h, w]
    return code.unsqueeze(0).expand(batch, -1, -1, -1)


class ConvNormAct(nn.Conv2d):
    """A conv with an optional norm (registered as `.norm`) and optional ReLU, in that order
    (detectron2's `Conv2d` parameter layout: `weight`, `bias`, `norm.weight`, `norm.bias`).

    `[B, in, H, W]` -> `[B, out, H', W']`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
                 bias: bool = True, norm: Optional[nn.Module] = None, relu: bool = False):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding, bias=bias)
        self.norm = norm
        self.relu = relu
        # detectron2's c2_xavier_fill: kaiming-uniform with a=1, zero bias
        nn.init.kaiming_uniform_(self.weight, a=1)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """`[B, C_in, H, W]` -> convolution, then the norm and activation when set: `[B, C_out, H', W']`."""
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x, inplace=True) if self.relu else x  # in place: neither conv nor norm backward needs x


def _make_norm(norm: str, channels: int) -> Optional[nn.Module]:
    if norm == "GN":
        return nn.GroupNorm(32, channels)
    if norm == "":
        return None
    raise ConfigError(f"pixel decoder norm {norm!r} is not supported; use 'GN' or '' (none)")


class DeformableEncoderLayer(nn.Module):
    """One encoder layer: deformable self-attention then a ReLU feed-forward, each followed by a
    residual add and LayerNorm (post-norm). `[B, S, C]` -> `[B, S, C]`."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = nn.ReLU(inplace=True)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Sequence[tuple[int, int]],
                level_start_index: Tensor) -> Tensor:
        """src, pos: `[B, S, C]`; reference_points: `[B, S, L, 2]`. Returns `[B, S, C]`."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(hidden))


class DeformableEncoderStack(nn.Module):
    """The encoder layers, applied in order (`layers.{i}`)."""

    def __init__(self, layers: list[DeformableEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes, level_start_index) -> Tensor:
        """`[B, S, C]` -> `[B, S, C]`."""
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index)
        return src


def encoder_reference_points(spatial_shapes: Sequence[tuple[int, int]], batch: int, device) -> Tensor:
    """The pixel centres of every level as (x, y) fractions of the level: `[B, S, L, 2]`, the same
    point repeated for each of the L levels (no padding, so every valid ratio is 1)."""
    points = []
    for height, width in spatial_shapes:
        ys = torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device) / height
        xs = torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device) / width
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], -1))
    points = torch.cat(points, 0)  # [S, 2]
    return points[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)


class MultiScaleDeformableEncoder(nn.Module):
    """Deformable DETR's encoder over several levels: adds a learned per-level embedding to the
    position encoding and runs the layer stack over all levels' pixels jointly."""

    def __init__(self, d_model: int, nhead: int, num_encoder_layers: int, dim_feedforward: int, dropout: float,
                 num_feature_levels: int, enc_n_points: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self.encoder = DeformableEncoderStack([
            DeformableEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points)
            for _ in range(num_encoder_layers)
        ])
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """srcs, pos_embeds: per level `[B, C, h_l, w_l]`. Returns the refined pixels of all levels
        `[B, S, C]` (levels in the given order) and the level sizes."""
        batch = srcs[0].shape[0]
        sizes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat([
            p.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
            for level, p in enumerate(pos_embeds)
        ], 1)
        starts = [0]
        for h, w in sizes[:-1]:
            starts.append(starts[-1] + h * w)
        level_start_index = torch.tensor(starts, dtype=torch.long)
        reference_points = encoder_reference_points(sizes, batch, flat.device)
        return self.encoder(flat, pos, reference_points, sizes, level_start_index), sizes


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone maps -> stride-4 mask features and three refined maps for the transformer decoder.

    Parameter names follow the original (`input_proj.*`, `transformer.*`, `adapter_1`, `layer_1`,
    `mask_features`). The position encodings are computed on the fly (nothing in the state dict).
    """

    def __init__(
        self,
        input_shapes: dict[str, tuple[int, int]],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str = "GN",
        transformer_in_features: Sequence[str] = ("res3", "res4", "res5"),
        common_stride: int = 4,
        transformer_enc_layers: int = 6,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_dropout: float = 0.0,
        transformer_n_points: int = 4,
    ):
        """input_shapes: `{"res2": (channels, stride), ...}` of the backbone maps the decoder reads."""
        super().__init__()
        missing = [name for name in transformer_in_features if name not in input_shapes]
        if missing:
            raise ConfigError(
                f"pixel decoder: transformer input features {missing} are not among the backbone "
                f"features {sorted(input_shapes)}; list only features the backbone produces"
            )
        ordered = sorted(input_shapes.items(), key=lambda item: item[1][1])  # fine to coarse
        self.in_features = [name for name, _ in ordered]
        self.feature_channels = [int(c) for _, (c, _) in ordered]
        encoder_inputs = [(name, shape) for name, shape in ordered if name in transformer_in_features]
        self.transformer_in_features = [name for name, _ in encoder_inputs]
        encoder_strides = [int(s) for _, (_, s) in encoder_inputs]
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.common_stride = common_stride
        self.num_output_levels = 3  # the transformer decoder always reads three scales

        # 1x1 conv + GroupNorm per encoder level, coarse to fine (res5 first)
        self.input_proj = nn.ModuleList()
        for _, (channels, _) in reversed(encoder_inputs):
            projection = nn.Sequential(nn.Conv2d(int(channels), conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
            self.input_proj.append(projection)

        self.transformer = MultiScaleDeformableEncoder(
            d_model=conv_dim, nhead=transformer_nheads, num_encoder_layers=transformer_enc_layers,
            dim_feedforward=transformer_dim_feedforward, dropout=transformer_dropout,
            num_feature_levels=len(encoder_inputs), enc_n_points=transformer_n_points,
        )
        self.mask_features = ConvNormAct(conv_dim, mask_dim, kernel_size=1)

        # FPN levels between the finest encoder level and common_stride (res2 by default)
        self.num_fpn_levels = int(math.log2(min(encoder_strides)) - math.log2(common_stride))
        use_bias = norm == ""
        for index, channels in enumerate(self.feature_channels[:self.num_fpn_levels]):
            self.add_module(f"adapter_{index + 1}", ConvNormAct(
                channels, conv_dim, kernel_size=1, bias=use_bias, norm=_make_norm(norm, conv_dim)))
            self.add_module(f"layer_{index + 1}", ConvNormAct(
                conv_dim, conv_dim, kernel_size=3, padding=1, bias=use_bias, norm=_make_norm(norm, conv_dim),
                relu=True))

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """features: backbone maps `{"res2": [B, C2, H/4, W/4], ..., "res5": [B, C5, H/32, W/32]}`
        (extra keys are ignored).

        Returns:
            mask_features `[B, mask_dim, H/4, W/4]` and the three multi-scale maps
            `[B, conv_dim, h, w]`, coarse to fine (res5, res4, res3 levels), the order the transformer
            decoder consumes them.
        """
        missing = [name for name in self.in_features if name not in features]
        if missing:
            raise AssertionError(
                f"pixel decoder input lacks the backbone features {missing}; pass all of {self.in_features}")
        srcs, pos = [], []
        for projection, name in zip(self.input_proj, reversed(self.transformer_in_features)):
            x = features[name].float()
            srcs.append(projection(x))
            pos.append(sine_position_encoding(x, self.conv_dim // 2))
        memory, sizes = self.transformer(srcs, pos)

        batch = memory.shape[0]
        outputs = [
            level.transpose(1, 2).reshape(batch, self.conv_dim, h, w)
            for level, (h, w) in zip(memory.split([h * w for h, w in sizes], dim=1), sizes)
        ]
        # top-down: add each finer backbone map to the upsampled coarser output
        for index in reversed(range(self.num_fpn_levels)):
            lateral = getattr(self, f"adapter_{index + 1}")(features[self.in_features[index]].float())
            # upsampled from a contiguous map: the encoder's outputs are channel-last views, which CPU bilinear
            # upsampling of 256 channels reads 3-4x slower than it copies them first
            coarser = outputs[-1].contiguous()
            upsampled = F.interpolate(coarser, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            # added in place (an 11 MB map at stride 4) unless the sum's dtype is promoted (bf16 autocast)
            merged = lateral.add_(upsampled) if lateral.dtype == upsampled.dtype else lateral + upsampled
            outputs.append(getattr(self, f"layer_{index + 1}")(merged))

        return self.mask_features(outputs[-1]), outputs[:self.num_output_levels]
