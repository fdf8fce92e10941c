"""Test & compare tab: streaming chat with a run's model (its PyTorch weights or an exported GGUF), base vs tuned
side by side, held-out evaluation. The model lives in the chat worker's process (chat_worker), not in this server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import chat_worker
import inference_utils
import jobs
import runfolder
import submit
from evaluation import EvalConfig
from inference_utils import GenerationConfig
from ui import forms, serve_panel
from ui.common import guarded, job_html, model_runs

BASE_ONLY = ("Base model only (no run)", "")
PYTORCH = ("PyTorch weights (adapter or merged model)", "")
POLL_S = 2.0


@dataclass
class TestTab:
    run: gr.Dropdown
    model: gr.Textbox
    weights: gr.Dropdown
    refresh: gr.Button
    loaded: gr.Markdown
    system_prompt: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    max_new_tokens: gr.Number
    use_adapter: gr.Checkbox
    chatbot: gr.Chatbot
    history: gr.State
    message: gr.Textbox
    send: gr.Button
    clear: gr.Button
    prompt: gr.Textbox
    compare: gr.Button
    base_reply: gr.Textbox
    tuned_reply: gr.Textbox
    eval_rows: gr.Number
    eval_batch: gr.Number
    evaluate: gr.Button
    eval_status: gr.HTML
    eval_result: gr.Markdown
    timer: gr.Timer
    serve: serve_panel.ServePanel | None = None


def build() -> TestTab:
    gr.Markdown(
        "Talk to a trained run, or put the same prompt to the base model and the tuned one side by side. "
        "The model is loaded on first use into a worker process of its own (a few seconds for small models); it "
        "is unloaded after a while unused, and when a training or export job starts (the job gets the GPU, or on a "
        "machine without one its memory)."
    )
    with gr.Row(equal_height=True):
        run = gr.Dropdown(label="Training run", choices=[BASE_ONLY], value=None, scale=3, elem_id="test-run")
        model = gr.Textbox(
            label="Base model",
            placeholder="empty: the run's own base model (or the demo model)",
            scale=3,
            elem_id="test-model",
        )
        weights = gr.Dropdown(
            label="Weights",
            choices=[PYTORCH],
            value="",
            info="An exported GGUF runs through llama.cpp: the file you will ship.",
            scale=3,
            elem_id="test-weights",
        )
        refresh = gr.Button("Refresh runs", size="sm", scale=1)
    loaded = gr.Markdown(elem_id="test-loaded")
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            system_prompt = forms.widget(GenerationConfig, "system_prompt", scale=3)
            temperature = forms.widget(
                GenerationConfig, "temperature", component=gr.Slider, step=0.05, elem_id="test-temperature"
            )
            # A slider cannot leave out its lower end: 0.05 is the smallest top_p it offers.
            top_p = forms.widget(GenerationConfig, "top_p", component=gr.Slider, minimum=0.05, step=0.05)
            max_new_tokens = forms.widget(GenerationConfig, "max_new_tokens", elem_id="test-max-tokens")
    with gr.Tab("Chat"):
        use_adapter = gr.Checkbox(
            value=True,
            label="Use the fine-tuned weights",
            info="Off: the same conversation with the base model (adapter switched off).",
        )
        chatbot = gr.Chatbot(label="Chat", height=360, elem_id="test-chatbot")
        history = gr.State([])
        with gr.Row(equal_height=True):
            message = gr.Textbox(label="Message", placeholder="Ask something…", scale=5, elem_id="test-message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="test-send")
            clear = gr.Button("Clear", scale=1)
    with gr.Tab("Base vs tuned"):
        with gr.Row(equal_height=True):
            prompt = gr.Textbox(
                label="Prompt", placeholder="The same prompt goes to both models", scale=5, elem_id="test-prompt"
            )
            compare = gr.Button("Compare", variant="primary", scale=1, elem_id="test-compare")
        with gr.Row():
            base_reply = gr.Textbox(label="Base model", lines=8, interactive=False, elem_id="test-base-reply")
            tuned_reply = gr.Textbox(label="Fine-tuned", lines=8, interactive=False, elem_id="test-tuned-reply")
    with gr.Tab("Held-out evaluation"):
        gr.Markdown(
            "Loss and perplexity of base vs tuned on the run's held-out rows (runs trained with an eval split)."
        )
        with gr.Row(equal_height=True):
            eval_rows = forms.widget(EvalConfig, "max_rows")
            eval_batch = forms.widget(EvalConfig, "batch_size")
            evaluate = gr.Button("Evaluate", elem_id="test-evaluate")
        eval_status = gr.HTML(elem_id="test-eval-status")
        eval_result = gr.Markdown(elem_id="test-eval-result")
    with gr.Tab("Serve"):
        serve = serve_panel.build()
    timer = gr.Timer(POLL_S, active=False)
    return TestTab(
        run,
        model,
        weights,
        refresh,
        loaded,
        system_prompt,
        temperature,
        top_p,
        max_new_tokens,
        use_adapter,
        chatbot,
        history,
        message,
        send,
        clear,
        prompt,
        compare,
        base_reply,
        tuned_reply,
        eval_rows,
        eval_batch,
        evaluate,
        eval_status,
        eval_result,
        timer,
        serve,
    )


def wire(tab: TestTab, tab_container: gr.Tab, workspace: Path) -> None:
    worker = chat_worker.ChatWorker(workspace)
    jobs.before_gpu_job(worker.end_for_job)  # a training or export job gets the card, not the chat model
    settings = [tab.system_prompt, tab.temperature, tab.top_p, tab.max_new_tokens]

    def generation(system_prompt: str, temperature: float, top_p: float, max_new_tokens: int) -> GenerationConfig:
        config = GenerationConfig(system_prompt, temperature, top_p, max_new_tokens)
        config.validate()
        return config

    def run_choices(current: str | None) -> gr.Dropdown:
        # Runs whose stage made a model that writes text (its record says), a stopped run's checkpoint included.
        runs = model_runs(workspace)
        names = [name for _, name in runs]
        # First visit: the newest finished run; afterwards the person's choice, "base model only" included.
        chosen = current if current == "" or current in names else (names[0] if names else "")
        return gr.Dropdown(choices=[BASE_ONLY, *runs], value=chosen)

    def weight_choices(run: str | None) -> gr.Dropdown:
        return weights_dropdown(run, "", workspace)

    def load(key: tuple[str, str, str]) -> Iterator[str]:
        """Lines while the worker loads (waiting, loading, warming up), then what it loaded."""
        try:
            for line in worker.prepare(*key):
                yield f"_{line}_"
        finally:
            notice, worker.notice = worker.notice, ""
        yield (f"{notice} " if notice else "") + loaded_line(worker.info)

    @guarded
    def send(message: str, history: list, run: str, model: str, gguf: str, use_adapter: bool, *values: Any):
        if not message.strip():
            raise gr.Error("Type a message first.")
        config = generation(*values)
        key = (model.strip(), run or "", gguf or "")
        history = [*history, {"role": "user", "content": message}]
        reply, ended = "", ""
        try:
            for line in load(key):
                yield "", history + [{"role": "assistant", "content": "…"}], history, line
            for reply in worker.chat(key, history, config, use_adapter):
                yield "", history + [{"role": "assistant", "content": reply}], history, gr.skip()
        except chat_worker.WorkerEnded as exc:  # a job took the machine: keep what was said, tell why it stopped
            ended = f"⚠️ {exc}"
        history = [*history, {"role": "assistant", "content": reply}] if reply else history[:-1]
        yield "" if reply else message, history, history, ended or gr.skip()

    @guarded
    def compare(prompt: str, run: str, model: str, gguf: str, *values: Any):
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        config = generation(*values)
        key = (model.strip(), run or "", gguf or "")
        try:
            for line in load(key):
                yield "", "", line
            for base, tuned in worker.compare(key, prompt, config):
                yield base, tuned, gr.skip()
        except chat_worker.WorkerEnded as exc:  # the replies so far stay in their boxes; the line says why
            yield gr.skip(), gr.skip(), f"⚠️ {exc}"

    @guarded
    def evaluate(run: str, max_rows: int, batch_size: int) -> None:
        submit.submit("eval", EvalConfig(run=run, max_rows=max_rows, batch_size=batch_size), workspace)

    @guarded
    def eval_view(run: str) -> tuple[str, str, gr.Timer]:
        return evaluation_view(run, workspace)

    for trigger in (tab.refresh.click, tab_container.select):
        # The run may stay the same (no .change), while an export made a new GGUF of it: list its files again.
        trigger(run_choices, inputs=tab.run, outputs=tab.run).then(
            lambda run, current: weights_dropdown(run, current, workspace),
            inputs=[tab.run, tab.weights],
            outputs=tab.weights,
            show_progress="hidden",
        )
    tab_container.select(worker.state_line, outputs=tab.loaded, show_progress="hidden")
    tab.run.change(weight_choices, inputs=tab.run, outputs=tab.weights, show_progress="hidden")
    # Another run: the conversation and the replies shown were the previous model's.
    tab.run.change(
        lambda: ([], [], "", ""),
        outputs=[tab.chatbot, tab.history, tab.base_reply, tab.tuned_reply],
        show_progress="hidden",
    )
    tab.run.change(
        eval_view, inputs=tab.run, outputs=[tab.eval_status, tab.eval_result, tab.timer], show_progress="hidden"
    )
    chat_inputs = [tab.message, tab.history, tab.run, tab.model, tab.weights, tab.use_adapter, *settings]
    chat_outputs = [tab.message, tab.chatbot, tab.history, tab.loaded]
    tab.send.click(send, inputs=chat_inputs, outputs=chat_outputs)
    tab.message.submit(send, inputs=chat_inputs, outputs=chat_outputs)
    tab.clear.click(lambda: ([], []), outputs=[tab.chatbot, tab.history])
    compare_inputs = [tab.prompt, tab.run, tab.model, tab.weights, *settings]
    compare_outputs = [tab.base_reply, tab.tuned_reply, tab.loaded]
    tab.compare.click(compare, inputs=compare_inputs, outputs=compare_outputs)
    tab.prompt.submit(compare, inputs=compare_inputs, outputs=compare_outputs)
    tab.evaluate.click(evaluate, inputs=[tab.run, tab.eval_rows, tab.eval_batch]).success(
        eval_view, inputs=tab.run, outputs=[tab.eval_status, tab.eval_result, tab.timer], show_progress="hidden"
    )
    tab.timer.tick(
        eval_view, inputs=tab.run, outputs=[tab.eval_status, tab.eval_result, tab.timer], show_progress="hidden"
    )
    serve_panel.wire(tab.serve, tab.run, tab.weights, workspace)


def weights_dropdown(run: str | None, current: str | None, workspace: Path) -> gr.Dropdown:
    """The run's weights: its PyTorch ones and each GGUF it exported; `current` stays chosen while it exists."""
    files = inference_utils.gguf_files(run, workspace)
    return gr.Dropdown(
        choices=[PYTORCH, *[(f"GGUF: {name}", name) for name in files]], value=current if current in files else ""
    )


def loaded_line(info: dict[str, Any]) -> str:
    """What the worker loaded, from chat_worker.describe()."""
    kind = {
        "base": "base model",
        "adapter": "base model + LoRA adapter",
        "merged": "full fine-tune",
        "gguf": "exported GGUF",
    }[info["kind"]]
    decoding = ", static KV cache with a compiled decoding step" if info.get("compiled") else ""
    return f"Loaded **{info['name']}** ({kind}, {info['backend']}{decoding})."


def evaluation_view(run: str | None, workspace: Path) -> tuple[str, str, gr.Timer]:
    """The newest evaluation job of this run: its progress, and the result table once it is written."""
    if not run:
        return "", "", gr.Timer(active=False)
    result = runfolder.run_path(run, workspace) / "eval.md"
    job = submit.latest_job("eval", run, workspace)
    if job is None:
        return "", result.read_text(encoding="utf-8") if result.exists() else "", gr.Timer(active=False)
    shown = result.read_text(encoding="utf-8") if result.exists() and not job.active else ""
    return job_html(job.name, job.status, job.progress), shown, gr.Timer(active=job.active)
