"""The configs are package data: one copy (configs/ is a link to it), inside a built wheel, and
named by the command line as well as given by path."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparsetrain.compare import load_grid
from sparsetrain.configs import CONFIG_DIR, find_config, list_configs
from sparsetrain.errors import ConfigError
from sparsetrain.train.config import load_config
from tests.test_cli_runs import TINY, sparsetrain

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_configs_are_the_package_configs():
    assert (ROOT / "configs").resolve() == CONFIG_DIR == ROOT / "sparsetrain" / "configs"
    assert {"default", "acdc", "rigl", "compare"} <= set(list_configs())


def test_a_config_is_found_by_name_or_by_path(tmp_path):
    assert find_config("rigl") == find_config("rigl.yaml") == CONFIG_DIR / "rigl.yaml"
    mine = tmp_path / "rigl.yaml"
    mine.write_text("train: {epochs: 1}\n")
    assert find_config(mine) == mine
    assert find_config("elsewhere/rigl.yaml") == Path("elsewhere/rigl.yaml")  # the loader's error
    with pytest.raises(ConfigError, match="did you mean 'rigl'.*shipped: acdc"):
        find_config("rilg")


def test_the_cli_trains_a_shipped_config_by_name(tmp_path):
    done = sparsetrain("train", "static", "--set", *TINY, "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "final.pt").is_file()
    done = sparsetrain("train", "nosuch")
    assert done.returncode == 2 and "shipped: acdc" in done.stderr


def test_a_built_wheel_holds_every_config_and_they_load(tmp_path):
    """The wheel is built from a copy of the sources, offline, without build isolation."""
    pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed")
    source = tmp_path / "src"
    shutil.copytree(
        ROOT / "sparsetrain", source / "sparsetrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    done = subprocess.run(
        [*command, "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("sparsetrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("sparsetrain/configs/")}
        assert shipped >= {f"sparsetrain/configs/{p.name}" for p in CONFIG_DIR.glob("*.yaml")}
        archive.extractall(tmp_path / "installed", members=sorted(shipped))
    for path in sorted((tmp_path / "installed" / "sparsetrain" / "configs").glob("*.yaml")):
        if path.stem.startswith("compare"):
            assert load_grid(path).variants
        else:
            load_config(path)
