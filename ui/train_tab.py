"""Train tab: every TrainConfig option, Start / Stop / Resume, and the live view of a run read from its folder.

The view is rebuilt from the run folder on every timer tick (status.json, events.jsonl, log.txt), so a page reload,
a second browser tab or a server restart shows the same thing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

import jobs
import model_utils
import planning
import runfolder
import settings
import stages
import submit
from rewards import BUILTIN_REWARDS
from train_config import ALL_LINEAR, ALL_LINEAR_LAYERS, FUSED_LINEAR, TrainConfig
from ui import forms
from ui.common import active_runs, duration, event_log, guarded, latest_run, loss_frame, progress_html, run_names
from workspace import UserError

POLL_S = 1.5
KINDS = ("train",)
FIELDS = settings.keys(TrainConfig)  # the form's keys, named through the config's fields


@dataclass
class TrainTab:
    run_name: gr.Textbox
    start: gr.Button
    stop: gr.Button
    resume: gr.Button
    hint: gr.Markdown
    memory: gr.Markdown
    time_estimate: gr.Markdown
    suggest: gr.Button
    suggestions: gr.CheckboxGroup
    apply: gr.Button
    runs: gr.Dropdown
    refresh: gr.Button
    status: gr.HTML
    plot: gr.LinePlot
    log: gr.Textbox
    timer: gr.Timer
    judge_api_key: gr.Textbox
    uses: gr.Markdown


def build(form: forms.Form) -> TrainTab:
    with gr.Row(equal_height=True):
        run_name = gr.Textbox(
            label="Run name", placeholder="optional: train-<date>-<time>", scale=3, elem_id="train-run-name"
        )
        start = gr.Button("Start training", variant="primary", scale=1, elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", interactive=False, scale=1, elem_id="train-stop")
        resume = gr.Button("Resume", interactive=False, scale=1, elem_id="train-resume")
    uses = gr.Markdown(elem_id="train-uses")
    hint = gr.Markdown(elem_id="train-hint")
    memory = gr.Markdown(elem_id="train-memory")
    time_estimate = gr.Markdown(elem_id="train-time")
    with gr.Row(equal_height=True):
        suggest = gr.Button("Suggest settings", scale=1, size="sm", elem_id="train-suggest")
        apply = gr.Button("Apply ticked suggestions", scale=1, size="sm", visible=False, elem_id="train-apply")
    suggestions = gr.CheckboxGroup(
        label="Suggestions from the dataset and the device: tick the ones to apply",
        choices=[],
        visible=False,
        elem_id="train-suggestions",
    )
    with gr.Row():
        with gr.Column(scale=5):
            judge_api_key = _settings(form)
        with gr.Column(scale=6):
            with gr.Row(equal_height=True):
                runs = gr.Dropdown(label="Run", choices=[], scale=4, elem_id="train-runs")
                refresh = gr.Button("Refresh", scale=1, size="sm")
            status = gr.HTML(elem_id="train-status")
            plot = gr.LinePlot(
                x="step",
                y="loss",
                color="series",
                title="Loss",
                height=300,
                x_title="step",
                x_axis_format="d",  # steps are whole numbers: a short run's axis ticked 0.5, 1.5, …
                color_map={"train": "#2563eb", "eval": "#f97316"},
                elem_id="train-plot",
            )
            log = gr.Textbox(
                label="Log (last lines)",
                lines=12,
                max_lines=20,
                interactive=False,
                autoscroll=True,
                elem_id="train-log",
            )
    timer = gr.Timer(POLL_S, active=False)
    return TrainTab(
        run_name,
        start,
        stop,
        resume,
        hint,
        memory,
        time_estimate,
        suggest,
        suggestions,
        apply,
        runs,
        refresh,
        status,
        plot,
        log,
        timer,
        judge_api_key,
        uses,
    )


def _settings(form: forms.Form) -> gr.Textbox:
    """The training settings; returns the GRPO judge's API key box (no setting: it is never saved)."""
    with gr.Row():
        # 0 in the widget means "no max_steps: train for the epochs" (values_to_config turns it into None).
        forms.setting(form, FIELDS.max_steps, minimum=0, elem_id="train-max-steps")
        forms.setting(form, FIELDS.num_train_epochs)
        forms.setting(form, FIELDS.learning_rate, step=1e-5, elem_id="train-lr")
    with gr.Row():
        forms.setting(form, FIELDS.per_device_train_batch_size, elem_id="train-batch")
        forms.setting(form, FIELDS.gradient_accumulation_steps, elem_id="train-accum")
        forms.setting(form, FIELDS.max_seq_length, elem_id="train-seq")
    with gr.Row():
        forms.setting(form, FIELDS.lora_r, elem_id="train-lora-r")
        forms.setting(form, FIELDS.lora_alpha)
        forms.setting(form, FIELDS.lora_dropout, step=0.05)
    # all-linear fits every family; the names are the Llama-style ones and Phi's fused layers.
    forms.setting(
        form, FIELDS.target_modules, choices=[ALL_LINEAR_LAYERS, *ALL_LINEAR, *FUSED_LINEAR], allow_custom_value=True
    )
    with gr.Row():
        forms.setting(form, FIELDS.eval_split, step=0.05, elem_id="train-eval")
        forms.setting(form, FIELDS.save_steps, elem_id="train-save-steps")
        forms.setting(form, FIELDS.early_stopping, elem_id="train-early-stopping")
    judge_api_key = _stage_settings(form)
    with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
        with gr.Row():
            forms.setting(form, FIELDS.gradient_checkpointing, elem_id="train-gc")
            forms.setting(form, FIELDS.train_on_responses_only)
            forms.setting(form, FIELDS.packing)
            forms.setting(form, FIELDS.fit_micro_batch)
        with gr.Row():  # PEFT's LoRA variants
            forms.setting(form, FIELDS.use_rslora, elem_id="train-rslora")
            forms.setting(form, FIELDS.use_dora, elem_id="train-dora")
        with gr.Row():
            forms.setting(form, FIELDS.warmup_steps, elem_id="train-warmup")
            forms.setting(form, FIELDS.lr_scheduler_type)
            forms.setting(form, FIELDS.weight_decay)
        with gr.Row():
            forms.setting(form, FIELDS.optim)
            forms.setting(form, FIELDS.eval_steps)
            forms.setting(form, FIELDS.early_stopping_patience)
            forms.setting(form, FIELDS.early_stopping_threshold, step=0.01)
            forms.setting(form, FIELDS.save_total_limit)
        with gr.Row():
            forms.setting(form, FIELDS.logging_steps)
            forms.setting(form, FIELDS.seed)
            forms.setting(form, FIELDS.report_to)
            forms.setting(form, FIELDS.num_gpus)
        with gr.Row():  # several GPUs or machines: DDP or FSDP, and the rendezvous the other machines join
            forms.setting(form, FIELDS.distributed)
            forms.setting(form, FIELDS.nnodes)
            forms.setting(form, FIELDS.rdzv_endpoint)

    return judge_api_key


