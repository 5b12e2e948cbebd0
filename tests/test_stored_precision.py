"""Checkpoints run in the precision they are stored in, and loading or exporting one holds
about one copy of it: these catch a return of the whole-model fp32 copy cheaply (a ~32M
parameter bf16 model in a subprocess; the 0.85B figures are in README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

from plt_port import checkpoint
from plt_port.config import PLTConfig
from plt_port.random_model import RANDOM_BASE, save_random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MID = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
           intermediate_size=1536, vocab_size=8192)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> str:
    config = PLTConfig(**{**RANDOM_BASE, **MID})
    return save_random_model(tmp_path_factory.mktemp("bf16") / "m", config, seed=0,
                             max_shard_bytes=20 * 2**20)


def weight_bytes(model_dir: str) -> int:
    return sum(os.path.getsize(p) for p in checkpoint.weight_files(model_dir))


def peak_growth(setup: str, body: str) -> int:
    """Peak RSS of running `body` minus the RSS after `setup`, in a fresh interpreter."""
    script = textwrap.dedent(setup) + textwrap.dedent("""
        def status_kb(key):  # this process image's own figures (ru_maxrss spans the exec)
            lines = open("/proc/self/status").read().splitlines()
            return next(int(l.split()[1]) for l in lines if l.startswith(key + ":")) * 1024
        before = status_kb("VmRSS")
    """) + textwrap.dedent(body) + "\nprint(status_kb(\"VmHWM\") - before)\n"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


def test_tensors_arrive_in_their_stored_precision(bf16_model):
    tensors = checkpoint.open_tensors(bf16_model)
    assert {tensors[name].dtype for name in list(tensors)[:5]} == {np.dtype(ml_dtypes.bfloat16)}
    assert checkpoint.open_tensors(bf16_model, dtype=np.float16)["model.norm.weight"].dtype \
        == np.float16


def test_default_run_precision_is_the_stored_one(bf16_model, make_model):
    from plt_port.model import run_dtype
    from runtimes.backends import load_backend

    assert run_dtype("bfloat16") == "bfloat16" and run_dtype("float32") == "float32"
    assert run_dtype("float16", "cpu") == "float32"   # torch's CPU fp16 matmuls are slow
    assert run_dtype("float16", "cuda") == "float16"
    backend = load_backend("torch", bf16_model)
    assert backend.run_dtype == "bfloat16"
    assert {str(p.dtype) for p in backend.model.parameters()} == {"torch.bfloat16"}
    assert load_backend("torch", make_model("plt")).run_dtype == "float32"


def test_torch_load_holds_one_copy(bf16_model):
    warm_up = """
        import torch
        import runtimes.backends.torch_backend
        from runtimes.backends import load_backend
        with torch.device("meta"):  # the first nn.Embedding sets up ~70 MB of torch itself
            torch.nn.Embedding(8, 8)
    """
    growth = peak_growth(warm_up, f"""
        backend = load_backend("torch", {bf16_model!r})
        state, _ = backend.prefill([[5, 6, 7]], 8)
    """)
    # 1.3 with the first forward's workspaces; the old fp32-widening load held over 3
    assert growth < 1.5 * weight_bytes(bf16_model), growth / weight_bytes(bf16_model)


@pytest.mark.parametrize("arguments", ["dtype='float16'", "quant=quantization(4)"])
def test_onnx_export_streams_tensor_by_tensor(bf16_model, tmp_path, arguments):
    pytest.importorskip("onnx")
    growth = peak_growth("import onnx, onnxruntime\n"
                         "from exporters.onnx_export import export, quantization\n", f"""
        export({bf16_model!r}, {str(tmp_path / "out")!r}, {arguments})
    """)
    assert growth < 0.75 * weight_bytes(bf16_model), growth / weight_bytes(bf16_model)
