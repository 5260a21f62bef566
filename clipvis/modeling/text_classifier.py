"""Open-vocabulary classification: the vocabulary, its CLIP text classifier, and the class
logits of masks pooled from CLIP's dense image features.

A vocabulary is a list of classes, each a list of synonyms. Every synonym is put into 14
prompt templates; its classifier row is the mean of the normalized prompt embeddings,
normalized again. A mask's logit for a class is the best of its synonyms' scaled cosines.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from clipvis._io import save_torch_atomic
from clipvis.errors import VocabularyError

if TYPE_CHECKING:
    from clipvis.modeling.clip_backbone import ClipBackbone

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

MAX_LOGIT_SCALE = 100.0


def parse_vocabulary(vocab: str | Sequence[str]) -> list[list[str]]:
    """A vocabulary -> one list of synonyms per class.

    `vocab` is either a string of classes separated by ';' ("person; dog, puppy; red car") or a
    sequence of class names; inside a class name ',' separates synonyms. Synonyms keep their inner
    spaces; a ", " separator loses its space, as in the original (other surrounding spaces are
    stripped too). Raises VocabularyError for an empty vocabulary, a blank class or a blank synonym.
    """
    if isinstance(vocab, str):
        names = vocab.split(";")
        if not vocab.strip():
            raise VocabularyError("the vocabulary is empty; give class names separated by ';'")
    else:
        names = list(vocab)
        if not names:
            raise VocabularyError("the vocabulary is empty; give at least one class name")
    classes: list[list[str]] = []
    for position, name in enumerate(names, start=1):
        if not isinstance(name, str):
            raise VocabularyError(f"class {position} of the vocabulary is {name!r}, not a string")
        if not name.strip():
            raise VocabularyError(
                f"class {position} of the vocabulary is blank; remove the empty entry (e.g. a doubled ';')"
            )
        synonyms = [synonym.strip() for synonym in name.split(",")]
        if any(not synonym for synonym in synonyms):
            raise VocabularyError(
                f"class {position} ({name.strip()!r}) has a blank synonym; remove the stray ','"
            )
        classes.append(synonyms)
    return classes


def templated_prompts(classes: list[list[str]]) -> tuple[list[str], list[int]]:
    """classes (synonyms per class) -> (prompts, synonyms per class).

    Prompts are ordered class by class, synonym by synonym, template by template, so that the
    prompts of synonym s are prompts[14*s : 14*(s+1)] when synonyms are numbered across classes."""
    prompts = [template.format(synonym) for synonyms in classes for synonym in synonyms for template in PROMPT_TEMPLATES]
    return prompts, [len(synonyms) for synonyms in classes]


@torch.no_grad()
def build_text_classifier(
    backbone: "ClipBackbone", classes: list[list[str]], progress: bool = False
) -> tuple[Tensor, list[int]]:
    """CLIP text classifier of a vocabulary -> ([S, D] one unit row per synonym, S = total synonyms;
    the number of synonyms of each class). Each row is the normalized mean of the normalized
    embeddings of the synonym's 14 prompts. `progress` shows a bar over the prompts."""
    prompts, num_synonyms = templated_prompts(classes)
    embeddings = backbone.encode_text(prompts, progress=progress)
    embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)
    per_synonym = embeddings.reshape(-1, len(PROMPT_TEMPLATES), embeddings.shape[-1]).mean(dim=1)
    return per_synonym / per_synonym.norm(dim=-1, keepdim=True), num_synonyms


