"""Shared test helpers: where the reference data lives and how to load it."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# The suite never reaches the network: a test that would fetch CLIP weights gets the offline error at once
# (subprocesses inherit it). Tests of the download path unset it and stand in for the downloader.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def reference_dir() -> Path:
    """The reference folder: $CLIPVIS_REFERENCE, default ../shared/reference from the repo root."""
    return Path(os.environ.get("CLIPVIS_REFERENCE", REPO_ROOT.parent / "shared" / "reference")).resolve()


def missing_reference_reason() -> str:
    """Why the tests that compare against the original are skipped ("" when the reference data is there)."""
    ref = reference_dir()
    if (ref / "fixtures").is_dir():
        return ""
    return (f"reference data not found at {ref} (outputs recorded from the original CLIP-VIS, see README "
            f"'Tests'); set CLIPVIS_REFERENCE to its folder to run the equivalence tests")


def skip_without_reference() -> None:
    """Skip the calling test (or fixture) with the reason when the reference data is absent."""
    reason = missing_reference_reason()
    if reason:
        pytest.skip(reason)


def inference_fixture_paths() -> list[Path]:
    """Every inference fixture (`fixtures/*.pt` except `criterion_*`), sorted by name."""
    folder = reference_dir() / "fixtures"
    return sorted(p for p in folder.glob("*.pt") if not p.name.startswith("criterion_"))


def criterion_fixture_paths() -> list[Path]:
    """Every training-loss fixture (`fixtures/criterion_*.pt`), sorted by name."""
    return sorted((reference_dir() / "fixtures").glob("criterion_*.pt"))


def load_fixture(path: Path) -> dict:
    """A fixture file as the dict the original run saved."""
    skip_without_reference()
    return torch.load(path, weights_only=False, map_location="cpu")


def synthesize(manifest, seed: int) -> dict:
    """The reference's deterministic synthetic state dict (official key names)."""
    skip_without_reference()
    path = reference_dir() / "synthetic_weights.py"
    spec = importlib.util.spec_from_file_location("clipvis_reference_synthetic_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthesize(manifest, seed=seed)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, name: str = "") -> None:
    """Assert |actual - expected| <= rel * max|expected| elementwise (tolerance relative to the tensor's scale)."""
    actual = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    expected = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rel * max(scale, 1e-12), f"{name}: max abs error {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.fixture(scope="session")
def reference() -> Path:
    skip_without_reference()
    return reference_dir()


def pytest_report_header(config):
    reason = missing_reference_reason()
    return [f"clipvis: {reason}; those tests are skipped"] if reason else []


def pytest_collection_modifyitems(config, items):
    """Without the reference data, the tests parametrized over its (then empty) file lists are skipped by
    pytest as "got empty parameter set": give them the real reason instead."""
    reason = missing_reference_reason()
    if not reason:
        return
    for item in items:
        for mark in item.iter_markers("skip"):
            if "empty parameter set" in str(mark.kwargs.get("reason", "")):
                item.add_marker(pytest.mark.skip(reason=reason), append=False)
                break


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    """A seeded tiny CLIP-VIS video model (clipvis_video_tiny.yaml) saved in the original's checkpoint layout."""
    from clipvis.checkpoint import model_to_official_keys
    from clipvis.config import builtin_config, load_config
    from clipvis.modeling.meta_arch import build_model

    torch.manual_seed(0)
    model = build_model(load_config(builtin_config("clipvis_video_tiny.yaml")))
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save({"model": model_to_official_keys(model.state_dict()), "iteration": 0}, path)
    return path
