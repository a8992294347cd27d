"""The text dataset: document split, training and validation windows, bad directories."""

from pathlib import Path

import pytest
import torch

from sparsetrain.data import DatasetInfo, dataset_info, load_dataset, text
from sparsetrain.errors import ConfigError, DataError
from sparsetrain.tasks import LANGUAGE_MODEL
from tests.text_corpus import write_corpus

SMALL = {"block_size": 16, "max_train_tokens": 512, "max_val_tokens": 256, "val_fraction": 0.3}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


def windows(root: Path, split: str, **options) -> tuple[torch.Tensor, torch.Tensor]:
    dataset, _ = load_dataset("text", split, root, **{**SMALL, **options})
    return dataset.tensors


def test_info_describes_byte_sequences() -> None:
    assert dataset_info("text", block_size=64) == DatasetInfo(
        "text", 1, 64, 256, task=LANGUAGE_MODEL
    )
    assert dataset_info("text").example_input(2).shape == (2, text.DEFAULTS["block_size"])


def test_split_is_by_document_and_deterministic(corpus: Path) -> None:
    paths = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.txt"))
    splits = {p: text.split_of(p, 0.3) for p in paths}
    assert set(splits.values()) == {"train", "test"}
    by_split = {s: text.documents(corpus, s, 0.3) for s in ("train", "test")}
    expected = {s: [(corpus / p).read_bytes() for p in paths if splits[p] == s] for s in by_split}
    assert by_split == expected  # every document in exactly one split, in path order
    # A document's side depends on its own path only: adding files moves no other document.
    (corpus / "zz_new.txt").write_text("A new document.\n")
    assert all(text.split_of(p, 0.3) == splits[p] for p in paths)
    assert text.documents(corpus, "test", 0.3)[: len(by_split["test"])] == by_split["test"]


def test_windows_are_next_byte_pairs_of_the_split_stream(corpus: Path) -> None:
    for split in ("train", "test"):
        x, y = windows(corpus, split)
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape and x.shape[1] == 16
        assert torch.equal(x[:, 1:], y[:, :-1])
        stream = b"".join(text.documents(corpus, split, 0.3))
        for row, target in zip(x, y, strict=True):
            assert bytes(row.tolist()) + bytes([int(target[-1])]) in stream
    x, _ = windows(corpus, "train")
    assert len(x) == 512 // 16
    assert len(windows(corpus, "test")[0]) == 256 // 16


def test_training_offsets_follow_the_seed_and_validation_is_fixed(corpus: Path) -> None:
    train, again, other = (windows(corpus, "train", seed=s)[0] for s in (0, 0, 1))
    assert torch.equal(train, again)
    assert not torch.equal(train, other)
    assert torch.equal(windows(corpus, "test", seed=0)[0], windows(corpus, "test", seed=1)[0])


def test_binary_files_and_hidden_files_are_skipped(corpus: Path) -> None:
    before = text.documents(corpus, "train", 0.3) + text.documents(corpus, "test", 0.3)
    for name in [f"blob{i}.bin" for i in range(6)]:
        (corpus / name).write_bytes(bytes(range(256)))  # NUL bytes: binary
    (corpus / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8
    (corpus / ".hidden").mkdir()
    (corpus / ".hidden" / "notes.txt").write_text("Hidden.\n")
    after = text.documents(corpus, "train", 0.3) + text.documents(corpus, "test", 0.3)
    assert sorted(after) == sorted(before)


def test_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"text directory {tmp_path / 'nowhere'} not found"):
        load_dataset("text", "train", tmp_path / "nowhere")


def test_empty_directory_names_it(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} holds no files"):
        load_dataset("text", "train", tmp_path / "empty")


def test_binary_only_directory_names_it_and_what_is_expected(tmp_path: Path) -> None:
    for i in range(10):
        (tmp_path / f"blob{i}.bin").write_bytes(bytes([0, 1, 2, 255]) * 100)
    with pytest.raises(DataError, match=rf"{tmp_path}: none of the \d+ files .* is text \(UTF-8"):
        load_dataset("text", "train", tmp_path)


def test_a_split_without_documents_or_shorter_than_a_block(corpus: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.mkdir()
    (one / "only.txt").write_text("Just one document.\n")
    side = text.split_of("only.txt", 0.5)
    other = "test" if side == "train" else "train"
    with pytest.raises(DataError, match=f"none of its 1 files falls in the {other} split"):
        load_dataset("text", other, one, val_fraction=0.5)
    with pytest.raises(DataError, match="fewer than block_size"):
        load_dataset("text", side, one, val_fraction=0.5, block_size=64)


@pytest.mark.parametrize(
    "options",
    [{"blocksize": 8}, {"block_size": 0}, {"max_train_tokens": 1.5}, {"val_fraction": 1.0}],
)
def test_bad_options_are_config_errors(options: dict) -> None:
    with pytest.raises(ConfigError, match="text dataset option"):
        dataset_info("text", **options)


def test_default_corpus_is_the_standard_library_source() -> None:
    paths = text._files(text.stdlib_dir(), default=True)
    assert {"os.py", "json/decoder.py", "asyncio/tasks.py"} <= set(paths)
    assert all(p.endswith(".py") for p in paths)
    assert not any({"test", "tests", "site-packages"} & set(p.split("/")) for p in paths)
    x, y = load_dataset("text", "test", max_val_tokens=4096)[0].tensors
    assert x.shape == (4096 // 128, 128) and torch.equal(x[:, 1:], y[:, :-1])
