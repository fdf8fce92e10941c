"""The arena: the same prompts through two or more contestants (a base model, training runs with their adapter on,
exported GGUF files through llama.cpp), every pair judged by an LLM in both orders, and a verdict with error bars.

The judge is reached through the synthetic-data stage's provider clients (OpenAI, Anthropic, Ollama, any
OpenAI-compatible server), so timeouts, reply-size caps, redirects, retries and key redaction are handled there.
A run folder holds, besides the usual files:

- `prompts.json`     the prompts (and reference answers), fixed when the job first starts;
- `replies.jsonl`    one line per contestant and prompt, appended as each reply is generated;
- `judgments.jsonl`  one line per pair, prompt and order, appended as the judge answers (resume skips them);
- `report.json`, `report.md`  the verdict, written when every judgement is in.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import runfolder
import stages
import synthetic_utils
from settings import check, option
from workspace import UserError, atomic_write_text, config_from_dict, resolve_user_path, write_json

log = logging.getLogger(__name__)

PROMPT_SOURCES = ("file", "run", "generated")
CONTESTANT_KINDS = ("base", "run", "gguf")
PROMPTS_FILE = "prompts.json"
REPLIES_FILE = "replies.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
GENERATED_DIR = "generated-prompts"
VERDICTS = ("A", "B", "tie")
UNPARSED = "unparsed"
Z_95 = 1.959963984540054
RAW_KEPT_CHARS = 2000  # of a judge's reply, kept beside the verdict for the per-prompt table
REASON_CHARS = 300
GGUF_MAGIC = b"GGUF"

JUDGE_SYSTEM = (
    "You are an impartial judge of AI assistants. You compare two answers to the same user message and decide "
    "which one is better: more helpful, correct, relevant and clear. A longer answer is not better for being long. "
    'Reply with one JSON object and nothing else: {"winner": "A" or "B" or "tie", "reason": "one short sentence"}.'
)
VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"winner": {"type": "string", "enum": list(VERDICTS)}, "reason": {"type": "string"}},
    "required": ["winner", "reason"],
    "additionalProperties": False,
}


@dataclass
class ArenaConfig:
    """Who competes, on which prompts, and who judges. The judge's API key is never a field here."""

    contestants: list[str] = option(
        default_factory=list,
        help="Two or more of: base:MODEL (demo, a Hub id or a folder), run:NAME (a training run, adapter on), "
        "gguf:PATH (an exported GGUF file, through llama.cpp).",
        label="Contestants",
    )
    prompt_source: str = option(
        "file",
        help="file: a prompts file; run: the held-out rows of a training run; generated: written by the judge's model.",
        choices=PROMPT_SOURCES,
        label="Prompts from",
    )
    prompts_file: str = option(
        "",
        help="TXT (one prompt a line), or JSONL / JSON / CSV / Parquet rows with a prompt column or in any dataset "
        "format (the last assistant reply becomes the reference answer).",
        label="Prompts file",
    )
    prompts_run: str = option(
        "", help="The training run whose held-out (eval split) rows are the prompts.", label="Run"
    )
    topic: str = option("", help="What generated prompts are about (prompt_source: generated).", label="Topic")
    max_prompts: int = option(20, help="Use at most this many prompts.", minimum=1, maximum=10000, label="Max prompts")
    system_prompt: str = option("", help="A system turn for every contestant.", label="System prompt", advanced=True)
    max_new_tokens: int = option(
        256, help="The longest reply of a contestant, in tokens.", minimum=1, label="Max tokens"
    )
    temperature: float = option(
        0.0,
        help="Contestants' sampling temperature; 0 = greedy (repeatable).",
        minimum=0,
        maximum=2,
        label="Temperature",
    )
    judge_provider: str = option(
        "openai",
        help="openai also covers vLLM, llama.cpp server and LM Studio (set the judge's base URL).",
        choices=synthetic_utils.PROVIDERS,
        label="Judge provider",
    )
    judge_model: str = option("", help="The judging model, e.g. gpt-4o-mini or claude-sonnet-4-5.", label="Judge model")
    judge_base_url: str = option(
        "", help="Empty: the provider's own API (Ollama: http://localhost:11434).", label="Judge base URL"
    )
    judge_response_format: str = option(
        "json_schema",
        help="json_object for python -m llama_cpp.server; none for servers without JSON modes.",
        choices=synthetic_utils.RESPONSE_FORMATS,
        label="Judge response format",
        advanced=True,
    )
    judge_max_tokens: int = option(
        256, help="The longest verdict.", minimum=16, label="Judge max tokens", advanced=True
    )
    judge_concurrency: int = option(4, help="Judge requests in flight at once.", minimum=1, maximum=64, advanced=True)
    timeout_s: float = option(
        120.0, help="Per judge request.", minimum=0, exclusive_minimum=True, label="Judge timeout (s)", advanced=True
    )
    max_retries: int = option(5, help="Retries per judge request on 429 / 5xx / timeouts.", minimum=0, advanced=True)
    backoff_s: float = option(1.0, help="First retry delay; doubles each retry.", minimum=0, advanced=True)
    max_consecutive_unparsed: int = option(
        20,
        help="Stop when this many verdicts in a row cannot be read (the judge is too weak or answers something else).",
        minimum=1,
        label="Stop after unreadable verdicts in a row",
        advanced=True,
    )

    def validate(self, workspace: str | Path | None = None) -> None:
        """Raise UserError for the first value that cannot work (contestants are checked by check_arena)."""
        check(self)
        if len(self.contestants) < 2:
            raise UserError("An arena needs at least two contestants, e.g. base:demo and run:NAME.")
        if len(set(self.contestants)) != len(self.contestants):
            raise UserError("A contestant is listed twice; list each one once.")
        for contestant in self.contestants:
            parse_contestant(contestant)
        if not str(self.judge_model).strip():
            raise UserError("No judge model given; name the model that judges, e.g. gpt-4o-mini.")
        if self.prompt_source == "file" and not str(self.prompts_file).strip():
            raise UserError("prompt_source is file but no prompts_file is given.")
        if self.prompt_source == "run" and not str(self.prompts_run).strip():
            raise UserError("prompt_source is run but no prompts_run is given; name a run trained with an eval split.")
        if self.prompt_source == "generated" and not str(self.topic).strip():
            raise UserError("Generated prompts need a topic: describe what the prompts should be about.")
        judge_settings(self).validate(workspace)


