"""The arena: the same prompts through two or more contestants (a base model, training runs with their adapter on,
exported GGUF files through llama.cpp), every pair judged by an LLM in both orders, and a verdict with error bars.

The judge is reached through llm_clients (OpenAI, Anthropic, Ollama, any OpenAI-compatible server), so timeouts,
reply-size caps, redirects, retries and key redaction are handled there. The settings, contestants and prompts are
arena_config's; what the judge reads and how its verdict is read, arena_judge's; the statistics and the report,
arena_report's. A run folder holds, besides the usual files:

- `prompts.json`     the prompts (and reference answers), fixed when the job first starts;
- `replies.jsonl`    one line per contestant and prompt, appended as each reply is generated;
- `judgments.jsonl`  one line per pair, prompt and order, appended as the judge answers (resume skips them);
- `report.json`, `report.md`  the verdict, written when every judgement is in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict
from itertools import combinations
from pathlib import Path
from typing import Any

import llm_clients
import runfolder
import stages
import synthetic_utils
from arena_config import ArenaConfig, Prompt, contestant_label, parse_contestant
from arena_judge import JUDGE_SYSTEM, RAW_KEPT_CHARS, UNPARSED, VERDICT_SCHEMA, judge_prompt, parse_verdict
from arena_report import build_report, report_markdown, verdict_line
from workspace import UserError, atomic_write_text, config_from_dict, resolve_user_path, write_json

log = logging.getLogger(__name__)

PROMPTS_FILE = "prompts.json"
REPLIES_FILE = "replies.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GENERATED_DIR = "generated-prompts"
GGUF_MAGIC = b"GGUF"


def arena_config_from_dict(data: dict[str, Any]) -> ArenaConfig:
    return config_from_dict(ArenaConfig, data, "arena config")


# ---------------------------------------------------------------- contestants


def check_contestants(config: ArenaConfig, workspace: str | Path | None = None) -> list[str]:
    """The contestants with run folders and GGUF files made absolute; UserError for one that cannot be found."""
    resolved = []
    for contestant in config.contestants:
        kind, what = parse_contestant(contestant)
        if kind == "run":
            run_dir = runfolder.run_path(what, workspace)
            stages.causal_lm(run_dir)  # UserError for a run without an adapter / merged model that generates text
            what = str(run_dir.resolve())
        elif kind == "gguf":
            path = resolve_user_path(what, workspace)
            if not path.is_file() or path.suffix.lower() != ".gguf":
                raise UserError(f"Contestant '{contestant}': {path} is not a .gguf file.")
            with open(path, "rb") as handle:
                if handle.read(4) != GGUF_MAGIC:
                    raise UserError(f"Contestant '{contestant}': {path} is not a GGUF file (no GGUF header).")
            what = str(path)
        resolved.append(f"{kind}:{what}")
    return resolved


class Contestant:
    """One contestant's model in memory; reply(messages) returns its whole reply (greedy by default)."""

    def __init__(self, contestant: str, config: ArenaConfig, workspace: Path) -> None:
        self.contestant = contestant
        self.config = config
        kind, what = parse_contestant(contestant)
        self.kind = kind
        try:
            if kind == "gguf":
                self.model = self._load_gguf(Path(what))
            else:
                import inference_utils

                self.model = inference_utils.load_chat_model(
                    what if kind == "base" else None, what if kind == "run" else None, workspace
                )
        except UserError as exc:
            raise UserError(f"Contestant '{contestant}' could not be loaded: {exc}") from None
        except Exception as exc:  # transformers, PEFT and llama.cpp raise many types for a broken model
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UserError(
                f"Contestant '{contestant}' could not be loaded ({type(exc).__name__}: {first}). Check the model, "
                "run or file, or leave it out."
            ) from None

    @staticmethod
    def _load_gguf(path: Path):
        from llama_cpp import Llama

        from gguf_utils.check import llama_threads

        return Llama(model_path=str(path), n_ctx=2048, n_threads=llama_threads(), verbose=False)

    def reply(self, messages: list[dict]) -> tuple[str, int]:
        """(reply text, tokens generated)."""
        config = self.config
        if config.system_prompt.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": config.system_prompt.strip()}, *messages]
        if self.kind == "gguf":
            response = self.model.create_chat_completion(
                messages=messages,
                max_tokens=config.max_new_tokens,
                temperature=config.temperature,
                top_p=1.0 if config.temperature == 0 else 0.9,
            )
            text = response["choices"][0]["message"]["content"] or ""
            return text.strip(), int(response.get("usage", {}).get("completion_tokens", 0))
        import inference_utils

        generation = inference_utils.GenerationConfig(
            temperature=config.temperature, top_p=0.9, max_new_tokens=config.max_new_tokens
        )
        text = ""
        for text in inference_utils.stream_chat(self.model, messages, generation):  # noqa: B007 - the last is whole
            pass
        tokens = len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        return text.strip(), tokens


