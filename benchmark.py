"""Benchmarks of a training run through EleutherAI's lm-evaluation-harness (the benchmark job kind): the harness's
own tasks, task registry and metrics, run on the base model, the run's tuned model and its exported GGUF, written
as one table of base vs tuned with each metric's standard error and the difference.

Each (contestant, task) pair is saved to the job's folder as soon as it is scored, so a stopped job resumes with the
pairs it has not scored yet. The finished table goes to the job's folder and to the training run's folder
(benchmark.json, benchmark.md), where the run comparison and a model card read it (benchmark_report).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import runfolder
from benchmark_report import RESULT_FILE, benchmark_markdown, is_number
from settings import check, option
from workspace import UserError, atomic_write_text, read_json, resolve_user_path, write_json

log = logging.getLogger(__name__)

# A short list to pick from; any other task, group or tag name the harness knows works too.
COMMON_TASKS = (
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "winogrande",
    "boolq",
    "mmlu_high_school_mathematics",
    "mmlu_college_computer_science",
    "gsm8k",
)
CONTESTANTS = ("base", "tuned", "gguf")
RESULTS_FOLDER = "benchmark"  # in the job's folder: one JSON per scored (contestant, task)
TABLE_FILE = "benchmark.md"


@dataclass
class BenchmarkConfig:
    """Which run to benchmark, on which tasks, how many rows each, and which of its models compete."""

    run: str = option("", help="The training run whose tuned model (adapter or merged) is benchmarked.", label="Run")
    tasks: list[str] = option(
        default_factory=list,
        help="lm-evaluation-harness task, group or tag names (e.g. arc_easy, hellaswag, mmlu, gsm8k); their data "
        "comes from the Hugging Face Hub on first use.",
        label="Tasks",
    )
    task_file: str = option(
        "",
        help="A custom task in the harness's YAML format (a relative data_files path is read beside the file).",
        label="Custom task file",
    )
    limit: int = option(100, help="Score at most this many rows of each task.", minimum=1, label="Rows per task")
    contestants: list[str] = option(
        default_factory=lambda: ["base", "tuned"],
        help="base (the run's base model), tuned (its adapter or merged model), gguf (its exported GGUF file, "
        "through llama.cpp's server; multiple-choice and generation tasks).",
        label="Contestants",
    )
    gguf: str = option(
        "", help="The GGUF file in the run's gguf/ folder for the gguf contestant ('' = the first one).", label="GGUF"
    )
    num_fewshot: int | None = option(
        None, help="Examples in each prompt (empty = the task's own default).", minimum=0, label="Few-shot"
    )
    batch_size: int = option(8, help="Requests per forward pass.", minimum=1, label="Batch size", advanced=True)

    def validate(self) -> None:
        check(self)
        if not str(self.run).strip():
            raise UserError("No run chosen; pick the training run to benchmark.")
        if not [task for task in self.tasks if str(task).strip()] and not str(self.task_file).strip():
            raise UserError(f"No task chosen; pick one (e.g. {', '.join(COMMON_TASKS[:3])}) or a custom task file.")
        unknown = [name for name in self.contestants if name not in CONTESTANTS]
        if unknown or not self.contestants:
            raise UserError(f"contestants must be some of: {', '.join(CONTESTANTS)} (got {self.contestants!r}).")


def benchmark_config_from_dict(data: dict[str, Any]) -> BenchmarkConfig:
    from workspace import config_from_dict

    return config_from_dict(BenchmarkConfig, data, "benchmark config")


# ---------------------------------------------------------------- checks before the job exists


@functools.cache
def task_manager(include_defaults: bool = True):
    """The harness's task registry (indexing its thousands of YAML files takes seconds: once per process, and not
    at all for custom tasks alone)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=include_defaults)


def manager_for(specs: dict[str, str | dict[str, Any]]):
    """The registry the specs need: the harness's own tasks only when one is named."""
    return task_manager(include_defaults=any(isinstance(spec, str) for spec in specs.values()))


