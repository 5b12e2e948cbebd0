"""What a model directory is decides its backend: a PyTorch checkpoint (torch), an ONNX export
(onnx), a plt-port MLX export and an mlx-community quantized checkpoint (mlx). `plt-port
generate` without --backend runs each on its backend; a --backend that does not fit is one
line naming the one that does. Shipped models go by name, and exports carry no local path."""

from __future__ import annotations

import json
import os

import pytest

from conftest import community_checkpoint, requires
from plt_port.app.cli import main
from runtimes.backends import BackendError, detect_backend, load_backend, model_kind


@pytest.fixture
def model_dirs(make_model, tmp_path) -> dict[str, str]:
    """{kind: directory} of one tiny model in each form."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("onnx")
    from exporters.mlx_export import export as export_mlx
    from exporters.onnx_export import export as export_onnx

    source = make_model("plt", eos_token_id=None)
    dirs = {"pytorch": source,
            "onnx": export_onnx(source, str(tmp_path / "onnx")),
            "mlx": export_mlx(source, tmp_path / "mlx")}
    dirs["mlx-quantized"] = community_checkpoint(source, tmp_path / "mlx-4bit")
    return dirs


@requires("torch")
def test_each_kind_of_directory_runs_on_its_backend(model_dirs, capsys):
    expected = {"pytorch": "torch", "onnx": "onnx", "mlx": "mlx", "mlx-quantized": "mlx"}
    for kind, path in model_dirs.items():
        assert (model_kind(path), detect_backend(path)) == (kind, expected[kind])
        assert main(["generate", "-m", path, "--max-tokens", "3", "-p", "def f():"]) == 0
        assert f"[{expected[kind]}, loops=2, decode=clp]" in capsys.readouterr().err, kind
    assert load_backend(None, model_dirs["onnx"]).name == "onnx"


@requires("torch")
@pytest.mark.parametrize("kind, wrong, right", [
    ("onnx", "torch", "onnx"), ("onnx", "mlx", "onnx"), ("mlx", "torch", "mlx"),
    ("mlx", "onnx", "mlx"), ("mlx-quantized", "torch", "mlx")])
def test_a_backend_that_does_not_fit_is_one_line_naming_the_right_one(model_dirs, capsys, kind,
                                                                       wrong, right):
    assert main(["generate", "--model", model_dirs[kind], "--backend", wrong, "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"the {wrong} backend does not load: use --backend {right}" in err
    with pytest.raises(BackendError, match=f"use --backend {right}"):
        load_backend(wrong, model_dirs[kind])


def test_serve_takes_the_backend_its_directory_is_for(model_dirs, monkeypatch):
    """`plt-port serve --model EXPORT` without --backend opens the export's backend."""
    from plt_port.app.commands import serve

    opened = []
    monkeypatch.setattr(serve, "open_server", lambda model, backend, *a, **k: opened.append(
        (model, backend)) or (_ for _ in ()).throw(SystemExit(0)))
    for kind, backend in [("onnx", "onnx"), ("mlx-quantized", "mlx"), ("pytorch", "torch")]:
        with pytest.raises(SystemExit):
            main(["serve", "--model", model_dirs[kind]])
        assert opened.pop() == (model_dirs[kind], backend)


def test_exports_carry_no_local_path(model_dirs):
    local = os.path.dirname(os.path.abspath(model_dirs["pytorch"]))
    for kind in ("onnx", "mlx", "mlx-quantized"):
        for name in os.listdir(model_dirs[kind]):
            if name.endswith((".json", ".py")):
                with open(os.path.join(model_dirs[kind], name), encoding="utf-8") as f:
                    assert local not in f.read(), (kind, name)
    with open(os.path.join(model_dirs["mlx"], "config.json")) as f:
        assert json.load(f)["mlx_export"]["source"] == os.path.basename(model_dirs["pytorch"])


def test_shipped_models_go_by_name(capsys):
    from plt_port.family import family_model_dirs, resolve_model_dir

    present = family_model_dirs("stdlib")
    if not present:
        pytest.skip("the embedded family is not in this installation")
    name = list(present)[-1]
    assert resolve_model_dir(name) == present[name]
    assert resolve_model_dir("some/dir") == "some/dir"
    assert main(["generate", "-m", name, "--max-tokens", "2", "--threads", "1", "def f("]) == 0
    assert f"loops={len(present)}" in capsys.readouterr().err