def arena_config_from_dict(data: dict[str, Any]) -> ArenaConfig:
    return config_from_dict(ArenaConfig, data, "arena config")


# ---------------------------------------------------------------- contestants


def parse_contestant(text: str) -> tuple[str, str]:
    """("base" | "run" | "gguf", what) from "kind:what"."""
    kind, sep, what = str(text).partition(":")
    if not sep or kind not in CONTESTANT_KINDS or not what.strip():
        raise UserError(
            f"Contestant '{text}' is not KIND:WHAT with KIND one of {', '.join(CONTESTANT_KINDS)} "
            "(e.g. base:demo, run:train-20261201-101500, gguf:/path/model.q4_k_m.gguf)."
        )
    return kind, what.strip()


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


def contestant_label(contestant: str) -> str:
    """A short name for tables: the run's or file's name."""
    kind, what = parse_contestant(contestant)
    return f"{kind}:{Path(what).name if kind in ('run', 'gguf') else what}"


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


@dataclass
class Prompt:
    """One prompt: the conversation up to the reply asked for, and the data's own reply when it has one."""

    id: int
    messages: list[dict]
    reference: str = ""

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]


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
    from train_config import prepare_training_data

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
    settings = judge_settings(config)
    settings.topic = config.topic
    settings.num_rows = config.max_prompts
    settings.max_tokens = max(settings.max_tokens, 1024)
    settings.temperature = 0.8
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