# ---------------------------------------------------------------- prompts


def prompts_from_file(path: str | Path, workspace: str | Path | None = None) -> list[Prompt]:
    """Prompts from a TXT file (one a line) or dataset rows (a prompt column, or any format the Dataset tab reads)."""
    import dataset_utils

    path = resolve_user_path(path, workspace)
    if path.suffix.lower() == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [Prompt(index, [{"role": "user", "content": line}]) for index, line in enumerate(lines)]
    rows = dataset_utils.load_local_file(path)
    columns = rows.column_names
    if "prompt" in columns and "completion" not in columns:
        return [
            Prompt(index, [{"role": "user", "content": str(row["prompt"])}], str(row.get("reference") or ""))
            for index, row in enumerate(rows)
            if str(row["prompt"] or "").strip()
        ]
    fmt = dataset_utils.detect_format(columns)
    if fmt == "text":
        raise UserError(f"{path.name} holds plain text rows, not prompts; give prompts or conversations.")
    fields = dataset_utils.resolve_columns(columns, fmt, {})
    return [
        conversation_prompt(index, dataset_utils.row_to_messages(row, fmt, fields)) for index, row in enumerate(rows)
    ]


def conversation_prompt(index: int, messages: list[dict]) -> Prompt:
    """A conversation ending with an assistant reply as a prompt (everything before it) and its reference."""
    return Prompt(index, messages[:-1], messages[-1]["content"])


def prompts_from_run(run: str, workspace: str | Path | None = None) -> list[Prompt]:
    """The held-out rows of a training run, as its training split them (matched back to their source rows)."""
    import dataset_utils
    import inference_utils
    import model_utils
    from dataset_utils import prepare_training_data

    trained, train_config = inference_utils.trained_run(run, workspace)
    if not train_config.eval_split:
        raise UserError(
            f"Run '{trained.run_dir.name}' was trained with eval_split 0, so it has no held-out rows; give a prompts "
            "file instead, or a run trained with an eval split."
        )
    run_workspace = runfolder.run_workspace(trained.run_dir)
    model_path = model_utils.resolve_model_path(train_config.model.name_or_path, run_workspace)
    tokenizer = model_utils.load_tokenizer(model_path, train_config.model.trust_remote_code)
    prepared = prepare_training_data(train_config, tokenizer, run_workspace)
    # The prepared split holds token ids only: find each held-out row's source conversation by its rendered text.
    raw = dataset_utils.load_rows(train_config.dataset, run_workspace)
    fmt = prepared.format
    if fmt == "text":
        raise UserError(
            f"Run '{trained.run_dir.name}' trained on plain text, which has no prompts; give a prompts file."
        )
    fields = dataset_utils.resolve_columns(raw.column_names, fmt, train_config.dataset.column_map)
    rendered = {}
    for row in raw:
        try:
            messages = dataset_utils.row_to_messages(row, fmt, fields, train_config.dataset.system_prompt)
        except UserError:
            continue
        rendered[dataset_utils.render_chat(messages, tokenizer)] = messages
    prompts = []
    for row in prepared.eval:
        text = tokenizer.decode(row["input_ids"], clean_up_tokenization_spaces=False)
        messages = rendered.get(text) or next((m for t, m in rendered.items() if t.startswith(text)), None)
        if messages is not None:
            prompts.append(conversation_prompt(len(prompts), messages))
    if not prompts:
        raise UserError(f"The held-out rows of run '{trained.run_dir.name}' could not be matched to its dataset.")
    return prompts


