"""Video mask AP against the official evaluators' numbers (reference eval cases), plus cases derived from
them (reordered ids, extra / unpredicted / unknown categories, empty and in-memory results), crowd and
area rules where the LV-VIS and YouTube-VIS evaluators differ, bad inputs, and the `clipvis evaluate` CLI."""
from __future__ import annotations

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest

from clipvis.errors import ClipvisError
from clipvis.evaluation import (
    STAT_NAMES,
    EvalParams,
    evaluate_video_ap,
    evaluate_video_ap_full,
    format_metrics_table,
)
from clipvis.evaluation.tracks import load_ground_truth, load_results
from clipvis.evaluation.video_ap import MODE_RULES, compute_video_ap
from conftest import REPO_ROOT, reference_dir, skip_without_reference

TOL = 1e-12
MODE_KEYS = {"lvvis": "lvviseval", "ytvis": "ytvoseval"}


def eval_case_dirs():
    """Every folder under <reference>/eval with an expected.json, sorted by name."""
    folder = reference_dir() / "eval"
    return sorted(p for p in folder.glob("*") if (p / "expected.json").is_file())


CASES = eval_case_dirs()


@pytest.fixture(scope="module")
def case_data():
    """Per case folder: (gt dict, results list, expected dict), read once."""
    cache = {}

    def load(folder: Path):
        if folder not in cache:
            cache[folder] = tuple(json.loads((folder / n).read_text()) for n in ("gt.json", "results.json", "expected.json"))
        return copy.deepcopy(cache[folder])

    return load


def assert_stats_equal(actual: dict, expected: dict, name: str, tol: float = TOL):
    assert list(actual) == list(STAT_NAMES), name
    for key in STAT_NAMES:
        assert abs(actual[key] - expected[key]) <= tol, f"{name}.{key}: {actual[key]!r} != {expected[key]!r}"


def assert_per_category_equal(actual: dict, expected: dict, name: str):
    assert sorted(actual) == sorted(int(k) for k in expected), name
    for cid, row in expected.items():
        mine = actual[int(cid)]
        for key, value in row.items():
            if key in ("name", "partition") or value is None:
                assert mine[key] == value, f"{name}[{cid}].{key}: {mine[key]!r} != {value!r}"
            else:
                assert mine[key] is not None and abs(mine[key] - value) <= TOL, f"{name}[{cid}].{key}: {mine[key]!r} != {value!r}"


def assert_metrics_equal(a: dict, b: dict, name: str):
    for key in ("stats", "stats_base", "stats_novel"):
        assert (key in a) == (key in b), f"{name}: {key}"
        if key in a:
            assert_stats_equal(a[key], b[key], f"{name}.{key}")
    assert a["per_category"] == b["per_category"], name


# --------------------------------------------------------------------------- official numbers


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_reference_case_equals_official(case, mode, case_data):
    gt, results, expected = case_data(case)
    official = expected[MODE_KEYS[mode]]
    result = evaluate_video_ap_full(case / "gt.json", case / "results.json", mode=mode)
    metrics = result.metrics
    assert metrics["mode"] == mode
    assert_stats_equal(metrics["stats"], official["stats"], f"{case.name}/{mode}.stats")
    if mode == "lvvis":
        assert_stats_equal(metrics["stats_base"], official["stats_base"], f"{case.name}.stats_base")
        assert_stats_equal(metrics["stats_novel"], official["stats_novel"], f"{case.name}.stats_novel")
    else:
        assert "stats_base" not in metrics
    assert_per_category_equal(metrics["per_category"], official["per_category"], f"{case.name}/{mode}.per_category")
    if "recall" in official:  # the accumulated arrays themselves, where the case stores them
        np.testing.assert_allclose(result.recall, np.array(official["recall"]), rtol=0, atol=TOL)
    if "precision_area_all_maxdets_100" in official:
        np.testing.assert_allclose(result.precision[:, :, :, 0, -1], np.array(official["precision_area_all_maxdets_100"]), rtol=0, atol=TOL)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_default_mode_follows_partition(case, case_data):
    gt, results, expected = case_data(case)
    metrics = evaluate_video_ap(gt, results)
    assert metrics["mode"] == ("lvvis" if all("partition" in c for c in gt["categories"]) else "ytvis")


