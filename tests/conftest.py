"""Shared fixtures: tiny random checkpoints in both formats, built by the tests themselves."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
import time

import numpy as np
import pytest

from plt_port.config import PLTConfig
from plt_port.random_model import save_random_model
from runtimes.backends.base import Backend

# Loud on purpose: rms_norm_eps away from the ops' default 1e-5 and weights of std 0.1 (not
# 0.02, where attention is nearly uniform), so that the loop count, the gate, the window and
# eps each change greedy tokens (test_fixtures_are_loud proves it).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, max_position_embeddings=512, rms_norm_eps=1e-2)
LOUD_STD = 0.1


def tiny_config(fmt: str = "plt", **overrides) -> PLTConfig:
    """A tiny config: `fmt` "plt" (iquestpltcoder, hidden-state gate) or "v1" (iquestloopcoder)."""
    if fmt == "v1":
        base = dict(model_type="iquestloopcoder", loop_num=2, loop_window_size=8)
    else:
        base = dict(model_type="iquestpltcoder", plt_num_loops=2, plt_window_size=[7, 0],
                    plt_gate_use_hidden_states=True)
    return PLTConfig(**{**TINY, "vocab_size": 512, **base, **overrides})


@pytest.fixture(autouse=True, scope="session")
def export_cache(tmp_path_factory):
    """Exports made on first use go to a folder of this test session, never to ~/.cache."""
    previous = os.environ.get("PLT_PORT_CACHE")
    os.environ["PLT_PORT_CACHE"] = str(tmp_path_factory.mktemp("export-cache"))
    yield
    if previous is None:
        del os.environ["PLT_PORT_CACHE"]
    else:
        os.environ["PLT_PORT_CACHE"] = previous


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models: one intra-op thread is faster, and the machine's two cores are shared."""
    if importlib.util.find_spec("torch") is None:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small code tokenizer trained on a few standard-library files (well under a second)."""
    from plt_port.tokenizer import train_tokenizer

    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, name) for name in ("textwrap.py", "bisect.py", "heapq.py")]
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(files, str(out), vocab_size=512)
    return str(out)


@pytest.fixture(params=["torch", "onnx", "mlx"])
def backend_name(request):
    """Each backend in turn, skipped with the reason where its framework is missing."""
    from runtimes.backends import backend_unavailable_reason

    reason = backend_unavailable_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir):
    """One loud random model per format for a whole test module, so ONNX exports each once
    per loop count."""
    root = tmp_path_factory.mktemp("format-models")
    return {fmt: save_random_model(root / fmt, tiny_config(fmt), 0, tokenizer_dir=tokenizer_dir,
                                   std=LOUD_STD) for fmt in ("plt", "v1")}


@pytest.fixture
def make_model(tmp_path, tokenizer_dir):
    """make_model(fmt="plt", seed=0, **config_overrides) -> path of a fresh random model dir."""
    counter = iter(range(10_000))

    def make(fmt: str = "plt", seed: int = 0, **overrides) -> str:
        config = tiny_config(fmt, **overrides)
        return save_random_model(tmp_path / f"model-{fmt}-{next(counter)}", config, seed,
                                 tokenizer_dir=tokenizer_dir, std=LOUD_STD)

    return make


def community_checkpoint(source, out) -> str:
    """An mlx-lm quantized checkpoint of `source` as mlx-community ships them: 4-bit weights,
    group size 32, mlx-lm's `quantization` entry, no plt-port marker in config.json."""
    from exporters.mlx_export import MARKER, export as export_mlx

    out = export_mlx(source, out, quantize=4, group_size=32)
    path = os.path.join(out, "config.json")
    with open(path) as f:
        config = json.load(f)
    del config[MARKER]
    with open(path, "w") as f:
        json.dump(config, f)
    return out


def random_prompts(lengths, seed=0, vocab=512) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


def reference_logits(model_dir, sequences, loops) -> list[np.ndarray]:
    """Logits [T, V] at every position of each sequence, from the reference full forward."""
    import torch

    from plt_port.model import PLTForCausalLM

    model = PLTForCausalLM.from_pretrained(model_dir, "float32")
    with torch.no_grad():
        return [model(torch.tensor([seq]), loops=loops)[0].numpy() for seq in sequences]


