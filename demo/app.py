"""Gradio demo: one prompt, up to four (model, backend, loop count, decode mode, speculative
decoding) columns streamed side by side, and a Loop analysis tab. `plt-port demo` launches it.

    app = build_app(["path/to/model"])
    launch(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

import json
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from plt_port.config import MAX_LOOPS, PLTConfig  # noqa: E402
from plt_port.errors import PLTError  # noqa: E402
from plt_port.family import CHAINS_EXAMPLES_JSON, display_names  # noqa: E402
from plt_port.tasks import answer_of  # noqa: E402
from runtimes.backends.base import DECODE_MODES  # noqa: E402

from .columns import (BACKEND_LABELS, MAX_COLUMNS, ColumnSpec, ColumnView,  # noqa: E402
                      DemoInputError, EnginePool, Limits, answer_note, as_int, compare,
                      error_view, make_request, make_spec, stopped_stats)
from .loop_analysis import heldout_fallback, loop_analysis  # noqa: E402

log = logging.getLogger("plt_port.demo")


def refuse_unreadable_values(component) -> None:
    """Make a Gradio input (a slider, a number) refuse an API call's value of the wrong type
    (`"abc"` for a slider) with one log line and its message, where Gradio would log a
    traceback and answer `{"error": null}`. Wrapped per instance: a subclass of a Gradio
    component makes Gradio write a .pyi stub beside this file."""
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except (TypeError, ValueError):
            message = f"{component.label}: {payload!r} is not a valid value"
            log.warning("refused an API call: %s", message)
            raise gr.Error(message, print_exception=False) from None

    component.preprocess = checked


# A column's settings, as the API names them: model_1, backend_1, loops_1, decode_1,
# speculative_1, model_2, ... (a caller that leaves speculative_N out gets "off")
COLUMN_SETTINGS = ("model", "backend", "loops", "decode", "speculative")

EXAMPLE_PROMPTS = [
    "def fibonacci(n):",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "class Stack:\n    def __init__(self):\n",
    "import os\n\n\ndef list_python_files(root):\n",
    "def merge_sorted(a, b):\n    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n",
]

CSS = """
.gradio-container { max-width: 1600px !important; margin: auto; }
.column-stats { font-size: 0.85rem; min-height: 2.6em; }
.column-stats p { margin: 0; }
.backend-note { font-size: 0.8rem; opacity: 0.8; }
.column-output .cm-editor { height: 330px !important; }
#prompt textarea { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.analysis-note th, .analysis-note td:first-child { white-space: nowrap; }
"""

INTRO = """# Parallel Loop Transformer: loop counts side by side
The same prompt runs in every column at once: pick a model, a backend, how many times the
shared layer stack loops, and the decode mode (**clp**: all loops of a token in one pass;
**naive**: one pass per loop), and speculative decoding (**ngram**: drafts looked up in the
context, **draft** *model*: drafts by another model, verified by the column's model in one
chunk; the text is the same as **off** when greedy).
Tokens/s and time to first token count only each column's own
backend time, so the columns do not slow each other's figures."""

CHAIN_EXAMPLES_NOTE = ("**Variable chains**: programs from the held-out split where the model "
                       "trained with fewer loops answers wrong and the one with more loops right "
                       "(picked by `plt-port card --family chains` from measured greedy answers). "
                       "A click sets the prompt and the two columns.")

ANALYSE_HINT = ("Press **Analyse** to measure this model loop by loop (step size, output shift, "
                "effective rank, gate mean, ...) on held-out text; it takes a while on a CPU.")


def backend_reasons(backends: dict[str, str | None] | None = None) -> dict[str, str | None]:
    """{backend: None if it runs here, else why not (with the install hint)}."""
    if backends is not None:
        return dict(backends)
    from runtimes.backends import BACKENDS, backend_unavailable_reason

    return {name: backend_unavailable_reason(name) for name in BACKENDS}


