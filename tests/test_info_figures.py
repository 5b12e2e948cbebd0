"""`plt-port info`'s printed figures against the bytes the backends really allocate: a batch
of 3 at a context between the window and a multiple of the growth step, at 3 loops, with the
global K/V at the run dtype and quantized to 8 and 4 bits (torch and MLX), and against each
backend's `expected_cache_bytes`. The existing info tests check labels; these check numbers
(a wrong ring width, carry, scale count or batch factor in the sizing changes a cell).
"""

from __future__ import annotations

import re

import pytest

from conftest import random_prompts
from runtimes.backends import backend_unavailable_reason, load_backend
from runtimes.backends.torch_backend import PackedLinear

KV = dict(head_dim=32, plt_window_size=[15, 0])  # a group of 32 fits; rings of 15 + 1 slots
CONTEXT, LOOPS, BATCH, GROUP = 40, 3, 3, 32
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}


def info_rows(capsys, model_dir: str, context: int = CONTEXT
              ) -> tuple[str, dict[str, list[str]]]:
    """(the output, {first cell: the other cells} of every table row) of `plt-port info`."""
    from plt_port.app.cli import main

    assert main(["info", model_dir, "--context", str(context), "--loops", str(LOOPS),
                 "--batch", str(BATCH), "--kv-group-size", str(GROUP)]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return out, rows


def assert_shows(cell: str, nbytes: int) -> None:
    """`cell` (e.g. "31.50 KiB") is `nbytes` to its printed precision (2 decimals)."""
    match = re.fullmatch(r"([\d,.]+) (B|KiB|MiB|GiB)", cell)
    assert match, cell
    unit = UNITS[match.group(2)]
    assert abs(float(match.group(1).replace(",", "")) * unit - nbytes) <= 0.005 * unit, \
        f"info shows {cell}, the backend holds {nbytes:,} B"


def real_state_bytes(backend, context: int = CONTEXT) -> int:
    """Bytes of a batch of 3 prefilled at the context: the arrays the backend allocated."""
    state, _ = backend.prefill(random_prompts([context, 9, 3], seed=5), context)
    assert state.capacity == context and state.batch_size == BATCH
    nbytes = backend.cache_bytes(state)
    if backend.name == "torch":  # summed here from the tensors themselves
        assert nbytes == sum(t.numel() * t.element_size() for t in state.caches.tensors())
    return nbytes


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory, tokenizer_dir):
    from conftest import LOUD_STD, tiny_config
    from plt_port.random_model import save_random_model

    return save_random_model(tmp_path_factory.mktemp("info") / "model", tiny_config("plt", **KV),
                             0, tokenizer_dir=tokenizer_dir, std=LOUD_STD)


def test_info_header_names_the_slots_held(capsys, kv_model):
    out, rows = info_rows(capsys, kv_model)
    assert f"KV cache at context {CONTEXT}, {LOOPS} loops, batch {BATCH} " \
           f"(global {CONTEXT} + {LOOPS - 1} x 16 ring slots per layer + carry; " \
           f"quantized: the global K/V, group {GROUP}" in out
    assert {"as the run dtype", "8-bit", "4-bit"} <= set(rows)


@pytest.mark.parametrize("context", [15, 17, CONTEXT], ids=["<window", ">window", "context"])
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_info_kv_table_is_what_torch_allocates(capsys, kv_model, dtype, bits, context):
    """The KV table's cell of each (global K/V setting, run dtype) against a real torch state
    of that setting at batch 3, and against `Backend.expected_cache_bytes`, on both sides of
    the ring's 16 slots."""
    _, rows = info_rows(capsys, kv_model, context)
    backend = load_backend("torch", kv_model, loops=LOOPS, dtype=dtype, kv_bits=bits,
                           kv_group_size=GROUP if bits else None)
    nbytes = real_state_bytes(backend, context)
    assert nbytes == backend.expected_cache_bytes(BATCH, context, ITEMSIZE[dtype])
    cell = rows["as the run dtype" if bits is None else f"{bits}-bit"]
    assert_shows(cell[0 if dtype == "float32" else 1], nbytes)


@pytest.mark.parametrize("row,name,options", [
    ("torch backend, float32", "torch", dict(dtype="float32")),
    ("torch backend, bfloat16", "torch", dict(dtype="bfloat16")),
    ("torch backend, bfloat16, KV 8-bit", "torch", dict(dtype="bfloat16", kv_bits=8)),
    ("torch backend, bfloat16, KV 4-bit", "torch", dict(dtype="bfloat16", kv_bits=4)),
    ("mlx backend, bfloat16", "mlx", dict(dtype="bfloat16")),
    ("mlx backend, bfloat16, KV 8-bit", "mlx", dict(dtype="bfloat16", kv_bits=8)),
    ("mlx backend, bfloat16, KV 4-bit", "mlx", dict(dtype="bfloat16", kv_bits=4)),
    ("onnx backend, float32 (CPU)", "onnx", {}),
])
def test_info_backend_rows_hold_the_real_cache(capsys, kv_model, row, name, options):
    """Each backend row's KV-cache column is the bytes that backend allocates."""
    reason = backend_unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    if options.get("kv_bits"):
        options = {**options, "kv_group_size": GROUP}
    _, rows = info_rows(capsys, kv_model)
    backend = load_backend(name, kv_model, loops=LOOPS, **options)
    nbytes = real_state_bytes(backend)
    assert nbytes == backend.expected_cache_bytes(BATCH, CONTEXT, ITEMSIZE[backend.run_dtype])
    assert_shows(rows[row][1], nbytes)


def test_info_weight_bytes_are_the_torch_parameters(capsys, kv_model):
    """The fp32 and bf16 weight rows against the parameters torch loads (untied embeddings)."""
    _, rows = info_rows(capsys, kv_model)
    for dtype, row in (("float32", "torch backend, float32"),
                       ("bfloat16", "torch backend, bfloat16")):
        backend = load_backend("torch", kv_model, loops=LOOPS, dtype=dtype)
        assert_shows(rows[row][0], held_weight_bytes(backend.model))


def held_weight_bytes(model) -> int:
    """Parameters, plus the weights the fp32 CPU path holds reordered for oneDNN (plain
    tensors of PackedLinear, not parameters)."""
    tensors = list(model.parameters())
    for module in model.modules():
        if isinstance(module, PackedLinear):
            tensors += [t for t in (module.weight, module.bias) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)