def generated_prompts(config: ArenaConfig, run_dir: Path, api_key: str | None) -> list[Prompt]:
    """Instructions (and reference responses) written by the judge's model, through the synthetic-data stage."""
    judge = config.judge_client()
    settings = synthetic_utils.SyntheticConfig(
        **{**asdict(judge), "max_tokens": max(judge.max_tokens, 1024), "temperature": 0.8},
        topic=config.topic,
        num_rows=config.max_prompts,
        concurrency=config.judge_concurrency,
    )
    out_dir = run_dir / GENERATED_DIR
    synthetic_utils.generate(settings, out_dir, api_key=api_key)
    return [conversation_prompt(index, messages) for index, messages in enumerate(synthetic_utils.read_rows(out_dir))]


def load_prompts(config: ArenaConfig, run_dir: Path, api_key: str | None) -> list[Prompt]:
    """The arena's prompts: read once and kept in prompts.json, so a resumed job asks about the same ones."""
    saved = run_dir / PROMPTS_FILE
    if saved.exists():
        return [Prompt(**item) for item in json.loads(saved.read_text(encoding="utf-8"))]
    workspace = runfolder.run_workspace(run_dir)
    if config.prompt_source == "file":
        prompts = prompts_from_file(config.prompts_file, workspace)
    elif config.prompt_source == "run":
        prompts = prompts_from_run(config.prompts_run, workspace)
    else:
        prompts = generated_prompts(config, run_dir, api_key)
    prompts = [prompt for prompt in prompts if prompt.messages and prompt.text.strip()][: config.max_prompts]
    if not prompts:
        raise UserError(f"No prompts found in the {config.prompt_source} source; check it holds user messages.")
    prompts = [Prompt(index, prompt.messages, prompt.reference) for index, prompt in enumerate(prompts)]
    write_json(saved, [asdict(prompt) for prompt in prompts])
    return prompts


def job_env(config: ArenaConfig, api_key: str | None = None) -> dict[str, str]:
    """Environment for jobs.start_job carrying the judge's key to the job's process (never to the run folder)."""
    return llm_clients.job_env(config.judge_client(), api_key)


# ---------------------------------------------------------------- judges the user already has

# What a judge of a few hundred million parameters is worth, said wherever one is offered.
SMALL_JUDGE_NOTE = (
    "A small local judge (under a few billion parameters) often misreads the task or prefers the longer answer: "
    "its verdicts are weak evidence. The arena asks it in both orders and counts what it cannot read as unparsed; "
    "use the largest model you have."
)
LLAMA_SERVER_PORT = 8000  # python -m llama_cpp.server's default


def ollama_models(base_url: str = llm_clients.OLLAMA_DEFAULT_URL, timeout_s: float = 1.0) -> list[str]:
    """The models a local Ollama serves (GET /api/tags), or [] when none answers there within timeout_s."""
    import httpx

    try:
        response = httpx.get(f"{base_url.rstrip('/')}/api/tags", timeout=timeout_s)
        response.raise_for_status()
        return sorted(str(model["name"]) for model in response.json().get("models", []) if "name" in model)
    except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError):
        return []


def run_ggufs(workspace: str | Path | None = None) -> list[Path]:
    """The GGUF files exported into run folders: each can judge through llama.cpp's server."""
    return sorted(runfolder.runs_dir(workspace).glob("*/gguf/*.gguf"))


def llama_server_command(gguf: Path, port: int = LLAMA_SERVER_PORT) -> str:
    """The command that serves a GGUF file as an OpenAI-compatible judge (llama-cpp-python's server), the model
    named by the file's stem (the server lists that name, which the judge check looks for)."""
    return f"python -m llama_cpp.server --model {gguf} --model_alias {gguf.stem} --port {port}"


