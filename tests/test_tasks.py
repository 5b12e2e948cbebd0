"""The variable-chain task: generated programs, their accuracy by depth, and training on them."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from plt_port import tasks
from plt_port.errors import PLTError
from plt_port.evaluate import binomial, chain_accuracy
from plt_port.tokenizer import Tokenizer


def printed(program_text: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(program_text, {})  # noqa: S102 (the generator's own programs)
    return out.getvalue().strip()


def test_programs_run_and_print_their_stated_answer_and_values():
    for program in tasks.programs("train", 0, 300, range(1, tasks.MAX_DEPTH + 1)):
        assert printed(program.text) == program.answer
        assert program.text == program.prompt + " " + program.answer + "\n"
        assert program.prompt.endswith("  # ->") and tasks.answer_of(program.prompt) == program.answer
        namespace = {}
        for line, value in zip(program.lines, program.values, strict=True):
            exec(line, namespace)  # noqa: S102
            assert namespace[line.split(" = ")[0]] % 10 == value


def test_depth_is_the_number_of_links_from_the_root_to_the_printed_variable():
    for depth in (1, 4, 9):
        for program in tasks.programs("validation", 1, 20, [depth]):
            lines = program.prompt.splitlines()
            defined = dict(line.split(" = ") for line in lines[:-1])
            name, links = lines[-1][len("print("):].split(" % ")[0], 0
            while not defined[name].isdigit():
                name, links = defined[name].split(" + ")[0], links + 1
            assert links == program.depth == depth
            assert len(lines) == 2 * depth + 2  # root, links, as many distractors, print


def test_programs_are_fixed_by_seed_and_the_splits_are_disjoint():
    depths = [1, 2, 3]
    assert tasks.programs("train", 5, 50, depths) == tasks.programs("train", 5, 50, depths)
    assert tasks.programs("train", 5, 50, depths) != tasks.programs("train", 6, 50, depths)
    train = {p.text for p in tasks.programs("train", 0, 4000, [1])}
    validation = {p.text for p in tasks.programs("validation", 0, 400, [1])}
    assert not train & validation
    assert {tasks.split_of(p) for p in tasks.programs("validation", 0, 50, depths)} == {"validation"}
    assert {len(p.prompt.splitlines()) for p in tasks.programs("train", 0, 200, depths)} == {4, 6, 8}


def test_bad_depths_and_splits_are_clear_errors():
    with pytest.raises(PLTError, match="depths"):
        tasks.programs("train", 0, 1, [0])
    with pytest.raises(PLTError, match="depths"):
        tasks.programs("train", 0, 1, [tasks.MAX_DEPTH + 1])
    with pytest.raises(PLTError, match="split"):
        tasks.programs("test", 0, 1, [1])



def test_answer_of_rejects_text_that_is_not_a_chain_prompt():
    assert tasks.answer_of("a = 3\nb = a + 9\nprint(b % 10)  # ->") == "2"
    for text in ("def f(x):\n    ", "a = 3\nprint(b % 10)  # ->", "print(1)  # -> 1",
                 "a = 3\nb = a + 9\nprint(b % 10)", "import os\nprint(os)  # ->"):
        assert tasks.answer_of(text) is None


def test_program_windows_score_the_answer_and_optionally_each_line_value(tokenizer_dir):
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    batch = tasks.programs("train", 0, 3, [1, 2])
    inputs, targets = tasks.program_windows(tokenizer, batch)
    _, with_values = tasks.program_windows(tokenizer, batch, line_values=True)
    for row, program in enumerate(batch):
        ids, _ = tasks.encode_program(tokenizer, program)
        prompt = tokenizer.encode(program.prompt)
        assert ids[:len(prompt)] == prompt and tokenizer.decode(ids[:-1]) == program.text.rstrip()
        assert inputs[row, :len(ids) - 1].tolist() == ids[:-1]
        answer = targets[row][targets[row] != tasks.IGNORE_INDEX].tolist()
        assert answer == ids[len(prompt):] and answer[-1] == tokenizer.eos_ids[0]
        assert tokenizer.decode(answer[:-1]) == " " + program.answer
        scored = with_values[row] != tasks.IGNORE_INDEX
        newlines = inputs[row] == tokenizer.encode("\n")[-1]
        assert (scored[:len(prompt) - 1] == newlines[:len(prompt) - 1]).all()
        assert tokenizer.decode(with_values[row][newlines].tolist()) == "".join(
            map(str, program.values))
        assert (with_values[row][len(prompt) - 1:] == targets[row][len(prompt) - 1:]).all()
    with pytest.raises(PLTError, match="seq_len"):
        tasks.program_windows(tokenizer, batch, seq_len=10)


def test_chain_accuracy_rows_by_depth_with_binomial_standard_errors(make_model):
    model_dir = make_model()
    rows = chain_accuracy(model_dir, [1, 3], 7, loops=3, batch_size=4)
    assert [r["depth"] for r in rows] == [1, 3] and all(r["count"] == 7 for r in rows)
    for r in rows:
        assert r["accuracy"] == r["correct"] / 7
        assert r["stderr"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 7))
    assert chain_accuracy(model_dir, [1, 3], 7, loops=3, batch_size=3) == rows  # batching
    assert binomial(3, 12) == {"correct": 3, "count": 12, "accuracy": 0.25,
                               "stderr": pytest.approx(0.125)}
    with pytest.raises(PLTError, match="depths"):
        chain_accuracy(model_dir, [0], 7)


def test_chain_accuracy_counts_a_program_right_only_when_every_answer_token_is(make_model,
                                                                              monkeypatch):
    """An oracle that predicts each next token of the program, but says 4 where a 3 is due:
    exactly the programs whose answer has no 3 are right."""
    import torch

    from plt_port.model import PLTForCausalLM

    model_dir = make_model()
    tokenizer = Tokenizer.from_dir(model_dir)
    three, four = tokenizer.encode("3")[-1], tokenizer.encode("4")[-1]

    def oracle(self, input_ids, loops=None):
        following = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1],
                                                                  tokenizer.eos_ids[0])], dim=1)
        following[following == tokenizer.pad_id] = tokenizer.eos_ids[0]
        following[following == three] = four
        return 10.0 * torch.nn.functional.one_hot(following, self.config.vocab_size).float()

    monkeypatch.setattr(PLTForCausalLM, "forward", oracle)
    [row] = chain_accuracy(model_dir, [2], 40, batch_size=16)
    programs = tasks.programs("validation", "eval/0/2", 40, [2])
    assert row["correct"] == sum(p.answer != "3" for p in programs) < 40


def test_eval_command_task_chains_writes_rows_per_loop_and_depth(make_model, tmp_path, capsys):
    from plt_port.app.cli import main

    model_dir = make_model()
    out = tmp_path / "rows.json"
    assert main(["eval", "--task", "chains", "--model", model_dir, "--loops", "1", "2",
                 "--depths", "1", "2", "--programs", "5", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "depth 1 | depth 2" in table and table.count("| model-plt") == 2
    rows = json.loads(out.read_text())
    assert [(r["loops"], r["depth"], r["trained_loops"]) for r in rows] == [
        (1, 1, 2), (1, 2, 2), (2, 1, 2), (2, 2, 2)]


def test_train_on_the_chains_corpus(tmp_path):
    from plt_port.app.cli import main

    args = ["train", "--out", str(tmp_path), "--corpus", "chains", "--loops", "2",
            "--vocab-size", "320", "--hidden-size", "32", "--num-hidden-layers", "2",
            "--intermediate-size", "64", "--seq-len", "64", "--window-left", "64",
            "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--eval-tokens", "256",
            "--min-depth", "1", "--max-depth", "2", "--threads", "1"]
    assert main(args) == 0
    state = json.load(open(tmp_path / "plt-chains-L2" / "checkpoint" / "trainer_state.json"))
    assert state["recipe"]["corpus"] == "chains" and len(state["train_loss"]) == 3
    assert state["validation"][0][0] == 3 and np.isfinite(state["validation"][0][1])
    assert Tokenizer.from_dir(tmp_path / "tokenizer").vocab_size == 320
    assert os.path.exists(tmp_path / "plt-chains-L2" / "final" / "config.json")
    rows = chain_accuracy(str(tmp_path / "plt-chains-L2" / "final"), [1, 3], 4)
    assert [r["depth"] for r in rows] == [1, 3]
    assert main(args[:-4] + ["--max-depth", "9", "--out", str(tmp_path / "long")]) == 1
    with pytest.raises(SystemExit):  # argparse: not a corpus
        main(args + ["--corpus", "tweets"])


# ---- the chains family's card and examples ------------------------------------------------
def accuracy_rows(accuracy_by_loops: dict[int, dict[int, float]], count: int = 100) -> list[dict]:
    return [{"model": f"plt-chains-L{loops}", "trained_loops": loops, "loops": loops,
             "depth": depth, **binomial(round(accuracy * count), count)}
            for loops, by_depth in accuracy_by_loops.items()
            for depth, accuracy in by_depth.items()]


def test_examples_come_from_depths_where_more_loops_measurably_win():
    from plt_port.family import card_chains

    rows = accuracy_rows({1: {1: 0.9, 2: 0.3, 3: 0.1}, 2: {1: 0.92, 2: 0.8, 3: 0.2},
                          4: {1: 0.9, 2: 0.8, 3: 0.6}})
    assert card_chains.separated_depths(rows, 1, 2) == [2]  # depth 3: 0.1 vs 0.2 is noise
    assert card_chains.separated_depths(rows, 2, 4) == [3]
    assert card_chains.separated_depths(rows, 2, 3) == []  # no L3 model

    def answer(model, loops, prompt):  # L1 never right, L2 up to depth 2, L4 always
        depth = (len(prompt.splitlines()) - 2) // 2
        return tasks.answer_of(prompt) if loops == 4 or (loops == 2 and depth <= 2) else "x"

    examples = card_chains.pick_examples(rows, answer, 5)
    assert [(e["depth"], e["columns"]) for e in examples] == [
        (2, [["plt-chains-L1", 1], ["plt-chains-L2", 2]]),
        (3, [["plt-chains-L2", 2], ["plt-chains-L4", 4]])]
    first = tasks.programs("validation", "eval/0/2", 5, [2])[0]  # the eval's own programs
    assert examples[0]["prompt"] == first.prompt and examples[0]["answer"] == first.answer
    assert examples[0]["answers"] == {"plt-chains-L1": "x", "plt-chains-L2": first.answer}


CHAINS = __import__("plt_port.family", fromlist=["x"]).family_model_dirs("chains")


def test_the_shipped_chains_family_is_small_fp16_and_its_card_matches_its_rows():
    from plt_port import family

    assert list(CHAINS) == list(family.CHAINS_FAMILY)
    total, configs = 0, []
    for name, path in CHAINS.items():
        configs.append(json.load(open(os.path.join(path, "config.json"))))
        total += sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert [c["plt_num_loops"] for c in configs] == [1, 2, 3, 4]
    assert {c["torch_dtype"] for c in configs} == {"float16"} and total < 16e6
    card = open(family.CHAINS_MODEL_CARD).read()
    rows = json.load(open(family.CHAINS_ACCURACY_JSON))
    for row in rows:
        assert f"{100 * row['accuracy']:.1f} ± {100 * row['stderr']:.1f}" in card
    for example in json.load(open(family.CHAINS_EXAMPLES_JSON))["examples"]:
        assert tasks.answer_of(example["prompt"]) == example["answer"]
        (low, _), (high, _) = example["columns"]
        assert example["answers"][low] != example["answer"] == example["answers"][high]
