"""The configs are package data: one copy (configs/ is a link to it), inside a built wheel, and
named by the command line as well as given by path. So is the sparse convolution's C++ source,
which the installed package compiles on first use."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sparsetrain.configs import CONFIG_DIR, find_config, list_configs
from sparsetrain.errors import ConfigError
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


INSTALLED_CHECK = """
import sys
from pathlib import Path
import sparsetrain
from sparsetrain.kernels.extension import SOURCE
from sparsetrain.compare import load_grid
from sparsetrain.configs import CONFIG_DIR, find_config, list_configs
from sparsetrain.train.config import load_config
assert Path(sparsetrain.__file__).is_relative_to(sys.argv[1]), sparsetrain.__file__
assert SOURCE.is_file() and SOURCE.is_relative_to(sys.argv[1]), SOURCE
for name in list_configs():
    path = find_config(name)
    assert path.parent == CONFIG_DIR
    load_grid(path) if name.startswith("compare") else load_config(path)
print(" ".join(list_configs()))
"""


def test_an_installed_wheel_holds_every_config_and_the_kernel_source(tmp_path):
    """Build the wheel from a copy of the sources (offline, no build isolation), install it into
    a directory of its own and load every shipped config from there by name."""
    pytest.importorskip("setuptools", reason="the build backend (setuptools) is not installed")
    source = tmp_path / "src"
    shutil.copytree(
        ROOT / "sparsetrain", source / "sparsetrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")]
    done = subprocess.run([*build, str(source)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("sparsetrain-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if n.startswith("sparsetrain/configs/")}
        names = set(archive.namelist())
    assert shipped >= {f"sparsetrain/configs/{p.name}" for p in CONFIG_DIR.glob("*.yaml")}
    assert "sparsetrain/kernels/csrc/sparse_conv.cpp" in names

    site = tmp_path / "site"
    install = [*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)]
    done = subprocess.run(install, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check = [sys.executable, "-c", INSTALLED_CHECK, str(site)]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site)}
    done = subprocess.run(check, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == list_configs()
