"""Held-out evaluation, the unigram baseline, `plt-port eval`, and the embedded family."""

from __future__ import annotations

import collections
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import reference_greedy
from plt_port import data, family
from plt_port.errors import PLTError
from plt_port.evaluate import evaluate, unigram_baseline, validation_tokens
from plt_port.model import PLTForCausalLM
from plt_port.tokenizer import Tokenizer

SEQ = 32


def reference_metrics(model_dir, loops, max_tokens):
    """Window by window, one sequence at a time, with log_softmax + gather."""
    model = PLTForCausalLM.from_pretrained(model_dir)
    tokens = validation_tokens(Tokenizer.from_dir(model_dir))
    nll, correct, count = 0.0, 0, 0
    for i in range(max_tokens // SEQ):
        window = torch.from_numpy(tokens[i * SEQ:i * SEQ + SEQ + 1]).long()[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(window[:, :-1], loops=loops).double(), -1)[0]
        target = window[0, 1:]
        nll -= logp.gather(-1, target[:, None]).sum().item()
        correct += (logp.argmax(-1) == target).sum().item()
        count += SEQ
    return nll / count, correct / count, count


@pytest.mark.parametrize("loops", [None, 1, 3])
def test_evaluate_matches_a_per_window_reference(make_model, loops):
    model_dir = make_model(seed=1)
    result = evaluate(model_dir, loops=loops, max_tokens=4 * SEQ, batch_size=3, seq_len=SEQ)
    loss, accuracy, count = reference_metrics(model_dir, loops or 2, 4 * SEQ)
    assert result["tokens"] == count == 4 * SEQ
    assert result["loops"] == (loops or 2)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert result["accuracy"] == pytest.approx(accuracy)


def test_evaluate_rejects_bad_arguments(make_model):
    model_dir = make_model()
    with pytest.raises(PLTError, match="loops"):
        evaluate(model_dir, loops=0, max_tokens=SEQ, seq_len=SEQ)
    with pytest.raises(PLTError, match="batch_size"):
        evaluate(model_dir, batch_size=0)


def test_unigram_baseline_matches_counting(tokenizer_dir, monkeypatch):
    some_files = {split: data.corpus_files(split)[:20] for split in ("train", "validation")}
    monkeypatch.setattr(data, "corpus_files", lambda split: some_files[split])
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    counts = collections.Counter()
    for path in data.corpus_files("train"):
        counts.update(tokenizer.encode(data.read_text(path)))
        counts[tokenizer.eos_ids[0]] += 1
    total = sum(counts.values()) + tokenizer.vocab_size
    targets = validation_tokens(tokenizer)[1:1 + 8 * SEQ]
    loss = -np.mean([math.log((counts[t] + 1) / total) for t in targets])
    most_common = counts.most_common(1)[0][0]
    result = unigram_baseline(tokenizer_dir, max_tokens=8 * SEQ, seq_len=SEQ)
    assert result["loss"] == pytest.approx(loss, rel=1e-9)
    assert result["accuracy"] == pytest.approx(np.mean(targets == most_common))


def test_eval_command_prints_a_table_and_writes_json(make_model, tmp_path, capsys):
    from plt_port.app.cli import main

    model_dir = make_model()
    out = tmp_path / "rows.json"
    assert main(["eval", "--model", model_dir, "--loops", "1", "2", "--max-tokens", str(2 * SEQ),
                 "--seq-len", str(SEQ), "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert len([l for l in table.splitlines() if l.startswith("| model-plt")]) == 2
    assert "perplexity" in table
    rows = json.loads(out.read_text())
    assert [r["loops"] for r in rows] == [1, 2]
    assert rows[1]["loss"] == pytest.approx(
        evaluate(model_dir, 2, 2 * SEQ, seq_len=SEQ)["loss"])
    assert main(["eval", "--model", str(tmp_path / "nowhere")]) == 1


def test_missing_family_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(family, "FAMILY_DIR", str(tmp_path))
    assert family.family_model_dirs() == {}
    with pytest.raises(PLTError, match="plt-port train"):
        family.default_model_dir()
    with pytest.raises(PLTError, match="unknown"):
        family.model_dir("gpt2")


FAMILY = family.family_model_dirs()  # shipped in the repository: a missing model fails below


def test_embedded_family_is_complete_small_fp16_and_consistent():
    assert list(FAMILY) == list(family.FAMILY)
    assert family.default_model_dir() == FAMILY["plt-stdlib-L2"]
    total = 0
    tokenizers = set()
    for loops, (name, path) in enumerate(FAMILY.items(), start=1):
        config = json.load(open(os.path.join(path, "config.json")))
        assert config["plt_num_loops"] == loops and config["torch_dtype"] == "float16"
        header = __import__("plt_port.checkpoint").checkpoint.read_header(
            os.path.join(path, "model.safetensors"))[0]
        assert {info["dtype"] for info in header.values()} == {"F16"}
        total += sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        tokenizers.add(open(os.path.join(path, "tokenizer.model"), "rb").read())
    assert total < 60e6 and len(tokenizers) == 1
    assert os.path.exists(family.MODEL_CARD)


@pytest.mark.parametrize("backend", ["torch", "mlx", "onnx"])
def test_default_model_runs_on_every_runtime(backend, monkeypatch, tmp_path):
    from runtimes.backends import backend_unavailable_reason, load_backend
    from runtimes.generate import generate

    if backend_unavailable_reason(backend):
        pytest.skip(backend_unavailable_reason(backend))
    monkeypatch.setenv("PLT_PORT_CACHE", str(tmp_path))
    path = family.default_model_dir()
    tokenizer = Tokenizer.from_dir(path)
    prompt = "class Reader:\n    def __init__(self, path):\n        "
    for loops in (2, 3):
        text, last = generate(load_backend(backend, path, loops=loops), tokenizer, prompt,
                              max_new_tokens=12, add_bos=False)
        expected = tokenizer.decode(reference_greedy(path, tokenizer.encode(prompt), loops, 12))
        assert last.loops == loops and text and expected.startswith(text)


def test_default_model_beats_the_unigram_baseline_and_writes_python_shaped_text():
    from runtimes.backends import load_backend
    from runtimes.generate import generate
    from runtimes.sampling import SamplingParams

    path = family.default_model_dir()
    result = evaluate(path, max_tokens=4 * 256)
    baseline = unigram_baseline(path, max_tokens=4 * 256)
    assert result["loss"] < baseline["loss"] - 1.0
    prompt = "import os\n\n\ndef read_lines(path):\n    "
    text, _ = generate(load_backend("torch", path), Tokenizer.from_dir(path), prompt,
                       max_new_tokens=64, add_bos=False,
                       sampling=SamplingParams(temperature=0.6, top_k=40, seed=0))
    lines = [line for line in (prompt + text).splitlines() if line.strip()]
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    assert len(lines) >= 4 and sum(i % 4 == 0 for i in indents) >= 0.75 * len(lines)
    assert {"self", "return", "if", "None", "def", "import", "in"} & set(text.replace(".", " ").split())


def test_tokenizer_larger_than_the_model_is_a_clear_error(make_model):
    small = make_model("plt", vocab_size=100)  # the fixture's tokenizer has 512 pieces
    with pytest.raises(PLTError, match="tokenizer and the model do not match"):
        evaluate(small, max_tokens=64, seq_len=32)