# ---------------------------------------------------------------- the judge


def judge_settings(config: ArenaConfig) -> synthetic_utils.SyntheticConfig:
    """The judge as the synthetic-data stage's client settings (provider, model, URL, timeouts, retries)."""
    return synthetic_utils.SyntheticConfig(
        provider=config.judge_provider,
        model=config.judge_model,
        base_url=config.judge_base_url,
        topic="judging answers",
        response_format=config.judge_response_format,
        temperature=0.0,
        max_tokens=config.judge_max_tokens,
        concurrency=config.judge_concurrency,
        timeout_s=config.timeout_s,
        max_retries=config.max_retries,
        backoff_s=config.backoff_s,
    )


def job_env(config: ArenaConfig, api_key: str | None = None) -> dict[str, str]:
    """Environment for jobs.start_job carrying the judge's key to the job's process (never to the run folder)."""
    return synthetic_utils.job_env(judge_settings(config), api_key)


def judge_prompt(prompt: Prompt, first: str, second: str) -> str:
    """What the judge reads: the conversation, the reference when there is one, answers A and B."""
    conversation = "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in prompt.messages)
    reference = f"[Reference answer]\n{prompt.reference}\n\n" if prompt.reference.strip() else ""
    return (
        f"[Conversation]\n{conversation}\n\n{reference}[Answer A]\n{first or '(empty)'}\n\n"
        f"[Answer B]\n{second or '(empty)'}\n\n"
        'Which answer is better? Reply with JSON only: {"winner": "A" | "B" | "tie", "reason": "one short sentence"}'
    )


def _judge_class(provider: str) -> type:
    """The synthetic-data client of `provider`, asking with the judge's system prompt and verdict schema.

    synthetic_utils' clients send its data-writing system prompt and row schema; only complete() differs here, so
    the connection, size caps, redirect checks, error classification and retries stay theirs."""
    base = synthetic_utils.PROVIDER_CLASSES[provider]

    class Judge(base):
        async def complete(self, prompt: str) -> synthetic_utils.Reply:
            return await _COMPLETE[provider](self, prompt)

    return Judge


async def _complete_openai(client: Any, prompt: str) -> synthetic_utils.Reply:
    config = client.config
    official = synthetic_utils.is_official(config)
    options: dict[str, Any] = {"max_completion_tokens" if official else "max_tokens": config.max_tokens}
    if config.response_format == "json_schema":
        options["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True},
        }
    elif config.response_format == "json_object":
        # llama-cpp-python's server turns an attached schema into a grammar; OpenAI's API takes no such key.
        options["response_format"] = {"type": "json_object", **({} if official else {"schema": VERDICT_SCHEMA})}
    response = await client.client.chat.completions.create(
        model=config.model,
        temperature=config.temperature,
        messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
        **options,
    )
    return synthetic_utils.openai_reply(response)


async def _complete_anthropic(client: Any, prompt: str) -> synthetic_utils.Reply:
    config = client.config
    options: dict[str, Any] = {}
    if config.response_format == "json_schema":
        options["output_config"] = {"format": {"type": "json_schema", "schema": VERDICT_SCHEMA}}
    response = await client.client.messages.create(
        model=config.model,
        max_tokens=config.max_tokens,
        system=JUDGE_SYSTEM,
        messages=[{"role": "user", "content": prompt}],
        **options,
    )
    return synthetic_utils.anthropic_reply(response)


async def _complete_ollama(client: Any, prompt: str) -> synthetic_utils.Reply:
    import pydantic

    config = client.config
    output_format = {"json_schema": VERDICT_SCHEMA, "json_object": "json", "none": None}[config.response_format]
    try:
        response = await client.client.chat(
            model=config.model,
            stream=False,
            format=output_format,
            messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}],
            options={"temperature": config.temperature, "num_predict": config.max_tokens},
        )
    except pydantic.ValidationError:
        raise synthetic_utils.not_a_chat_reply("message") from None
    return synthetic_utils.Reply(
        response.message.content or "", response.prompt_eval_count or 0, response.eval_count or 0
    )


