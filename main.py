"""LLM Finetuner. `python main.py` serves the web app; `python main.py <command> …` runs the same jobs headless."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import settings
from workspace import WORKSPACE_ENV, UserError


def cmd_demo_model(args: argparse.Namespace) -> int:
    import model_utils

    path = model_utils.ensure_demo_model(args.workspace, progress=lambda message: print(message, flush=True))
    print(path)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import download_utils
    import submit

    if not args.resume and not args.repo_id and not args.config:
        raise UserError("Give a Hub id (python main.py download OWNER/NAME) or --resume RUN.")
    if args.resume:
        _check_no_settings(args)
        run_dir = submit.resume(args.resume, args.workspace)
    else:
        fixed = {"repo_id": args.repo_id} if args.repo_id else {}
        config = config_from_args(args, download_utils.download_config_from_dict, fixed)
        run_dir = submit.submit("download", config, args.workspace)
    print(f"run: {run_dir}")
    return 0 if args.detach else follow_download(run_dir)


def follow_download(run_dir) -> int:
    """A download's bytes in huggingface_hub's own progress bar, read from the job's progress; Ctrl+C stops it."""
    import time

    from huggingface_hub.utils import tqdm

    import jobs
    import runfolder

    bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc=runfolder.stage_settings(run_dir)["repo_id"])
    try:
        while True:
            progress = runfolder.read_progress(run_dir)
            if progress.total:
                bar.total, bar.n = progress.total, progress.step or 0
                bar.refresh()
            status = jobs.job_status(run_dir)
            if not status.active:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping (what was downloaded stays; resume with --resume RUN)…", file=sys.stderr)
        jobs.stop_job(run_dir)
        while jobs.job_status(run_dir).active:
            time.sleep(0.5)
        status = jobs.job_status(run_dir)
    bar.close()
    print(f"{status.state}{': ' + status.error if status.error else ''}")
    message = runfolder.read_progress(run_dir).message
    if status.state == "done" and message:
        print(message)
    return 0 if status.state in ("done", "stopped") else 1


# The TrainConfig options `main.py dataset` takes beside the dataset's own: how its rows are prepared for training.
PREPARE_FLAGS = ("max_seq_length", "eval_split", "train_on_responses_only", "seed")


def config_from_args(args: argparse.Namespace, from_dict, fixed: dict | None = None):
    """A command's config: its YAML file (`args.config`, if any), the setting flags over it, then `fixed` (what the
    command takes as a positional, e.g. the run to export). The YAML is read into its config first, so that its
    own mistakes are named as the file's and its shorthand (`model: NAME`) is expanded before a flag is merged in."""
    from workspace import config_to_dict, load_yaml

    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    given = settings.merge_settings(settings.given_settings(args), fixed or {})
    if given:
        data = settings.merge_settings(config_to_dict(from_dict(data)), given)
    return from_dict(data)


def _check_no_settings(args: argparse.Namespace) -> None:
    """--resume continues a run with the settings saved in its folder: a setting flag beside it would be ignored."""
    given = settings.given_settings(args)
    if given:
        raise UserError(
            f"--resume continues the run with its own saved settings; leave out {', '.join(sorted(given))}."
        )


def cmd_dataset(args: argparse.Namespace) -> int:
    import dataset_utils
    import model_utils
    from train_config import TrainConfig
    from workspace import config_from_dict

    given = settings.given_settings(args)
    config = config_from_dict(
        dataset_utils.DatasetConfig,
        {**given.get("dataset", {}), "source": args.source, "column_map": _parse_mapping(args.map)},
        "dataset",
    )
    config.validate()
    # Each flag was checked against its field's bounds when it was read: these go to prepare_dataset, no validate().
    prepare = {name: given.get(name, settings.default_of(TrainConfig, name)) for name in PREPARE_FLAGS}
    tokenizer = model_utils.load_tokenizer(model_utils.resolve_model_path(args.model, args.workspace))
    stage = _dataset_stage(config, given, args.workspace)
    if stage is not None:
        return _stage_dataset(config, tokenizer, stage, prepare, given, args)
    if args.report or args.clean:
        return _dataset_report(config, tokenizer, prepare, args)
    prepared = dataset_utils.prepare_dataset(config, tokenizer, workspace=args.workspace, **prepare)
    eval_rows = len(prepared.eval) if prepared.eval is not None else 0
    print(f"format: {prepared.format}")
    print(
        f"rows: {prepared.source_rows} read, {prepared.dropped_rows} skipped, {len(prepared.train)} train, "
        f"{eval_rows} eval{' (from cache)' if prepared.cache_hit else ''}"
    )
    print("trained tokens are shown between ⟦ and ⟧")
    for index in range(min(args.examples, len(prepared.train))):
        row = prepared.train[index]
        segments = dataset_utils.loss_segments(row["input_ids"], row["labels"], tokenizer)
        print(f"\n--- example {index + 1} ({len(row['input_ids'])} tokens)\n{dataset_utils.format_segments(segments)}")
    return 0


