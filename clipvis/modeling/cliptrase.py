"""CLIPtrase (Shao et al., ECCV 2024): training-free open-vocabulary semantic segmentation on a CLIP ViT.

The image tower runs unchanged up to the last two blocks. The second-to-last block keeps its output but
also yields the head-averaged self-correlation map (cos q + cos k + cos v) / 3 over all token pairs; the
last block replaces its attention probabilities by softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)) +
softmax(v v^T / sqrt(d)). Every token then goes through ln_post and the projection and is L2-normalised.
Text features are the 80 ImageNet prompt templates, averaged per text.

Works for any open_clip ``VisionTransformer`` whose blocks use ``nn.MultiheadAttention`` (the standard
``ResidualAttentionBlock``). Post-processing (recalibration, DBSCAN, cluster vote) lives in
``clipvis.inference.cliptrase_postprocess``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from torch import nn

from clipvis.errors import ClipvisError


class CLIPtraseError(ClipvisError):
    """The model or the input does not fit CLIPtrase (not a ViT, wrong image size, empty texts)."""


# The 80 ImageNet prompt templates of CLIP, in the order CLIPtrase uses them (open_clip ships them as functions).
CLIPTRASE_TEMPLATES: tuple[str, ...] = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, T, W] -> [B, heads, T, W / heads]."""
    b, t, w = x.shape
    return x.reshape(b, t, num_heads, w // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads * d]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def _cosine_map(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, heads, T, T] cosine similarity of every token pair (per head)."""
    n = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return n @ n.transpose(-1, -2)


class CLIPtraseSegmenter(nn.Module):
    """CLIPtrase's image and text towers on an open_clip CLIP model with a ViT image tower.

    ``clip_model``: an open_clip ``CLIP`` (its ``visual`` a ``VisionTransformer`` with at least 2 blocks).
    ``tokenizer``: ``open_clip.get_tokenizer(name)`` (or any callable list[str] -> LongTensor [n, L]).
    The model is used as it is (its weights are not copied); call ``.eval()`` on it first.
    """

    def __init__(self, clip_model: nn.Module, tokenizer: Callable | None = None):
        super().__init__()
        visual = getattr(clip_model, "visual", None)
        blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
        if visual is None or blocks is None or not hasattr(visual, "conv1"):
            raise CLIPtraseError("CLIPtrase needs an open_clip CLIP model with a ViT image tower "
                                 "(model.visual.conv1 and model.visual.transformer.resblocks)")
        if len(blocks) < 2:
            raise CLIPtraseError(f"CLIPtrase needs at least 2 transformer blocks in the image tower, got {len(blocks)}")
        for i in (-2, -1):
            attn = getattr(blocks[i], "attn", None)
            if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
                raise CLIPtraseError("CLIPtrase needs standard open_clip blocks (nn.MultiheadAttention with a "
                                     "packed in_proj_weight) for the last two blocks of the image tower")
        self.clip = clip_model
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ image tower
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def patch_size(self) -> int:
        return int(self.visual.conv1.kernel_size[0])

    def interpolated_pos_embed(self, grid: int) -> torch.Tensor:
        """The positional embedding for a grid x grid patch layout -> [grid * grid + 1, width].

        At the training grid p0 it is returned as it is. Otherwise the p0 x p0 patch rows go through
        bicubic interpolation (align_corners=False, no antialias) with scale_factor (grid + 0.1) / p0, as
        the original does (the sampling positions follow that factor, not the output size); the CLS row
        is kept."""
        pos = self.visual.positional_embedding
        n0 = pos.shape[0] - 1
        p0 = int(round(n0 ** 0.5))
        if p0 * p0 != n0:
            raise CLIPtraseError(f"positional embedding has {n0} patch rows, not a square grid")
        if grid == p0:
            return pos
        patch = pos[1:].reshape(1, p0, p0, -1).permute(0, 3, 1, 2)
        scale = (grid + 0.1) / p0
        patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
        if patch.shape[-2:] != (grid, grid):
            raise AssertionError(f"interpolated grid {tuple(patch.shape[-2:])} != ({grid}, {grid})")
        patch = patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)
        return torch.cat([pos[:1], patch], dim=0)

    def _run_block(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One open_clip block on batch-first tokens [B, T, W]."""
        if getattr(self.visual.transformer, "batch_first", True):
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    def _qkv(self, block: nn.Module, x: torch.Tensor):
        """ln_1 then in_proj (with bias) of a block -> q, k, v each [B, heads, T, d]."""
        attn = block.attn
        qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
        q, k, v = qkv.chunk(3, dim=-1)
        h = attn.num_heads
        return _heads(q, h), _heads(k, h), _heads(v, h)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images [B, 3, S, S] (S a multiple of the patch size) ->
        (tokens [B, hw + 1, D] after ln_post and proj, L2-normalised per token, CLS first;
        correlation map of the second-to-last block [B, hw + 1, hw + 1])."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
            raise CLIPtraseError(f"images must be [B, 3, S, S], got {tuple(images.shape)}")
        size = images.shape[-1]
        ps = self.patch_size
        if size % ps:
            raise CLIPtraseError(f"image size {size} is not a multiple of the patch size {ps}")
        grid = size // ps
        vis = self.visual
        x = vis.conv1(images.to(vis.conv1.weight.dtype))          # [B, W, p, p]
        x = x.flatten(2).transpose(1, 2)                            # [B, hw, W], row-major patches
        cls = vis.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.interpolated_pos_embed(grid).to(x.dtype)
        x = vis.ln_pre(x)
        blocks = vis.transformer.resblocks
        for block in blocks[:-2]:
            x = self._run_block(block, x)
        # second-to-last block: standard output, plus its q/k/v self-correlation map
        block = blocks[-2]
        q, k, v = self._qkv(block, x)
        corr = ((_cosine_map(q) + _cosine_map(k) + _cosine_map(v)) / 3).mean(dim=1)
        x = self._run_block(block, x)
        # last block: attention probabilities replaced by the sum of three self-softmaxes
        block = blocks[-1]
        q, k, v = self._qkv(block, x)
        scale = q.shape[-1] ** -0.5
        probs = sum(torch.softmax((t @ t.transpose(-1, -2)) * scale, dim=-1) for t in (q, k, v))
        out = F.linear(_merge_heads(probs @ v), block.attn.out_proj.weight, block.attn.out_proj.bias)
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = vis.ln_post(x)
        if vis.proj is not None:
            x = x @ vis.proj
        return F.normalize(x, dim=-1), corr

    # ------------------------------------------------------------------ text tower
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """texts (n) -> token ids [n, 80, L]: every text in the 80 templates."""
        if self.tokenizer is None:
            raise CLIPtraseError("no tokenizer given; pass tokenizer=open_clip.get_tokenizer(model_name)")
        texts = _check_texts(texts)
        prompts = [t.format(text) for text in texts for t in CLIPTRASE_TEMPLATES]
        tokens = self.tokenizer(prompts)
        return tokens.reshape(len(texts), len(CLIPTRASE_TEMPLATES), -1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """texts (n; each string is one class, used verbatim) -> text features [n, D].

        Each prompt feature is L2-normalised, the 80 are averaged, the mean normalised; the stacked
        rows are normalised once more (as the original does)."""
        tokens = self.tokenize(texts)
        n, t, length = tokens.shape
        feats = self.encode_prompts(tokens.reshape(n * t, length))
        feats = F.normalize(feats, dim=-1).reshape(n, t, -1).mean(dim=1)
        feats = F.normalize(feats, dim=-1)
        return F.normalize(feats, dim=-1)

    def encode_prompts(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [n, L] -> raw text-tower features [n, D] (before any normalisation): `clip.encode_text`
        up to float rounding, run only up to the longest prompt (`clip_backbone.encode_text_tokens`)."""
        from clipvis.modeling.clip_backbone import encode_text_tokens

        return encode_text_tokens(self.clip, tokens)

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the CLIP model."""
        return float(self.clip.logit_scale.detach().exp())


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise CLIPtraseError("texts must be a list of strings (one class each), not one string")
    texts = list(texts)
    if not texts:
        raise CLIPtraseError("the text list is empty; give at least one class name")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise CLIPtraseError(f"text {i} is {text!r}; every class must be a non-blank string")
    return texts