_COMPLETE = {"openai": _complete_openai, "anthropic": _complete_anthropic, "ollama": _complete_ollama}


def judge_client(config: ArenaConfig, api_key: str | None):
    settings = judge_settings(config)
    return _judge_class(config.judge_provider)(settings, synthetic_utils.resolve_api_key(settings, api_key))


def parse_verdict(text: str) -> tuple[str, str]:
    """("A" | "B" | "tie" | "unparsed", the one-line reason) from a judge's reply; never raises."""
    text = str(text or "")
    for match in re.finditer(r"\{[^{}]*\}", text, re.S):
        try:
            data = json.loads(match.group(0))
        except ValueError:
            continue
        winner = _winner(data.get("winner", data.get("verdict"))) if isinstance(data, dict) else None
        if winner:
            return winner, synthetic_utils.shorten(str(data.get("reason") or ""), REASON_CHARS)
    found = re.search(
        r"\b(?:winner|verdict|better answer)\b\W{0,4}(?:is\s+)?(?:answer\s+)?\[{0,2}(A|B|tie)\b", text, re.I
    )
    if found:
        reason = re.search(r"\breason\b\W{0,4}(.+)", text, re.I)
        return _winner(found.group(1)) or UNPARSED, synthetic_utils.shorten(reason.group(1) if reason else "", 300)
    return UNPARSED, ""


def _winner(value: Any) -> str | None:
    value = str(value or "").strip().strip("[]\"' .").lower()
    return {"a": "A", "answer a": "A", "b": "B", "answer b": "B", "tie": "tie", "draw": "tie"}.get(value)


# ---------------------------------------------------------------- the job


def check_arena(config: ArenaConfig, workspace: str | Path | None = None) -> ArenaConfig:
    """Validate and resolve a config before a job exists: contestants found, prompts file there, key present."""
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
    api_key = synthetic_utils.resolve_api_key(judge_settings(config), None)
    try:
        return _run_arena(config, ctx, api_key)
    except UserError as exc:
        message = synthetic_utils.redact(str(exc), api_key)
        if message != str(exc):
            raise UserError(message) from None
        raise


def _run_arena(config: ArenaConfig, ctx: runfolder.JobContext, api_key: str | None) -> str:
    run_dir, reporter = ctx.run_dir, ctx.reporter
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    reporter.start(0, None, f"Checking the judge {config.judge_model}")
    asyncio.run(_check_judge(config, api_key))  # a wrong URL or key fails now, not after the replies
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


async def _check_judge(config: ArenaConfig, api_key: str | None) -> None:
    client = judge_client(config, api_key)
    try:
        await client.check()
    finally:
        await client.close()


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
    client = judge_client(config, api_key)
    retries = SimpleNamespace(summary=SimpleNamespace(retries=0))  # what synthetic_utils' retry loop counts into
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
        reply = await synthetic_utils.request(client, text, retries)
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
                    f'(no {{"winner": "A" | "B" | "tie"}}; the last began: {synthetic_utils.shorten(last_raw, 160)!r}). '
                    "Use a stronger judge model, or response_format json_schema / json_object; resuming keeps the "
                    "verdicts so far."
                )
        return "done"
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await client.close()


# ---------------------------------------------------------------- the verdict


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (ties count as half a success); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def prompt_outcome(records: list[dict], a: str) -> float | None:
    """a's score on one prompt against one rival: the mean of its two orders' verdicts (win 1, tie ½, loss 0), so
    a judge that always prefers the first answer scores a tie; None when neither verdict could be read."""
    scores = [1.0 if r["winner"] == a else 0.5 if r["winner"] == "tie" else 0.0 for r in records if r["winner"]]
    return sum(scores) / len(scores) if scores else None


