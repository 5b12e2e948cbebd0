"""Variable chains: a synthetic code task whose answer needs serial steps.

A program assigns a digit to a root variable, then derives a chain of `depth` variables,
each from the one before (`b = a + 3`), with as many distractor assignments of digits to
other variables scattered in between; it ends by printing the last variable of the chain
modulo 10, with the printed value written after `# ->`:

    k = 7
    q = 2
    b = k + 3
    m = b + 2
    x = 5
    print(m % 10)  # -> 2

Every line is valid Python and exec'ing the program prints the answer. Each link's value
needs the value of the link before it, so a model that is never shown intermediate values
needs about one pass of attention per link: the number of links (`depth`) is the knob that a
shallow stack cannot take in one pass.

Programs are fixed by (seed, index); train and validation are disjoint by construction: a
program belongs to the validation split iff a hash of its text says so, and each split's
generator skips the other split's programs.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import numpy as np

from .errors import PLTError

NAMES = "abcdefghjkmnpqrstuvwxyz"  # single letters, without the easily confused i, l, o
MAX_DEPTH = (len(NAMES) - 1) // 2  # a chain of depth + 1 names and depth distractors
ANSWER_MARK = "# ->"
# small increments: a 3 x 10 addition table is learnt at once, where the full table modulo 10
# is a slow-to-learn (grokking) problem of its own that hid the chain task in pilots
STEPS = (1, 2, 3)
VALIDATION_PERCENT = 10
CHAINS_EVAL_DEPTHS = range(1, 9)  # the shipped chains family is trained and scored on these
CHAINS_EVAL_PROGRAMS = 200  # held-out programs per depth of `plt-port eval --task chains`
SPLITS = ("train", "validation")


class TaskError(PLTError, ValueError):
    pass


@dataclass(frozen=True)
class ChainProgram:
    lines: tuple[str, ...]  # the assignments
    values: tuple[int, ...]  # the value each assignment leaves in its variable, modulo 10
    question: str  # the printed variable
    depth: int  # links from its chain's root to the printed variable

    @property
    def body(self) -> str:
        return "\n".join(self.lines)

    @property
    def prompt(self) -> str:
        """The assignments and the print, up to and including "# ->"."""
        return f"{self.body}\nprint({self.question} % 10)  {ANSWER_MARK}"

    @property
    def answer(self) -> str:
        target = f"{self.question} = "
        return str(next(v for line, v in zip(self.lines, self.values) if line.startswith(target)))

    @property
    def text(self) -> str:
        """The whole program: valid Python that prints `answer`."""
        return f"{self.prompt} {self.answer}\n"


def check_depths(depths) -> list[int]:
    depths = list(depths)
    if not depths or any(not 1 <= d <= MAX_DEPTH for d in depths):
        raise TaskError(f"chain depths must be in 1..{MAX_DEPTH}, got {depths}")
    return depths


def _chain(rng: random.Random, names: list[str]) -> list[tuple[str, int]]:
    """(line, value mod 10) of one chain: a root, then one link per further name."""
    value = rng.randrange(10)
    lines = [(f"{names[0]} = {value}", value)]
    for previous, name in zip(names, names[1:]):
        step = rng.choice(STEPS)
        value = (value + step) % 10
        lines.append((f"{name} = {previous} + {step}", value))
    return lines


def _interleave(rng: random.Random, first: list, second: list) -> list:
    """A random merge of two lists that keeps the order within each."""
    slots = [0] * len(first) + [1] * len(second)
    rng.shuffle(slots)
    sources = (iter(first), iter(second))
    return [next(sources[s]) for s in slots]


def generate_program(rng: random.Random, depth: int) -> ChainProgram:
    """A chain of `depth` links and `depth` distractor digit assignments; the print asks for
    the chain's last variable."""
    names = rng.sample(NAMES, 2 * depth + 1)
    distractors = [(f"{name} = {value}", value)
                   for name, value in zip(names[depth + 1:], rng.choices(range(10), k=depth))]
    lines, values = zip(*_interleave(rng, _chain(rng, names[:depth + 1]), distractors))
    return ChainProgram(lines, values, names[depth], depth)


def split_of(program: ChainProgram) -> str:
    digest = hashlib.sha256(program.text.encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "little") % 100 < VALIDATION_PERCENT \
        else "train"


def programs(split: str, seed: int | str, count: int, depths) -> list[ChainProgram]:
    """`count` programs of `split`, fixed by `seed`; depths drawn uniformly from `depths`."""
    if split not in SPLITS:
        raise TaskError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    depths = check_depths(depths)
    rng = random.Random(f"chains/{split}/{seed}")
    found = []
    while len(found) < count:
        program = generate_program(rng, rng.choice(depths))
        if split_of(program) == split:
            found.append(program)
    return found


