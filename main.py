"""LLM Finetuner. `python main.py` serves the web app; `python main.py <command> …` runs the same jobs headless."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from workspace import WORKSPACE_ENV, UserError


def cmd_demo_model(args: argparse.Namespace) -> int:
    import model_utils

    path = model_utils.ensure_demo_model(args.workspace, progress=lambda message: print(message, flush=True))
    print(path)
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    import dataset_utils
    import model_utils

    config = dataset_utils.DatasetConfig(
        source=args.source, split=args.split, format=args.format, column_map=_parse_mapping(args.map),
        chat_template=args.chat_template, system_prompt=args.system_prompt, max_rows=args.max_rows,
    )
    tokenizer = model_utils.load_tokenizer(model_utils.resolve_model_path(args.model, args.workspace))
    prepared = dataset_utils.prepare_dataset(
        config, tokenizer, max_seq_length=args.max_seq_length, train_on_responses_only=not args.train_on_all,
        eval_split=args.eval_split, workspace=args.workspace,
    )
    eval_rows = len(prepared.eval) if prepared.eval is not None else 0
    print(f"format: {prepared.format}")
    print(f"rows: {prepared.source_rows} read, {prepared.dropped_rows} skipped, {len(prepared.train)} train, "
          f"{eval_rows} eval{' (from cache)' if prepared.cache_hit else ''}")
    print("trained tokens are shown between ⟦ and ⟧")
    for index in range(min(args.examples, len(prepared.train))):
        row = prepared.train[index]
        segments = dataset_utils.loss_segments(row["input_ids"], row["labels"], tokenizer)
        print(f"\n--- example {index + 1} ({len(row['input_ids'])} tokens)\n{dataset_utils.format_segments(segments)}")
    return 0


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field or not column:
            raise UserError(f"--map takes FIELD=COLUMN (e.g. output=answer), not '{pair}'.")
        mapping[field.strip()] = column.strip()
    return mapping


def cmd_train(args: argparse.Namespace) -> int:
    import jobs

    if args.resume:
        run_dir = jobs.run_path(args.resume, args.workspace)
        jobs.resume_job(run_dir)
    elif args.config:
        import training_utils
        from workspace import config_to_dict, load_yaml

        config = training_utils.train_config_from_dict(load_yaml(args.config))
        config.validate()
        _print_memory_estimate(config, args.workspace)
        run_dir = jobs.create_run("train", config_to_dict(config), args.workspace, args.name)
        jobs.start_job(run_dir)
    else:
        raise UserError("Give a config file (python main.py train CONFIG.yaml) or --resume RUN.")
    print(f"run: {run_dir}")
    return 0 if args.detach else follow(run_dir)


def _print_memory_estimate(config, workspace) -> None:
    import model_utils

    path = model_utils.resolve_model_path(config.model.name_or_path, workspace)
    estimate = model_utils.estimate_memory(path, config.mode, config.lora_r, config.target_modules,
                                           config.per_device_train_batch_size, config.max_seq_length,
                                           config.gradient_checkpointing)
    print(f"memory estimate: {estimate.summary()}")


def follow(run_dir) -> int:
    """Show a job's progress until it ends; Ctrl+C asks it to stop (it saves a checkpoint first)."""
    import time

    from tqdm import tqdm

    import jobs

    seen, bar = 0, None
    try:
        while True:
            for event in jobs.read_events(run_dir, since=seen):
                seen += 1
                if event.get("max_steps") and bar is None:
                    bar = tqdm(total=event["max_steps"], unit="step")
                if bar is not None and "step" in event:
                    bar.n = event["step"]
                    bar.set_postfix({k: event[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in event})
                    bar.refresh()
            status = jobs.read_status(run_dir)
            if status["state"] not in jobs.ACTIVE_STATES:
                break
            time.sleep(1)
    except KeyboardInterrupt:
        print("\nstopping (saving a checkpoint)…", file=sys.stderr)
        jobs.stop_job(run_dir)
        while jobs.read_status(run_dir)["state"] in jobs.ACTIVE_STATES:
            time.sleep(1)
        status = jobs.read_status(run_dir)
    if bar is not None:
        bar.close()
    print(f"{status['state']}{': ' + status['error'] if status.get('error') else ''}")
    return 0 if status["state"] in ("done", "stopped") else 1


def cmd_runs(args: argparse.Namespace) -> int:
    import jobs

    runs = jobs.list_runs(args.workspace)
    if not runs:
        print("no runs yet")
    for run in runs:
        progress = f"step {run.step}/{run.max_steps}" if run.step is not None else ""
        loss = f"loss {run.last_loss:.4f}" if run.last_loss is not None else ""
        print(f"{run.name:32} {run.kind:7} {run.state:9} {progress:16} {loss}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    import jobs

    jobs.stop_job(jobs.run_path(args.run, args.workspace))
    print("stop requested; the job saves a checkpoint and ends")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import jobs

    return jobs.run_job(args.run_dir, resume=args.resume)


def cmd_serve(args: argparse.Namespace) -> int:
    import ui

    ui.serve(host=args.host, port=args.port, share=args.share, auth=args.auth, workspace=args.workspace)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python main.py", description=__doc__)
    parser.add_argument("--workspace", default=None, help="folder for models, runs and caches (default ./workspace)")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the app on")
    parser.add_argument("--port", type=int, default=7860, help="port to serve the app on")
    parser.add_argument("--share", action="store_true", help="create a public Gradio link (requires --auth)")
    parser.add_argument("--auth", default=None, help="USER:PASS required to open the app (or FINETUNER_AUTH)")
    parser.set_defaults(handler=cmd_serve)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo-model", help="convert the built-in demo model (SmolLM2-135M-Instruct) once",
                               description="Turn the packaged SmolLM2-135M-Instruct GGUF into a Hugging Face folder "
                                           "under the workspace (once; later calls reuse it) and print its path.")
    demo.set_defaults(handler=cmd_demo_model)

    data = commands.add_parser("dataset", help="prepare a dataset and show rendered examples",
                               description="Load, detect, render and tokenize a dataset; print the format, row counts "
                                           "and examples with the trained (loss-carrying) spans marked ⟦like this⟧.")
    data.add_argument("source", help="local CSV/JSON/JSONL/Parquet/TXT file or a Hub dataset id")
    data.add_argument("--model", default="demo", help="model whose tokenizer and chat template to use (default demo)")
    data.add_argument("--format", default="auto", help="auto, alpaca, sharegpt, messages, prompt_completion or text")
    data.add_argument("--map", action="append", metavar="FIELD=COLUMN", help="column mapping, repeatable")
    data.add_argument("--split", default="train", help="Hub split (default train)")
    data.add_argument("--chat-template", default="", help="'chatml' or a Jinja template, for models without one")
    data.add_argument("--system-prompt", default="", help="system turn added to rows that have none")
    data.add_argument("--max-rows", type=int, default=0, help="read at most this many rows (0 = all)")
    data.add_argument("--max-seq-length", type=int, default=1024, help="truncate examples to this many tokens")
    data.add_argument("--eval-split", type=float, default=0.0, help="fraction held out for evaluation")
    data.add_argument("--train-on-all", action="store_true", help="train on every token, not only the replies")
    data.add_argument("--examples", type=int, default=2, help="how many rendered examples to print")
    data.set_defaults(handler=cmd_dataset)
    train = commands.add_parser("train", help="start (or resume) a training run",
                                description="Start a training job from a YAML config (model, dataset and TrainConfig "
                                            "options) in a new run folder and follow its progress; Ctrl+C stops it "
                                            "with a checkpoint.")
    train.add_argument("config", nargs="?", help="YAML config file")
    train.add_argument("--name", default=None, help="run name (default train-<date>-<time>)")
    train.add_argument("--resume", metavar="RUN", default=None, help="resume this run from its last checkpoint")
    train.add_argument("--detach", action="store_true", help="start the job and return at once")
    train.set_defaults(handler=cmd_train)

    runs = commands.add_parser("runs", help="list runs and their state", description="List every run on disk.")
    runs.set_defaults(handler=cmd_runs)

    stop = commands.add_parser("stop", help="stop a running job", description="Ask a job to checkpoint and stop.")
    stop.add_argument("run", help="run name or folder")
    stop.set_defaults(handler=cmd_stop)

    run = commands.add_parser("run", help="(internal) run a job in this process",
                              description="Run the job of a run folder in this process; the app and the train "
                                          "command start it for you.")
    run.add_argument("run_dir")
    run.add_argument("--resume", action="store_true")
    run.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.workspace:
        os.environ[WORKSPACE_ENV] = args.workspace
    try:
        return args.handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