def build_report(config: ArenaConfig, prompts: list[Prompt], replies: dict, judged: dict) -> dict[str, Any]:
    """Counts, win rates with 95 % Wilson intervals, a ranking, reference metrics and the per-prompt table."""
    contestants = config.contestants
    pairs, totals = [], {c: {"wins": 0, "ties": 0, "losses": 0} for c in contestants}
    for a, b in combinations(contestants, 2):
        wins = ties = losses = unparsed = flipped = 0
        for prompt in prompts:
            records = [judged[(a, b, prompt.id, order)] for order in ("ab", "ba") if (a, b, prompt.id, order) in judged]
            score = prompt_outcome(records, a)
            if score is None:
                unparsed += 1
                continue
            wins, ties, losses = wins + (score > 0.5), ties + (score == 0.5), losses + (score < 0.5)
            read = [r["winner"] for r in records if r["winner"]]
            flipped += len(read) == 2 and read[0] != read[1]
        n = wins + ties + losses
        low, high = wilson_interval(wins + ties / 2, n)
        pairs.append(
            {
                "a": a,
                "b": b,
                "wins": wins,
                "ties": ties,
                "losses": losses,
                "unparsed": unparsed,
                "order_disagreements": flipped,
                "win_rate": round((wins + ties / 2) / n, 4) if n else None,
                "ci95": [round(low, 4), round(high, 4)],
            }
        )
        for name, (w, loss) in ((a, (wins, losses)), (b, (losses, wins))):
            totals[name]["wins"] += w
            totals[name]["losses"] += loss
            totals[name]["ties"] += ties
    ranking = []
    for name, counts in totals.items():
        n = counts["wins"] + counts["ties"] + counts["losses"]
        low, high = wilson_interval(counts["wins"] + counts["ties"] / 2, n)
        ranking.append(
            {
                "contestant": name,
                **counts,
                "score": round((counts["wins"] + counts["ties"] / 2) / n, 4) if n else None,
                "ci95": [round(low, 4), round(high, 4)],
                **speed(name, prompts, replies),
            }
        )
    ranking.sort(key=lambda row: -1 if row["score"] is None else row["score"], reverse=True)
    table = [
        {
            "prompt": prompt.id,
            "text": prompt.text,
            "reference": prompt.reference,
            "replies": {c: replies[(c, prompt.id)]["reply"] for c in contestants},
            "judgments": [
                {key: r[key] for key in ("a", "b", "order", "verdict", "winner", "reason")}
                for a, b in combinations(contestants, 2)
                for order in ("ab", "ba")
                if (r := judged.get((a, b, prompt.id, order)))
            ],
        }
        for prompt in prompts
    ]
    judgments = list(judged.values())
    return {
        "contestants": contestants,
        "judge": {"provider": config.judge_provider, "model": config.judge_model, "base_url": config.judge_base_url},
        "prompts": len(prompts),
        "prompt_source": config.prompt_source,
        "judgments": len(judgments),
        "unparsed_judgments": sum(1 for r in judgments if r["verdict"] == UNPARSED),
        "pairs": pairs,
        "ranking": ranking,
        "reference_metrics": reference_metrics(contestants, prompts, replies),
        "per_prompt": table,
    }


def speed(contestant: str, prompts: list[Prompt], replies: dict) -> dict[str, float]:
    records = [replies[(contestant, prompt.id)] for prompt in prompts]
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {
        "reply_tokens": tokens,
        "reply_seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
    }


def reference_metrics(contestants: list[str], prompts: list[Prompt], replies: dict) -> dict[str, dict] | None:
    """BLEU and chrF (sacrebleu) and ROUGE-L F1 (rouge-score) of each contestant's replies against the data's own
    answers, over the prompts that have one; None when none has."""
    with_reference = [prompt for prompt in prompts if prompt.reference.strip()]
    if not with_reference:
        return None
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    references = [prompt.reference for prompt in with_reference]
    metrics = {}
    for contestant in contestants:
        hypotheses = [replies[(contestant, prompt.id)]["reply"] for prompt in with_reference]
        rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, hypotheses, strict=True)]
        metrics[contestant] = {
            "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "rougeL": round(100 * sum(rouge) / len(rouge), 2),
            "prompts": len(with_reference),
        }
    return metrics