def custom_task(path: str | Path) -> dict[str, Any]:
    """A custom task file as the harness's inline config, its relative local data files read beside the file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path)
    try:
        config = load_yaml(path)
    except Exception as exc:  # the harness's YAML loader raises what PyYAML and its includes raise
        raise UserError(f"Custom task file {path} could not be read: {exc}") from exc
    if not isinstance(config.get("task"), str):
        raise UserError(f"Custom task file {path} has no `task:` name; see the harness's task guide for the format.")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {
            split: _beside(path, value) if isinstance(value, str) else value for split, value in files.items()
        }
    elif isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = _beside(path, files)
    return config


def _beside(task_file: Path, data_file: str) -> str:
    """A relative data file's path next to the task file (the harness would read it from the current folder)."""
    return data_file if "://" in data_file or Path(data_file).is_absolute() else str(task_file.parent / data_file)


def task_specs(config: BenchmarkConfig) -> dict[str, str | dict[str, Any]]:
    """{task name: what the harness loads it from}: registry names as they are, the custom file as its config."""
    specs: dict[str, str | dict[str, Any]] = {}
    names = [str(task).strip() for task in config.tasks if str(task).strip()]
    if names:
        known = set(task_manager().all_tasks)
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise UserError(
                    f"Unknown benchmark task '{name}': lm-evaluation-harness {_harness_version()} has no task, group "
                    f"or tag of that name.{hint}"
                )
            specs[name] = name
    if str(config.task_file).strip():
        spec = custom_task(config.task_file)
        specs[spec["task"]] = spec
    return specs


