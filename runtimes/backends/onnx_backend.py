"""ONNX Runtime backend: runs the graph of `exporters.onnx_export` behind `runtimes.backends.base.Backend`.

- Provider: CUDAExecutionProvider when onnxruntime-gpu and a GPU are present, else CPU.
- One session serves prefill (one call per loop), the CLP step (one call, all loops) and the
  naive step, and each MatMul weight feeds one node: ORT loads weights.bin itself, pre-packs
  each MatMul / MatMulNBits weight once for the CPU kernels and frees the unpacked copy (a
  float32 export is held at about its weights.bin size). Packed weights keep fp32 CLP steps
  of 2-4 rows close to one-row ones (no packing per call), and MatMulNBits needs them for its
  fast int8-compute path (accuracy_level 4).
- Caches live in OrtValues bound with IO binding; the global KV is bound as an output to its
  own input buffer, so the graph's ScatterND writes the new slots in place. Rings, the carry
  and the hidden hand-over are fresh outputs of each call, fed to the next one as they are.
Imports neither torch nor onnx (the export on first use needs onnx).
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from plt_port.cache_layout import ring_slots
from plt_port.config import PLTConfig

from exporters.export_store import ensure_exported
from exporters.onnx_export import MANIFEST, check_export, export, quantization

from .base import Backend, BackendError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def default_dtype(stored: str, device: str) -> str:
    """The export precision of a checkpoint stored in `stored` when none is asked: float32
    on the CPU (its provider lacks most float16 kernels, so float16 graphs run through
    inserted Casts and fp32 copies of the weights), float16 on a GPU for 16-bit checkpoints."""
    return "float16" if device == "cuda" and stored in ("float16", "bfloat16") else "float32"


def resolve_export(model_dir: str, loops: int | None, dtype: str | None, device: str = "cpu",
                   quant=None) -> tuple[str, dict]:
    """(export dir, manifest): `model_dir` itself when it is an export, else a cached export
    of the PyTorch model directory at `loops`, `dtype` (default: `default_dtype`) and `quant`
    (an `exporters.onnx_graph.Quantization` or None), made on first use."""
    model_dir = os.fspath(model_dir)
    if not os.path.exists(os.path.join(model_dir, MANIFEST)):
        config = PLTConfig.from_file(model_dir)
        loops = config.resolve_loops(loops)
        dtype = dtype or ("float32" if quant else default_dtype(config.torch_dtype, device))
        model_dir = ensure_exported(model_dir, "onnx", export, loops=loops, dtype=dtype,
                                    quant=quant)
    elif quant is not None:
        raise BackendError(f"{model_dir} is already an ONNX export; quantize from the PyTorch "
                           f"model directory")
    manifest = check_export(model_dir, BackendError)
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
    supports_rewind = True
    supports_verify = True
    loops_share_weights = False  # one export (graphs and weights) per loop count

    def __init__(self, model_dir: str, loops: int | None = None, provider: str = "auto",
                 dtype: str | None = None, threads: int | None = None,
                 quantize: int | None = None, block_size: int = 32,
                 kv_bits: int | None = None, kv_group_size: int | None = None,
                 quantized_kv_start: int = 0):
        if kv_bits is not None:
            raise BackendError("the onnx backend keeps its KV caches in the export's dtype "
                               "(float16 on CUDA for 16-bit checkpoints, float32 on the CPU); "
                               "kv_bits (--kv-bits) quantizes the torch and mlx caches")
        self.check_threads(threads)
        self.source_dir = os.fspath(model_dir)
        self.device = choose_device(provider)
        quant = None if quantize is None else quantization(quantize, block_size)
        export_dir, self.manifest = resolve_export(model_dir, loops, dtype, self.device, quant)
        super().__init__(export_dir, loops=self.manifest["loops"])
        self.np_dtype = np.dtype(self.manifest["dtype"])
        self.run_dtype = self.np_dtype.name
        self.session = self._session(threads)
        self.check_graph()

    def check_graph(self) -> None:
        """The export's config.json, manifest and graph must describe one model: the sizes the
        manifest records are config.json's, and the graph's inputs and outputs are those this
        backend feeds and reads, in the manifest's dtype (an edited file would otherwise fail
        inside ONNX Runtime, or run another model's shapes)."""
        cfg, manifest = self.config, self.manifest
        recorded = {"num_layers": cfg.num_hidden_layers, "window": cfg.window,
                    "num_attention_heads": cfg.num_attention_heads,
                    "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
                    "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size}
        for key, value in recorded.items():
            if manifest.get(key) != value:
                raise BackendError(f"{self.model_dir}: config.json gives {key} {value}, the "
                                   f"export's {MANIFEST} {manifest.get(key)!r}; export again")
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        expected = self.graph_inputs()
        problems = [] if set(inputs) == set(expected) else \
            [f"inputs {sorted(set(inputs) ^ set(expected))}"]
        expected["logits"] = ("tensor(float)", [None, cfg.vocab_size])
        for name, (kind, shape) in expected.items():
            arg = inputs.get(name) or outputs.get(name)
            if arg is not None and arg.type == kind and len(arg.shape) == len(shape) and all(
                    want is None or not isinstance(got, int) or got == want
                    for got, want in zip(arg.shape, shape)):
                continue
            problems.append(f"{name} is {arg.type} {arg.shape}" if arg else f"no {name}")
        if problems:
            raise BackendError(f"{os.path.join(self.model_dir, manifest['graph']['file'])} "
                               f"does not match config.json and {MANIFEST} (loops {self.loops}, "
                               f"{manifest['dtype']}): {'; '.join(problems[:3])}; export again")

    def graph_inputs(self) -> dict[str, tuple[str, list]]:
        """{input name: (ONNX Runtime type, shape; None: a dim of any size)} of the graph."""
        cfg, R = self.config, self.loops - 1
        value = {"float32": "tensor(float)", "float16": "tensor(float16)"}[self.manifest["dtype"]]
        G, D, H = cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        ids = ("tensor(int64)", [None])
        inputs = {"input_ids": ("tensor(int64)", [None, None]), "start": ids, "num_new": ids,
                  "loops": ids, "logit_rows": ("tensor(int64)", [1])}
        if R:
            inputs["past_hidden"] = (value, [None, None, H])
        for i in range(cfg.num_hidden_layers):
            for kv in ("key", "value"):
                inputs[f"past_key_values.{i}.{kv}"] = (value, [None, G, None, D])
                if R:
                    inputs[f"past_ring.{i}.{kv}"] = (value, [R, None, G, None, D])
        if R and not cfg.is_v1:
            inputs["past_carry"] = (value, [R, None, H])
        return inputs

    def _session(self, threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # idle threads sleep instead of spinning: on cores busy with other work, spinning
        # threads stall the decode (measured: README, Command line, threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        providers = [PROVIDERS["cuda"], PROVIDERS["cpu"]] if self.device == "cuda" \
            else [PROVIDERS["cpu"]]
        graph = os.path.join(self.model_dir, self.manifest["graph"]["file"])
        try:
            return ort.InferenceSession(graph, options, providers=providers)
        except Exception as exc:  # ONNX Runtime's Fail, InvalidGraph, InvalidProtobuf, ...
            raise BackendError(f"{graph}: ONNX Runtime cannot load it ({type(exc).__name__}: "
                               f"{str(exc)[:300]}); export again") from None

    # ---- caches -----------------------------------------------------------------------
    def _zeros(self, shape) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, self.np_dtype), self.device, 0)

    def new_caches(self, batch: int, capacity: int) -> dict:
        cfg, R = self.config, self.loops - 1
        G, D, Wr = cfg.num_key_value_heads, cfg.head_dim, ring_slots(cfg.window, capacity)
        caches = {"global": [{kv: self._zeros((batch, G, capacity, D)) for kv in ("key", "value")}
                             for _ in range(cfg.num_hidden_layers)]}
        if R:
            caches["ring"] = [{kv: self._zeros((R, batch, G, Wr, D)) for kv in ("key", "value")}
                              for _ in range(cfg.num_hidden_layers)]
        if R and not cfg.is_v1:
            caches["carry"] = self._zeros((R, batch, cfg.hidden_size))
        return caches

    @staticmethod
    def _values(caches: dict) -> list[ort.OrtValue]:
        layers = caches["global"] + caches.get("ring", [])
        return [v for layer in layers for v in layer.values()] + \
            ([caches["carry"]] if "carry" in caches else [])

    def _grown(self, old: ort.OrtValue, axis: int, size: int) -> ort.OrtValue:
        """`old` with axis `axis` extended to `size` (new entries zero, at the end)."""
        shape = old.shape()
        if size <= shape[axis]:
            return old
        grown = np.zeros(shape[:axis] + [size] + shape[axis + 1:], self.np_dtype)
        grown[(slice(None),) * axis + (slice(0, shape[axis]),)] = old.numpy()
        return ort.OrtValue.ortvalue_from_numpy(grown, self.device, 0)

    def grow_caches(self, caches, capacity):
        slots = ring_slots(self.config.window, capacity)
        for layers, axis, size in (("global", 2, capacity), ("ring", 3, slots)):
            for layer in caches.get(layers, []):
                for kv, old in layer.items():
                    layer[kv] = self._grown(old, axis, size)
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
            array, source_array = value.numpy(), source.numpy()
            # rings of different sizes: a smaller one holds positions < its size in its prefix
            shared = tuple(slice(0, min(n, m)) for n, m in zip(array.shape[2:],
                                                                source_array.shape[2:]))
            array[:, slot] = 0
            array[(slice(None), slot) + shared] = source_array[(slice(None), source_slot) + shared]
            value.update_inplace(array)
        return caches

    # ---- rewinds (rings [R, B, G, Wr, D] per layer, carry [R, B, d]) ------------------------
    def gather_ring(self, caches, slots, ring_slots):
        if "ring" not in caches:
            return None
        index = ring_slots[:, None, None, :, None]
        return [np.take_along_axis(value.numpy()[:, slots].swapaxes(0, 1), index, axis=3)
                for layer in caches["ring"] for value in layer.values()]  # [k, R, G, m, D]

    def scatter_ring(self, caches, slot, ring_slots, rows, row, columns):
        values = [value for layer in caches["ring"] for value in layer.values()]
        for value, saved in zip(values, rows):
            array = value.numpy()  # the OrtValue's own memory on the CPU, a copy on a GPU
            array[:, slot][:, :, ring_slots] = saved[row][:, :, columns]
            value.update_inplace(array)
        return caches

    def gather_carry(self, caches, slots):
        if "carry" not in caches:
            return None
        return [caches["carry"].numpy()[:, slots].swapaxes(0, 1)[:, :, None]]  # [k, L-1, 1, d]

    def scatter_carry(self, caches, slot, carries, row, column):
        array = caches["carry"].numpy()
        array[:, slot] = 0 if carries is None else carries[0][row, :, column]
        caches["carry"].update_inplace(array)
        return caches

    def own_rows(self, arrays, row):
        return [a[row:row + 1].copy() for a in arrays]

    # ---- saved prompt caches ---------------------------------------------------------------
    def export_slot(self, caches, slot, length):
        held = min(self.config.window, length)
        arrays = {f"global.{i}.{kv}": value.numpy()[slot, :, :length].copy()
                  for i, layer in enumerate(caches["global"]) for kv, value in layer.items()}
        arrays.update({f"ring.{i}.{kv}": value.numpy()[:, slot, :, :held].copy()
                       for i, layer in enumerate(caches.get("ring", []))
                       for kv, value in layer.items()})
        if "carry" in caches:
            arrays["carry"] = caches["carry"].numpy()[:, slot].copy()
        return arrays

    def import_slot(self, caches, slot, arrays):
        def put(value, name, index):
            array = value.numpy()
            source = arrays[name]
            array[index(source)] = source
            value.update_inplace(array)

        for i, layer in enumerate(caches["global"]):
            for kv, value in layer.items():
                put(value, f"global.{i}.{kv}", lambda a: (slot, slice(None), slice(0, a.shape[1])))
        for i, layer in enumerate(caches.get("ring", [])):
            for kv, value in layer.items():
                put(value, f"ring.{i}.{kv}",
                    lambda a: (slice(None), slot, slice(None), slice(0, a.shape[2])))
        if "carry" in caches:
            put(caches["carry"], "carry", lambda a: (slice(None), slot))
        return caches

    def cache_nbytes(self, caches) -> int:
        return sum(int(np.prod(v.shape())) * self.np_dtype.itemsize for v in self._values(caches))

    # ---- running ----------------------------------------------------------------------
    def _run(self, caches: dict, ids: np.ndarray, start: np.ndarray, num_new: np.ndarray,
             loops: list[int], hidden, logit_rows: int = 1):
        """One call over the row groups `loops` (see exporters/onnx_graph.py); updates
        `caches` and returns (fp32 logits [B, V], or [B, logit_rows, V] of each sequence's
        last rows, present_hidden or None)."""
        binding = self.session.io_binding()
        feeds = {"input_ids": ids, "start": start, "num_new": num_new,
                 "loops": np.array(loops, np.int64),
                 "logit_rows": np.array([logit_rows], np.int64)}
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        fresh = []  # outputs ORT allocates: the rings, the carry, the hidden hand-over
        for i, layer in enumerate(caches["global"]):
            for kv, value in layer.items():
                binding.bind_ortvalue_input(f"past_key_values.{i}.{kv}", value)
                binding.bind_ortvalue_output(f"present.{i}.{kv}", value)  # written in place
            for kv, value in caches["ring"][i].items() if "ring" in caches else ():
                binding.bind_ortvalue_input(f"past_ring.{i}.{kv}", value)
                fresh.append((f"present_ring.{i}.{kv}", caches["ring"][i], kv))
        if "carry" in caches:
            binding.bind_ortvalue_input("past_carry", caches["carry"])
            fresh.append(("present_carry", caches, "carry"))
        handover = {}
        if self.loops > 1:
            binding.bind_ortvalue_input("past_hidden", hidden)
            fresh.append(("present_hidden", handover, "hidden"))
        logits = np.empty((len(ids) * logit_rows, self.config.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        for name, _, _ in fresh:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        # get_outputs() lists outputs in binding order: the in-place ones, logits, then `fresh`
        values = binding.get_outputs()
        for (_, holder, key), value in zip(fresh, values[len(values) - len(fresh):]):
            holder[key] = value
        if logit_rows > 1:
            logits = logits.reshape(len(ids), logit_rows, -1)
        return logits, handover.get("hidden")

    def _loops_in_turn(self, caches, ids, start, num_new, carries: list | None = None,
                       logit_rows: int = 1):
        """Loop 1, 2, ... L over the chunk, each call handing its outputs to the next;
        `carries` receives each loop r < L's hand-over (PLT: its shifted carries); the last
        call gives the logits of `logit_rows` rows."""
        hidden = self._zeros((*ids.shape, self.config.hidden_size)) if self.loops > 1 else None
        for r in range(1, self.loops + 1):
            rows = logit_rows if r == self.loops else 1
            logits, hidden = self._run(caches, ids, start, num_new, [r], hidden, rows)
            if carries is not None and r < self.loops:
                carries.append(hidden)
        return logits

    def prefill_chunk(self, caches, ids, start, num_new, trace=False, every_row=False):
        # A chunk is never wider than the longest remaining prompt, so padded writes stay
        # below the longest prompt length <= capacity. Every row: the last T rows of a chunk
        # whose sequences fill it (a verify's one sequence).
        carries = [] if trace and "carry" in caches else None
        logits = self._loops_in_turn(caches, ids, np.full(len(ids), start, np.int64), num_new,
                                     carries, ids.shape[1] if every_row else 1)
        if not trace:
            return logits
        return logits, [np.stack([c.numpy() for c in carries], axis=1)] if carries else None

    def decode_rows(self, caches, tokens, positions, mode):
        ids, num_new = tokens[:, None], np.ones(len(tokens), np.int64)
        if mode == "naive":
            return self._loops_in_turn(caches, ids, positions, num_new)
        hidden = self._zeros((len(tokens), 1, self.config.hidden_size))
        return self._run(caches, ids, positions, num_new, list(range(1, self.loops + 1)),
                         hidden)[0]