def _dataset_report(config, tokenizer, prepare: dict, args: argparse.Namespace) -> int:
    import dataset_report

    report = dataset_report.build_report(config, tokenizer, workspace=args.workspace, **prepare)
    print(report.text())
    if args.clean:
        path, rows = dataset_report.write_cleaned_copy(config, report, args.workspace)
        print(f"cleaned copy: {path} ({rows} of {report.rows} rows)")
    return 0


def _dataset_stage(config, given: dict, workspace) -> str | None:
    """The stage `main.py dataset` reads the rows as when it is not SFT: --stage, or DPO / KTO for columns of
    pairs / KTO rows."""
    import preference_data
    from train_config import TrainConfig

    stage = preference_data.stage_of_source(
        config, given.get("stage", settings.default_of(TrainConfig, "stage")), workspace
    )
    return stage if preference_data.reads_stage_format(stage) else None


def _stage_dataset(config, tokenizer, stage: str, prepare: dict, given: dict, args: argparse.Namespace) -> int:
    """`main.py dataset` for preference and prompt data: the report, or the first rows rendered as `stage` trains
    them (the replies between ⟦ and ⟧)."""
    import dataset_report
    import planning
    import preference_data
    import stages

    reference = given.get("reference_column", "")
    if args.report or args.clean:
        report = planning.stage_data_report(
            config, stage, tokenizer, args.workspace, reference, **prepare_view(prepare)
        )
        print(report.text())
        if args.clean:
            path, rows = dataset_report.write_cleaned_copy(config, report, args.workspace)
            print(f"cleaned copy: {path} ({rows} of {report.rows} rows)")
        return 0
    fmt, shown = preference_data.rendered_rows(config, stage, tokenizer, args.examples, args.workspace, reference)
    print(f"format: {fmt} (read as {stages.get(stage).title} reads it)")
    print("each example: the prompt as the chat template renders it, then each reply between ⟦ and ⟧")
    for index, example in enumerate(shown, start=1):
        print(f"\n--- example {index}")
        if "error" in example:
            print(f"cannot train: {example['error']}")
            continue
        print(example["prompt"], end="")
        for side in ("chosen", "rejected", "completion"):
            if side in example:
                label = f" ({example['label']})" if side == "completion" else ""
                print(f"\n[{side}{label}] ⟦{example[side]}⟧")
        if example.get("answer"):  # GRPO's reference for its rewards: the replies are generated
            print(f"\n[reference answer] {example['answer']}")
    return 0


def prepare_view(prepare: dict) -> dict:
    """The preparation settings a preference report reads (it renders every reply: train_on_responses_only is
    SFT's)."""
    return {name: value for name, value in prepare.items() if name != "train_on_responses_only"}


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise UserError(f"--map takes FIELD=COLUMN (e.g. output=answer), not '{pair}'.")
        mapping[field.strip()] = column.strip()
    return mapping


def cmd_train(args: argparse.Namespace) -> int:
    import submit

    if args.resume:
        _check_no_settings(args)
        run_dir = submit.resume(args.resume, args.workspace)
    elif args.config or settings.given_settings(args):
        import job_checks
        from train_config import train_config_from_dict

        config = config_from_args(args, train_config_from_dict)
        config.validate()
        job_checks.check_model(config.model.name_or_path, args.workspace)  # before the estimates read its config
        _print_memory_estimate(config, args.workspace)
        if args.suggest:
            return _print_suggestions(config, args.workspace)
        _print_time_estimate(config, args.workspace)
        run_dir = submit.submit("train", config, args.workspace, args.name)
    else:
        raise UserError(
            "Give a config file (python main.py train CONFIG.yaml), settings as flags (--dataset.source FILE …) "
            "or --resume RUN."
        )
    print(f"run: {run_dir}")
    return 0 if args.detach else follow(run_dir)