def _harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _offline() -> bool:
    return any(
        os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def check_data(specs: dict[str, str | dict[str, Any]]) -> None:
    """Offline, load each task's data now (from the cache or a local file): one that is not there is refused before
    the job starts. Online the job downloads it."""
    if not _offline():
        return
    for name, spec in specs.items():
        try:
            manager_for(specs).load([spec])
        except Exception as exc:  # datasets raises ConnectionError, FileNotFoundError, ValueError… for missing data
            raise UserError(
                f"Benchmark task '{name}' needs data that is not on this machine and HF_HUB_OFFLINE is set "
                f"({type(exc).__name__}: {str(exc)[:200]}). Run once online to download it, or use a custom task "
                "over a local file."
            ) from exc


def check_benchmark(config: BenchmarkConfig, workspace: str | Path | None = None) -> BenchmarkConfig:
    """The config as the job gets it: the run has a trained model (and a GGUF when asked), every task is known and,
    offline, its data is here; UserError otherwise."""
    config.validate()
    if str(config.task_file).strip():
        path = resolve_user_path(str(config.task_file).strip(), workspace)
        if not path.is_file():
            raise UserError(f"Custom task file {path} not found.")
        config.task_file = str(path)
    specs = task_specs(config)
    trained = runfolder.trained_model(runfolder.run_path(config.run, workspace))
    if "gguf" in config.contestants:
        gguf_file(trained.run_dir, config.gguf)
    check_data(specs)
    return config


def gguf_file(run_dir: Path, name: str = "") -> Path:
    """The run's exported GGUF file `name` (or its first one); UserError when it has none."""
    files = sorted((Path(run_dir) / "gguf").glob("*.gguf"))
    chosen = [path for path in files if path.name == name] if name else files[:1]
    if not chosen:
        wanted = f"no {name} in" if name else "no GGUF file in"
        raise UserError(
            f"Run '{Path(run_dir).name}' has {wanted} gguf/; export it first (Export tab) or leave out gguf."
        )
    return chosen[0]


def benchmark_run_name(config) -> str:
    return f"bench-{Path(str(config.run)).name}"[:80]


# ---------------------------------------------------------------- the job


class _Stopped(Exception):
    """Raised inside the harness's model call when the job is asked to stop, to leave the current task at once."""


@dataclass
class _Pace:
    """Where the job is, for the progress line: task runs done of all, the one being scored and its model calls."""

    done: int
    total: int
    scoring: str = ""
    calls: int = 0
    rows: int = 0  # rows scored by this job so far (all contestants)


def benchmark_job(config: BenchmarkConfig, ctx: runfolder.JobContext) -> str:
    """Score every (contestant, task) pair not scored yet, then write the table; "stopped" when asked to stop."""
    result = run_benchmark(config, ctx.run_dir, ctx.reporter, ctx.stop, ctx.workspace)
    return "stopped" if result is None else "done"


def run_benchmark(
    config: BenchmarkConfig,
    job_dir: Path,
    reporter: runfolder.Reporter | None = None,
    stop: runfolder.StopFlag | None = None,
    workspace: str | Path | None = None,
) -> dict[str, Any] | None:
    """The benchmark table (also written to the job's and the training run's folders); None when stopped."""
    import model_utils

    reporter = reporter or runfolder.Reporter(None)
    stop = stop or runfolder.StopFlag()
    trained = runfolder.trained_model(runfolder.run_path(config.run, workspace or runfolder.run_workspace(job_dir)))
    run_workspace = runfolder.run_workspace(trained.run_dir)
    reporter.start(0, None, "Reading the harness's task registry")
    specs = task_specs(config)
    units = [(contestant, name) for contestant in config.contestants for name in specs]
    folder = Path(job_dir) / RESULTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    done = sum(1 for contestant, name in units if _unit_path(folder, contestant, name).exists())
    pace = _Pace(done, len(units))
    reporter.start(done, len(units), f"{done} of {len(units)} task runs already scored")
    base_path = model_utils.resolve_model_path(trained.base_model, run_workspace) if trained.base_model else None
    for contestant in config.contestants:
        todo = [name for name in specs if not _unit_path(folder, contestant, name).exists()]
        if not todo:
            continue
        if stop.requested:
            return None
        reporter.progress(pace.done, pace.total, f"{contestant}: loading the model")
        with _contestant_model(contestant, trained, base_path, config, run_workspace) as lm:
            _watch_calls(lm, stop, pace, reporter)
            for name in todo:
                pace.scoring, pace.calls = f"{contestant}: {name}", 0
                try:
                    scored = _score(lm, specs[name], config, manager_for(specs))
                except _Stopped:
                    return None
                write_json(_unit_path(folder, contestant, name), scored)
                pace.done += 1
                rows = sum(item.get("effective", 0) for item in scored["n-samples"].values())
                pace.rows += rows
                message = f"{contestant}: {name} scored on {rows} rows"
                reporter.progress(pace.done, pace.total, message, rows=pace.rows)
                if stop.requested:
                    return None
    table = benchmark_table(
        {contestant: _read_units(folder, contestant, specs) for contestant in config.contestants},
        run=trained.run_dir.name,
        base_model=trained.base_model or "",
        limit=config.limit,
    )
    for target in (Path(job_dir), trained.run_dir):
        write_json(target / RESULT_FILE, table)
        atomic_write_text(target / TABLE_FILE, benchmark_markdown(table))
    reporter.progress(len(units), len(units), f"{len(table['rows'])} metrics scored", force=True)
    return table


def _unit_path(folder: Path, contestant: str, task: str) -> Path:
    return folder / f"{contestant}__{task}.json"


def _read_units(folder: Path, contestant: str, specs: dict) -> dict[str, Any]:
    return {name: read_json(_unit_path(folder, contestant, name)) for name in specs}


def _score(lm, spec: str | dict[str, Any], config: BenchmarkConfig, manager) -> dict[str, Any]:
    """One task (or group) scored by the harness: its results, standard errors and row counts."""
    from lm_eval import simple_evaluate

    output = simple_evaluate(
        model=lm,
        tasks=[spec],
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=1000,  # the harness's stderr of non-mean metrics; its default 100000 takes minutes
    )
    return {key: output.get(key, {}) for key in ("results", "n-samples", "higher_is_better", "versions")}


def _watch_calls(lm, stop: runfolder.StopFlag, pace: _Pace, reporter: runfolder.Reporter) -> None:
    """Count the model calls of the task being scored (progress) and stop inside a long task: the harness hands a
    model all of a task's requests in one call, so its per-batch call is the only place to look in between."""
    for name in ("_model_call", "_model_generate", "gguf_completion"):
        if hasattr(lm, name):
            setattr(lm, name, _watched(getattr(lm, name), stop, pace, reporter))


def _watched(call, stop: runfolder.StopFlag, pace: _Pace, reporter: runfolder.Reporter):
    def watched(*args, **kwargs):
        if stop.requested:
            raise _Stopped
        pace.calls += 1
        reporter.progress(pace.done, pace.total, f"{pace.scoring}, {pace.calls} model calls")
        return call(*args, **kwargs)

    return watched


def _gguf_model(base_url: str):
    """The harness's gguf model over llama-cpp-python's server. The harness asks for the context and continuation
    echoed with one generated token and drops the last log-probability as that token's; llama-cpp-python's echo
    holds only the prompt's tokens, so the continuation's last token would be dropped instead (a one-token answer
    would score 0). An empty entry stands in for the generated token; the harness's own scoring does the rest."""
    from lm_eval.models.gguf import GGUFLM

    class LlamaCppServerLM(GGUFLM):
        def gguf_completion(self, context, continuation=None, stop=None, retries=3, delay=5, **kwargs):
            response = super().gguf_completion(context, continuation, stop, retries, delay, **kwargs)
            if continuation:
                for choice in response.get("choices") or []:
                    logprobs = choice.get("logprobs") or {}
                    if logprobs.get("tokens"):
                        logprobs["tokens"].append("")
                        logprobs["token_logprobs"].append(0.0)
                        logprobs["text_offset"].append(len(context) + len(continuation))
                        logprobs["top_logprobs"].append({"": 0.0})
            return response

    return LlamaCppServerLM(base_url=base_url)


class _contestant_model:
    """The harness's model of one contestant, freed (or its llama.cpp server stopped) on exit."""

    def __init__(self, contestant: str, trained, base_path: str | None, config: BenchmarkConfig, workspace: Path):
        self.contestant, self.trained, self.base_path, self.config, self.workspace = (
            contestant,
            trained,
            base_path,
            config,
            workspace,
        )
        self.server = None

    def __enter__(self):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        common = dict(
            batch_size=self.config.batch_size, device=device, trust_remote_code=self.trained.trust_remote_code
        )
        if self.contestant == "gguf":
            import serving

            self.server = serving.start_llama_server(gguf_file(self.trained.run_dir, self.config.gguf), logits_all=True)
            return _gguf_model(self.server.base_url)
        from lm_eval.models.huggingface import HFLM

        if self.trained.kind == "merged" and self.contestant == "tuned":
            return HFLM(pretrained=str(self.trained.path), **common)
        if self.trained.kind == "merged":
            import model_utils

            base = self.trained.train_config.get("model", {}).get("name_or_path") or ""
            return HFLM(pretrained=model_utils.resolve_model_path(base, self.workspace), **common)
        peft = {"peft": str(self.trained.path)} if self.contestant == "tuned" else {}
        return HFLM(pretrained=self.base_path, **peft, **common)

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()
        import gc

        gc.collect()


# ---------------------------------------------------------------- the table


def benchmark_table(scored: dict[str, dict[str, Any]], run: str, base_model: str, limit: int) -> dict[str, Any]:
    """One row per (task, metric): each contestant's value and standard error, and tuned − base where both ran."""
    rows = []
    first = next(iter(scored.values()))
    for unit in first:
        for task, metrics in first[unit]["results"].items():
            higher = first[unit]["higher_is_better"].get(task, {})
            for key in metrics:
                metric, _, filter_name = key.partition(",")
                if not filter_name or metric.endswith("_stderr") or not is_number(metrics[key]):
                    continue
                row = {
                    "task": task,
                    "metric": metric if filter_name == "none" else f"{metric} ({filter_name})",
                    "higher_is_better": higher.get(metric),
                    "rows": (first[unit]["n-samples"].get(task) or {}).get("effective"),
                }
                for contestant, units in scored.items():
                    values = units[unit]["results"].get(task, {})
                    stderr = values.get(f"{metric}_stderr,{filter_name}")
                    row[contestant] = {
                        "value": values.get(key),
                        "stderr": stderr if is_number(stderr) else None,
                    }
                if "base" in scored and "tuned" in scored:
                    base, tuned = row["base"]["value"], row["tuned"]["value"]
                    row["difference"] = tuned - base if is_number(base) and is_number(tuned) else None
                rows.append(row)
    return {
        "run": run,
        "base_model": base_model,
        "contestants": list(scored),
        "limit": limit,
        "harness": f"lm-evaluation-harness {_harness_version()}",
        "rows": rows,
    }
