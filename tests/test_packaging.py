"""The package as a wheel: it carries every shipped config, and an installed copy (not the source checkout)
loads each of them and runs the demo."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SHIPPED = sorted(p.name for p in (REPO_ROOT / "clipvis" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a clean copy of the working tree (no stale build/ folder can leak into it; no build
    isolation: the test environment has setuptools)."""
    source = tmp_path_factory.mktemp("source") / "clipvis"
    shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "output", "clipvis_demo"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True)
    if built.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{built.stdout}\n{built.stderr}")
    (path,) = out.glob("clipvis-*.whl")
    return path


def test_configs_are_one_source_of_truth():
    """The top-level configs/ (where users of the original look) is the package's folder, not a copy."""
    top = REPO_ROOT / "configs"
    assert top.resolve() == (REPO_ROOT / "clipvis" / "configs").resolve()
    assert SHIPPED and "clipvis_video_ConvNeXt-B.yaml" in SHIPPED


def test_wheel_contains_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in SHIPPED:
        assert f"clipvis/configs/{name}" in names, name
    assert "clipvis/config/model_configs/clipvis_tiny_convnext.json" in names
    assert "clipvis/data/semseg_vocabularies.json" in names


def test_installed_wheel_loads_every_config_and_runs_the_demo(wheel, tmp_path):
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    script = (
        "import clipvis, sys\n"
        f"assert clipvis.__file__.startswith({str(target)!r}), clipvis.__file__\n"
        "from clipvis.config import available_builtin_configs, builtin_config, load_config\n"
        "names = available_builtin_configs()\n"
        "for name in names:\n"
        "    load_config(builtin_config(name))\n"
        "print(','.join(names))\n"
        "from clipvis.cli.main import main\n"
        "sys.exit(main(['--quiet', 'demo', '--frames', '3', '--height', '64', '--width', '64',\n"
        "               '--config', 'clipvis_video_tiny.yaml', '--out', 'demo']))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[0].split(",") == SHIPPED
    assert (tmp_path / "demo" / "results.json").is_file()