def _official_with_change(expected: dict, change: str) -> dict:
    stats = dict(expected["lvviseval"]["stats"])
    for key, delta in expected["diagnostics"]["stat_changes_when"][change].items():
        stats[key] += delta
    return stats


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_diagnostics_results_order_and_maxdets(case, case_data):
    """The diagnostics re-ran the official evaluator with one thing changed; we reproduce those we can."""
    gt, results, expected = case_data(case)
    changes = expected.get("diagnostics", {}).get("stat_changes_when", {})
    if "results_file_order_reversed" in changes:  # ties are broken by file order
        metrics = evaluate_video_ap(gt, list(reversed(results)), mode="lvvis")
        assert_stats_equal(metrics["stats"], _official_with_change(expected, "results_file_order_reversed"), "reversed")
    if "maxDets_1_10_1000_instead_of_1_10_100" in changes:
        parsed = load_ground_truth(gt, truncate_areas=True)
        run = compute_video_ap(parsed, load_results(results, parsed), MODE_RULES["lvvis"], EvalParams(max_dets=(1, 10, 1000)))
        assert_stats_equal(run.metrics["stats"], _official_with_change(expected, "maxDets_1_10_1000_instead_of_1_10_100"), "maxDets 1000")
    if "thresholds_np_arange(0.5,0.951,0.05)_AP_only" in changes:  # thresholds must be linspace, not arange
        parsed = load_ground_truth(gt, truncate_areas=True)
        params = EvalParams(iou_thresholds=np.arange(0.5, 0.951, 0.05))
        run = compute_video_ap(parsed, load_results(results, parsed), MODE_RULES["lvvis"], params)
        want = _official_with_change(expected, "thresholds_np_arange(0.5,0.951,0.05)_AP_only")
        assert abs(run.metrics["stats"]["AP"] - want["AP"]) <= TOL


# --------------------------------------------------------------------------- derived cases