def default_columns(trained_loops: dict[str, int], offered: list[str]) -> list[ColumnSpec]:
    """Several models (the family, one per loop count): column i runs model i at the loop
    count it was trained with. One model: column i runs it at i + 1 loops (the first column
    as a plain one-loop transformer). PyTorch when it is offered."""
    backend = "torch" if "torch" in offered else (offered[0] if offered else "torch")
    names = list(trained_loops)
    if len(names) > 1:
        picks = [(names[i % len(names)], trained_loops[names[i % len(names)]])
                 for i in range(MAX_COLUMNS)]
    else:
        picks = [(names[0], min(i + 1, MAX_LOOPS)) for i in range(MAX_COLUMNS)]
    return [ColumnSpec(model, backend, loops, "clp") for model, loops in picks]


def expected_answer_text(prompt) -> str:
    """The line under the prompt: the answer of a variable-chain program, else nothing."""
    expected = answer_of(prompt) if isinstance(prompt, str) else None
    return "" if expected is None else (f"Expected answer: **{expected}** (what the program "
                                        "prints, computed by running its assignments)")


def chain_example_rows(examples: list[dict], models: dict[str, str]) -> tuple[list, list]:
    """([prompt, model, loops, model, loops] rows, labels) of the examples whose two models
    are offered; a label says the depth and what each model answered when they were picked."""
    offered = [e for e in examples if all(model in models for model, _ in e["columns"])]
    labels = [f"depth {e['depth']}: " + ", ".join(
        f"L={loops} says {e['answers'][model]}" for model, loops in e["columns"])
        + f" (answer {e['answer']})" for e in offered]
    rows = [[e["prompt"], *[str(v) for column in e["columns"] for v in column]] for e in offered]
    return rows, labels


def load_chain_examples(path: str = CHAINS_EXAMPLES_JSON) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return json.load(f)["examples"]


def column_settings(n: int) -> list[str]:
    """The API names of the settings of columns 1..n."""
    return [f"{name}_{i + 1}" for i in range(n) for name in COLUMN_SETTINGS]


def compare_handler(pool: EnginePool, limits: Limits, reasons: dict[str, str | None]):
    """The Run button (and the `/compare` API): validate, then stream every column until all
    finish. Yields MAX_COLUMNS (text, stats) pairs; columns past the chosen count stay empty.
    Under a variable-chain prompt each column's stats say the right answer and whether it
    gave it. A refused request is one warning line in the log and a message in the page."""

    def run(prompt, columns, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
            seed, use_chat_template, **settings):
        expected = answer_of(prompt) if isinstance(prompt, str) else None

        def outputs(views: list[ColumnView]) -> list[str]:
            views = views + [ColumnView()] * (MAX_COLUMNS - len(views))
            return [value for view in views for value in (
                view.text, "\n\n".join(filter(None, [view.stats, answer_note(
                    expected, prompt, view.text) if view.stats else ""])))]

        try:
            n = as_int(columns, "columns", 1, MAX_COLUMNS)
            request = make_request(prompt, limits, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, top_k=top_k,
                                   repetition_penalty=repetition_penalty, seed=seed,
                                   use_chat_template=use_chat_template)
            names, width = column_settings(n), len(COLUMN_SETTINGS)
            specs = [make_spec(pool, *(settings.get(name)
                                       for name in names[width * i:width * (i + 1)]))
                     for i in range(n)]
        except PLTError as exc:  # DemoInputError, or a sampling parameter the sampler refuses
            log.warning("refused a comparison: %s", exc)
            gr.Warning(str(exc))
            yield outputs([error_view("", str(exc))] * MAX_COLUMNS)
            return
        comparison = compare(pool, specs, request, reasons)
        try:
            for views in comparison:
                yield outputs(views)
        finally:
            comparison.close()

    return run


def analysis_handler(pool: EnginePool):
    """Analyse button and model choice: (gallery, card plot, note), each shown when it has
    something (a one-image Gallery would open as a zoomed preview, hence the separate plot)."""

    def views(images, figure, note):
        return (gr.Gallery(value=images, visible=bool(images)),
                gr.Plot(value=figure, visible=figure is not None), note)

    def analyse(model, loops):
        try:
            model_dir = pool.model_dir(model)
            loops = as_int(loops, "loops", 1, MAX_LOOPS)
        except DemoInputError as exc:
            return views([], None, f"⚠️ {exc}")
        return views(*loop_analysis(model_dir, loops))

    def model_card(model):
        try:
            return views([], *heldout_fallback(pool.model_dir(model), ANALYSE_HINT))
        except DemoInputError as exc:
            return views([], None, f"⚠️ {exc}")

    return analyse, model_card


