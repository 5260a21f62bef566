"""Score fusion and instance selection against the original's recorded final outputs."""
from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from clipvis.errors import ClipvisError
from clipvis.inference.instance_selection import (
    ClassScoreAccumulator,
    frame_keep,
    fuse_class_scores,
    mask_scores,
    per_frame_mask_stats,
    select_instances,
    top_query_class_pairs,
)
from clipvis.modeling.tracker import apply_permutations, track_queries
from conftest import assert_close, inference_fixture_paths, load_fixture

PATHS = inference_fixture_paths()
IDS = [p.name for p in PATHS]


@pytest.fixture(scope="module", params=PATHS, ids=IDS)
def fx(request):
    """One inference fixture plus its tracked per-query tensors ([Q, T, ...]), built once."""
    data = load_fixture(request.param)
    meta, decoder = data["meta"], data["decoder"]
    perms = track_queries(decoder["pred_embds"], meta["memory"], meta["topk"])
    data["ours"] = {
        "masks": apply_permutations(decoder["pred_masks"], perms).transpose(0, 1),
        "ious": apply_permutations(decoder["pred_ious"], perms).transpose(0, 1),
        "object_logits": apply_permutations(decoder["pred_object_logits"], perms).transpose(0, 1),
    }
    return data


def _fusion_inputs(fx):
    """Class logits whose softmax is the recorded per-frame probability (softmax(log p) = p)."""
    classify, tracked = fx["classify"], fx["tracked"]
    return (
        classify["per_frame_cls_prob"].log(),
        tracked["pred_ious"][0],
        tracked["pred_per_frame_obj_logits"][0],
    )


def test_fuse_class_scores(fx):
    logits, ious, object_logits = _fusion_inputs(fx)
    final, per_frame_prob = fuse_class_scores(logits, ious, object_logits)
    assert_close(final, fx["classify"]["final_cls_score"], rel=1e-5, name="final class score")
    assert_close(per_frame_prob, fx["classify"]["per_frame_cls_prob"], rel=1e-5, name="per-frame class prob")


def test_accumulator_equals_whole_video_fusion(fx):
    logits, ious, object_logits = _fusion_inputs(fx)
    accumulator = ClassScoreAccumulator()
    for t in range(logits.shape[1]):
        prob = accumulator.add_frame(logits[:, t], ious[:, t], object_logits[:, t])
        assert_close(prob, fx["classify"]["per_frame_cls_prob"][:, t], rel=1e-5, name=f"frame {t} class prob")
    assert accumulator.num_frames == logits.shape[1]
    assert_close(accumulator.finalize(), fx["classify"]["final_cls_score"], rel=1e-5, name="accumulated score")


def test_tracked_inputs_match_recorded(fx):
    """The masks this module is fed follow the recorded tracking (sanity check of the fixture chain)."""
    assert_close(fx["ours"]["object_logits"], fx["classify"]["per_frame_object_logits"], rel=1e-6, name="object")
    assert_close(fx["ours"]["ious"], fx["tracked"]["pred_ious"][0], rel=1e-6, name="ious")


TIE = 1e-6  # relative margin within which a thresholded decision may go either way on another CPU