@pytest.fixture(scope="module")
def first_case(case_data):
    skip_without_reference()
    assert CASES, f"no eval cases under {reference_dir() / 'eval'}"
    return CASES[0]


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
def test_results_in_memory_equal_file(first_case, case_data, mode):
    gt, results, _ = case_data(first_case)
    from_file = evaluate_video_ap(first_case / "gt.json", first_case / "results.json", mode=mode)
    in_memory = evaluate_video_ap(gt, results, mode=mode)
    assert_metrics_equal(in_memory, from_file, "in-memory")


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
def test_reordered_and_relabelled_ids_change_nothing(first_case, case_data, mode):
    gt, results, _ = case_data(first_case)
    baseline = evaluate_video_ap(gt, results, mode=mode)
    relabel = {v["id"]: 10 * v["id"] + 7 for v in gt["videos"]}  # same order, other values
    for v in gt["videos"]:
        v["id"] = relabel[v["id"]]
    for a in gt["annotations"]:
        a["video_id"] = relabel[a["video_id"]]
    for r in results:
        r["video_id"] = relabel[r["video_id"]]
    rng = np.random.default_rng(0)
    gt["videos"] = [gt["videos"][i] for i in rng.permutation(len(gt["videos"]))]
    gt["categories"] = [gt["categories"][i] for i in rng.permutation(len(gt["categories"]))]
    assert_metrics_equal(evaluate_video_ap(gt, results, mode=mode), baseline, "relabelled")


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
def test_category_never_annotated_nor_predicted(first_case, case_data, mode):
    gt, results, _ = case_data(first_case)
    baseline = evaluate_video_ap(gt, results, mode=mode)
    new_id = max(c["id"] for c in gt["categories"]) + 1
    gt["categories"].append({"id": new_id, "name": "never seen", "partition": 3})
    metrics = evaluate_video_ap(gt, results, mode=mode)
    assert all(v is None for k, v in metrics["per_category"][new_id].items() if k not in ("name", "partition"))
    for key in ("stats", "stats_base", "stats_novel"):
        if key in baseline:
            assert_stats_equal(metrics[key], baseline[key], key)


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
def test_category_never_predicted(first_case, case_data, mode):
    gt, results, _ = case_data(first_case)
    baseline = evaluate_video_ap(gt, results, mode=mode)
    annotated = sorted({a["category_id"] for a in gt["annotations"]})
    dropped = annotated[0]
    metrics = evaluate_video_ap(gt, [r for r in results if r["category_id"] != dropped], mode=mode)
    row = metrics["per_category"][dropped]
    assert row["AP"] == 0.0 and row["AR100"] == 0.0
    for cid in annotated[1:]:
        assert metrics["per_category"][cid] == baseline["per_category"][cid]


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
def test_unknown_category_predictions_are_ignored_with_warning(first_case, case_data, mode, caplog):
    gt, results, _ = case_data(first_case)
    baseline = evaluate_video_ap(gt, results, mode=mode)
    unknown = max(c["id"] for c in gt["categories"]) + 100
    extra = dict(results[0], category_id=unknown, score=1.0)
    with caplog.at_level(logging.WARNING):
        metrics = evaluate_video_ap(gt, [extra] + results, mode=mode)
    assert str(unknown) in caplog.text
    assert_metrics_equal(metrics, baseline, "unknown category")


@pytest.mark.parametrize("mode", ["lvvis", "ytvis"])
def test_empty_results(first_case, case_data, mode):
    gt, results, expected = case_data(first_case)
    official = expected[MODE_KEYS[mode]]
    metrics = evaluate_video_ap(gt, [], mode=mode)
    for key in [k for k in ("stats", "stats_base", "stats_novel") if k in official]:
        for name in STAT_NAMES:  # -1 depends only on the GT; everything defined is 0 without predictions
            assert metrics[key][name] == (-1.0 if official[key][name] == -1 else 0.0), (key, name)


