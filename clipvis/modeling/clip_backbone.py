"""The frozen open_clip CLIP model used as CLIP-VIS's backbone.

The image tower gives the multi-scale features the pixel decoder consumes (`res2`..`res5`)
and the dense map (`clip_vis_dense`) that masks are pooled from for open-vocabulary
classification; the text tower encodes class prompts. What differs between image-tower families
(timm ConvNeXt towers `convnext_*`, open_clip's modified ResNets `RN*`) lives in
`clipvis.modeling.image_towers`, one module per family; the text tower is shared.

The whole CLIP model stays frozen in eval mode: no parameter requires a gradient and
`.train()` on a parent module never switches its BatchNorms or dropouts to training mode.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import open_clip
from open_clip.pretrained import get_pretrained_cfg, is_pretrained_cfg
import torch
from torch import Tensor, nn

from clipvis.errors import CheckpointError, ClipvisError
from clipvis.modeling.image_towers import FEATURE_STRIDES, ClipImageTower, image_tower_for

__all__ = ["ClipBackbone", "FEATURE_STRIDES", "encode_text_tokens"]


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's "no pretrained weights loaded" warning while a model is created."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _cached_pretrained_file(model_name: str, tag: str) -> Path | None:
    """The local file of open_clip's pretrained weights `tag` for `model_name` if it is already
    downloaded (Hugging Face cache or open_clip's URL cache), else None. Never downloads."""
    cfg = get_pretrained_cfg(model_name, tag)
    if cfg.get("file"):
        path = Path(cfg["file"]).expanduser()
        return path if path.is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hub)
            filename = filename or "open_clip_pytorch_model.bin"
            candidates = [filename]
            if filename == "open_clip_pytorch_model.bin":
                candidates.insert(0, "open_clip_model.safetensors")
            elif filename.endswith((".bin", ".pth")):
                candidates.insert(0, filename[:-4] + ".safetensors")
            for name in candidates:
                found = try_to_load_from_cache(repo_id=repo_id, filename=name)
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
    url = cfg.get("url", "")
    if url:
        path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if path.is_file():
            return path
    return None


def offline() -> bool:
    """True when downloads are switched off: HF_HUB_OFFLINE=1 (Hugging Face's switch) or CLIPVIS_OFFLINE=1."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "CLIPVIS_OFFLINE"))


def _resolve_pretrained(model_name: str, pretrained: str) -> Path:
    """A local weights file for `pretrained`: a file path, or an open_clip pretrained tag, taken from the local
    cache or, on first use, downloaded into it as open_clip does (not when `offline()`)."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if not is_pretrained_cfg(model_name, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise ClipvisError(
            f"CLIP weights {pretrained!r} are neither a file nor an open_clip pretrained tag of "
            f"{model_name!r} (known tags: {tags}); give a local weights file or one of those tags"
        )
    cached = _cached_pretrained_file(model_name, pretrained)
    if cached is not None:
        return cached
    fetch = ("python -c \"import open_clip; "
             f"open_clip.create_model('{model_name}', pretrained='{pretrained}')\"")
    if offline():
        raise ClipvisError(
            f"open_clip weights {model_name}/{pretrained} are not in the local cache and downloads are off "
            f"(HF_HUB_OFFLINE / CLIPVIS_OFFLINE); fetch them once on a machine with internet with: {fetch} "
            "(or pass the path of a local weights file)"
        )
    from open_clip.pretrained import download_pretrained

    logging.getLogger(__name__).warning("downloading CLIP weights %s/%s (first use; cached for the next runs)",
                                        model_name, pretrained)
    try:
        downloaded = download_pretrained(get_pretrained_cfg(model_name, pretrained))
    except Exception as error:  # network, hub or disk errors of many kinds
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ClipvisError(
            f"could not download open_clip weights {model_name}/{pretrained} ({reason}); without internet, "
            f"fetch them once elsewhere with: {fetch}, copy the cache (~/.cache/huggingface) here, or pass a local "
            "weights file"
        ) from None
    if not downloaded or not Path(downloaded).is_file():
        raise ClipvisError(f"open_clip found no weights file for {model_name}/{pretrained}; pass a local weights file")
    return Path(downloaded)