def local_judges(workspace: str | Path | None = None, ollama_url: str = llm_clients.OLLAMA_DEFAULT_URL) -> list[dict]:
    """Judges the user already has, each as the ArenaConfig settings that use it ({label, settings, start}: start
    is the command to run first, empty when the judge is already served): a local Ollama's models, and each run's
    GGUF file through llama-cpp-python's server."""
    found = [
        {
            "label": f"Ollama: {name}",
            "settings": {"judge_provider": "ollama", "judge_model": name, "judge_base_url": ollama_url},
            "start": "",
        }
        for name in ollama_models(ollama_url)
    ]
    for gguf in run_ggufs(workspace):
        found.append(
            {
                "label": f"GGUF: {gguf.parent.parent.name}/{gguf.name}",
                "settings": {
                    "judge_provider": "openai",
                    "judge_model": gguf.stem,
                    "judge_base_url": f"http://127.0.0.1:{LLAMA_SERVER_PORT}/v1",
                    "judge_response_format": "json_object",  # the server's grammar holds the verdict's shape
                },
                "start": llama_server_command(gguf),
            }
        )
    return found


# ---------------------------------------------------------------- the job


def check_arena(config: ArenaConfig, workspace: str | Path | None = None) -> ArenaConfig:
    """Validate and resolve a config before a job exists: contestants found, prompts file there."""
    config.validate(workspace)
    config.contestants = check_contestants(config, workspace)
    if config.prompt_source == "file":
        config.prompts_file = str(resolve_user_path(config.prompts_file, workspace))
    if config.prompt_source == "run":
        import inference_utils

        trained, train_config = inference_utils.trained_run(config.prompts_run, workspace)
        if not train_config.eval_split:
            raise UserError(
                f"Run '{trained.run_dir.name}' was trained with eval_split 0, so it has no held-out rows; give a "
                "prompts file instead, or a run trained with an eval split."
            )
        config.prompts_run = str(trained.run_dir.resolve())
    return config


def check_judge(config: ArenaConfig, api_key: str | None = None) -> None:
    """The judge answering before a job exists: nothing listening, a refused key or an unknown model is refused now,
    not by the job. Checked last, after the local checks, since it asks a server."""
    judge = config.judge_client()
    llm_clients.check_server(judge, llm_clients.resolve_api_key(judge, api_key))


def _read_lines(path: Path) -> list[dict]:
    """The records of a JSONL file appended one write per line; a torn last line (a killed job) is cut off."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep != len(raw):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return [json.loads(line) for line in raw[:keep].decode("utf-8").splitlines() if line.strip()]


def _append(path: Path, record: dict) -> None:
    # One write call per record: a killed job leaves at most one torn last line, which the next read cuts off.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, ensure_ascii=False) + "\n").encode())
    finally:
        os.close(fd)


def judgment_key(record: dict) -> tuple[str, str, int, str]:
    return record["a"], record["b"], record["prompt"], record["order"]


def arena_job(config: ArenaConfig, ctx: runfolder.JobContext) -> str:
    """The arena stage's job: check the judge, generate the replies, judge every pair both ways, write the report."""
    import model_utils

    model_utils.select_backend()  # before transformers/peft are imported: Unsloth patches them
    api_key = llm_clients.resolve_api_key(config.judge_client(), None)
    try:
        return _run_arena(config, ctx, api_key)
    except UserError as exc:
        message = llm_clients.redact(str(exc), api_key)
        if isinstance(exc, llm_clients.ServerBusy):
            message += " The verdicts so far are saved: resume later."
        if message != str(exc):
            raise UserError(message) from None
        raise