def answer_of(prompt: str) -> str | None:
    """The value a chain prompt (a program up to "# ->") prints, by running its assignments
    in a namespace without builtins; None when the text is not such a program."""
    body, mark, rest = prompt.rpartition(ANSWER_MARK)
    lines = body.rstrip().splitlines()
    if not mark or rest.strip() or not lines or not lines[-1].startswith("print("):
        return None
    namespace: dict = {"__builtins__": {}}
    try:
        for line in lines[:-1]:
            target, equals, expression = line.partition(" = ")
            if not equals or not target.isidentifier():
                return None
            namespace[target] = _arithmetic(expression, namespace)
        return str(_arithmetic(lines[-1].strip()[len("print("):-1], namespace))
    except (KeyError, ValueError):
        return None


def _arithmetic(expression: str, namespace: dict) -> int:
    """`NAME|DIGITS [+ NAME|DIGITS]...` or `NAME % 10`, evaluated without eval()."""
    left, percent, modulus = expression.partition(" % ")
    total = sum(_operand(term, namespace) for term in left.split(" + "))
    return total % _operand(modulus, namespace) if percent else total


def _operand(term: str, namespace: dict) -> int:
    term = term.strip()
    if term.isdigit():
        return int(term)
    if term.isidentifier():
        return namespace[term]
    raise ValueError(term)


# ---- token windows: one whole program per row ------------------------------------------------
IGNORE_INDEX = -100  # torch cross_entropy's default: targets that carry no loss


def encode_program(tokenizer, program: ChainProgram,
                   line_values: bool = False) -> tuple[list[int], list[int]]:
    """(token ids of the program ending in eos, the target of each id's position).

    Targets are the answer tokens and the closing eos (IGNORE_INDEX elsewhere); with
    `line_values`, also the value of each assignment at its newline, in place of the next
    line's first token: deep supervision of intermediate results that the input never shows.
    The prompt is encoded on its own, so a prompt typed into a generator yields exactly the
    ids before the answer.
    """
    prompt = tokenizer.encode(program.prompt)
    answer = tokenizer.encode(f" {program.answer}") + [tokenizer.eos_ids[0]]
    ids = prompt + answer
    targets = [IGNORE_INDEX] * (len(prompt) - 1) + answer + [IGNORE_INDEX]
    if line_values:
        newline = tokenizer.encode("\n")[-1]
        ends = [i for i, token in enumerate(prompt) if token == newline]
        for position, value in zip(ends, program.values, strict=True):
            targets[position] = tokenizer.encode(str(value))[-1]
    return ids, targets


def program_windows(tokenizer, batch: list[ChainProgram], seq_len: int | None = None,
                    line_values: bool = False):
    """(inputs, targets) [len(batch), seq_len] int64 arrays, each row one program, padded
    (targets: `encode_program`'s). seq_len None: the longest program's."""
    encoded = [encode_program(tokenizer, p, line_values) for p in batch]
    if seq_len is None:
        seq_len = max(len(ids) for ids, _ in encoded) - 1
    inputs = np.full((len(batch), seq_len), tokenizer.pad_id, dtype=np.int64)
    targets = np.full((len(batch), seq_len), IGNORE_INDEX, dtype=np.int64)
    for row, (program, (ids, program_targets)) in enumerate(zip(batch, encoded)):
        if len(ids) > seq_len + 1:
            raise TaskError(f"a depth-{program.depth} program is {len(ids)} tokens, longer than "
                            f"seq_len + 1 = {seq_len + 1}: raise seq_len or lower the depths")
        inputs[row, :len(ids) - 1] = ids[:-1]
        targets[row, :len(ids) - 1] = program_targets[:-1]
    return inputs, targets


@dataclass
class ChainBatches:
    """Training batches of chain programs (targets with the line values); the programs of
    step s are fixed by (seed, step)."""

    tokenizer: object
    depths: list[int]
    seq_len: int
    batch_size: int  # global batch (all ranks together)
    seed: int

    def batch(self, step: int, rank: int = 0, world_size: int = 1):
        if self.batch_size % world_size:
            raise TaskError(f"batch size {self.batch_size} is not divisible by "
                            f"{world_size} processes")
        per_rank = self.batch_size // world_size
        batch = programs("train", f"{self.seed}/{step}", self.batch_size, self.depths)
        return program_windows(self.tokenizer, batch[rank * per_rank:(rank + 1) * per_rank],
                               self.seq_len, line_values=True)
