"""Hostile files and options (issue 26, classes 4-11 outside the server): thread counts past
the cores, broken config.json of `export mlx`, chat templates that build huge strings or
recurse, tokenizer files that panic the Rust library or carry wrong types, mlx-community dirs
with wrong quantization types, ONNX exports that disagree with themselves, full disks. Each
ends in one clear PLTError (CLI: one error line), never a traceback, a hang or garbage."""

from __future__ import annotations

import json
import os

import pytest

from conftest import requires
from test_hostile_inputs import DEEP_JSON, cli_error, no_hang  # noqa: F401 (no_hang: a fixture)
from plt_port.errors import PLTError

CORES = len(os.sched_getaffinity(0))


# ---- 4. thread counts bounded by the cores ------------------------------------------------------
@pytest.mark.parametrize("command", [["generate", "x"], ["chat"], ["serve"], ["bench"],
                                     ["eval"], ["train"], ["demo"]])
def test_threads_past_the_cores_are_a_usage_error(command, capsys):
    from plt_port.app.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([command[0], "--threads", str(CORES + 1), *command[1:]])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"from 1 to {CORES}" in err


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_backend_threads_accept_exactly_the_cores(backend, make_model):
    from runtimes.backends import BackendError, load_backend

    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    model_dir = make_model("plt")
    load_backend(backend, model_dir, threads=CORES)
    with pytest.raises(BackendError, match=f"threads must be an integer from 1 to {CORES}"):
        load_backend(backend, model_dir, threads=CORES + 1)


# ---- 5. export mlx reads config.json through the one JSON reader ---------------------------------
@requires("mlx")
@pytest.mark.parametrize("content,message", [
    ("{bad", "unreadable JSON"), ("5", "expected a JSON object"), (DEEP_JSON, "nested too deeply"),
    (b"{\"a\": \"\xff\"}", "unreadable JSON"), (None, "not a regular file")])
def test_export_mlx_refuses_a_broken_config_cleanly(make_model, tmp_path, content, message,
                                                    capsys, no_hang):  # noqa: F811
    model_dir = make_model()
    path = os.path.join(model_dir, "config.json")
    os.remove(path)
    if content is None:
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    line = cli_error(["export", "mlx", model_dir, str(tmp_path / "out")], capsys)
    assert message in line and "config.json" in line
    assert not os.path.exists(tmp_path / "out")
