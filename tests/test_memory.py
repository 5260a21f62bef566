"""Memory housekeeping (`clipvis.memory`): freed heap memory goes back to the system, and the pages of
replaced memory-mapped checkpoint tensors leave the resident set without changing any live data."""
from __future__ import annotations

import sys

import pytest
import torch

from clipvis.memory import TrimWhenGrown, _glibc, evict_file_pages, page_out, release_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc() is None, reason="Linux/glibc only")


def resident_mb(kind: str) -> float:
    """RssAnon or RssFile of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"{kind} not in /proc/self/status")


def test_release_freed_memory_returns_a_fragmented_heap():
    blocks = [bytes(64 * 1024) for _ in range(3000)]  # ~190 MB of heap (below glibc's mmap threshold)
    pinned = bytes(64 * 1024)  # allocated last: the heap's top cannot simply shrink back
    del blocks
    before = resident_mb("RssAnon")
    release_freed_memory()
    after = resident_mb("RssAnon")
    assert before - after > 100, (before, after)
    assert len(pinned) == 64 * 1024


def test_trim_when_grown_trims_only_past_the_first_windows_level_plus_margin():
    """Between windows: the first call takes the level, calls within the margin leave the heap mapped (the next
    window reuses it without page faults), a call past it returns the freed heap to the system."""
    trim = TrimWhenGrown(margin_bytes=64 * 2**20)
    assert trim() is False and trim.baseline is not None
    small = [bytes(64 * 1024) for _ in range(160)]  # ~10 MB: within the margin
    assert trim() is False
    blocks = [bytes(64 * 1024) for _ in range(3000)]  # ~190 MB of heap (below glibc's mmap threshold)
    pinned = bytes(64 * 1024)  # allocated last: the heap's top cannot simply shrink back
    del blocks
    before = resident_mb("RssAnon")
    assert trim() is True
    assert before - resident_mb("RssAnon") > 100
    assert len(pinned) == 64 * 1024 and len(small) == 160


def test_evict_file_pages_drops_only_dead_mapped_tensors(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"dead": torch.arange(16 * 2**20, dtype=torch.float32), "live": torch.ones(2**20)}, path)
    state = torch.load(path, mmap=True)
    dead, live = state["dead"], state["live"]
    expected = float(dead.sum()) + float(live.sum())  # both paged in (64 + 4 MB)
    anonymous = torch.full((2**20,), 3.0)

    before = resident_mb("RssFile")
    assert evict_file_pages([anonymous], keep=[live]) == 0  # not file-backed: untouched
    assert evict_file_pages([dead], keep=[dead]) == 0  # still in use: untouched
    dropped = evict_file_pages([dead], keep=[live])
    after = resident_mb("RssFile")
    assert dropped >= 63 * 2**20 and before - after > 50, (dropped, before, after)
    # nothing live changed, and the dropped pages read back from the file unchanged
    assert float(anonymous.sum()) == 3.0 * 2**20 and float(live.sum()) == 2**20
    assert float(dead.sum()) + float(live.sum()) == expected


def test_page_out_leaves_contents_and_drops_mapped_pages(tmp_path):
    path = tmp_path / "text.pt"
    torch.save({"w": torch.arange(16 * 2**20, dtype=torch.float32)}, path)
    mapped = torch.load(path, mmap=True)["w"]
    anonymous = torch.arange(2**20, dtype=torch.float32)
    expected = float(mapped.sum())  # paged in
    before = resident_mb("RssFile")
    page_out([mapped, anonymous])
    assert before - resident_mb("RssFile") > 50
    assert float(mapped.sum()) == expected and torch.equal(anonymous, torch.arange(2**20, dtype=torch.float32))


def test_encoding_a_vocabulary_again_after_the_text_tower_was_paged_out(tmp_path):
    from clipvis.checkpoint import model_to_official_keys
    from clipvis.config import builtin_config, load_config
    from clipvis.inference.predictor import VideoPredictor
    from clipvis.modeling.meta_arch import build_model

    cfg = load_config(builtin_config("clipvis_video_tiny.yaml"))
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pth"
    torch.save({"model": model_to_official_keys(build_model(cfg).state_dict())}, weights)
    predictor = VideoPredictor.from_config(cfg, weights=weights, progress=False)
    first = predictor.encode_vocabulary("cat; dog, puppy").classifier.clone()
    predictor.encode_vocabulary("car")
    predictor._vocabularies.clear()
    assert torch.equal(predictor.encode_vocabulary("cat; dog, puppy").classifier, first)


def _python(code: str, **env) -> list[str]:
    """stdout words of `python -c code` with THP_MEM_ALLOC_ENABLE unset, then `env`."""
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_huge_page_allocations_are_enabled_only_before_torch_is_imported():
    """torch reads THP_MEM_ALLOC_ENABLE at its first allocation: set before the import, left alone after it, and a
    user's own value is kept."""
    before = "from clipvis.memory import enable_huge_page_allocations as e; r = e(); import os, torch; print(r, os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    after = "import torch; from clipvis.memory import enable_huge_page_allocations as e; import os; print(e(), os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    assert _python(before) == ["True", "1"]
    assert _python(after) == ["False", "None"]
    assert _python(before, THP_MEM_ALLOC_ENABLE="0") == ["False", "0"]


def test_the_clipvis_command_enables_huge_page_allocations_before_importing_torch():
    code = ("import os, sys; from clipvis.cli.main import main; assert 'torch' not in sys.modules; "
            "main([]); print(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    assert _python(code)[-1] == "1"
