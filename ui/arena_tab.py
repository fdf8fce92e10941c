"""Arena tab: the same prompts through two or more models (base, training runs, GGUF files), judged pair by pair by
an LLM in both orders; the verdict with 95 % intervals and every reply with the judge's reasons.

The judge's API key goes to the job's process through its environment only; it is never written to the run folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import arena_utils
import runfolder
import submit
from arena_utils import ArenaConfig
from ui import forms
from ui.common import guarded, job_controls, job_view, latest_run, model_runs, run_names, save_upload

KINDS = ("arena",)
POLL_S = 2.0
# The settings shown as widgets built from ArenaConfig's metadata (contestants and the prompts file are special).
FIELDS = (
    "prompt_source",
    "prompts_run",
    "topic",
    "max_prompts",
    "max_new_tokens",
    "temperature",
    "system_prompt",
    "judge_provider",
    "judge_model",
    "judge_base_url",
    "judge_response_format",
    "judge_max_tokens",
    "judge_concurrency",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_consecutive_unparsed",
)
KEY_HELP = (
    "Sent to the job's process only, never saved. Empty: the OPENAI_API_KEY / ANTHROPIC_API_KEY of the "
    "server's environment; local servers need none."
)


@dataclass
class ArenaTab:
    contestants: gr.Dropdown
    fields: dict[str, gr.components.Component]
    prompts_file: gr.Textbox
    upload: gr.File
    api_key: gr.Textbox
    run_name: gr.Textbox
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    refresh: gr.Button
    hint: gr.Markdown
    runs: gr.Dropdown
    status: gr.HTML
    report: gr.Markdown
    timer: gr.Timer
    local_judge: gr.Dropdown | None = None  # judges the user already has (arena_utils.local_judges)
    local_note: gr.Markdown | None = None


def contestant_choices(workspace: Path) -> list[str]:
    """base:demo, every training run with a model (a stopped one's checkpoint too), and every GGUF file exported
    into a run folder."""
    runs = [f"run:{name}" for _, name in model_runs(workspace)]
    ggufs = sorted(str(path) for path in runfolder.runs_dir(workspace).glob("*/gguf/*.gguf"))
    return ["base:demo", *runs, *(f"gguf:{path}" for path in ggufs)]


def build() -> ArenaTab:
    gr.Markdown(
        "Put the same prompts to two or more models and let an LLM judge each pair, in both orders so that the "
        "judge's preference for the first answer cancels out. Contestants: `base:MODEL`, `run:NAME` (adapter on), "
        "`gguf:PATH` (through llama.cpp); type others into the list."
    )
    fields: dict[str, gr.components.Component] = {}
    contestants = forms.widget(
        ArenaConfig, "contestants", value=[], choices=[], allow_custom_value=True, elem_id="arena-contestants"
    )
    with gr.Row():
        fields["prompt_source"] = forms.widget(ArenaConfig, "prompt_source", component=gr.Radio)
        prompts_file = forms.widget(ArenaConfig, "prompts_file", scale=2, elem_id="arena-prompts-file")
        upload = gr.File(label="…or upload a prompts file", file_types=[".txt", ".jsonl", ".json", ".csv", ".parquet"])
    with gr.Row():
        fields["prompts_run"] = forms.widget(ArenaConfig, "prompts_run")
        fields["topic"] = forms.widget(ArenaConfig, "topic")
        for name in ("max_prompts", "max_new_tokens", "temperature"):
            fields[name] = forms.widget(ArenaConfig, name)
    with gr.Row():
        fields["judge_provider"] = forms.widget(
            ArenaConfig, "judge_provider", component=gr.Radio, elem_id="arena-judge-provider"
        )
        fields["judge_model"] = forms.widget(ArenaConfig, "judge_model", elem_id="arena-judge-model")
        fields["judge_base_url"] = forms.widget(ArenaConfig, "judge_base_url", elem_id="arena-judge-url")
        api_key = gr.Textbox(label="Judge API key", type="password", info=KEY_HELP, elem_id="arena-api-key")
    with gr.Row():
        local_judge = gr.Dropdown(
            label="…or a judge you already have",
            info="A local Ollama's models and your runs' GGUF files (through llama-cpp-python's server).",
            choices=[],
            value=None,
            scale=2,
            elem_id="arena-local-judge",
        )
        local_note = gr.Markdown(arena_utils.SMALL_JUDGE_NOTE, elem_id="arena-local-judge-note")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            for name in FIELDS:
                if name not in fields:
                    fields[name] = forms.widget(ArenaConfig, name)
    controls = job_controls("arena", "arena", "optional: arena-<date>-<time>", "arena-report", POLL_S)
    return ArenaTab(
        contestants,
        fields,
        prompts_file,
        upload,
        api_key,
        *controls,
        local_judge=local_judge,
        local_note=local_note,
    )


def wire(tab: ArenaTab, tab_container: gr.Tab, app: gr.Blocks, workspace: Path) -> None:
    names = list(tab.fields)
    view = [tab.status, tab.report, tab.stop, tab.resume, tab.hint, tab.timer]

    @guarded
    def start(contestants: list[str], prompts_file: str, upload: str | None, run_name: str, api_key: str, *values):
        data: dict[str, Any] = dict(zip(names, values, strict=True))
        data["contestants"] = list(contestants or [])
        data["prompts_file"] = str(save_upload(upload, workspace)) if upload else (prompts_file or "").strip()
        config = arena_utils.arena_config_from_dict(data)
        run_dir = submit.submit("arena", config, workspace, run_name, api_key=api_key or None)
        return gr.Dropdown(choices=run_names(workspace, KINDS), value=run_dir.name)

    @guarded
    def show(run: str | None) -> list[Any]:
        return arena_view(run, workspace)

    @guarded
    def stop(run: str) -> None:
        submit.stop(run, workspace)

    @guarded
    def resume(run: str, api_key: str) -> None:
        submit.resume(run, workspace, api_key=api_key or None)

    def opened(current: list[str] | None, run: str | None) -> list[Any]:
        runs = run_names(workspace, KINDS)
        chosen = run if run in runs else latest_run(workspace, KINDS)
        return [
            gr.Dropdown(choices=contestant_choices(workspace), value=current or []),
            gr.Dropdown(choices=runs, value=chosen),
            *arena_view(chosen, workspace),
        ]

    judge_fields = ["judge_provider", "judge_model", "judge_base_url", "judge_response_format"]

    def judges_found() -> gr.Dropdown:
        found = arena_utils.local_judges(workspace)
        return gr.Dropdown(choices=[judge["label"] for judge in found], value=None)

    def use_judge(label: str | None) -> list[Any]:
        """The judge's settings into the fields, and what to run first (a GGUF file's server)."""
        judge = next((item for item in arena_utils.local_judges(workspace) if item["label"] == label), None)
        if judge is None:
            return [gr.skip() for _ in judge_fields] + [arena_utils.SMALL_JUDGE_NOTE]
        start = (
            f"Start its server first, in a terminal: `{judge['start']}`. " if judge["start"] else "Ollama serves it. "
        )
        values = [judge["settings"].get(name, gr.skip()) for name in judge_fields]
        return [*values, start + arena_utils.SMALL_JUDGE_NOTE]

    tab.local_judge.input(
        use_judge, inputs=tab.local_judge, outputs=[*(tab.fields[name] for name in judge_fields), tab.local_note]
    )
    inputs = [tab.contestants, tab.prompts_file, tab.upload, tab.run_name, tab.api_key]
    tab.start.click(start, inputs=[*inputs, *(tab.fields[name] for name in names)], outputs=tab.runs).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.stop.click(stop, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.resume.click(resume, inputs=[tab.runs, tab.api_key]).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.runs.input(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.timer.tick(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    for trigger in (tab.refresh.click, tab_container.select):
        trigger(opened, inputs=[tab.contestants, tab.runs], outputs=[tab.contestants, tab.runs, *view])
    tab_container.select(judges_found, outputs=tab.local_judge, show_progress="hidden")
    app.load(opened, inputs=[tab.contestants, tab.runs], outputs=[tab.contestants, tab.runs, *view])


def arena_view(run: str | None, workspace: Path) -> list[Any]:
    """status, the report (once written), Stop / Resume, the reason a button is off, and polling."""
    return job_view(run, workspace, arena_utils.REPORT_MD)
