"""Corpus selection, split, dedup, caps, tokenizer round trip and token batches."""

from __future__ import annotations

import os

import numpy as np
import pytest

from plt_port import data
from plt_port.errors import PLTError
from plt_port.tokenizer import Tokenizer


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


@pytest.fixture
def fake_stdlib(tmp_path):
    root = str(tmp_path / "lib")
    for i in range(60):
        write(root, f"pkg{i % 3}/mod{i}.py", f"def f{i}():\n    return {i}\n")
    write(root, "copy_a.py", "X = 'same content'\n")
    write(root, "copy_b.py", "X = 'same content'\n")
    write(root, "test/test_mod.py", "assert True\n")
    write(root, "site-packages/thirdparty.py", "import os\n")
    write(root, "big.py", "#" * 5000 + "\n")
    with open(os.path.join(root, "latin1.py"), "wb") as f:
        f.write(b"s = '\xe9'\n")
    return root


def test_split_is_disjoint_deterministic_deduplicated_and_filtered(fake_stdlib):
    train = data.corpus_files("train", root=fake_stdlib, max_file_bytes=1000)
    val = data.corpus_files("validation", root=fake_stdlib, max_file_bytes=1000)
    everything = data.corpus_files("all", root=fake_stdlib, max_file_bytes=1000)
    assert train == data.corpus_files("train", root=fake_stdlib, max_file_bytes=1000)
    assert not set(train) & set(val) and sorted(train + val) == everything
    rel = {os.path.relpath(p, fake_stdlib) for p in everything}
    assert len(rel & {"copy_a.py", "copy_b.py"}) == 1  # dedup by content
    assert not rel & {"test/test_mod.py", "site-packages/thirdparty.py", "big.py", "latin1.py"}
    assert all(data.is_validation(os.path.relpath(p, fake_stdlib)) for p in val)
    assert len(everything) == 61


def test_total_size_cap(fake_stdlib):
    capped = data.corpus_files("all", root=fake_stdlib, max_total_bytes=200)
    assert 0 < sum(map(os.path.getsize, capped)) <= 200
    assert set(capped) < set(data.corpus_files("all", root=fake_stdlib))


def test_bad_arguments(fake_stdlib, tmp_path):
    with pytest.raises(PLTError, match="split"):
        data.corpus_files("dev", root=fake_stdlib)
    with pytest.raises(PLTError, match="not a directory"):
        data.corpus_files("train", root=str(tmp_path / "missing"))


def test_real_stdlib_corpus_and_held_out_text():
    val = data.corpus_files("validation")
    train = data.corpus_files("train")
    assert len(train) > 100 and len(val) > 5 and not set(train) & set(val)
    assert all(p.endswith(".py") and p.startswith(data.stdlib_dir()) for p in train + val)
    text = data.held_out_text()
    assert text.startswith(data.read_text(val[0])) and data.read_text(val[-1]) in text
    assert data.held_out_text(max_chars=1000) == text[:1000]


def test_tokenizer_round_trips_held_out_code_exactly(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    text = data.held_out_text(max_chars=60_000) + "\tx = 'caf\u00e9'  \n\n\n    \n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_token_batches_are_fixed_by_step_and_split_across_ranks():
    tokens = np.arange(1000, dtype=np.int32)
    batches = data.TokenBatches(tokens, seq_len=16, batch_size=4, seed=3)
    full = batches.windows(7)
    assert full.shape == (4, 17)
    assert (np.diff(full, axis=1) == 1).all()  # contiguous slices of the stream
    np.testing.assert_array_equal(full, batches.windows(7))
    assert not np.array_equal(full, batches.windows(8))
    halves = [batches.windows(7, rank, 2) for rank in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), full)
    with pytest.raises(PLTError, match="divisible"):
        batches.windows(0, 0, 3)
    with pytest.raises(PLTError, match="fewer than"):
        data.TokenBatches(tokens[:10], seq_len=16, batch_size=1, seed=0)


def test_sequential_windows_cover_the_stream():
    tokens = np.arange(100, dtype=np.int32)
    windows = data.sequential_windows(tokens, seq_len=10)
    assert windows.shape == (9, 11)
    np.testing.assert_array_equal(windows[:, 1:].ravel(), tokens[1:91])
    assert data.sequential_windows(tokens, 10, max_tokens=30).shape == (3, 11)
    with pytest.raises(PLTError):
        data.sequential_windows(tokens[:5], seq_len=10)
