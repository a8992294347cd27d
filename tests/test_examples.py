"""The scripts under examples/ run as the README shows them, and the README quotes them exactly."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Arguments that keep each run to a few seconds; outputs go under the test's directory (cwd).
EXAMPLES = {
    "own_loop.py": [],
    "acdc_own_loop.py": ["--synthetic", "--epochs", "2"],
    "hf_gpt2.py": ["--steps", "20", "--out", "out"],
    "lightning_mlp.py": ["--epochs", "2", "--out", "out"],
}


@pytest.mark.parametrize("script", list(EXAMPLES))
def test_example_runs(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *EXAMPLES[script]],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sparsity 90.00%" in done.stdout
    if script == "hf_gpt2.py":
        final = tmp_path / "out" / "final"
        assert (final / "model.safetensors").is_file() and (final / "model.stz").is_file()
        assert "90.00% of the sparse weights are zero" in done.stdout  # save_model: masked
    if script == "lightning_mlp.py":
        assert (tmp_path / "out" / "checkpoints" / "last.ckpt").is_file()


def _quoted_blocks() -> list[tuple[str, str]]:
    """(example file, code block) for each Python block the README introduces with a link to
    an example script (no other code block between the link and it)."""
    readme = (ROOT / "README.md").read_text()
    pattern = r"\(examples/(\w+\.py)\)(?:(?!```).)*?```python\n(.*?)```"
    return re.findall(pattern, readme, re.S)


def _lines(text: str) -> list[str]:
    """Lines without indentation or runs of spaces (README excerpts may be dedented, their
    comments aligned)."""
    return [re.sub(r"\s+", " ", line.strip()) for line in text.splitlines() if line.strip()]


def test_readme_quotes_the_examples():
    blocks = _quoted_blocks()
    assert {name for name, _ in blocks} >= set(EXAMPLES)
    for name, block in blocks:
        source, quoted = _lines((ROOT / "examples" / name).read_text()), _lines(block)
        starts = [i for i, line in enumerate(source) if line == quoted[0]]
        assert any(source[i : i + len(quoted)] == quoted for i in starts), (
            f"the README's block for examples/{name} is not a passage of it"
        )