def wire(tab: TrainTab, form: forms.Form, app: gr.Blocks, workspace: Path) -> None:
    view = [tab.status, tab.plot, tab.log, tab.start, tab.stop, tab.resume, tab.hint, tab.timer]

    @guarded
    def show(run: str | None) -> list[Any]:
        return live_view(run, workspace)

    @guarded
    def start(data: dict) -> gr.Dropdown:
        config = forms.values_to_config(form.values(data))
        run_dir = submit.submit("train", config, workspace, data[tab.run_name], api_key=data[tab.judge_api_key] or None)
        return gr.Dropdown(choices=run_names(workspace, KINDS), value=run_dir.name)

    @guarded
    def stop(run: str) -> None:
        submit.stop(run, workspace)

    @guarded
    def resume(run: str, api_key: str) -> None:
        submit.resume(run, workspace, api_key=api_key or None)

    @guarded
    def opened() -> list[Any]:
        # One call on page load (not two chained ones): the page shows the live run one round trip sooner.
        run = latest_run(workspace, KINDS)
        return [gr.Dropdown(choices=run_names(workspace, KINDS), value=run), *live_view(run, workspace)]

    def refresh(current: str | None) -> gr.Dropdown:
        names = run_names(workspace, KINDS)
        return gr.Dropdown(choices=names, value=current if current in names else (names[0] if names else None))

    _wire_planning(tab, form, app, workspace)
    _wire_start_summary(tab, form, app)
    tab.start.click(start, inputs={tab.run_name, tab.judge_api_key, *form.inputs()}, outputs=tab.runs).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.stop.click(stop, inputs=tab.runs).success(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.resume.click(resume, inputs=[tab.runs, tab.judge_api_key]).success(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    tab.runs.input(show, inputs=tab.runs, outputs=view, show_progress="hidden")
    tab.refresh.click(refresh, inputs=tab.runs, outputs=tab.runs).then(
        show, inputs=tab.runs, outputs=view, show_progress="hidden"
    )
    # Named, so bench/ui_bench.py can time the same call the page makes every POLL_S seconds.
    tab.timer.tick(show, inputs=tab.runs, outputs=view, show_progress="hidden", api_name="train_view")
    app.load(opened, outputs=[tab.runs, *view], show_progress="hidden", api_name="train_opened")


def _wire_planning(tab: TrainTab, form: forms.Form, app: gr.Blocks, workspace: Path) -> None:
    """Suggest (nothing changes until the user ticks a suggestion and applies it) and the time estimate."""
    fields = list(planning.SUGGESTED_FIELDS)

    def suggestions_for(data: dict) -> list[planning.Suggestion]:
        config = forms.values_to_config(form.values(data))
        # A view: a Hub id not downloaded yet says so (Download first) rather than downloading in the server.
        path = model_utils.resolve_model_path(config.model.name_or_path, workspace, download=False)
        return planning.suggest(config, planning.dataset_report_for(config, workspace), path)

    @guarded
    def suggest(data: dict) -> tuple[gr.CheckboxGroup, gr.Button]:
        found = suggestions_for(data)
        choices = [(item.line(), item.field) for item in found if item.changes]
        kept = [item.line() for item in found if not item.changes]
        info = ("Already fine: " + "; ".join(kept)) if kept else None
        return gr.CheckboxGroup(choices=choices, value=[], visible=True, info=info), gr.Button(visible=bool(choices))

    @guarded
    def apply(data: dict) -> list[Any]:
        accepted = data[tab.suggestions] or []
        if not accepted:
            raise gr.Error("Tick the suggestions to apply first.")
        found = {item.field: item.value for item in suggestions_for(data)}
        return [found[name] if name in accepted and name in found else gr.skip() for name in fields]

    tab.suggest.click(suggest, inputs=form.inputs(), outputs=[tab.suggestions, tab.apply])
    tab.apply.click(apply, inputs={tab.suggestions, *form.inputs()}, outputs=[form.widgets[name] for name in fields])

    def estimate(data: dict) -> str:
        # Runs by itself whenever a setting changes, so a problem is shown in place instead of as a pop-up.
        try:
            config = forms.values_to_config(form.values(data))
            text = f"**Time estimate, Start to done:** {planning.time_estimate_text(config, workspace)}"
            return text + gpu_memory_line(config, workspace)
        except (UserError, TypeError, ValueError, OSError) as exc:  # a half-typed number reaches here as None
            return f"**Time estimate unavailable:** {exc}"

    triggers = [
        FIELDS.model.name_or_path,
        FIELDS.dataset.source,
        "mode",  # the form's LoRA / QLoRA / full choice, not a field
        *fields,
        FIELDS.num_train_epochs,
        FIELDS.gradient_checkpointing,
        FIELDS.num_gpus,  # the memory per GPU (gpu_memory_line)
        FIELDS.nnodes,
        FIELDS.distributed,
    ]
    gr.on(
        [app.load, *[form.widgets[key].change for key in triggers if key in form.widgets]],
        estimate,
        inputs=form.inputs(),
        outputs=tab.time_estimate,
        trigger_mode="always_last",
        show_progress="hidden",
    )


def _wire_start_summary(tab: TrainTab, form: forms.Form, app: gr.Blocks) -> None:
    """The line beside Start that says which model and data a new run takes, kept current as they change."""
    keys = [
        FIELDS.model.name_or_path,
        "mode",
        FIELDS.dataset.source,
        FIELDS.stage,
        FIELDS.start_from_run,
        FIELDS.max_steps,
        FIELDS.num_train_epochs,
    ]
    gr.on(
        [app.load, *[form.widgets[key].change for key in keys]],
        lambda data: start_summary(form.values(data)),
        inputs=form.inputs(),
        outputs=tab.uses,
        trigger_mode="always_last",
        show_progress="hidden",
    )


def start_summary(values: dict[str, Any]) -> str:
    """'Start trains demo (16-bit LoRA) on uploads/support.csv: SFT, 60 steps.' from the form's values."""
    try:
        config = forms.values_to_config(values)
    except (UserError, TypeError, ValueError) as exc:  # a half-typed value: the estimate below says more
        return f"**Start:** the settings are not complete yet ({html.escape(str(exc))})."
    modes = {value: label for label, value in forms.MODES}
    model = config.model.name_or_path.strip() or "no model chosen (Model tab)"
    source = config.dataset.source.strip()
    data = f"`{source}`" if source else "**no dataset chosen yet** (Dataset tab)"
    stage = stages.get(config.stage) if config.stage in stages.names() else None
    length = f"{config.max_steps} steps" if config.max_steps else f"{config.num_train_epochs:g} epochs"
    own = stage.settings if stage else ()
    start_from = f", from run `{config.start_from_run}`" if config.start_from_run and "start_from_run" in own else ""
    return (
        f"**Start trains** `{model}` ({modes.get(config.mode, config.mode)}) on {data}: "
        f"{stage.title if stage else config.stage}{start_from}, {length}."
    )


def live_view(run: str | None, workspace: Path) -> list[Any]:
    """status, loss plot, log tail, Start / Stop / Resume, the reason a button is off, and whether to keep polling."""
    running = active_runs(workspace, KINDS)
    queue_note = f"Start: run `{running[0]}` is still active; a new run waits for it in the queue." if running else ""
    start = gr.Button(interactive=True)
    if not run:
        hint = queue_note or "No run yet: set the options and press Start."
        return [
            progress_html(None, None, "No run selected."),
            None,
            "",
            start,
            gr.Button(interactive=False),
            gr.Button(interactive=False),
            hint,
            gr.Timer(active=False),
        ]
    run_dir = runfolder.run_path(run, workspace)
    status = jobs.job_status(run_dir)
    allowed = jobs.actions(run_dir, status)
    events = event_log(run_dir)
    reasons = [queue_note]
    if allowed.can_stop or status.state == runfolder.State.STOPPING:
        reasons.append(stop_note(status.state, events.step_s))
    if not allowed.can_stop:
        reasons.append(f"Stop: {allowed.stop_reason}")
    if not allowed.can_resume:
        reasons.append(f"Resume: {allowed.resume_reason}")
    reasons.append(nodes_hint(run_dir, status))
    return [
        progress_html(events.step, events.total, status_line(run, status, events, model_download(run_dir))),
        loss_frame(events),
        runfolder.log_tail(run_dir),
        start,
        gr.Button(interactive=allowed.can_stop),
        gr.Button(interactive=allowed.can_resume),
        " · ".join(reason for reason in reasons if reason),
        gr.Timer(active=status.active),
    ]


def gpu_memory_line(config: TrainConfig, workspace: Path) -> str:
    """On several GPUs (num_gpus above 1, or several nodes of this machine's GPUs): the memory one GPU needs under
    DDP and under FSDP, as a line under the time estimate; "" on one GPU."""
    gpus = (config.num_gpus or model_utils.detect_device().gpu_count) * config.nnodes
    if gpus < 2:
        return ""
    path = model_utils.model_reference(config.model.name_or_path, workspace)
    return f"  \n**Memory {planning.gpu_memory_for(config, path, gpus).summary()}** (distributed: {config.distributed})"


def nodes_hint(run_dir: Path, status: runfolder.Status) -> str:
    """For a run on several nodes: its nodes and processes, and while it waits or runs, the command each other
    machine runs to join it (the same as `main.py node-command RUN`)."""
    try:
        commands = jobs.node_commands(run_dir)
    except UserError:
        return ""
    text = f"Nodes: {len(commands) + 1} × {status.processes} process(es), this machine is node 0."
    if status.active:
        text += " Run on each other machine: " + " ".join(
            f"node {node}: `{command}`" for node, command in enumerate(commands, start=1)
        )
    return text


def _stage_settings(form: forms.Form) -> gr.Textbox:
    """The stage (SFT, DPO, ORPO, KTO, GRPO) and its own options: GRPO's rewards, their weights, the LLM judge and a
    reward file (its code runs only with the box ticked, never in a shared app); then any other stage's own settings
    (its record's `settings`), one widget each."""
    with gr.Accordion("Stage: SFT, DPO / ORPO / KTO preference tuning, GRPO reinforcement learning", open=False):
        with gr.Row():
            forms.setting(form, FIELDS.stage, elem_id="train-stage")
            forms.setting(form, FIELDS.start_from_run, elem_id="train-start-from-run")
            forms.setting(form, FIELDS.beta, step=0.01, elem_id="train-beta")
        with gr.Row():
            forms.setting(form, FIELDS.num_generations, elem_id="train-num-generations")
            forms.setting(form, FIELDS.max_completion_length)
            forms.setting(form, FIELDS.temperature, step=0.1)
        with gr.Row():
            forms.setting(form, FIELDS.reward_funcs, choices=list(BUILTIN_REWARDS), scale=2, elem_id="train-rewards")
            forms.setting(
                form,
                FIELDS.reward_weights,
                component=gr.Textbox,
                placeholder="e.g. 1, 0.5",
                elem_id="train-reward-weights",
            )
        with gr.Row():
            forms.setting(form, FIELDS.reward_pattern, elem_id="train-reward-pattern")
            forms.setting(form, FIELDS.reference_column)
            forms.setting(form, FIELDS.reward_min_length)
            forms.setting(form, FIELDS.reward_max_length)
        with gr.Row():
            forms.setting(form, FIELDS.judge_provider, elem_id="train-judge-provider")
            forms.setting(form, FIELDS.judge_model, elem_id="train-judge-model")
            forms.setting(form, FIELDS.judge_base_url, elem_id="train-judge-url")
            forms.setting(form, FIELDS.judge_min_score)
            forms.setting(form, FIELDS.judge_max_score)
        forms.setting(form, FIELDS.judge_rubric, lines=2, elem_id="train-judge-rubric")
        judge_api_key = gr.Textbox(
            label="Judge API key",
            type="password",
            info="For the LLM judge; sent to the training job's process only, never saved. Empty: the "
            "OPENAI_API_KEY / ANTHROPIC_API_KEY of the server's environment; local servers need none.",
            elem_id="train-judge-api-key",
        )
        with gr.Row():
            forms.setting(form, FIELDS.reward_file, elem_id="train-reward-file")
            forms.setting(form, FIELDS.reward_file_functions, allow_custom_value=True, elem_id="train-reward-functions")
            forms.setting(form, FIELDS.allow_reward_file, elem_id="train-allow-reward-file")
        warning = gr.Markdown(REWARD_FILE_WARNING, elem_id="train-reward-file-warning")
        others = [name for name in stages.own_settings() if name not in form.widgets]
        if others:
            with gr.Row():
                for name in others:
                    forms.setting(form, name)
    _stage_fields_follow_stage(form, [judge_api_key, warning])
    return judge_api_key


def stage_field_visibility(stage: str) -> dict[str, bool]:
    """Which of the stages' own settings the chosen stage has (its record's `settings`), by TrainConfig field."""
    try:
        own = set(stages.get(stage).settings)
    except UserError:  # an unknown stage (a stale value): show every field rather than none
        own = set(stages.own_settings())
    return {name: name in own for name in stages.own_settings()}


def _stage_fields_follow_stage(form: forms.Form, reward_extras: list[gr.components.Component]) -> None:
    """Show only the chosen stage's own fields (SFT has none; GRPO about twenty); `reward_extras` (the judge's key,
    the reward-file warning) go with the stage that runs reward functions."""
    names = stages.own_settings()
    targets = [form.widgets[name] for name in names] + reward_extras

    def follow(stage: str) -> list[Any]:
        shown = stage_field_visibility(stage)
        try:
            rewards = stages.get(stage).reward_functions
        except UserError:
            rewards = True
        return [gr.update(visible=shown[name]) for name in names] + [gr.update(visible=rewards)] * len(reward_extras)

    for target, update in zip(targets, follow(forms.DEFAULTS[FIELDS.stage]), strict=True):
        target.visible = update["visible"]  # the page opens with the default stage's fields only
    form.widgets[FIELDS.stage].change(
        follow, inputs=form.widgets[FIELDS.stage], outputs=targets, show_progress="hidden"
    )


# Shown under the reward file's settings: what ticking the box means.
REWARD_FILE_WARNING = (
    "⚠️ A reward file is Python code: with **Run reward file code** ticked it runs inside the training job with this "
    "app's rights. Use only a file you wrote or trust. A shared app refuses reward files."
)


def stop_note(state: str, step_s: float | None) -> str:
    """What Stop does while a run goes: the trainer stops between steps, so the current one ends first."""
    took = f" (the last one took {duration(step_s)})" if step_s else ""
    if state == runfolder.State.STOPPING:
        return f"Stopping: waiting for the current step to end{took}; a checkpoint is saved to resume from."
    if state == runfolder.State.RUNNING:
        return f"Stop: ends the run once the current step is done{took}, saving a checkpoint to resume from."
    return "Stop: takes the run out of the queue."


def stage_parts(latest: dict[str, Any]) -> list[str]:
    """The stage's own metrics, named and ordered by the stages' records: DPO / ORPO / KTO: reward margin and
    accuracy (ORPO: its log-odds ratio; KTO: KL); GRPO: mean reward, KL, completion length, each reward function's
    mean."""
    shown = sorted((key for key in latest if stages.is_metric(key)), key=stages.metric_order)
    return [f"{stages.metric_label(key)} {latest[key]:.3g}" for key in shown]


def model_download(run_dir: Path) -> runfolder.Progress | None:
    """The run's progress while it downloads its Hub model (before training starts), else None: its step and total
    are then the download's bytes done / total."""
    progress = runfolder.read_progress(run_dir)
    metrics = progress.metrics
    if progress.total is not None and (progress.step, progress.total) == (
        metrics.get("bytes_done"),
        metrics.get("bytes_total"),
    ):
        return progress
    return None


def status_line(
    run: str, status: runfolder.Status, events: runfolder.EventLog, download: runfolder.Progress | None = None
) -> str:
    """One line: state, step, losses, speed, ETA and memory from the newest events; while the run downloads its
    model, the download's bytes, rate and ETA instead of the step."""
    latest = events.latest
    parts = [f"<b>{html.escape(run)}</b>", f"<span class='state state-{status.state}'>{status.state}</span>"]
    if download is not None:
        parts.append(html.escape(download.message))
        if download.eta_s is not None and status.state == runfolder.State.RUNNING:
            parts.append(f"ETA {duration(download.eta_s)}")
    elif events.step is not None:
        parts.append(f"step {events.step}/{events.total}")
    if "loss" in latest:
        parts.append(f"loss {latest['loss']:.4f}")
    if "eval_loss" in latest:
        parts.append(f"eval loss {latest['eval_loss']:.4f}")
    parts += stage_parts(latest)
    if "tokens_per_s" in latest:
        parts.append(f"{latest['tokens_per_s']:.0f} tokens/s")
    if "eta_s" in latest and status.state == runfolder.State.RUNNING:
        parts.append(f"ETA {duration(latest['eta_s'])}")
    if "memory_gib" in latest:
        parts.append(f"memory {latest['memory_gib']:.2f} GiB")
    if status.processes > 1:
        devices = "GPUs" if status.device == "GPU" else "processes"
        parts.append(f"{status.processes} {devices}")
    if latest.get("gpu_memory_gib"):
        parts.append("per GPU " + ", ".join(f"{used:.1f}" for used in latest["gpu_memory_gib"]) + " GiB")
    if status.micro_batch:
        parts.append(f"micro-batch {status.micro_batch} × {status.gradient_accumulation}")
    line = " · ".join(parts)
    if status.note:
        line += f"<div class='run-note'>{html.escape(status.note)}</div>"
    if status.error:
        line += f"<pre class='run-error'>{html.escape(status.error)}</pre>"
    return line
