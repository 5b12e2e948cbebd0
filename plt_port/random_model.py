"""Random model directories of any size, without any deep-learning framework.

Used by the tests (tiny checkpoints in both formats) and by `plt-port bench` (e.g. a
~100M-parameter model whose weights do not fit the CPU caches); `PRESETS` are their sizes.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sysconfig

import numpy as np

from .atomic import atomic_write_text
from .checkpoint import expected_shapes, numpy_dtype, save_model_dir
from .config import PLTConfig

# Random PLT models (LoopCoder-v2 form: hidden-state gate, window [64, 0]) by size: the sizes
# of `plt-port bench --random` and of the tests' tiny models.
PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=96, vocab_size=512,
                 max_position_embeddings=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=688, vocab_size=4096),   # ~5M
    "25m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=2, intermediate_size=1408, vocab_size=8192),    # ~25M
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048, vocab_size=16384),  # ~100M
    "300m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, intermediate_size=2816, vocab_size=32000),  # ~340M
}
RANDOM_BASE = dict(model_type="iquestpltcoder", plt_num_loops=2, plt_window_size=[64, 0],
                   plt_gate_use_hidden_states=True, max_position_embeddings=4096,
                   torch_dtype="bfloat16")  # stored like the released checkpoints


def random_tensors(config: PLTConfig, seed: int = 0, std: float = 0.02,
                   gate_std: float = 0.5, dtype=None) -> dict[str, np.ndarray]:
    """Weights ~ N(0, std); norm weights ~ 1 + N(0, 0.1); gate weights and bias ~ N(0, gate_std)
    so that the gate takes clearly different values per token and head. `dtype` None: the
    config's torch_dtype."""
    rng = np.random.default_rng(seed)
    dtype = dtype or numpy_dtype(config.torch_dtype)
    tensors = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "gate_projections" in name or "plt_gate" in name:
            value = gate_std * rng.standard_normal(shape)
        else:
            value = std * rng.standard_normal(shape)
        tensors[name] = value.astype(dtype)
    return tensors


def save_random_model(out_dir: str | os.PathLike, config: PLTConfig, seed: int = 0,
                      tokenizer_dir: str | None = None, max_shard_bytes: int | None = None,
                      **kwargs) -> str:
    save_model_dir(out_dir, config, random_tensors(config, seed, **kwargs), tokenizer_dir,
                   max_shard_bytes)
    return os.fspath(out_dir)


def code_pieces(count: int) -> list[str]:
    """`count` vocabulary pieces as a sentencepiece BPE trained on code would hold them: the
    most frequent substrings (1-10 characters, `▁` for a space) of the words, numbers,
    operators and indentation runs of the Python standard library's modules, most frequent
    first."""
    stdlib = sysconfig.get_paths()["stdlib"]
    words = collections.Counter()
    for name in sorted(n for n in os.listdir(stdlib) if n.endswith(".py")):
        with open(os.path.join(stdlib, name), encoding="utf-8", errors="replace") as f:
            words.update(re.findall(r" ?[A-Za-z_]+| ?\d|[^\w\s]{1,3}|\n| +", f.read()))
    substrings = collections.Counter()
    for word, n in words.items():
        word = word.replace(" ", "\u2581")
        for start in range(len(word)):
            for end in range(start + 1, min(len(word), start + 10) + 1):
                substrings[word[start:end]] += n
    return [piece for piece, _ in substrings.most_common(count)]


def save_code_tokenizer(out_dir: str | os.PathLike, vocab_size: int,
                        added_tokens: tuple[str, ...] = ()) -> str:
    """A Hugging Face `tokenizer.json` (unigram, byte fallback, `▁` for spaces: the shape of
    the LoopCoder / IQuest sentencepiece vocabularies) of exactly `vocab_size` ids, and its
    tokenizer_config.json (`<unk>` 0, `<s>` 1, `</s>` 2, then the 256 byte pieces, then
    `added_tokens` as added tokens of the config, then code pieces): a realistic vocabulary of
    any size for a random model, e.g. the 76,800 of LoopCoder for a grammar's token masks."""
    special = ["<unk>", "<s>", "</s>"]
    fixed = special + [f"<0x{b:02X}>" for b in range(256)] + list(added_tokens)
    if vocab_size < len(fixed) + 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for pieces")
    pieces = [p for p in code_pieces(vocab_size) if p not in fixed][:vocab_size - len(fixed)]
    vocab = [[p, 0.0] for p in fixed] + [[p, -1.0 - i / len(pieces)] for i, p in
                                         enumerate(pieces)]
    if len(vocab) != vocab_size:
        raise ValueError(f"the standard library gives only {len(vocab)} pieces")
    spec = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}
                             for i, t in enumerate(special)],
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "Unigram", "unk_id": 0, "vocab": vocab, "byte_fallback": True}}
    first_added = len(special) + 256
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": False,
              "added_tokens_decoder": {str(first_added + i): {"content": t, "special": False}
                                       for i, t in enumerate(added_tokens)}}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "tokenizer.json"), json.dumps(spec))
    atomic_write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config))
    return os.fspath(out_dir)