def _print_memory_estimate(config, workspace) -> None:
    import gguf_utils
    import model_utils

    # The model's config is enough (a Hub id not downloaded yet is fetched by the training job).
    path = model_utils.model_reference(config.model.name_or_path, workspace)
    print(f"memory estimate: {model_utils.estimate_memory(config, path).summary()}")
    print(f"backend: {model_utils.backend_plan()[1]}")
    warning = gguf_utils.conversion_warning(model_utils.model_architectures(path))
    if warning:  # training works; the user should know before it that the GGUF export will not
        print(f"warning: {warning}")


def _print_suggestions(config, workspace) -> int:
    import model_utils
    import planning

    # The report reads the tokenizer: a Hub id not downloaded yet says so instead of downloading here.
    path = model_utils.resolve_model_path(config.model.name_or_path, workspace, download=False)
    report = planning.dataset_report_for(config, workspace)
    print("suggested settings (nothing is changed: copy the ones you want into the config):")
    for suggestion in planning.suggest(config, report, path):
        print(f"  {suggestion.line()}")
    return 0


def _print_time_estimate(config, workspace) -> None:
    import planning

    try:
        print(f"time estimate, Start to done: {planning.time_estimate_text(config, workspace)}")
    except UserError as exc:  # the job reports the problem itself, with the same message
        print(f"time estimate unavailable: {exc}")


def _start_keyed_job(args: argparse.Namespace, kind: str, from_dict) -> Path:
    """Start (or `--resume`) a synth or arena run: both take a YAML config and setting flags, and an API key from
    --api-key-env, which travels in the job's environment only."""
    import runfolder
    import submit

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {args.api_key_env}: that environment variable is not set.")
    if args.resume:
        _check_no_settings(args)
        run_dir = runfolder.run_path(args.resume, args.workspace)
        found = runfolder.read_kind(run_dir)
        if found != kind:
            raise UserError(f"Run '{run_dir.name}' is a {found} run; resume it with `python main.py {found} --resume`.")
        submit.resume(run_dir, args.workspace, api_key=api_key)
        return run_dir
    if args.config or settings.given_settings(args):
        return submit.submit(kind, config_from_args(args, from_dict), args.workspace, args.name, api_key=api_key)
    raise UserError(f"Give a config file (python main.py {kind} CONFIG.yaml), settings as flags or --resume RUN.")


def cmd_synth(args: argparse.Namespace) -> int:
    import runfolder
    import synthetic_utils

    run_dir = _start_keyed_job(args, "synth", synthetic_utils.synthetic_config_from_dict)
    print(f"run: {run_dir}\nrows: {run_dir / synthetic_utils.DATA_FILE}")
    if args.detach:
        return 0
    code = follow(run_dir)
    message = runfolder.read_progress(run_dir).message
    if message:
        print(message)
    return code


def follow_job(run_dir, detach: bool) -> tuple[int, bool]:
    """Print the new run's folder, then (unless detached) follow it to its end: (exit code, whether it ended done,
    so the command prints its result)."""
    import jobs

    print(f"run: {run_dir}")
    if detach:
        return 0, False
    code = follow(run_dir)
    return code, jobs.job_status(run_dir).state == "done"


def cmd_arena(args: argparse.Namespace) -> int:
    import arena_utils

    run_dir = _start_keyed_job(args, "arena", arena_utils.arena_config_from_dict)
    code, done = follow_job(run_dir, args.detach)
    if done:
        print((run_dir / "report.md").read_text(encoding="utf-8"))
    return code


