"""A tiny seeded text corpus written into a directory, for the text dataset and language-model tests."""

from pathlib import Path

import numpy as np

WORDS = [
    "the",
    "a",
    "sparse",
    "dense",
    "mask",
    "weight",
    "grows",
    "prunes",
    "layer",
    "model",
    "trains",
    "quickly",
    "slowly",
]


def write_corpus(directory: Path, n_files: int = 12, lines: int = 40, seed: int = 0) -> Path:
    """``n_files`` documents (some in a subdirectory) of ``lines`` short sentences each."""
    rng = np.random.default_rng(seed)
    for i in range(n_files):
        path = directory / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        sentences = (" ".join(rng.choice(WORDS, size=rng.integers(3, 8))) for _ in range(lines))
        path.write_text("".join(f"{s.capitalize()}.\n" for s in sentences))
    return directory
