"""The temporal top-K tracker against the original's recorded tracker runs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from clipvis.errors import ClipvisError
from clipvis.modeling.tracker import TemporalTopKTracker, apply_permutations, track_queries
from conftest import assert_close, inference_fixture_paths, load_fixture

PATHS = inference_fixture_paths()
IDS = [p.name for p in PATHS]


@pytest.fixture(scope="module", params=PATHS, ids=IDS)
def fx(request):
    """One inference fixture, loaded once per module."""
    return load_fixture(request.param)


def _exact(actual, expected, name):
    assert_close(actual, expected, rel=0.0, name=name)


def test_tracker_only_reproduces_outputs(fx):
    meta, run = fx["meta"], fx["tracker_only"]
    inputs, outputs = run["inputs"], run["outputs"]
    perms = track_queries(inputs["pred_embds"], meta["memory"], meta["topk"])

    per_frame_obj = apply_permutations(inputs["pred_object_logits"], perms).transpose(0, 1)  # [Q, T, 2]
    _exact(per_frame_obj, outputs["pred_per_frame_obj_logits"][0], "per-frame object logits")
    _exact(apply_permutations(inputs["pred_masks"], perms).transpose(0, 1), outputs["pred_masks"][0], "masks")
    _exact(apply_permutations(inputs["pred_ious"], perms).transpose(0, 1), outputs["pred_ious"][0], "ious")
    assert_close(per_frame_obj.mean(1), outputs["pred_obj_logits"][0], rel=1e-5, name="mean object logits")


def test_tracker_calls_on_decoder_outputs(fx):
    meta, decoder, tracked = fx["meta"], fx["decoder"], fx["tracked"]
    perms = track_queries(decoder["pred_embds"], meta["memory"], meta["topk"])

    num_frames, num_queries = decoder["pred_embds"].shape[:2]
    assert perms.shape == (num_frames, num_queries)
    assert torch.equal(perms[0], torch.arange(num_queries))
    assert len(fx["tracker_calls"]) == num_frames - 1
    for i, call in enumerate(fx["tracker_calls"]):
        assert torch.equal(perms[i + 1], call["indices"]), f"permutation of frame {i + 1} differs"

    per_frame_obj = apply_permutations(decoder["pred_object_logits"], perms).transpose(0, 1)
    assert_close(per_frame_obj, tracked["pred_per_frame_obj_logits"][0], rel=1e-5, name="per-frame object logits")
    assert_close(per_frame_obj.mean(1), tracked["pred_obj_logits"][0], rel=1e-5, name="mean object logits")
    ious = apply_permutations(decoder["pred_ious"], perms).transpose(0, 1)
    assert_close(ious, tracked["pred_ious"][0], rel=1e-5, name="ious")


def test_streaming_step_equals_whole_video(fx):
    meta, embeddings = fx["meta"], fx["decoder"]["pred_embds"]
    whole = track_queries(embeddings, meta["memory"], meta["topk"])

    tracker = TemporalTopKTracker(memory=meta["memory"], topk=meta["topk"])
    for _ in range(2):  # the second pass checks that reset() forgets the first video
        tracker.reset()
        streamed = torch.stack([tracker.step(frame) for frame in embeddings])
        assert torch.equal(streamed, whole)


def _per_frame_reference(embeddings, memory, topk):
    """The matching rule spelled out one memory frame at a time (no batching), as the brief states it."""
    tracks = [embeddings[0]]
    perms = [torch.arange(embeddings.shape[1])]
    for frame in embeddings[1:]:
        current = frame / frame.norm(dim=1, keepdim=True)
        weighted, candidates, totals = [], [], []
        for i, past in enumerate(tracks[-memory:]):
            cost = 1 - current @ (past / past.norm(dim=1, keepdim=True)).t()  # [current, track]
            perm = torch.from_numpy(linear_sum_assignment(cost.t().numpy())[1].astype(np.int64))
            candidates.append(perm)
            totals.append(cost[perm, torch.arange(len(perm))].sum())
            weighted.append(cost * (i + 1))
        totals = torch.stack(totals)
        if len(totals) < topk:
            perm = candidates[int(torch.topk(totals, 1, largest=False).indices)]
        else:
            chosen = torch.topk(totals, topk, largest=False).indices
            voted = torch.stack(weighted)[chosen].mean(0)
            perm = torch.from_numpy(linear_sum_assignment(voted.t().numpy())[1].astype(np.int64))
        perms.append(perm)
        tracks.append(frame[perm])
    return torch.stack(perms)


@pytest.mark.parametrize("memory,topk", [(9, 5), (3, 2), (4, 6), (1, 1)])
def test_batched_costs_equal_per_frame_matching_on_hard_data(memory, topk):
    """Noisy, drifting embeddings where the recency-weighted vote and the top-K choice matter."""
    generator = torch.Generator().manual_seed(memory * 10 + topk)
    base = torch.randn(16, 8, generator=generator)
    frames = []
    for _ in range(14):
        noisy = base + 1.2 * torch.randn(16, 8, generator=generator)
        frames.append(noisy[torch.randperm(16, generator=generator)])
    embeddings = torch.stack(frames)
    assert torch.equal(track_queries(embeddings, memory, topk), _per_frame_reference(embeddings, memory, topk))


def test_apply_permutations_matches_indexing():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 3, 2, generator=generator)
    perms = torch.stack([torch.randperm(6, generator=generator) for _ in range(4)])
    out = apply_permutations(x, perms)
    for t in range(4):
        assert torch.equal(out[t], x[t][perms[t]])


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ClipvisError, match="memory"):
        TemporalTopKTracker(memory=0)
    with pytest.raises(AssertionError, match=r"\[T, Q, C\]"):
        track_queries(torch.randn(5, 8))
    tracker = TemporalTopKTracker()
    tracker.step(torch.randn(5, 8))
    with pytest.raises(AssertionError, match="same number of queries"):
        tracker.step(torch.randn(6, 8))
    with pytest.raises(AssertionError, match=r"\[T, Q\]"):
        apply_permutations(torch.randn(3, 5, 2), torch.zeros(3, 4, dtype=torch.long))
