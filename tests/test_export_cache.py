"""Exports made on first use: reused while nothing changed, redone when anything did."""

import os

from exporters import cache


def fake_export(calls):
    def export(model_dir, out_dir, **options):
        calls.append(options)
        os.makedirs(out_dir)
    return export


def test_reused_until_the_model_options_or_exporter_code_change(make_model, monkeypatch):
    model_dir = make_model("plt")
    calls = []
    first = cache.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2)
    assert cache.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2) == first
    assert len(calls) == 1
    assert cache.ensure_exported(model_dir, "onnx", fake_export(calls), loops=3) != first
    monkeypatch.setattr(cache, "exporter_code_digest", lambda: "other exporter code")
    assert cache.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2) != first
    monkeypatch.undo()
    os.utime(os.path.join(model_dir, "config.json"), ns=(1, 1))
    assert cache.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2) != first
    assert len(calls) == 4