def _text_tower_digest(backbone: "ClipBackbone") -> str:
    """Hash of every text-tower tensor (everything in the CLIP model but the image tower)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(backbone.clip_model.state_dict().items()):
        if name.startswith("visual."):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def cached_text_classifier(
    backbone: "ClipBackbone", classes: list[list[str]], cache_dir: Path | None, progress: bool = False
) -> tuple[Tensor, list[int]]:
    """build_text_classifier with an on-disk cache: ([S, D] classifier, synonyms per class).

    The cache file in `cache_dir` is keyed by the CLIP model name, a hash of the text-tower
    weights and the prompts, so a large vocabulary is encoded once. cache_dir None: no cache."""
    if cache_dir is None:
        return build_text_classifier(backbone, classes, progress)
    prompts, num_synonyms = templated_prompts(classes)
    key = hashlib.blake2b(digest_size=16)
    key.update(backbone.model_name.encode())
    key.update(_text_tower_digest(backbone).encode())
    key.update("\n".join(prompts).encode())
    key.update(repr(num_synonyms).encode())
    path = Path(cache_dir) / f"text_classifier-{backbone.model_name}-{key.hexdigest()}.pt"
    device = backbone.logit_scale.device
    if path.is_file():
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            if stored["prompts"] == prompts and stored["num_synonyms"] == num_synonyms:
                return stored["classifier"].to(device), list(stored["num_synonyms"])
        except Exception:  # a damaged cache file is rebuilt below
            pass
    classifier, num_synonyms = build_text_classifier(backbone, classes, progress)
    save_torch_atomic({"classifier": classifier.cpu(), "num_synonyms": num_synonyms, "prompts": prompts}, path)
    return classifier, num_synonyms


@dataclass
class Vocabulary:
    """Class names (each a list of synonyms) and their text embeddings.

    classifier: `[S, D]` normalized text embeddings, S = total synonyms; num_synonyms: synonyms per class.
    """

    classes: list[list[str]]
    classifier: Tensor
    num_synonyms: list[int]

    @property
    def names(self) -> list[str]:
        """One display name per class: its synonyms joined by ', '."""
        return [", ".join(c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)


@torch.no_grad()
def encode_vocabulary(
    backbone: "ClipBackbone", vocabulary: str | Sequence[str], cache_dir: Path | None = None, progress: bool = False
) -> Vocabulary:
    """Class names ("person; dog, puppy" or a list; ',' separates synonyms) -> `Vocabulary` with the text
    classifier of the backbone's text tower (cached on disk in `cache_dir` when given; `progress` shows a
    bar over the prompts)."""
    classes = parse_vocabulary(vocabulary)
    classifier, num_synonyms = cached_text_classifier(backbone, classes, cache_dir, progress)
    return Vocabulary(classes, classifier, list(num_synonyms))


def classification_logits(
    embeddings: Tensor, classifier: Tensor, logit_scale: Tensor, num_synonyms: list[int]
) -> Tensor:
    """embeddings [..., D], classifier [S, D], logit_scale (log temperature, scalar),
    num_synonyms (K counts summing to S) -> class logits [..., K].

    Logit of a synonym = min(exp(logit_scale), 100) x cosine(embedding, classifier row);
    a class's logit is the maximum over its synonyms."""
    if sum(num_synonyms) != classifier.shape[0]:
        raise ValueError(f"num_synonyms sums to {sum(num_synonyms)} but the classifier has {classifier.shape[0]} rows")
    scale = torch.clamp(logit_scale.exp(), max=MAX_LOGIT_SCALE)
    synonym_logits = (scale * F.normalize(embeddings, dim=-1)) @ classifier.t()
    if all(count == 1 for count in num_synonyms):
        return synonym_logits
    # Gather each class's synonyms into a padded [K, max synonyms] table; padding repeats the
    # class's first synonym, which leaves the maximum unchanged.
    widest = max(num_synonyms)
    starts = torch.tensor([0] + num_synonyms[:-1]).cumsum(0)
    offsets = torch.arange(widest)
    counts = torch.tensor(num_synonyms)
    table = starts[:, None] + torch.where(offsets[None, :] < counts[:, None], offsets[None, :], 0)
    table = table.to(synonym_logits.device)
    return synonym_logits[..., table].amax(dim=-1)


@torch.no_grad()
def mask_class_logits(
    backbone: "ClipBackbone",
    dense: Tensor,
    masks: Tensor,
    classifier: Tensor,
    num_synonyms: list[int],
    frames_per_batch: int = 8,
) -> Tensor:
    """Per-frame open-vocabulary class logits of (tracked) masks.

    dense [T,C,h32,w32] clip_vis_dense, masks [T,Q,h4,w4] mask logits at stride 4 ->
    class logits [T,Q,K]. Masks are resized bilinearly (align_corners=False) to the dense size,
    pooled from that frame's dense features through CLIP's head, and scored against the text
    classifier. With a ResNet backbone a mask with no positive pixel at the dense size gets
    all-zero logits (as in the original). Frames are processed `frames_per_batch` at a time."""
    if dense.shape[0] != masks.shape[0]:
        raise ValueError(f"dense has {dense.shape[0]} frames but masks have {masks.shape[0]}")
    logits = []
    for start in range(0, dense.shape[0], frames_per_batch):
        frame_dense = dense[start:start + frames_per_batch]
        frame_masks = F.interpolate(
            masks[start:start + frames_per_batch].to(frame_dense.dtype),
            size=frame_dense.shape[-2:],
            mode="bilinear",
            align_corners=False,
        )
        embeddings = backbone.pooled_embeddings(frame_dense, frame_masks)
        frame_logits = classification_logits(embeddings, classifier, backbone.logit_scale, num_synonyms)
        if backbone.tower.empty_mask_logits_zero:
            empty = ~(frame_masks > 0).flatten(2).any(dim=-1)
            frame_logits = frame_logits.masked_fill(empty[..., None], 0.0)
        logits.append(frame_logits)
    if not logits:
        return dense.new_zeros(0, masks.shape[1], len(num_synonyms))
    return torch.cat(logits, dim=0)