# --------------------------------------------------------------------------- where the two evaluators differ


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _box(h, w, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _tiny_case(crowd_b: bool, areas_b=None):
    """One 1-frame 10x10 video, category 1; GT A top-left box, GT B bottom-right box (crowd or not);
    predictions: B (0.95), B (0.9), A (0.8), each an exact copy."""
    a, b = _box(10, 10, 0, 4, 0, 4), _box(10, 10, 5, 10, 5, 10)
    gt = {
        "videos": [{"id": 1, "height": 10, "width": 10, "length": 1, "file_names": ["1/0.jpg"]}],
        "categories": [{"id": 1, "name": "thing", "partition": 0}, {"id": 2, "name": "other", "partition": 2}],
        "annotations": [
            {"id": 1, "video_id": 1, "category_id": 1, "segmentations": [_rle(a)], "areas": [int(a.sum())], "iscrowd": 0},
            {"id": 2, "video_id": 1, "category_id": 1, "segmentations": [_rle(b)], "areas": areas_b or [int(b.sum())], "iscrowd": int(crowd_b)},
        ],
    }
    results = [
        {"video_id": 1, "category_id": 1, "score": s, "segmentations": [_rle(m)]}
        for s, m in ((0.95, b), (0.9, b), (0.8, a))
    ]
    return gt, results


def test_crowd_gt_reusable_in_lvvis_mode_ignored_in_ytvis_mode():
    gt, results = _tiny_case(crowd_b=True)
    lv = evaluate_video_ap(gt, results, mode="lvvis")["stats"]
    # LV-VIS: the crowd GT is a regular GT that two predictions both match: 3 TP over 2 GT
    assert lv["AP"] == pytest.approx(1.0, abs=1e-15)
    assert lv["AR100"] == pytest.approx(1.5, abs=1e-15) and lv["AR1"] == pytest.approx(0.5, abs=1e-15)
    yt = evaluate_video_ap(gt, results, mode="ytvis")["stats"]
    # YouTube-VIS: the crowd GT and its matches are ignored; the top-1 prediction is one of them
    assert yt["AP"] == pytest.approx(1.0, abs=1e-15)
    assert yt["AR100"] == pytest.approx(1.0, abs=1e-15) and yt["AR1"] == 0.0
    plain = evaluate_video_ap(*_tiny_case(crowd_b=False), mode="lvvis")["stats"]
    assert plain["AR100"] == pytest.approx(1.0, abs=1e-15)  # without crowd, the duplicate is a false positive
    assert plain["AP"] < 1.0


def test_gt_area_truncation_lvvis_only():
    """LV-VIS casts each stored per-frame GT area to int before averaging; YouTube-VIS does not.
    A stored area of 128²+0.7 is therefore 'small' (bounds are inclusive) only in LV-VIS mode."""
    gt, results = _tiny_case(crowd_b=False, areas_b=[128**2 + 0.7])
    gt["annotations"] = gt["annotations"][1:]
    results = results[:1]
    lv = evaluate_video_ap(gt, results, mode="lvvis")["stats"]
    yt = evaluate_video_ap(gt, results, mode="ytvis")["stats"]
    assert lv["APs"] == pytest.approx(1.0, abs=1e-15) and lv["APm"] == pytest.approx(1.0, abs=1e-15)
    assert yt["APs"] == -1.0 and yt["APm"] == pytest.approx(1.0, abs=1e-15)


def test_track_iou_sums_over_frames():
    """IoU = Σ intersections / Σ unions over frames (absent frames are empty masks): an exact ratio probe."""
    h, w = 8, 8
    g0, g1 = _box(h, w, 0, 4, 0, 4), _box(h, w, 0, 4, 0, 8)  # 16 + 32 px
    d0 = _box(h, w, 0, 4, 0, 4)  # frame 0 exact, frame 1 absent -> IoU = 16 / 48 = 1/3
    gt = {
        "videos": [{"id": 1, "height": h, "width": w, "length": 2, "file_names": ["a", "b"]}],
        "categories": [{"id": 1, "name": "x"}],
        "annotations": [{"id": 1, "video_id": 1, "category_id": 1, "segmentations": [_rle(g0), _rle(g1)], "areas": [16, 32], "iscrowd": 0}],
    }
    full = _box(h, w, 0, 4, 0, 8)  # frame 0: 16/32, frame 1 exact: (16+32)/(32+32) = 0.75
    for segs, want_ap50 in (([_rle(d0), None], 0.0), ([_rle(full), _rle(full)], 1.0)):
        res = [{"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": segs}]
        stats = evaluate_video_ap(gt, res, mode="ytvis")["stats"]
        assert stats["AP50"] == pytest.approx(want_ap50, abs=1e-15)
    stats = evaluate_video_ap(gt, [{"video_id": 1, "category_id": 1, "score": 0.5, "segmentations": [_rle(full), _rle(full)]}], mode="ytvis")["stats"]
    assert stats["AP"] == pytest.approx(np.mean([1.0 if t <= 0.75 + 1e-12 else 0.0 for t in np.linspace(0.5, 0.95, 10)]), abs=1e-12)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(first_case, case_data):
    gt, results, _ = case_data(first_case)
    with pytest.raises(ClipvisError, match="987654"):
        evaluate_video_ap(gt, [dict(results[0], video_id=987654)] + results)
    video = next(v for v in gt["videos"] if v["id"] == results[0]["video_id"])
    wrong_size = dict(results[0], segmentations=[_rle(np.zeros((video["height"] + 1, video["width"]), bool))] * len(results[0]["segmentations"]))
    with pytest.raises(ClipvisError, match="size"):
        evaluate_video_ap(gt, [wrong_size])
    with pytest.raises(ClipvisError, match="frames"):
        evaluate_video_ap(gt, [dict(results[0], segmentations=results[0]["segmentations"][:-1])])
    with pytest.raises(ClipvisError, match="score"):
        evaluate_video_ap(gt, [{k: v for k, v in results[0].items() if k != "score"}])
    with pytest.raises(ClipvisError, match="list"):
        evaluate_video_ap(gt, {"not": "a list"})
    no_annotations = {k: v for k, v in gt.items() if k != "annotations"}
    with pytest.raises(ClipvisError, match="annotations"):
        evaluate_video_ap(no_annotations, results)
    with pytest.raises(ClipvisError, match="annotations"):  # YouTube-VIS valid.json stores "annotations": null
        evaluate_video_ap(dict(gt, annotations=None), results)
    no_partition = dict(gt, categories=[{k: v for k, v in c.items() if k != "partition"} for c in gt["categories"]])
    with pytest.raises(ClipvisError, match="partition"):
        evaluate_video_ap(no_partition, results, mode="lvvis")
    assert evaluate_video_ap(no_partition, results)["mode"] == "ytvis"
    with pytest.raises(ClipvisError, match="mode"):
        evaluate_video_ap(gt, results, mode="coco")


# --------------------------------------------------------------------------- CLI


def test_cli_subprocess_writes_metrics(first_case, tmp_path):
    out = tmp_path / "sub" / "metrics.json"
    proc = subprocess.run(
        [sys.executable, "-m", "clipvis", "evaluate", "--gt", str(first_case / "gt.json"), "--results", str(first_case / "results.json"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("AP50", "AP75", "base", "novel", "AR100", "APb"):
        assert word in proc.stdout
    written = json.loads(out.read_text())
    expected = evaluate_video_ap(first_case / "gt.json", first_case / "results.json")
    assert written["mode"] == expected["mode"]
    for key in ("stats", "stats_base", "stats_novel"):
        assert written[key] == expected[key]
    assert written["per_category"] == {str(k): v for k, v in expected["per_category"].items()}
    assert not list(out.parent.glob("*.tmp"))


def test_cli_main_modes_and_errors(first_case, tmp_path, capsys):
    from clipvis.cli.main import main

    out = tmp_path / "m.json"
    assert main(["evaluate", "--gt", str(first_case / "gt.json"), "--results", str(first_case / "results.json"), "--mode", "ytvis", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["mode"] == "ytvis" and "stats_base" not in written
    capsys.readouterr()
    assert main(["evaluate", "--gt", str(first_case / "gt.json"), "--results", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main(["evaluate", "--gt", str(first_case / "gt.json"), "--results", str(empty)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    gt = json.loads((first_case / "gt.json").read_text())
    gt.pop("annotations")
    test_split = tmp_path / "test_split.json"
    test_split.write_text(json.dumps(gt))
    assert main(["evaluate", "--gt", str(test_split), "--results", str(first_case / "results.json")]) == 2
    assert "annotations" in capsys.readouterr().err
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["evaluate", "--gt", str(first_case / "gt.json"), "--results", str(first_case / "results.json"), "--out", str(blocker / "m.json")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1


def test_format_metrics_table(first_case):
    metrics = evaluate_video_ap(first_case / "gt.json", first_case / "results.json", mode="lvvis")
    table = format_metrics_table(metrics)
    assert f"{100 * metrics['stats']['AP']:.1f}" in table
    assert f"{100 * metrics['stats_novel']['AP']:.1f}" in table
    yt = format_metrics_table(evaluate_video_ap(first_case / "gt.json", first_case / "results.json", mode="ytvis"))
    assert "novel" not in yt and "AR100" in yt