def follow(run_dir) -> int:
    """Show a job's progress until it ends; Ctrl+C asks it to stop (it saves a checkpoint first)."""
    import time

    from tqdm import tqdm

    import jobs
    import runfolder

    seen, bar, last_step = 0, None, None
    shown = ("loss", "eval_loss", "tokens_per_s")
    # Piped, every redraw of a bar is a line of its own: plain lines then, one per step.
    terminal = sys.stderr.isatty()
    try:
        while True:
            for event in runfolder.read_events(run_dir, since=seen):
                seen += 1
                if event.total and bar is None and terminal:
                    bar = tqdm(total=event.total, unit="step")
                if event.step is None or not (event.total or bar is not None):
                    continue
                postfix = {key: event.metrics[key] for key in shown if key in event.metrics}
                if event.message:
                    postfix["at"] = event.message[:60]
                if bar is not None:
                    bar.n = event.step
                    bar.set_postfix(postfix, refresh=False)
                    bar.refresh()
                elif event.step != last_step:
                    figures = "".join(
                        f", {key} {value:.4g}" if isinstance(value, (int, float)) else f", {key} {value}"
                        for key, value in postfix.items()
                        if key != "at"
                    )
                    at = f" · {postfix['at']}" if "at" in postfix else ""
                    print(f"step {event.step}/{event.total}{figures}{at}", file=sys.stderr, flush=True)
                last_step = event.step
            status = jobs.job_status(run_dir)
            if not status.active:
                break
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping (saving a checkpoint)…", file=sys.stderr)
        jobs.stop_job(run_dir)
        while jobs.job_status(run_dir).active:
            time.sleep(1)
        status = jobs.job_status(run_dir)
    if bar is not None:
        bar.close()
    print(f"{status.state}{': ' + status.error if status.error else ''}")
    return 0 if status.state in ("done", "stopped") else 1


def cmd_export(args: argparse.Namespace) -> int:
    import gguf_utils
    import submit
    from gguf_utils import ollama

    if args.ollama and args.detach:
        raise UserError("--ollama waits for the export to hand it on; leave out --detach.")
    if args.ollama:
        ollama.check_reachable()  # before a long export, not after it
    config = config_from_args(args, gguf_utils.export_config_from_dict, {"run": args.run})
    run_dir = submit.submit("export", config, args.workspace)
    print(f"run: {run_dir}")
    if args.detach:
        return 0
    code = follow(run_dir)
    if code == 0:
        for line in export_summary(run_dir):
            print(line)
    if code != 0 or not args.ollama:
        return code
    gguf_dir = gguf_utils.export_source(args.run, args.workspace).run_dir / "gguf"
    modelfile = "Modelfile.lora" if config.lora_gguf else "Modelfile"
    added = ollama.add_to_ollama(gguf_dir, args.ollama, modelfile, progress=lambda message: print(message, flush=True))
    print(f"created {added['model']} in Ollama at {added['host']}; asked {added['question']!r}, it answered:")
    print(added["reply"])
    return 0


def export_summary(export_run: Path) -> list[str]:
    """The end of `main.py export`: each file written, with its size and the agreement it scored against the HF model
    (the exported run's gguf/report.json); nothing for an export that did not finish."""
    import jobs
    import runfolder

    if jobs.job_status(export_run).state != "done":
        return []
    source = runfolder.run_path(runfolder.stage_settings(export_run)["run"], runfolder.run_workspace(export_run))
    folder = source / "gguf"
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    lines = [
        f"{folder / item['file']}  {item['size_bytes'] / 1e6:.1f} MB, top-1 agreement with the HF model "
        f"{item['agreement']:.1%}"
        for item in report.get("files", [])
    ]
    lora = report.get("lora")
    if lora:
        lines.append(
            f"{folder / lora['file']}  {lora['size_bytes'] / 1e6:.1f} MB, the LoRA adapter on {lora['base_file']}: "
            f"top-1 agreement {lora['agreement']:.1%}"
        )
    return lines


def cmd_push(args: argparse.Namespace) -> int:
    import hub_push
    import runfolder
    import submit

    config = config_from_args(args, hub_push.push_config_from_dict, {"run": args.run})
    run_dir = submit.submit("push", config, args.workspace)
    code, done = follow_job(run_dir, args.detach)
    if done:
        print(f"pushed: {runfolder.read_progress(run_dir).message}")
    return code


def cmd_chat(args: argparse.Namespace) -> int:
    import inference_utils
    from workspace import config_from_dict

    config = config_from_dict(inference_utils.GenerationConfig, settings.given_settings(args), "generation settings")
    config.validate()
    if not args.prompt.strip():
        raise UserError('The prompt is empty; pass --prompt "your message".')
    # One reply (two with --compare) does not repay compiling the decoding step; the rest is the Test tab's fast path.
    chat_model = inference_utils.load_for_chat(args.model, args.run, args.workspace, gguf=args.gguf, compile_step=False)
    messages = [{"role": "user", "content": args.prompt}]
    if not args.compare:
        _print_stream(inference_utils.stream_chat(chat_model, messages, config))
        return 0
    # A terminal shows one stream at a time: the base reply, then the tuned one (the same model, adapter toggled).
    inference_utils.check_can_compare(chat_model)
    for label, use_adapter in (("base", False), ("tuned", True)):
        print(f"[{label}]", flush=True)
        _print_stream(inference_utils.stream_chat(chat_model, messages, config, use_adapter=use_adapter))
    return 0