def encode_text_tokens(model: nn.Module, tokens: Tensor) -> Tensor:
    """An open_clip CLIP's text tower: tokens [N, context] -> [N, D] projected features at each prompt's
    end-of-text token, not normalized (what `model.encode_text(tokens)` gives).

    The text transformer is causal and the end-of-text token is the prompt's highest token id, so positions
    after the longest prompt cannot change the result: they are cut off, which makes short prompts several
    times cheaper than running the whole 77-token context. Towers of another kind fall back to encode_text."""
    if getattr(model, "text_pool_type", None) != "argmax" or getattr(model, "attn_mask", None) is None:
        return model.encode_text(tokens, normalize=False)
    end = tokens.argmax(dim=-1)
    length = int(end.max()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), end]
    projection = model.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class ClipBackbone(nn.Module):
    """A frozen open_clip CLIP model exposing CLIP-VIS's backbone features, dense-feature
    mask pooling and text encoding.

    State-dict keys are `clip_model.<open_clip key>`, i.e. the official checkpoint's
    `backbone.clip_model.<x>` without the leading `backbone.`.
    """

    def __init__(self, model_name: str, pretrained: str | None = None):
        """model_name: an open_clip model name (`convnext_base_w_320`, `RN50`, ...).
        pretrained: None (random init, weights come later from a checkpoint), a local weights
        file, or an open_clip pretrained tag (from the local cache, or downloaded into it on first use
        unless HF_HUB_OFFLINE / CLIPVIS_OFFLINE is set)."""
        super().__init__()
        from clipvis.config.open_clip_models import register_open_clip_configs

        register_open_clip_configs()  # our own (tiny) model configs become known to open_clip
        if model_name not in open_clip.list_models():
            raise ClipvisError(
                f"unknown CLIP model {model_name!r}; use an open_clip model name such as "
                "'convnext_base_w_320' or 'RN50' (see open_clip.list_models())"
            )
        weights = _resolve_pretrained(model_name, pretrained) if pretrained else None
        with _quiet_open_clip():
            # device None: built where torch builds it, not moved (moving fails for `parameters_on_meta`)
            self.clip_model = open_clip.create_model(model_name, pretrained=None, load_weights=False, device=None)
        if weights is not None:
            try:
                open_clip.load_checkpoint(self.clip_model, str(weights))
            except Exception as error:  # torch/open_clip raise many kinds of errors here
                raise CheckpointError(
                    f"could not load CLIP weights {weights} into {model_name}: {error}; "
                    "check that the file belongs to this model"
                ) from error
        self.model_name = model_name
        # the tower only reads clip_model.visual: it is not a submodule, so state-dict keys stay the original's
        self.tower: ClipImageTower = image_tower_for(self.clip_model.visual, model_name)
        self._tokenizer = open_clip.get_tokenizer(model_name)
        for parameter in self.clip_model.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "ClipBackbone":
        """The backbone is frozen: it stays in eval mode whatever `mode` says."""
        return super().train(False)

    @property
    def logit_scale(self) -> Tensor:
        """CLIP's learned log temperature (a scalar tensor)."""
        return self.clip_model.logit_scale

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint image-text embedding space."""
        return int(self.clip_model.text_projection.shape[-1])

    def output_shapes(self) -> dict[str, tuple[int, int]]:
        """{feature name: (channels, stride)} for res2..res5 and clip_vis_dense."""
        return self.tower.output_shapes()

    @torch.no_grad()
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images [B,3,H,W], already normalized -> {"res2": [B,C2,H/4,W/4], "res3": [B,C3,H/8,W/8],
        "res4": [B,C4,H/16,W/16], "res5": [B,C5,H/32,W/32], "clip_vis_dense": [B,C5,H/32,W/32]}
        (sizes rounded as the convolutions round them)."""
        return self.tower.features(images)

    def text_tensors(self) -> list[Tensor]:
        """The text tower's parameters and buffers (everything of the CLIP model outside `visual` but the
        logit scale): only used to encode vocabularies."""
        named = list(self.clip_model.named_parameters()) + list(self.clip_model.named_buffers())
        return [t for name, t in named if not name.startswith("visual.") and name != "logit_scale"]

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 128, progress: bool = False) -> Tensor:
        """texts: N prompts -> [N, D] projected end-of-text features, not normalized.
        Prompts are encoded `batch_size` at a time (similar lengths together, each batch cut after its longest
        prompt) to bound memory and time; `progress` shows a bar over the prompts."""
        device = self.clip_model.logit_scale.device
        if not texts:
            return torch.zeros(0, self.embed_dim, device=device)
        tokens = self._tokenizer(list(texts)).to(device)
        # batch prompts of similar length together: each batch only runs up to its longest prompt
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
        features = torch.empty(len(texts), self.embed_dim, device=device)
        from tqdm import tqdm

        with tqdm(total=len(texts), unit="prompt", desc="text encoding", disable=not progress, leave=False) as bar:
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                features[rows] = encode_text_tokens(self.clip_model, tokens[rows]).to(features.dtype)
                bar.update(len(rows))
        return features

    @torch.no_grad()
    def pooled_embeddings(self, dense: Tensor, masks: Tensor) -> Tensor:
        """dense [B,C,h,w] clip_vis_dense, masks [B,Q,h,w] mask logits at the dense resolution
        -> [B,Q,D] CLIP image embeddings of each mask's region (pixels with logit > 0), as the
        image tower's family pools them (`clipvis.modeling.image_towers`)."""
        if masks.shape[-2:] != dense.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} must be at the dense size {tuple(dense.shape[-2:])}")
        return self.tower.pooled_embeddings(dense, (masks > 0).to(dense.dtype))
