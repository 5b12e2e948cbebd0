"""Exports made on first use: reused while nothing changed, redone when anything did."""

import os

from exporters import export_store


def fake_export(calls):
    def export(model_dir, out_dir, **options):
        calls.append(options)
        os.makedirs(out_dir)
    return export


def test_reused_until_the_model_options_or_exporter_code_change(make_model, monkeypatch):
    model_dir = make_model("plt")
    calls = []
    first = export_store.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2)
    assert export_store.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2) == first
    assert len(calls) == 1
    assert export_store.ensure_exported(model_dir, "onnx", fake_export(calls), loops=3) != first
    monkeypatch.setattr(export_store, "code_digest", lambda: "other exporter code")
    assert export_store.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2) != first
    monkeypatch.undo()
    os.utime(os.path.join(model_dir, "config.json"), ns=(1, 1))
    assert export_store.ensure_exported(model_dir, "onnx", fake_export(calls), loops=2) != first
    assert len(calls) == 4


def test_the_code_digest_covers_the_checkpoint_reader_and_config(tmp_path, monkeypatch):
    digest = export_store.code_digest()
    for module in (export_store.checkpoint, export_store.config):
        changed = tmp_path / os.path.basename(module.__file__)
        changed.write_text(open(module.__file__, encoding="utf-8").read() + "\n# changed\n")
        monkeypatch.setattr(module, "__file__", str(changed))
        assert export_store.code_digest() != digest
        monkeypatch.undo()
