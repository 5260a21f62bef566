"""Teacher forcing of the masked-attention decoder with the original's recorded attention masks.

The decoder's masked cross-attention binarizes each layer's mask logits (`sigmoid < 0.5`). An entry whose
logit lies within float rounding of 0 can come out either way on different CPUs (the original reproduces its
own fixtures across an AMD EPYC and an Intel Xeon only to ~4e-4 of scale because of one such flip), and the
flip changes what every later layer attends to. The fixtures therefore record, per window and per prediction
head call, the mask the original returned (`decoder_attn_masks`, see ../shared/reference/README.md).

`replay_attention_masks(fixture)` puts an `AttentionMaskReplay` in place of
`clipvis.modeling.transformer_decoder.hidden_positions` (the decoder's one thresholded decision) for the
duration of a `with` block. Every call still computes our own decision from our own logits and compares it
with the recorded one, keeping each disagreement with its logit (at the attention resolution), so a test can
require that decisions differ only within a stated margin of the threshold. With `force=True` (teacher
forcing) the recorded decision is returned, otherwise ours (free running).

The decoder must be fed the fixture's frames in order, any number per forward (the predictor's one frame per
forward, or a whole window); calls are matched to frames by counting.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clipvis.modeling import transformer_decoder


def unpack_attention_masks(record: dict) -> torch.Tensor:
    """One recorded call `{"shape": (B, Q, h, w), "packed": uint8}` -> bool `[B, Q, h*w]`, True = hidden."""
    b, q, h, w = (int(v) for v in record["shape"])
    packed = np.asarray(torch.as_tensor(record["packed"]).numpy(), dtype=np.uint8)
    bits = np.unpackbits(packed)[: b * q * h * w].reshape(b, q, h * w)
    return torch.from_numpy(bits.astype(bool))


@dataclass
class Disagreement:
    """One attention-mask entry where our decision differs from the original's."""

    frame: int
    call: int  # prediction-head call: 0 = heads on the learnable queries, then one per layer
    query: int
    position: int
    logit: float  # our mask logit there, at the attention resolution
    scale: float  # max |logit| of that call and frame (the margin is relative to it)


class AttentionMaskReplay:
    """Stands in for `hidden_positions(mask_logits, size)`: see the module docstring.

    fixture: an inference fixture with `decoder_attn_masks` and `meta["dec_layers"]`.
    force: return the recorded decisions (True) or our own (False).
    """

    def __init__(self, fixture: dict, force: bool = True):
        if "decoder_attn_masks" not in fixture:
            pytest.fail("this fixture records no decoder_attn_masks: regenerate it with the reference harness")
        self.force = force
        self.calls_per_forward = int(fixture["meta"]["dec_layers"]) - 1  # the last head call's mask is unused
        self._own = transformer_decoder.hidden_positions
        self.per_frame: List[List[torch.Tensor]] = []  # [frame][call] -> bool [Q, h*w]
        for window_calls in fixture["decoder_attn_masks"]:
            unpacked = [unpack_attention_masks(record) for record in window_calls]
            for b in range(unpacked[0].shape[0]):
                self.per_frame.append([calls[b] for calls in unpacked])
        self.frames_done = 0
        self._call = 0
        self.entries = 0  # decisions compared
        self.disagreements: List[Disagreement] = []

    def __call__(self, mask_logits: torch.Tensor, size) -> torch.Tensor:
        ours = self._own(mask_logits, size)  # [B, Q, h*w]
        batch = ours.shape[0]
        if self.frames_done + batch > len(self.per_frame):
            pytest.fail(f"the decoder ran on more frames than the fixture recorded ({len(self.per_frame)})")
        recorded = torch.stack([self.per_frame[self.frames_done + b][self._call] for b in range(batch)])
        if recorded.shape != ours.shape:
            pytest.fail(f"recorded attention mask of call {self._call} has shape {tuple(recorded.shape)}, "
                        f"ours {tuple(ours.shape)}")
        recorded = recorded.to(ours.device)
        differ = ours != recorded
        self.entries += ours.numel()
        if differ.any():
            logits = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False).flatten(2)
            scales = logits.abs().amax(dim=(1, 2))
            for b, q, p in differ.nonzero().tolist():
                self.disagreements.append(Disagreement(
                    self.frames_done + b, self._call, q, p, float(logits[b, q, p]), float(scales[b])))
        self._call += 1
        if self._call == self.calls_per_forward:
            self._call = 0
            self.frames_done += batch
        return recorded if self.force else ours

    def check_decisions(self, margin: float, max_fraction: float = 1e-4) -> None:
        """Fail unless every disagreement has |logit| <= margin x the scale of its call's logits, and at most
        `max_fraction` of the compared entries disagree. The message lists the worst ones."""
        far = [d for d in self.disagreements if abs(d.logit) > margin * d.scale]
        worst = sorted(self.disagreements, key=lambda d: -abs(d.logit) / d.scale)[:5]
        summary = ", ".join(
            f"frame {d.frame} call {d.call} query {d.query}: logit {d.logit:.3g} (scale {d.scale:.3g})" for d in worst)
        assert not far, (f"{len(far)} attention-mask decisions differ from the original's far from the threshold "
                         f"(beyond {margin:g} x scale): {summary}")
        fraction = len(self.disagreements) / max(self.entries, 1)
        assert fraction <= max_fraction, (f"{len(self.disagreements)} of {self.entries} attention-mask decisions "
                                          f"differ ({fraction:.2g} > {max_fraction:g}): {summary}")


@contextmanager
def replay_attention_masks(fixture: dict, force: bool = True) -> Iterator[AttentionMaskReplay]:
    """Within the block, the decoder's attention-mask decisions are compared with (and, if `force`, replaced
    by) the fixture's recorded ones; yields the `AttentionMaskReplay` with the comparison's record."""
    replay = AttentionMaskReplay(fixture, force=force)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer_decoder, "hidden_positions", replay)
        yield replay


class ThresholdMonitor:
    """Stands in for `hidden_positions` where nothing was recorded (the training-loss fixtures): returns our
    own decisions and notes, per call in order, how many entries lie within `margin` x scale of the threshold
    (decisions another CPU may take the other way)."""

    def __init__(self, margin: float):
        self.margin = margin
        self._own = transformer_decoder.hidden_positions
        self.near_ties: List[int] = []  # per call

    def __call__(self, mask_logits: torch.Tensor, size) -> torch.Tensor:
        logits = F.interpolate(mask_logits.float(), size=size, mode="bilinear", align_corners=False).flatten(2)
        scales = logits.abs().amax(dim=(1, 2), keepdim=True)
        self.near_ties.append(int((logits.abs() <= self.margin * scales).sum()))
        return self._own(mask_logits, size)

    def first_tie(self) -> int:
        """Index of the first call with a near-tie entry, or the number of calls when there is none."""
        return next((i for i, n in enumerate(self.near_ties) if n), len(self.near_ties))


@contextmanager
def monitor_attention_thresholds(margin: float) -> Iterator[ThresholdMonitor]:
    """Within the block, the decoder's attention-mask decisions are its own; yields the `ThresholdMonitor`."""
    monitor = ThresholdMonitor(margin)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformer_decoder, "hidden_positions", monitor)
        yield monitor