def build_app(model_dirs, limits: Limits = Limits(), *, backend_options: dict | None = None,
              backends: dict | None = None, loader=None,
              chain_examples: list[dict] | None = None) -> gr.Blocks:
    """The demo page. `backend_options`: {backend name: load_backend options}. `backends`
    ({name: unavailable reason or None}) and `loader` (like runtimes.load_backend) default
    to the real ones; tests pass their own. `chain_examples` (default: the packaged
    chains_examples.json) are offered when their models are."""
    models = display_names(model_dirs)
    if not models:
        raise DemoInputError("no model directories given")
    # read every config now: a bad model dir is a clear error here rather than in a column
    trained_loops = {name: PLTConfig.from_file(d).num_loops for name, d in models.items()}
    pool = EnginePool(models, loader, backend_options,
                      max_batch=MAX_COLUMNS * limits.concurrency)
    reasons = backend_reasons(backends)
    offered = [name for name, reason in reasons.items() if reason is None]
    columns = default_columns(trained_loops, offered)
    chain_rows, chain_labels = chain_example_rows(
        load_chain_examples() if chain_examples is None else chain_examples, models)
    backend_choices = [(BACKEND_LABELS.get(name, name), name) for name in offered]
    model_choices = list(models)

    with gr.Blocks(title="PLT loop comparison", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Tab("Compare"):
            with gr.Row(equal_height=False):
                prompt = gr.Textbox(label="Prompt (code to complete)", lines=5, scale=4,
                                    max_length=limits.max_prompt_chars, elem_id="prompt",
                                    value=EXAMPLE_PROMPTS[0])
                with gr.Column(scale=1, min_width=300):
                    n_columns = gr.Slider(1, MAX_COLUMNS, value=2, step=1, label="Columns",
                                          elem_id="n-columns")
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="run",
                                        interactive=bool(offered))
                        stop = gr.Button("Stop", elem_id="stop")
            expected_answer = gr.Markdown(expected_answer_text(EXAMPLE_PROMPTS[0]),
                                          elem_id="expected-answer")
            gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="Example prompts")
            with gr.Accordion("Sampling and limits", open=False):
                with gr.Row():
                    max_new_tokens = gr.Slider(1, limits.max_new_tokens,
                                               value=min(96, limits.max_new_tokens), step=1,
                                               label="Max new tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                            label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.01, 1.0, value=1.0, step=0.01, label="Top-p")
                    top_k = gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05,
                                                   label="Repetition penalty (1 = off)")
                    seed = gr.Number(0, precision=0, label="Seed")
                    use_chat = gr.Checkbox(True, label="Chat template (models that have one)")
            # Choices are the values the API advertises (strings), and a value outside them
            # reaches the handler, which refuses it in one line (Gradio's own refusal would
            # print a traceback).
            choice = dict(allow_custom_value=True)
            boxes, column_inputs, column_outputs = [], [], []
            with gr.Row():
                for i, spec in enumerate(columns):
                    with gr.Column(visible=i < 2, variant="panel", min_width=280) as box:
                        # full-width model and backend: their names must not be cut off
                        # when four columns share the page
                        model = gr.Dropdown(model_choices, value=spec.model, label="Model",
                                            elem_id=f"model-{i}", **choice)
                        backend = gr.Dropdown(backend_choices, value=spec.backend,
                                              label="Backend", elem_id=f"backend-{i}", **choice)
                        with gr.Row():
                            loops = gr.Dropdown([str(n) for n in range(1, MAX_LOOPS + 1)],
                                                value=str(spec.loops), label="Loops",
                                                elem_id=f"loops-{i}", min_width=80, **choice)
                            mode = gr.Dropdown(list(DECODE_MODES), value=spec.decode_mode,
                                               label="Decode", elem_id=f"mode-{i}", min_width=80,
                                               **choice)
                        # full width too: "draft <model name>"
                        speculative = gr.Dropdown(pool.speculative_choices(),
                                                  value=spec.speculative, label="Speculative",
                                                  elem_id=f"speculative-{i}", **choice)
                        output = gr.Code(language="python", label=f"Column {i + 1}", lines=14,
                                         max_lines=14, interactive=False, wrap_lines=True,
                                         buttons=["copy"], elem_id=f"output-{i}",
                                         elem_classes=["column-output"])
                        stats = gr.Markdown("", elem_id=f"stats-{i}",
                                            elem_classes=["column-stats"])
                    boxes.append(box)
                    column_inputs += [model, backend, loops, mode, speculative]
                    column_outputs += [output, stats]
            if chain_rows:
                gr.Markdown(CHAIN_EXAMPLES_NOTE)
                width = len(COLUMN_SETTINGS)  # an example sets the model and loops of two
                gr.Examples(chain_rows, inputs=[prompt, *column_inputs[0:3:2],
                                                *column_inputs[width:width + 3:2]],
                            label="Variable-chain examples", elem_id="chain-examples",
                            example_labels=chain_labels)
            missing = [f"**{BACKEND_LABELS.get(n, n)}**: {r}" for n, r in reasons.items() if r]
            if missing:
                gr.Markdown("Backends not offered here: " + "; ".join(missing),
                            elem_classes=["backend-note"])

        with gr.Tab("Loop analysis"):
            with gr.Row():
                analysis_model = gr.Dropdown(model_choices, value=columns[1].model,
                                             label="Model", **choice)
                analysis_loops = gr.Slider(1, MAX_LOOPS, value=4, step=1, label="Loops")
                analyse_button = gr.Button("Analyse", variant="primary")
            gallery = gr.Gallery(label="Per-loop diagnostics", columns=3, height="auto",
                                 object_fit="contain", preview=False, visible=False)
            with gr.Row():
                card_plot = gr.Plot(label="Held-out loss (model card)", show_label=False,
                                    visible=False)
                analysis_note = gr.Markdown(elem_classes=["analysis-note"])

        prompt.change(expected_answer_text, prompt, expected_answer, queue=False,
                      api_visibility="private")
        n_columns.change(lambda n: [gr.Column(visible=i < int(n)) for i in range(MAX_COLUMNS)],
                         n_columns, boxes, queue=False, api_visibility="private")
        run_event = run.click(compare_handler(pool, limits, reasons),
                              [prompt, n_columns, max_new_tokens, temperature, top_p, top_k,
                               repetition_penalty, seed, use_chat],
                              column_outputs, api_name="compare",
                              inputs_kwargs=dict(zip(column_settings(MAX_COLUMNS), column_inputs)))
        column_stats = column_outputs[1::2]
        # once the run is cancelled (its late updates are dropped), say so in the columns
        stop.click(None, cancels=[run_event]).then(
            lambda *stats: [stopped_stats(s) for s in stats], column_stats, column_stats,
            queue=False, api_visibility="private")
        analyse, model_card = analysis_handler(pool)
        analysis_views = [gallery, card_plot, analysis_note]
        analyse_button.click(analyse, [analysis_model, analysis_loops], analysis_views,
                             api_name="loop_analysis", concurrency_limit=1)
        analysis_model.change(model_card, analysis_model, analysis_views, api_visibility="private")
        app.load(model_card, analysis_model, analysis_views, api_visibility="private")

    for block in app.blocks.values():
        if isinstance(block, (gr.Slider, gr.Number)):
            refuse_unreadable_values(block)
    app.queue(default_concurrency_limit=limits.concurrency, max_size=limits.queue_size)
    app.pool = pool  # for tests and for closing the engines
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, **kwargs):
    """Serve the page on host:port (loopback unless told otherwise; never a share link)."""
    return app.launch(server_name=host, server_port=port, share=False, show_error=False,
                      css=CSS, theme=gr.themes.Soft(), footer_links=["gradio"], **kwargs)