def _print_stream(replies) -> None:
    shown = ""
    for reply in replies:
        sys.stdout.write(reply[len(shown) :])
        sys.stdout.flush()
        shown = reply
    print()


def cmd_eval(args: argparse.Namespace) -> int:
    import evaluation
    import runfolder
    import submit

    config = config_from_args(args, evaluation.eval_config_from_dict, {"run": args.run})
    run_dir = submit.submit("eval", config, args.workspace)
    code, done = follow_job(run_dir, args.detach)
    if done:
        target = runfolder.run_path(config.run, args.workspace)
        print((target / "eval.md").read_text(encoding="utf-8"))
    return code


def cmd_benchmark(args: argparse.Namespace) -> int:
    import benchmark
    import submit

    if args.resume:
        run_dir = submit.resume(args.resume, args.workspace)
    else:
        config = config_from_args(args, benchmark.benchmark_config_from_dict, {"run": args.run} if args.run else None)
        run_dir = submit.submit("benchmark", config, args.workspace)
    code, done = follow_job(run_dir, args.detach)
    if done:
        print((run_dir / benchmark.TABLE_FILE).read_text(encoding="utf-8"))
    return code


def cmd_serve_run(args: argparse.Namespace) -> int:
    import serving

    api_key = args.api_key or os.environ.get(serving.API_KEY_ENV, "")
    existing = serving.running_endpoint(serving.model_to_serve(args.run, args.workspace, args.weights)[0])
    if existing is not None:
        print(f"already serving {existing.model} ({existing.backend}) at {existing.base_url} (pid {existing.pid})")
        return 0
    import serving_app

    serving_app.serve_forever(args.run, args.workspace, args.host, args.port, api_key, args.weights)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import jobs

    if args.compare:
        import compare_utils

        print(compare_utils.comparison_text(compare_utils.compare_runs(args.compare, args.workspace)))
        return 0
    runs = jobs.list_runs(args.workspace)
    if not runs:
        print("no runs yet")
    for run in runs:
        print(f"{run.name:32} {run.kind:7} {run.state:9} {progress_line(run.progress)}")
    return 0


def progress_line(progress) -> str:
    """step/total, loss and message of a run's newest progress, the same for every kind of job."""
    parts = []
    if progress.step is not None and progress.total:
        parts.append(f"step {progress.step}/{progress.total}")
    if progress.metrics.get("loss") is not None:
        parts.append(f"loss {progress.metrics['loss']:.4f}")
    if progress.message:
        parts.append(progress.message)
    return "  ".join(parts)


def cmd_stop(args: argparse.Namespace) -> int:
    import submit

    submit.stop(args.run, args.workspace)
    print("stop requested; the job saves a checkpoint and ends")
    return 0