def greedy_run(backend, prompts, steps, mode="clp", max_tokens=None, chunk_size=None):
    """Greedy decoding from a prefill: (sequences, logits [steps + 1] of [B, V], state);
    logits[s] predicts the token at position len(prompt) + s."""
    max_tokens = max_tokens or max(map(len, prompts)) + steps
    state, logits = backend.prefill(prompts, max_tokens, chunk_size=chunk_size)
    sequences, history = [list(p) for p in prompts], [logits]
    for _ in range(steps):
        tokens = logits.argmax(-1)
        for sequence, token in zip(sequences, tokens):
            sequence.append(int(token))
        logits = backend.step(state, tokens, mode=mode)
        history.append(logits)
    return sequences, history, state


UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def assert_error_fits_precision(got, expected, dtype: str) -> None:
    """Logits computed in `dtype` against fp32 ones: the largest error, relative to the
    largest logit, is between 1 and 12 unit roundoffs of `dtype` (2.5-4.7 seen on these
    models). Above: a bug. Below: a more precise dtype ran than the one asked for."""
    error = np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()
    roundoffs = error / UNIT_ROUNDOFF[dtype]
    assert 1 <= roundoffs <= 12, f"{dtype}: error {error:.2e} = {roundoffs:.2f} unit roundoffs"


def reference_greedy(model_dir, prompt_ids, loops, steps):
    """Greedy continuation by the reference model's full forward, recomputed every step."""
    import torch

    from plt_port.model import PLTForCausalLM

    model = PLTForCausalLM.from_pretrained(model_dir, "float32")
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]), loops=loops)[0, -1].argmax()))
    return ids[len(prompt_ids):]


class CachelessBackend(Backend):
    """A backend that keeps no caches: fakes that compute logits from the tokens alone (to
    test the generate loop, the demo or the server, not a model) implement
    `logits_for(last_tokens [B]) -> [B, V]` and run through the real skeleton."""

    name = "cacheless"

    def logits_for(self, last_tokens) -> np.ndarray:
        raise NotImplementedError

    def new_caches(self, batch, capacity):
        return None

    def prefill_chunk(self, caches, ids, start, num_new):
        return self.logits_for(ids[np.arange(len(ids)), self.last_token_index(num_new)])

    def decode_rows(self, caches, tokens, positions, mode):
        return self.logits_for(tokens)

    def grow_caches(self, caches, capacity):
        return caches

    def copy_slot(self, caches, slot, source_caches, source_slot, length):
        return caches

    def cache_nbytes(self, caches):
        return 0


class ConstantBackend(CachelessBackend):
    """Always predicts token 5, each call taking `call_s` seconds (steps that take time)."""

    call_s = 0.005

    def logits_for(self, last_tokens) -> np.ndarray:
        time.sleep(self.call_s)
        logits = np.zeros((len(last_tokens), self.config.vocab_size), np.float32)
        logits[:, 5] = 1.0
        return logits


def requires(module: str):
    """Skip marker for tests that need an optional package."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"needs the optional package {module!r}")


sys.path.insert(0, os.path.dirname(__file__))


def write_fast_tokenizer(out_dir, vocab_size: int = 512, added: dict[int, str] | None = None,
                         byte_level: bool = True) -> str:
    """A Hugging Face tokenizer.json (BPE on a few stdlib files, byte-level or sentencepiece
    style with byte fallback) and a tokenizer_config.json with `added` tokens (id -> content)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    stdlib = sysconfig.get_paths()["stdlib"]
    files = [os.path.join(stdlib, name) for name in ("textwrap.py", "bisect.py", "heapq.py")]
    specials = ["<unk>", "<s>", "</s>"]
    if byte_level:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                         decoders.Fuse()])
        alphabet = []
        specials += [f"<0x{b:02X}>" for b in range(256)]
    tok.train(files, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                         initial_alphabet=alphabet, show_progress=False))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast",
              "added_tokens_decoder": {str(i): {"content": c, "special": True}
                                       for i, c in (added or {}).items()}}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(out_dir)
