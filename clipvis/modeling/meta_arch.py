"""The CLIP-VIS model assembled from its parts: frozen CLIP backbone + Mask2Former-style head.

The module tree mirrors the original checkpoint (`backbone.clip_model.*`, `sem_seg_head.pixel_decoder.*`,
`sem_seg_head.predictor.*`), so an official state dict maps onto it by name (see `clipvis.checkpoint`).
Everything here is per frame: tracking and classification over time live in `clipvis.inference`.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from clipvis.errors import ConfigError
from clipvis.modeling.clip_backbone import ClipBackbone
from clipvis.modeling.mask_former_head import MaskFormerHead
from clipvis.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from clipvis.modeling.transformer_decoder import MultiScaleMaskedTransformerDecoder


class ClipVis(nn.Module):
    """CLIP-VIS per-frame model.

    `forward(images)` takes normalized, padded frames `[B,3,H,W]` (H, W multiples of `size_divisibility`)
    and returns the decoder outputs (`pred_object_logits [B,Q,2]`, `pred_masks [B,Q,H/4,W/4]`,
    `pred_ious [B,Q,1]`, `pred_embds [B,Q,C]`, `aux_outputs`) plus `clip_vis_dense [B,Cd,H/32,W/32]`.
    """

    def __init__(
        self,
        backbone: ClipBackbone,
        sem_seg_head: MaskFormerHead,
        *,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
    ):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.size_divisibility = size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        """The device the model's weights are on."""
        return self.pixel_mean.device

    @property
    def num_queries(self) -> int:
        """Q, the number of object queries of the transformer decoder."""
        return self.sem_seg_head.predictor.num_queries

    def preprocess(self, frames: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """uint8 or float RGB frames `[B,3,H,W]` (0..255) -> (normalized frames zero-padded at the
        bottom/right to a multiple of `size_divisibility` `[B,3,Hp,Wp]` float32, unpadded size (H, W))."""
        images = (frames.to(self.device, torch.float32) - self.pixel_mean) / self.pixel_std
        h, w = images.shape[-2:]
        d = self.size_divisibility
        pad_h, pad_w = (-h) % d if d > 1 else 0, (-w) % d if d > 1 else 0
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h), value=0.0)
        return images, (int(h), int(w))

    def forward(self, images: torch.Tensor) -> Tuple[Dict, torch.Tensor]:
        """Normalized padded frames `[B,3,H,W]` -> (decoder outputs dict, clip_vis_dense `[B,Cd,H/32,W/32]`)."""
        features = self.backbone(images)
        outputs = self.sem_seg_head(features)
        return outputs, features["clip_vis_dense"]


# The config keys that name a component, each with the components it can select. The image model (CLIPVIS)
# and the video model (CLIPVIS_Video) are the same per-frame network; they differ in how training samples
# data and how inference runs over frames, which the engine reads from the config.
PIXEL_DECODERS: Dict[str, Callable[..., nn.Module]] = {"MSDeformAttnPixelDecoder": MSDeformAttnPixelDecoder}
TRANSFORMER_DECODERS: Dict[str, Callable[..., nn.Module]] = {
    "MultiScaleMaskedTransformerDecoder": MultiScaleMaskedTransformerDecoder}
SUPPORTED_COMPONENTS: Dict[str, Tuple[str, ...]] = {
    "MODEL.META_ARCHITECTURE": ("CLIPVIS", "CLIPVIS_Video"),
    "MODEL.BACKBONE.NAME": ("CLIP",),
    "MODEL.SEM_SEG_HEAD.NAME": ("MaskFormerHead",),
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": tuple(PIXEL_DECODERS),
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": tuple(TRANSFORMER_DECODERS),
    # CLIP sees RGB; frames are read as RGB and PIXEL_MEAN / PIXEL_STD are in RGB order
    "INPUT.FORMAT": ("RGB",),
}


def check_components(cfg) -> None:
    """Refuse a config whose component keys (`SUPPORTED_COMPONENTS`) name something clipvis does not build,
    with the supported values; a config without `_BASE_` keeps detectron2's defaults (GeneralizedRCNN, BGR),
    which are refused here rather than silently run as CLIP-VIS."""
    for key, supported in SUPPORTED_COMPONENTS.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        if node not in supported:
            hint = " (does the config file lack `_BASE_`?)" if key == "MODEL.META_ARCHITECTURE" else ""
            raise ConfigError(f"{key} {node!r} is not supported{hint}: use {' or '.join(supported)}")


def build_model(cfg, load_clip_weights: bool = True) -> ClipVis:
    """A `ClipVis` built from a config (our `clipvis.config` CfgNode with the original's keys).

    With `load_clip_weights`, CLIP's weights come from `MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS` (a local file or
    an open_clip tag already in the local cache); pass False when a CLIP-VIS checkpoint, which holds them,
    is loaded next. Raises `ConfigError` for a component key naming something not supported (`check_components`).
    """
    check_components(cfg)
    pretrained = (cfg.MODEL.FC_CLIP.CLIP_PRETRAINED_WEIGHTS or None) if load_clip_weights else None
    backbone = ClipBackbone(cfg.MODEL.FC_CLIP.CLIP_MODEL_NAME, pretrained=pretrained)
    head_cfg = cfg.MODEL.SEM_SEG_HEAD
    mf = cfg.MODEL.MASK_FORMER
    pixel_decoder = PIXEL_DECODERS[head_cfg.PIXEL_DECODER_NAME](
        {k: v for k, v in backbone.output_shapes().items() if k in head_cfg.IN_FEATURES},
        conv_dim=head_cfg.CONVS_DIM,
        mask_dim=head_cfg.MASK_DIM,
        norm=head_cfg.NORM,
        transformer_in_features=tuple(head_cfg.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
        common_stride=head_cfg.COMMON_STRIDE,
        transformer_enc_layers=head_cfg.TRANSFORMER_ENC_LAYERS,
        transformer_nheads=head_cfg.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
        transformer_dim_feedforward=1024,
        transformer_dropout=mf.DROPOUT,
        transformer_n_points=head_cfg.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
    )
    predictor = TRANSFORMER_DECODERS[mf.TRANSFORMER_DECODER_NAME](
        head_cfg.CONVS_DIM,
        hidden_dim=mf.HIDDEN_DIM,
        num_queries=mf.NUM_OBJECT_QUERIES,
        nheads=mf.NHEADS,
        dim_feedforward=mf.DIM_FEEDFORWARD,
        dec_layers=mf.DEC_LAYERS,
        pre_norm=mf.PRE_NORM,
        mask_dim=head_cfg.MASK_DIM,
        enforce_input_project=mf.ENFORCE_INPUT_PROJ,
        dropout=mf.DROPOUT,
    )
    return ClipVis(
        backbone,
        MaskFormerHead(pixel_decoder, predictor),
        pixel_mean=cfg.MODEL.PIXEL_MEAN,
        pixel_std=cfg.MODEL.PIXEL_STD,
        size_divisibility=mf.SIZE_DIVISIBILITY,
    )