def cmd_node_command(args: argparse.Namespace) -> int:
    import jobs
    import runfolder

    for node, command in enumerate(jobs.node_commands(runfolder.run_path(args.run, args.workspace)), start=1):
        print(f"# node {node}\n{command}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import jobs

    return jobs.run_job(args.run_dir, resume=args.resume)


def cmd_serve(args: argparse.Namespace) -> int:
    import ui

    ui.serve(
        host=args.host,
        port=args.port,
        share=args.share,
        auth=args.auth,
        workspace=args.workspace,
        auth_file=args.auth_file,
        insecure_no_auth=args.insecure_no_auth,
    )
    return 0


CONFIG_HELP = "YAML file of settings; a setting flag (--KEY VALUE) given beside it wins"


def build_parser() -> argparse.ArgumentParser:
    # Every setting flag comes from its config's field metadata (settings.add_config_flags): a field added to a
    # config is a flag here with its type, bounds, choices and help, and nothing in this function names it.
    from arena_utils import ArenaConfig
    from dataset_utils import DatasetConfig
    from download_utils import DownloadConfig
    from evaluation import EvalConfig
    from gguf_utils import ExportConfig
    from hub_push import PushConfig
    from inference_utils import GenerationConfig
    from synthetic_utils import SyntheticConfig
    from train_config import TrainConfig

    # The installed package's console script is the same CLI under its own name.
    prog = "llm-finetuner" if os.path.basename(sys.argv[0]) == "llm-finetuner" else "python main.py"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--workspace", default=None, help="folder for models, runs and caches (default ./workspace)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    # Gradio's own variables: a Hugging Face Space's Dockerfile sets them (0.0.0.0, the Space's app_port).
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
        help="address to serve the app on (default $GRADIO_SERVER_NAME, else 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
        help="port to serve the app on (default $GRADIO_SERVER_PORT, else 7860)",
    )
    parser.add_argument("--share", action="store_true", help="create a public Gradio link (requires --auth)")
    parser.add_argument("--auth", default=None, help="USER:PASS required to open the app (or FINETUNER_AUTH)")
    parser.add_argument(
        "--auth-file", default=None, metavar="PATH", help="file holding one USER:PASS line (keeps it out of ps)"
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve on a non-loopback --host without a login (anyone who reaches it can use the app)",
    )
    parser.set_defaults(handler=cmd_serve)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser(
        "demo-model",
        help="convert the built-in demo model (SmolLM2-135M-Instruct) once",
        description="Turn the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face folder "
        "under the workspace (once; later calls reuse it) and print its path.",
    )
    demo.set_defaults(handler=cmd_demo_model)

    download = commands.add_parser(
        "download",
        help="download a model from the Hugging Face Hub",
        description="Download the files training needs (safetensors, tokenizer, configs, chat template) of a Hub "
        "model into the Hugging Face cache, as a job with progress; a killed download resumes. Uses HF_TOKEN or "
        "the token of `hf auth login` for gated and private models.",
    )
    download.add_argument("repo_id", nargs="?", help="the model's Hub id, OWNER/NAME")
    download.add_argument("--config", metavar="YAML", default=None, help=CONFIG_HELP)
    settings.add_config_flags(download, DownloadConfig, exclude=["repo_id"])
    download.add_argument("--resume", metavar="RUN", help="resume a stopped or failed download run")
    download.add_argument("--detach", action="store_true", help="start the job and return")
    download.set_defaults(handler=cmd_download)

    data = commands.add_parser(
        "dataset",
        help="prepare a dataset and show rendered examples",
        description="Load, detect, render and tokenize a dataset; print the format, row counts "
        "and examples with the trained (loss-carrying) spans marked ⟦like this⟧.",
    )
    data.add_argument("source", help="local CSV/JSON/JSONL/Parquet/TXT file or a Hub dataset id")
    data.add_argument("--model", default="demo", help="model whose tokenizer and chat template to use (default demo)")
    data.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="column mapping, repeatable")
    settings.add_config_flags(data, DatasetConfig, exclude=["source", "column_map"], section="dataset")
    settings.add_config_flags(data, TrainConfig, names=PREPARE_FLAGS)
    # The stage reads the rows in its format (pairs, KTO rows, GRPO prompts); without it, columns of pairs read as DPO.
    settings.add_config_flags(data, TrainConfig, names=("stage", "reference_column"))
    data.add_argument("--examples", type=int, default=2, help="how many rendered examples to print")
    data.add_argument(
        "--report",
        action="store_true",
        help="print the quality report (duplicates, empty replies, cut rows, lengths, leakage) instead",
    )
    data.add_argument(
        "--clean", action="store_true", help="with the report, write a copy without duplicates and empty replies"
    )
    data.set_defaults(handler=cmd_dataset)
    train = commands.add_parser(
        "train",
        help="start (or resume) a training run",
        description="Start a training job from a YAML config (model, dataset and TrainConfig options) and/or "
        "--KEY VALUE settings (the YAML's keys, sections dotted: --dataset.source data.jsonl --lora_r 8; a flag "
        "wins over the file) in a new run folder and follow its progress; Ctrl+C stops it with a checkpoint.",
    )
    train.add_argument("config", nargs="?", help=CONFIG_HELP)
    train.add_argument("--name", default=None, help="run name (default train-<date>-<time>)")
    train.add_argument("--resume", metavar="RUN", default=None, help="resume this run from its last checkpoint")
    train.add_argument("--detach", action="store_true", help="start the job and return at once")
    train.add_argument(
        "--suggest", action="store_true", help="print suggested settings with their reasons and exit (starts nothing)"
    )
    settings.add_config_flags(train, TrainConfig)
    train.set_defaults(handler=cmd_train)

    synth = commands.add_parser(
        "synth",
        help="generate a synthetic dataset with an LLM (or resume one)",
        description="Start a job that asks an OpenAI-compatible, Anthropic or Ollama model "
        "for training rows (SyntheticConfig options in YAML and/or as --KEY VALUE flags) and appends them "
        "to data.jsonl in a new run folder; the API key comes from "
        "OPENAI_API_KEY / ANTHROPIC_API_KEY and is never saved.",
    )
    _add_keyed_job_flags(synth, "synth", "continue this run up to its num_rows", "the API key")
    settings.add_config_flags(synth, SyntheticConfig)
    synth.set_defaults(handler=cmd_synth)

    arena = commands.add_parser(
        "arena",
        help="judge two or more models on the same prompts with an LLM (or resume an arena)",
        description="Start a job that puts the same prompts to every contestant (base:MODEL, run:NAME, "
        "gguf:PATH; ArenaConfig options in YAML and/or as --KEY VALUE flags), has an LLM judge every pair in both "
        "orders and writes report.json and report.md (win rates with 95%% intervals) into a new run folder; the "
        "judge's API key comes from OPENAI_API_KEY / ANTHROPIC_API_KEY and is never saved.",
    )
    _add_keyed_job_flags(arena, "arena", "continue this arena; judged prompts are kept", "the judge's API key")
    settings.add_config_flags(arena, ArenaConfig)
    arena.set_defaults(handler=cmd_arena)

    export = commands.add_parser(
        "export",
        help="export a trained run to GGUF files and an Ollama Modelfile",
        description="Merge the run's adapter, convert with llama.cpp, quantize, check each "
        "file against the HF model and write an Ollama Modelfile, into "
        "runs/RUN/gguf/ (report.json holds the agreement figures).",
    )
    export.add_argument("run", help="training run name or folder")
    export.add_argument("--config", metavar="YAML", default=None, help=CONFIG_HELP)
    settings.add_config_flags(export, ExportConfig, exclude=["run"], aliases={"quants": "--quant"})
    export.add_argument("--detach", action="store_true", help="start the job and return at once")
    export.add_argument(
        "--ollama",
        metavar="NAME",
        default=None,
        help="then create model NAME in the running Ollama ($OLLAMA_HOST) and ask it one question "
        "(from Modelfile.lora with --lora-gguf)",
    )
    export.set_defaults(handler=cmd_export)

    push = commands.add_parser(
        "push",
        help="push a trained run to the Hugging Face Hub with a model card",
        description="Upload the run's adapter, merged safetensors and/or GGUF files to a Hub repo (created if "
        "needed) with a model card made from the run, as a job with progress; pushing again resumes (files "
        "already there are skipped). Uses HF_TOKEN or the token of `hf auth login`, which must be able to write.",
    )
    push.add_argument("run", help="training run name or folder")
    push.add_argument("--config", metavar="YAML", default=None, help=CONFIG_HELP)
    settings.add_config_flags(push, PushConfig, exclude=["run"], aliases={"repo_id": "--repo"})
    push.add_argument("--detach", action="store_true", help="start the job and return at once")
    push.set_defaults(handler=cmd_push)

    chat = commands.add_parser(
        "chat",
        help="chat with a model or a trained run (streams the reply)",
        description="Generate a reply to one prompt, token by token, with the model's chat "
        "template; --run adds a training run's adapter (or uses its merged "
        "model), --compare shows the base reply and then the tuned one.",
    )
    chat.add_argument(
        "--model", default=None, help="demo, a Hub id or a local folder (default: the run's base model, else demo)"
    )
    chat.add_argument("--run", default=None, help="training run name or folder whose adapter/merged model to use")
    chat.add_argument(
        "--gguf",
        default=None,
        help="chat with an exported GGUF through llama.cpp instead: a file name in the run's gguf/ folder "
        "(e.g. trained-q8_0.gguf) or a path",
    )
    chat.add_argument("--prompt", required=True, help="the user message")
    settings.add_config_flags(chat, GenerationConfig)
    chat.add_argument("--compare", action="store_true", help="answer with the base model, then with the tuned one")
    chat.set_defaults(handler=cmd_chat)

    evaluate = commands.add_parser(
        "eval",
        help="held-out loss and perplexity of base vs tuned for a run",
        description="Re-create the run's eval split, measure the loss on its reply tokens "
        "with the adapter off (base) and on (tuned), and write eval.json and "
        "eval.md into the run folder.",
    )
    evaluate.add_argument("run", help="training run name or folder")
    evaluate.add_argument("--config", metavar="YAML", default=None, help=CONFIG_HELP)
    settings.add_config_flags(evaluate, EvalConfig, exclude=["run"])
    evaluate.add_argument("--detach", action="store_true", help="start the job and return at once")
    evaluate.set_defaults(handler=cmd_eval)

    _add_benchmark_command(commands)
    _add_serve_command(commands)

    runs = commands.add_parser("runs", help="list runs and their state", description="List every run on disk.")
    runs.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        default=None,
        help="training runs side by side: final and best losses, tokens/s, time, memory and the config differences",
    )
    runs.set_defaults(handler=cmd_runs)

    stop = commands.add_parser("stop", help="stop a running job", description="Ask a job to checkpoint and stop.")
    stop.add_argument("run", help="run name or folder")
    stop.set_defaults(handler=cmd_stop)

    node = commands.add_parser(
        "node-command",
        help="the command each other machine runs to join a multi-node training run",
        description="Print, for a training run started here on several nodes (nnodes, rdzv_endpoint), the shell "
        "command to run on each other machine (node 1, 2, …): the same install path and run folder on every machine.",
    )
    node.add_argument("run", help="run name or folder")
    node.set_defaults(handler=cmd_node_command)

    run = commands.add_parser(
        "run",
        help="(internal) run a job in this process",
        description="Run the job of a run folder in this process; the app and the train command start it for you.",
    )
    run.add_argument("run_dir")
    run.add_argument("--resume", action="store_true")
    run.set_defaults(handler=cmd_run)
    return parser


