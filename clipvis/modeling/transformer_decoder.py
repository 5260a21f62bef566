"""CLIP-VIS's masked-attention transformer decoder (Mask2Former's, with class-agnostic heads).

Learnable queries attend to the pixel decoder's three scales in turn (coarse to fine, round
robin). Each layer runs masked cross-attention (a query only sees pixels its previous mask
prediction covers), then self-attention among the queries, then a feed-forward block. After the
learnable queries and after every layer, shared heads read the LayerNorm-ed queries and predict
an object/no-object pair of logits, a mask (dot product with the per-pixel mask features) and a
mask-IoU score (sigmoid of a 3-layer MLP: the reference run uses a sigmoid; an older public
revision of the original applies a ReLU instead).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from clipvis.errors import ConfigError
from clipvis.modeling.pixel_decoder import sine_position_encoding

__all__ = ["MLP", "MultiScaleMaskedTransformerDecoder", "attention_mask_from_masks", "hidden_positions"]


class MLP(nn.Module):
    """Linear layers (`layers.{i}`) with ReLU between them: `[..., in]` -> `[..., out]`."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        """`[..., in_dim]` -> `[..., out_dim]` (ReLU between the linear layers)."""
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class MaskedCrossAttentionLayer(nn.Module):
    """Queries attend to one level's pixels, with residual and LayerNorm (after, or before if
    `pre_norm`). queries `[B, Q, C]`, pixels `[B, S, C]` -> `[B, Q, C]`."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, queries: Tensor, pixels: Tensor, attn_mask: Optional[Tensor], pixel_pos: Tensor,
                query_pos: Tensor) -> Tensor:
        """Masked cross-attention from the queries `[B, Q, C]` (query_pos alike) to one level's pixels `[B, S, C]`
        (pixel_pos alike) -> `[B, Q, C]`. attn_mask: `[B, Q, S]` bool, True where a query may not look, the same
        for every head (or None).

        `multihead_attn`'s projections, computed here around one `scaled_dot_product_attention` with the boolean
        mask broadcast over the heads: `nn.MultiheadAttention` wants the mask repeated per head and turns it into
        an additive float mask of that size first, which costs more than the attention itself (same result)."""
        source = self.norm(queries) if self.pre_norm else queries
        attention = self.multihead_attn
        batch, num_queries, channels = source.shape
        heads = attention.num_heads
        w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attention.in_proj_bias.chunk(3)

        def split_heads(x: Tensor) -> Tensor:  # [B, L, C] -> [B, heads, L, C/heads]
            return x.view(batch, -1, heads, channels // heads).transpose(1, 2)

        q = split_heads(F.linear(source + query_pos, w_q, b_q))
        k = split_heads(F.linear(pixels + pixel_pos, w_k, b_k))
        v = split_heads(F.linear(pixels, w_v, b_v))
        visible = None if attn_mask is None else ~attn_mask[:, None]
        mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=visible,
                                               dropout_p=attention.dropout if self.training else 0.0)
        attended = attention.out_proj(mixed.transpose(1, 2).reshape(batch, num_queries, channels))
        queries = queries + self.dropout(attended)
        return queries if self.pre_norm else self.norm(queries)


class QuerySelfAttentionLayer(nn.Module):
    """Self-attention among the queries with residual and LayerNorm. `[B, Q, C]` -> `[B, Q, C]`."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, queries: Tensor, query_pos: Tensor) -> Tensor:
        """Self-attention among the queries: queries, query_pos `[B, Q, C]` -> `[B, Q, C]`."""
        source = self.norm(queries) if self.pre_norm else queries
        with_pos = source + query_pos
        attended = self.self_attn(with_pos, with_pos, value=source, need_weights=False)[0]
        queries = queries + self.dropout(attended)
        return queries if self.pre_norm else self.norm(queries)


class FeedForwardLayer(nn.Module):
    """Linear-ReLU-linear with residual and LayerNorm. `[B, Q, C]` -> `[B, Q, C]`."""

    def __init__(self, d_model: int, dim_feedforward: int = 2048, dropout: float = 0.0, pre_norm: bool = False):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, queries: Tensor) -> Tensor:
        """Feed-forward block with residual and norm: `[B, Q, C]` -> `[B, Q, C]`."""
        source = self.norm(queries) if self.pre_norm else queries
        hidden = self.linear2(self.dropout(F.relu(self.linear1(source))))
        queries = queries + self.dropout(hidden)
        return queries if self.pre_norm else self.norm(queries)


def hidden_positions(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Where each query may not look: the mask logits resized (bilinear, align_corners=False) to the
    next layer's level, hidden where sigmoid(logit) < 0.5.

    This is the decoder's one thresholded decision (`attention_mask_from_masks` calls it by its
    module name, so an equivalence test can replay recorded decisions in its place).

    Args:
        mask_logits: `[B, Q, H, W]`.
        size: (h, w) of the level the next layer attends to.

    Returns:
        `[B, Q, h*w]` bool, True = hidden.
    """
    resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
    return resized.sigmoid().flatten(2) < 0.5