def _run_arena(config: ArenaConfig, ctx: runfolder.JobContext, api_key: str | None) -> str:
    run_dir, reporter = ctx.run_dir, ctx.reporter
    llm_clients.quiet_http_logs()
    reporter.start(0, None, f"Checking the judge {config.judge_model}")
    llm_clients.check_server(config.judge_client(), api_key)  # a wrong URL or key fails now, not after the replies
    prompts = load_prompts(config, run_dir, api_key)
    pairs = list(combinations(config.contestants, 2))
    total = len(config.contestants) * len(prompts) + 2 * len(pairs) * len(prompts)
    replies = {(r["contestant"], r["prompt"]): r for r in _read_lines(run_dir / REPLIES_FILE)}
    judged = {judgment_key(r): r for r in _read_lines(run_dir / JUDGMENTS_FILE)}
    done = len(replies) + len(judged)
    reporter.start(done, total, f"{len(prompts)} prompts, {len(config.contestants)} contestants, {len(pairs)} pairs")
    for contestant in config.contestants:
        missing = [prompt for prompt in prompts if (contestant, prompt.id) not in replies]
        if not missing:
            continue
        if ctx.stop.requested:
            return "stopped"
        reporter.progress(done, total, f"loading {contestant_label(contestant)}", force=True)
        model = Contestant(contestant, config, ctx.workspace)
        for prompt in missing:
            if ctx.stop.requested:
                return "stopped"
            started = time.monotonic()
            text, tokens = model.reply(prompt.messages)
            seconds = time.monotonic() - started
            record = {"contestant": contestant, "prompt": prompt.id, "reply": text, "tokens": tokens}
            record.update(seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0)
            _append(run_dir / REPLIES_FILE, record)
            replies[(contestant, prompt.id)] = record
            done += 1
            reporter.progress(done, total, f"{contestant_label(contestant)} answered prompt {prompt.id + 1}")
        del model
    outcome = asyncio.run(_judge_all(config, ctx, api_key, prompts, pairs, replies, judged, done, total))
    if outcome == "stopped":
        return outcome
    report = build_report(config, prompts, replies, judged)
    write_json(run_dir / REPORT_JSON, report)
    atomic_write_text(run_dir / REPORT_MD, report_markdown(report))
    reporter.progress(total, total, verdict_line(report), force=True)
    log.info("arena done: %s", verdict_line(report))
    return "done"


async def _judge_all(
    config: ArenaConfig,
    ctx: runfolder.JobContext,
    api_key: str | None,
    prompts: list[Prompt],
    pairs: list[tuple[str, str]],
    replies: dict,
    judged: dict,
    done: int,
    total: int,
) -> str:
    """Ask the judge about every (pair, prompt, order) not yet in judgments.jsonl; each answer is appended at once."""
    client = llm_clients.open_client(config.judge_client(), api_key)
    todo = [
        (a, b, prompt, order)
        for prompt in prompts
        for a, b in pairs
        for order in ("ab", "ba")
        if (a, b, prompt.id, order) not in judged
    ]
    unparsed_in_row, last_raw = 0, ""

    async def ask(a: str, b: str, prompt: Prompt, order: str) -> dict:
        first, second = (a, b) if order == "ab" else (b, a)
        text = judge_prompt(prompt, replies[(first, prompt.id)]["reply"], replies[(second, prompt.id)]["reply"])
        reply = await client.complete(text, JUDGE_SYSTEM, VERDICT_SCHEMA, schema_name="verdict")
        verdict, reason = parse_verdict(reply.text)
        winner = {"A": first, "B": second, "tie": "tie"}.get(verdict)
        return {
            "a": a,
            "b": b,
            "prompt": prompt.id,
            "order": order,
            "verdict": verdict,
            "winner": winner,
            "reason": reason,
            "raw": reply.text[:RAW_KEPT_CHARS],
        }

    pending: set[asyncio.Task] = set()
    try:
        while todo or pending:
            if ctx.stop.requested:
                return "stopped"
            while todo and len(pending) < config.judge_concurrency:
                pending.add(asyncio.create_task(ask(*todo.pop(0))))
            finished, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                record = task.result()
                _append(ctx.run_dir / JUDGMENTS_FILE, record)
                judged[judgment_key(record)] = record
                done += 1
                if record["verdict"] == UNPARSED:
                    unparsed_in_row, last_raw = unparsed_in_row + 1, record["raw"]
                else:
                    unparsed_in_row = 0
                unparsed = sum(1 for item in judged.values() if item["verdict"] == UNPARSED)
                ctx.reporter.progress(
                    done, total, f"judged {len(judged)} of {2 * len(pairs) * len(prompts)}", unparsed=unparsed
                )
            if unparsed_in_row >= config.max_consecutive_unparsed:
                raise UserError(
                    f"Stopped: the last {unparsed_in_row} replies of the judge '{config.judge_model}' held no verdict "
                    f'(no {{"winner": "A" | "B" | "tie"}}; the last began: {llm_clients.shorten(last_raw, 160)!r}). '
                    "Use a stronger judge model, or response_format json_schema / json_object; resuming keeps the "
                    "verdicts so far."
                )
        return "done"
    finally:
        await llm_clients.cancel_and_close(pending, client)