def verdict_line(report: dict[str, Any]) -> str:
    """One line: the leader and its score, or each pair's counts."""
    parts = []
    for pair in report["pairs"]:
        rate = f"{pair['win_rate']:.0%}" if pair["win_rate"] is not None else "–"
        parts.append(
            f"{contestant_label(pair['a'])} vs {contestant_label(pair['b'])}: {pair['wins']}-{pair['ties']}-"
            f"{pair['losses']} ({rate})"
        )
    return "; ".join(parts) + (f"; {report['unparsed_judgments']} unparsed" if report["unparsed_judgments"] else "")


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: pairs, ranking, reference metrics, every prompt with its replies and reasons."""
    label = contestant_label
    judge = report["judge"]
    lines = [
        "# Arena report",
        "",
        f"{report['prompts']} prompts ({report['prompt_source']}), {len(report['contestants'])} contestants, judge "
        f"{judge['provider']}:{judge['model']}; {report['judgments']} judgements ({report['unparsed_judgments']} "
        "unparsed). Each prompt is judged in both orders; a prompt's outcome is the mean of the two (win 1, tie ½, "
        "loss 0), so verdicts that flip with the order count as a tie. Intervals: 95 % Wilson, ties as half a win.",
        "",
        "## Pairs",
        "",
        "| A | B | A wins | ties | B wins | unparsed | order flips | A's win rate | 95 % CI |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pair in report["pairs"]:
        low, high = pair["ci95"]
        lines.append(
            f"| {_cell(label(pair['a']))} | {_cell(label(pair['b']))} | {pair['wins']} | {pair['ties']} | "
            f"{pair['losses']} | {pair['unparsed']} | {pair['order_disagreements']} | {_percent(pair['win_rate'])} | "
            f"{100 * low:.1f}–{100 * high:.1f} % |"
        )
    lines += [
        "",
        "## Ranking (win rate against all others)",
        "",
        "| # | contestant | wins | ties | losses | score | 95 % CI | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for place, row in enumerate(report["ranking"], 1):
        low, high = row["ci95"]
        lines.append(
            f"| {place} | {_cell(label(row['contestant']))} | {row['wins']} | {row['ties']} | {row['losses']} | "
            f"{_percent(row['score'])} | {100 * low:.1f}–{100 * high:.1f} % | {row['tokens_per_s']:.1f} |"
        )
    if report["reference_metrics"]:
        lines += [
            "",
            "## Against the reference answers",
            "",
            "| contestant | BLEU | chrF | ROUGE-L | prompts |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, values in report["reference_metrics"].items():
            lines.append(
                f"| {_cell(label(name))} | {values['bleu']:.2f} | {values['chrf']:.2f} | {values['rougeL']:.2f} | "
                f"{values['prompts']} |"
            )
    names = report["contestants"]
    lines += [
        "",
        "## Per prompt",
        "",
        "| # | prompt | " + " | ".join(_cell(label(name)) for name in names) + " | verdicts (order: reason) |",
        "|---:|---|" + "---|" * len(names) + "---|",
    ]
    for row in report["per_prompt"]:
        verdicts = "<br>".join(
            f"{label(j['a'])} vs {label(j['b'])} [{j['order']}]: "
            f"{label(j['winner']) if j['winner'] and j['winner'] != 'tie' else j['winner'] or UNPARSED}"
            f"{' — ' + j['reason'] if j['reason'] else ''}"
            for j in row["judgments"]
        )
        cells = [_cell(row["replies"][name]) for name in names]
        lines.append(f"| {row['prompt'] + 1} | {_cell(row['text'])} | " + " | ".join(cells) + f" | {_cell(verdicts)} |")
    return "\n".join(lines) + "\n"