def attention_mask_from_masks(mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """The cross-attention mask for the next layer from the current mask predictions (the same for every head).

    `hidden_positions` decides which pixels each query may not look at; a query that would see no
    pixel at all sees every pixel instead.

    Args:
        mask_logits: `[B, Q, H, W]`.
        size: (h, w) of the level the next layer attends to.

    Returns:
        `[B, Q, h*w]` bool, True = hidden.
    """
    hidden = hidden_positions(mask_logits, size)  # [B, Q, h*w]
    return (hidden & ~hidden.all(-1, keepdim=True)).detach()


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """The masked-attention decoder with CLIP-VIS's heads (the original's `predictor`).

    `dec_layers` is the config value (MODEL.MASK_FORMER.DEC_LAYERS): the decoder has
    `dec_layers - 1` layers plus the prediction heads on the learnable queries.
    Parameter names follow the original: `transformer_{self,cross}_attention_layers`,
    `transformer_ffn_layers`, `decoder_norm`, `query_feat`, `query_embed`, `level_embed`,
    `input_proj`, `iou_head`, `object_embed`, `mask_embed`.
    """

    num_feature_levels = 3

    def __init__(
        self,
        in_channels: int = 256,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 10,
        pre_norm: bool = False,
        mask_dim: int = 256,
        enforce_input_project: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dec_layers < 1:
            raise ConfigError(f"DEC_LAYERS must be at least 1 (the heads on the learnable queries), got {dec_layers}")
        self.num_heads = nheads
        self.num_layers = dec_layers - 1
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries

        self.transformer_self_attention_layers = nn.ModuleList(
            QuerySelfAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(self.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            MaskedCrossAttentionLayer(hidden_dim, nheads, dropout, pre_norm) for _ in range(self.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(
            FeedForwardLayer(hidden_dim, dim_feedforward, dropout, pre_norm) for _ in range(self.num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.query_feat = nn.Embedding(num_queries, hidden_dim)   # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                projection = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(projection.weight, a=1)
                nn.init.zeros_(projection.bias)
                self.input_proj.append(projection)
            else:
                self.input_proj.append(nn.Identity())

        self.iou_head = MLP(hidden_dim, hidden_dim, 1, 3)
        self.object_embed = MLP(hidden_dim, hidden_dim, 2, 3)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self._keep_aux_outputs = True

    @contextmanager
    def final_predictions_only(self) -> Iterator[None]:
        """Within this context `forward` returns an empty `aux_outputs` list: inference needs only the last
        layer's predictions, and dropping the earlier ones (one `[B,Q,H/4,W/4]` mask tensor per layer) as
        soon as the next layer's attention mask is made keeps memory flat. The final outputs are unchanged."""
        previous = self._keep_aux_outputs
        self._keep_aux_outputs = False
        try:
            yield
        finally:
            self._keep_aux_outputs = previous

    def prediction_heads(self, queries: Tensor, mask_features: Tensor, scores: bool = True
                         ) -> tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
        """The shared heads on the current queries `[B, Q, C]` and mask features `[B, mask_dim, H, W]`.

        Returns (normed queries `[B, Q, C]`, object logits `[B, Q, 2]`, mask logits `[B, Q, H, W]`,
        IoU scores `[B, Q, 1]` (sigmoid, in (0, 1))); with `scores=False` only the normed queries and the mask
        logits (which the next layer's attention mask needs), None in place of the others."""
        normed = self.decoder_norm(queries)
        batch, channels, height, width = mask_features.shape
        # one batched matmul [B, H*W, C] x [B, C, Q], read in place from the pixel decoder's channel-last maps
        # (a bfloat16 bmm with the pixels as the transposed operand runs 10x slower, and copying the map to
        # channels-first costs more than all the products); the logits come out as a [B, Q, H, W] view
        pixels = mask_features.flatten(2).transpose(1, 2)
        mask_logits = torch.matmul(pixels, self.mask_embed(normed).transpose(1, 2)).transpose(1, 2)
        mask_logits = mask_logits.view(batch, -1, height, width)
        if not scores:
            return normed, None, mask_logits, None
        return normed, self.object_embed(normed), mask_logits, self.iou_head(normed).sigmoid()

    def forward(self, multi_scale_features: list[Tensor], mask_features: Tensor) -> dict:
        """Decode the queries.

        Args:
            multi_scale_features: three maps `[B, in_channels, h_l, w_l]`, coarse to fine (as the
                pixel decoder returns them).
            mask_features: `[B, mask_dim, H/4, W/4]`.

        Returns:
            `{"pred_object_logits": [B,Q,2], "pred_masks": [B,Q,H/4,W/4], "pred_ious": [B,Q,1],
            "pred_embds": [B,Q,hidden] (the decoder-normed final queries), "aux_outputs": one dict
            with pred_object_logits / pred_masks / pred_ious per earlier prediction, index 0 = the
            heads on the learnable queries}`.
        """
        if len(multi_scale_features) != self.num_feature_levels:
            raise AssertionError(
                f"the transformer decoder needs {self.num_feature_levels} feature maps, got {len(multi_scale_features)}"
            )
        batch = mask_features.shape[0]
        sizes, pixels, pixel_pos = [], [], []
        for level, feature in enumerate(multi_scale_features):
            sizes.append((int(feature.shape[-2]), int(feature.shape[-1])))
            pixel_pos.append(sine_position_encoding(feature, self.hidden_dim // 2).flatten(2).transpose(1, 2))
            projected = self.input_proj[level](feature).flatten(2) + self.level_embed.weight[level][None, :, None]
            pixels.append(projected.transpose(1, 2))  # [B, h*w, C]

        query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        queries = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        # Within `final_predictions_only()` an earlier prediction's masks only make the next layer's attention
        # mask, at that layer's level size: bilinear resizing is linear, so those logits are the mask embeddings
        # times the mask features resized once per frame to the three level sizes, 4-64x fewer pixels than
        # resizing full-size logits at every layer (one [H/4*W/4, C] x [C, Q] product a layer: 4.7 ms of 360x480
        # fp32 frames' ~1.2 s). Equal up to rounding, in fp32 and bf16 alike (README "Speed": bf16's deviation).
        level_maps = None
        if not self._keep_aux_outputs:
            level_maps = [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
                          for size in sizes]

        def maps_for(call: int) -> Tensor:  # call 0: the heads on the learnable queries, then one per layer
            if level_maps is None or call == self.num_layers:
                return mask_features
            return level_maps[call % self.num_feature_levels]

        normed, object_logits, mask_logits, ious = self.prediction_heads(
            queries, maps_for(0), scores=self._keep_aux_outputs or self.num_layers == 0)
        predictions = [(object_logits, mask_logits, ious)]
        for index in range(self.num_layers):
            level = index % self.num_feature_levels
            attn_mask = attention_mask_from_masks(mask_logits, sizes[level])
            queries = self.transformer_cross_attention_layers[index](
                queries, pixels[level], attn_mask, pixel_pos[level], query_pos)
            queries = self.transformer_self_attention_layers[index](queries, query_pos)
            queries = self.transformer_ffn_layers[index](queries)
            # within `final_predictions_only()` an earlier layer's object and IoU scores are never used
            last = index == self.num_layers - 1
            normed, object_logits, mask_logits, ious = self.prediction_heads(
                queries, maps_for(index + 1), scores=self._keep_aux_outputs or last)
            if self._keep_aux_outputs:
                predictions.append((object_logits, mask_logits, ious))
            else:
                predictions = [(object_logits, mask_logits, ious)]

        return {
            "pred_object_logits": object_logits,
            "pred_masks": mask_logits.contiguous(),
            "pred_ious": ious,
            "pred_embds": normed,
            "aux_outputs": [
                {"pred_object_logits": o, "pred_masks": m, "pred_ious": i} for o, m, i in predictions[:-1]
            ],  # empty within `final_predictions_only()`
        }