def _add_benchmark_command(commands) -> None:
    from benchmark import BenchmarkConfig

    bench = commands.add_parser(
        "benchmark",
        help="benchmark a run's base and tuned models with lm-evaluation-harness (or resume one)",
        description="Score the run's base model, its tuned model and (with --contestants gguf) its exported GGUF on "
        "lm-evaluation-harness tasks (any task name the harness knows, or --task_file a custom task YAML), at most "
        "--limit rows each, and print a table of base vs tuned with each metric's standard error and the "
        "difference (benchmark.md, also in the training run's folder). Standard tasks download their data from "
        "the Hugging Face Hub on first use.",
    )
    bench.add_argument("run", nargs="?", help="training run name or folder")
    bench.add_argument("--config", metavar="YAML", default=None, help=CONFIG_HELP)
    settings.add_config_flags(bench, BenchmarkConfig, exclude=["run"])
    bench.add_argument("--resume", metavar="RUN", default=None, help="resume this benchmark run; scored tasks are kept")
    bench.add_argument("--detach", action="store_true", help="start the job and return at once")
    bench.set_defaults(handler=cmd_benchmark)


def _add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a run as an OpenAI-compatible endpoint (/v1/chat/completions)",
        description="Serve the run's exported GGUF through llama-cpp-python's server or, without an export, its "
        "transformers model, as an OpenAI-compatible API at http://HOST:PORT/v1 until Ctrl+C. A second serve of "
        "the same run prints the running one's address.",
    )
    serve.add_argument("run", help="training run name or folder")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument(
        "--api-key", default=None, help="key clients must send (required beyond loopback; or FINETUNER_SERVE_API_KEY)"
    )
    serve.add_argument(
        "--weights",
        default="auto",
        help="auto (the run's largest GGUF if it exported one, else its transformers model), transformers, or a GGUF "
        "file name in the run's gguf/ folder",
    )
    serve.set_defaults(handler=cmd_serve_run)


def _add_keyed_job_flags(parser: argparse.ArgumentParser, kind: str, resume_help: str, key_help: str) -> None:
    """The flags synth and arena share beside their settings: the config file, run name, resume, detach, key."""
    parser.add_argument("config", nargs="?", help=CONFIG_HELP)
    parser.add_argument("--name", default=None, help=f"run name (default {kind}-<date>-<time>)")
    parser.add_argument("--resume", metavar="RUN", default=None, help=resume_help)
    parser.add_argument("--detach", action="store_true", help="start the job and return at once")
    parser.add_argument(
        "--api-key-env", metavar="VAR", default=None, help=f"read {key_help} from this environment variable instead"
    )


def main(argv: list[str] | None = None) -> int:
    try:
        # A setting flag outside its field's bounds is a UserError while parsing, worded as for the value in YAML.
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
        if args.workspace:
            os.environ[WORKSPACE_ENV] = args.workspace
        return args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
