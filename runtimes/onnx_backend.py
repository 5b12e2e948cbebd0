"""ONNX Runtime backend: runs the graphs of `exporters.onnx_export` behind `runtimes.base.Backend`.

- Provider: CUDAExecutionProvider when onnxruntime-gpu and a GPU are present, else CPU.
- Weights once in memory: `weights.bin` is memory-mapped once, each tensor is one OrtValue
  (a view, no copy) handed to both sessions with `SessionOptions.add_initializer`, so the
  prefill and decode graphs share them. ORT's CPU pre-packing would add a packed copy of a
  weight per MatMul node that uses it (the prefill graph unrolls the loops: L copies), so it
  is off. Without it MLAS packs B on every MatMul with more than one row, so on CPU a CLP
  step (L rows) costs about as much as the naive one. `prepack=True` turns it on for the CLP
  decode graph only: one packed copy more (2x weight memory) for a faster CLP step on CPU
  (`--onnx-prepack` on generate). The CUDA provider does not pre-pack.
- Caches live in OrtValues bound with IO binding; the global KV (both graphs) and the rings
  (decode graph) are bound as outputs to their own input buffers, so the graphs' ScatterND
  writes the new slot in place and nothing is copied between steps.
Imports neither torch nor onnx (the export on first use needs onnx).
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort

from plt_port.config import PLTConfig

from exporters.export_store import ensure_exported
from exporters.onnx_export import MANIFEST, check_export, export

from .base import Backend, BackendError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def resolve_export(model_dir: str, loops: int | None, dtype: str | None) -> tuple[str, dict]:
    """(export dir, manifest): `model_dir` itself when it is an export, else a cached export
    of the PyTorch model directory at `loops` and `dtype` (default float32), made on first use."""
    model_dir = os.fspath(model_dir)
    if not os.path.exists(os.path.join(model_dir, MANIFEST)):
        loops = PLTConfig.from_file(model_dir).resolve_loops(loops)
        model_dir = ensure_exported(model_dir, "onnx", export, loops=loops,
                                    dtype=dtype or "float32")
    check_export(model_dir, BackendError)
    try:
        with open(os.path.join(model_dir, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise BackendError(f"{model_dir}: unreadable {MANIFEST} ({exc}); export again") from None
    for name, asked in (("loops", loops), ("dtype", dtype)):
        if asked is not None and asked != manifest[name]:
            raise BackendError(f"{model_dir} was exported with {name}={manifest[name]}, "
                               f"{asked} asked; export again with --{name} {asked} or pass "
                               f"the PyTorch model directory")
    return model_dir, manifest


def choose_device(provider: str) -> str:
    """'cuda' when asked (or auto) and onnxruntime-gpu can place a tensor on a GPU, else 'cpu'."""
    available = ort.get_available_providers()
    if provider not in ("auto", *PROVIDERS):
        raise BackendError(f"provider must be auto, cpu or cuda, got {provider!r}")
    if provider == "cpu" or (provider == "auto" and PROVIDERS["cuda"] not in available):
        return "cpu"
    if PROVIDERS["cuda"] not in available:
        raise BackendError(f"{PROVIDERS['cuda']} is not available in this onnxruntime "
                           f"({', '.join(available)}); install onnxruntime-gpu for cuda")
    try:
        ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", 0)
    except Exception as exc:  # onnxruntime-gpu without a usable GPU or driver
        if provider == "auto":
            return "cpu"
        raise BackendError(f"onnxruntime-gpu found no usable GPU ({exc})") from None
    return "cuda"


class ONNXBackend(Backend):
    name = "onnx"
    loops_share_weights = False  # one export (graphs and weights) per loop count

    def __init__(self, model_dir: str, loops: int | None = None, provider: str = "auto",
                 dtype: str | None = None, threads: int | None = None, prepack: bool = False):
        self.check_threads(threads)
        self.source_dir = os.fspath(model_dir)
        self.device = choose_device(provider)
        export_dir, self.manifest = resolve_export(model_dir, loops, dtype)
        super().__init__(export_dir, loops=self.manifest["loops"])
        self.np_dtype = np.dtype(self.manifest["dtype"])
        self.run_dtype = self.np_dtype.name
        self.weights = self._load_weights()
        self.sessions = {kind: self._session(graph["file"], threads, prepack and kind == "decode")
                         for kind, graph in self.manifest["graphs"].items()}

    # ---- loading ----------------------------------------------------------------------
    def _load_weights(self) -> dict[str, ort.OrtValue]:
        """One read-only mapping of the file; every tensor an OrtValue over its slice (no copy,
        and the pages are the OS file cache: shared with any other process using this export)."""
        path = os.path.join(self.model_dir, self.manifest["weights_file"])
        self._weights_buffer = np.memmap(path, np.uint8, mode="r")
        values = {}
        for name, entry in self.manifest["weights"].items():
            raw = self._weights_buffer[entry["offset"]:entry["offset"] + entry["length"]]
            array = raw.view(entry["dtype"]).reshape(entry["shape"])
            values[name] = ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)
        return values

    def _session(self, graph_file: str, threads: int | None, prepack: bool):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if not prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in self.weights.items():
            options.add_initializer(name, value)
        providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if self.device == "cuda" \
            else [PROVIDERS["cpu"]]
        return ort.InferenceSession(os.path.join(self.model_dir, graph_file), options,
                                    providers=providers)

    # ---- caches -----------------------------------------------------------------------
    def _zeros(self, shape) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.np_dtype), self.device, 0)

    def new_caches(self, batch: int, capacity: int) -> dict:
        cfg, R = self.config, self.loops - 1
        G, D, W = cfg.num_key_value_heads, cfg.head_dim, cfg.window
        caches = {"global": [{kv: self._zeros((batch, G, capacity, D)) for kv in ("key", "value")}
                             for _ in range(cfg.num_hidden_layers)]}
        if R:
            caches["ring"] = [{kv: self._zeros((R, batch, G, W, D)) for kv in ("key", "value")}
                              for _ in range(cfg.num_hidden_layers)]
        if R and not cfg.is_v1:
            caches["carry"] = self._zeros((R, batch, cfg.hidden_size))
        return caches

    @staticmethod
    def _values(caches: dict) -> list[ort.OrtValue]:
        layers = caches["global"] + caches.get("ring", [])
        return [v for layer in layers for v in layer.values()] + \
            ([caches["carry"]] if "carry" in caches else [])

    def grow_caches(self, caches, capacity):
        for layer in caches["global"]:
            for kv, old in layer.items():
                grown = np.zeros(old.shape()[:2] + [capacity] + old.shape()[3:], self.np_dtype)
                grown[:, :, :old.shape()[2]] = old.numpy()
                layer[kv] = ort.OrtValue.ortvalue_from_numpy(grown, self.device, 0)
        return caches

    def copy_slot(self, caches, slot, source_caches, source_slot, length):
        for layer, source_layer in zip(caches["global"], source_caches["global"]):
            for kv, value in layer.items():
                array = value.numpy()
                array[slot, :, :length] = source_layer[kv].numpy()[source_slot, :, :length]
                value.update_inplace(array)
        per_loop = [(v, s) for layer, source_layer in zip(caches.get("ring", []),
                                                          source_caches.get("ring", []))
                    for v, s in zip(layer.values(), source_layer.values())]
        if "carry" in caches:
            per_loop.append((caches["carry"], source_caches["carry"]))
        for value, source in per_loop:  # [R, B, ...]: the batch is axis 1
            array = value.numpy()
            array[:, slot] = source.numpy()[:, source_slot]
            value.update_inplace(array)
        return caches

    def cache_nbytes(self, caches) -> int:
        return sum(int(np.prod(v.shape())) * self.np_dtype.itemsize for v in self._values(caches))

    # ---- running ----------------------------------------------------------------------
    def _run(self, kind: str, caches: dict, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One graph run with the caches bound; updates `caches` and returns fp32 logits."""
        session = self.sessions[kind]
        binding = session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        fresh = []  # outputs ORT allocates: prefill rings (a Concat), the carry
        for i, layer in enumerate(caches["global"]):
            for kv, value in layer.items():
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", value)
                binding.bind_ortvalue_output(f"present.{i}.{kv}", value)  # written in place
            for kv, value in caches["ring"][i].items() if "ring" in caches else ():
                binding.bind_ortvalue_input(f"past_ring.{i}.{kv}", value)
                if kind == "decode":
                    binding.bind_ortvalue_output(f"present_ring.{i}.{kv}", value)
                else:
                    fresh.append((f"present_ring.{i}.{kv}", ("ring", i, kv)))
        if "carry" in caches:
            binding.bind_ortvalue_input("past_carry", caches["carry"])
            fresh.append(("present_carry", ("carry", None, None)))
        logits = np.empty((len(feeds["start"]), self.config.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        for name, _ in fresh:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        # get_outputs() lists outputs in binding order: the in-place ones, logits, then `fresh`
        values = binding.get_outputs()
        for (_, (group, i, kv)), value in zip(fresh, values[len(values) - len(fresh):]):
            if group == "carry":
                caches["carry"] = value
            else:
                caches["ring"][i][kv] = value
        return logits

    def prefill_chunk(self, caches, ids, start, num_new):
        # Every chunk is as wide as the longest remaining prompt, so padded writes stay below
        # the longest prompt length <= capacity.
        return self._run("prefill", caches, {
            "input_ids": ids, "start": np.full(len(ids), start, np.int64), "num_new": num_new})

    def decode_rows(self, caches, tokens, positions, mode):
        if mode == "clp":
            return self._run("decode", caches, {"input_ids": tokens, "start": positions})
        # the prefill graph with one token runs the loops one after another
        return self._run("prefill", caches, {"input_ids": tokens[:, None], "start": positions,
                                             "num_new": np.ones(len(tokens), np.int64)})