def _pair_instances(result, expected, fx) -> torch.Tensor:
    """Index into `expected` for each instance of `result`, comparing decisions with their margins in mind.

    The inputs are the original's recorded tensors, so masks of a pair are identical frame by frame except
    where a decision could flip with float rounding: a frame kept by one side and suppressed (all -1) by the
    other is accepted only if its per-frame score is within TIE of 0.1 x the pair's score, and a pair that
    only one side selected only if its score ties with the top-k cut. Every other difference fails."""
    classify = fx["classify"]
    ours_m, exp_m = result["pred_masks"], expected["pred_masks"]
    n, m = len(ours_m), len(exp_m)
    same_frame = (ours_m.flatten(2)[:, None] == exp_m.flatten(2)[None]).all(-1)  # [n, m, T]
    cost = (~same_frame).sum(-1).double() + 1e6 * (result["pred_classes"][:, None] != expected["pred_classes"][None])
    rows, cols = linear_sum_assignment(cost.numpy())
    # margins of our decisions
    scores = classify["final_cls_score"][result["query_indices"], result["pred_classes"]]
    per_frame_score = (classify["per_frame_cls_prob"][result["query_indices"], :, result["pred_classes"]].sigmoid()
                       * classify["per_frame_object_logits"][result["query_indices"]].softmax(-1)[..., 0]) ** 0.5
    keep_tie = (per_frame_score / (0.1 * scores[:, None]) - 1).abs() <= TIE  # [n, T]
    flat = classify["final_cls_score"].flatten().sort(descending=True).values
    cut = flat[min(n, len(flat)) - 1]
    for i, j in zip(rows.tolist(), cols.tolist()):
        if cost[i, j] >= 1e6:
            assert (scores[i] / cut - 1).abs() <= TIE, f"instance {i} (score {scores[i]:.6g}) is not the original's"
            continue
        for t in (~same_frame[i, j]).nonzero().flatten().tolist():
            one_suppressed = bool((ours_m[i, t] == -1).all() or (exp_m[j, t] == -1).all())
            assert one_suppressed and keep_tie[i, t], (
                f"instance {i} frame {t} differs from the original's, and not by a suppression decision at a tie")
    assert n == m
    order = torch.empty(n, dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return order


def test_select_instances_matches_original(fx):
    classify, expected, meta = fx["classify"], fx["final"], fx["meta"]
    result = select_instances(
        classify["final_cls_score"],
        classify["per_frame_cls_prob"],
        classify["per_frame_object_logits"],
        fx["ours"]["masks"],
        meta["per_video"],
    )
    count = min(meta["per_video"], classify["final_cls_score"].numel())
    assert result["scores"].shape == (count,)
    assert result["frame_keep"].shape == (count, fx["ours"]["masks"].shape[1])
    order = _pair_instances(result, expected, fx)
    assert_close(result["scores"], expected["scores"][order], rel=1e-5, name="scores")
    assert torch.all(result["scores"][:-1] >= result["scores"][1:]), "instances are not ordered by score"
    # the query index says where each instance's (unsuppressed) masks came from
    source = fx["ours"]["masks"][result["query_indices"]]
    kept = result["frame_keep"]
    assert torch.equal(result["pred_masks"][kept], source[kept])
    assert bool((result["pred_masks"][~kept] == -1).all())


def test_stats_path_equals_dense_path(fx):
    """The streaming engine's path: stats per (query, frame), gathered for the pairs afterwards."""
    classify, meta = fx["classify"], fx["meta"]
    masks = fx["ours"]["masks"]
    dense = select_instances(
        classify["final_cls_score"], classify["per_frame_cls_prob"], classify["per_frame_object_logits"],
        masks, meta["per_video"],
    )
    query_sums, query_counts = per_frame_mask_stats(masks)  # [Q, T]
    scores, classes, queries = top_query_class_pairs(classify["final_cls_score"], meta["per_video"])
    keep = frame_keep(
        classify["per_frame_cls_prob"][queries, :, classes], classify["per_frame_object_logits"][queries], scores
    )
    streamed = scores * mask_scores(query_sums[queries], query_counts[queries], keep)
    order = torch.sort(streamed, descending=True, stable=True).indices
    assert_close(streamed[order], dense["scores"], rel=1e-5, name="stats-path scores")
    assert torch.equal(classes[order], dense["pred_classes"])
    assert torch.equal(queries[order], dense["query_indices"])
    assert torch.equal(keep[order], dense["frame_keep"])


def test_suppressed_frames_and_mask_score(fx):
    """Frames whose per-frame score falls below 0.1 x the pair's score become -1 and stop counting.

    The recorded videos rarely trigger suppression, so make some frames of every query clearly
    non-objects and compare against the original's whole-tensor formula for the mask score.
    """
    classify, meta = fx["classify"], fx["meta"]
    masks = fx["ours"]["masks"]
    object_logits = classify["per_frame_object_logits"].clone()
    num_queries, num_frames = object_logits.shape[:2]
    generator = torch.Generator().manual_seed(0)
    silenced = torch.rand(num_queries, num_frames, generator=generator) < 0.3
    object_logits[silenced] = torch.tensor([-30.0, 30.0])

    result = select_instances(
        classify["final_cls_score"], classify["per_frame_cls_prob"], object_logits, masks, meta["per_video"]
    )
    queries, classes, keep = result["query_indices"], result["pred_classes"], result["frame_keep"]
    class_scores = classify["final_cls_score"][queries, classes]
    # the per-frame score as the original writes it: sigmoid of the softmax probability
    per_frame_score = (
        classify["per_frame_cls_prob"][queries, :, classes].sigmoid() * object_logits[queries].softmax(-1)[..., 0]
    ) ** 0.5
    assert torch.equal(keep, per_frame_score >= 0.1 * class_scores[:, None])
    assert not bool(keep[silenced[queries]].any()), "a silenced frame was kept"
    assert bool((result["pred_masks"][~keep] == -1).all())

    pred = result["pred_masks"].flatten(1)
    positive = (pred > 0).float()
    whole_mask_score = (pred.sigmoid() * positive).sum(1) / (positive.sum(1) + 1e-6)
    assert_close(result["scores"], class_scores * whole_mask_score, rel=1e-5, name="scores with suppression")

    sums, counts = per_frame_mask_stats(masks[queries])
    assert_close(class_scores * mask_scores(sums, counts, keep), result["scores"], rel=1e-5, name="stats path")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ClipvisError, match="at least 1"):
        top_query_class_pairs(torch.rand(4, 3), 0)
    with pytest.raises(AssertionError, match="expected"):
        fuse_class_scores(torch.rand(4, 2, 3), torch.rand(4, 2, 1), torch.rand(4, 3, 2))
    with pytest.raises(AssertionError, match="before any frame"):
        ClassScoreAccumulator().finalize()
    with pytest.raises(AssertionError, match="expected"):
        select_instances(torch.rand(4, 3), torch.rand(4, 2, 3), torch.rand(4, 2, 2), torch.rand(4, 5, 8), 2)
