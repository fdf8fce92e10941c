"""Test & compare tab: streaming chat with a run's model, base vs tuned side by side, held-out evaluation."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import inference_utils
import runfolder
import submit
from inference_utils import EvalConfig, GenerationConfig
from ui import forms
from ui.common import guarded, job_html, run_names

BASE_ONLY = ("Base model only (no run)", "")
POLL_S = 2.0


class LoadedModel:
    """The one chat model this server keeps in memory, reloaded when another model or run is chosen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, str] | None = None
        self._model: inference_utils.ChatModel | None = None

    def get(self, model: str, run: str, workspace: Path) -> inference_utils.ChatModel:
        key = (model.strip(), run or "")
        with self._lock:
            if self._key != key:
                self._model, self._key = None, None  # free the old one before loading the next
                self._model = inference_utils.load_chat_model(key[0] or None, key[1] or None, workspace)
                self._key = key
            return self._model


@dataclass
class TestTab:
    run: gr.Dropdown
    model: gr.Textbox
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


def build() -> TestTab:
    gr.Markdown(
        "Talk to a trained run, or put the same prompt to the base model and the tuned one side by side. "
        "The model is loaded into this server on first use (a few seconds for small models)."
    )
    with gr.Row(equal_height=True):
        run = gr.Dropdown(label="Training run", choices=[BASE_ONLY], value=None, scale=3, elem_id="test-run")
        model = gr.Textbox(
            label="Base model",
            placeholder="empty: the run's own base model (or the demo model)",
            scale=3,
            elem_id="test-model",
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
    timer = gr.Timer(POLL_S, active=False)
    return TestTab(
        run,
        model,
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
    )


def wire(tab: TestTab, tab_container: gr.Tab, workspace: Path) -> None:
    cache = LoadedModel()
    settings = [tab.system_prompt, tab.temperature, tab.top_p, tab.max_new_tokens]

    def generation(system_prompt: str, temperature: float, top_p: float, max_new_tokens: int) -> GenerationConfig:
        config = GenerationConfig(system_prompt, temperature, top_p, max_new_tokens)
        config.validate()
        return config

    def run_choices(current: str | None) -> gr.Dropdown:
        names = run_names(workspace, ("train",), states=("done",))
        # First visit: the newest finished run; afterwards the person's choice, "base model only" included.
        chosen = current if current == "" or current in names else (names[0] if names else "")
        return gr.Dropdown(choices=[BASE_ONLY, *names], value=chosen)

    @guarded
    def send(message: str, history: list, run: str, model: str, use_adapter: bool, *values: Any):
        if not message.strip():
            raise gr.Error("Type a message first.")
        config = generation(*values)
        chat_model = cache.get(model, run, workspace)
        history = [*history, {"role": "user", "content": message}]
        reply = ""
        yield "", history + [{"role": "assistant", "content": "…"}], history, loaded_line(chat_model)
        for reply in inference_utils.stream_chat(chat_model, history, config, use_adapter=use_adapter):
            yield "", history + [{"role": "assistant", "content": reply}], history, gr.skip()
        history = [*history, {"role": "assistant", "content": reply}]
        yield "", history, history, gr.skip()

    @guarded
    def compare(prompt: str, run: str, model: str, *values: Any):
        if not prompt.strip():
            raise gr.Error("Type a prompt first.")
        config = generation(*values)
        chat_model = cache.get(model, run, workspace)
        yield "", "", loaded_line(chat_model)
        for base, tuned in inference_utils.stream_compare(chat_model, prompt, config):
            yield base, tuned, gr.skip()

    @guarded
    def evaluate(run: str, max_rows: int, batch_size: int) -> None:
        submit.submit_eval(EvalConfig(run=run, max_rows=max_rows, batch_size=batch_size), workspace)

    @guarded
    def eval_view(run: str) -> tuple[str, str, gr.Timer]:
        return evaluation_view(run, workspace)

    for trigger in (tab.refresh.click, tab_container.select):
        trigger(run_choices, inputs=tab.run, outputs=tab.run)
    tab.run.change(
        eval_view, inputs=tab.run, outputs=[tab.eval_status, tab.eval_result, tab.timer], show_progress="hidden"
    )
    chat_inputs = [tab.message, tab.history, tab.run, tab.model, tab.use_adapter, *settings]
    chat_outputs = [tab.message, tab.chatbot, tab.history, tab.loaded]
    tab.send.click(send, inputs=chat_inputs, outputs=chat_outputs)
    tab.message.submit(send, inputs=chat_inputs, outputs=chat_outputs)
    tab.clear.click(lambda: ([], []), outputs=[tab.chatbot, tab.history])
    compare_inputs = [tab.prompt, tab.run, tab.model, *settings]
    compare_outputs = [tab.base_reply, tab.tuned_reply, tab.loaded]
    tab.compare.click(compare, inputs=compare_inputs, outputs=compare_outputs)
    tab.prompt.submit(compare, inputs=compare_inputs, outputs=compare_outputs)
    tab.evaluate.click(evaluate, inputs=[tab.run, tab.eval_rows, tab.eval_batch]).success(
        eval_view, inputs=tab.run, outputs=[tab.eval_status, tab.eval_result, tab.timer], show_progress="hidden"
    )
    tab.timer.tick(
        eval_view, inputs=tab.run, outputs=[tab.eval_status, tab.eval_result, tab.timer], show_progress="hidden"
    )


def loaded_line(chat_model: inference_utils.ChatModel) -> str:
    kind = {"base": "base model", "adapter": "base model + LoRA adapter", "merged": "full fine-tune"}[chat_model.kind]
    return f"Loaded **{chat_model.name}** ({kind}, {chat_model.backend})."


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
