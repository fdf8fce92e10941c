"""Synthetic datasets: ask an LLM for training rows (llm_clients: OpenAI and any OpenAI-compatible server via
base_url, Anthropic, Ollama), validate each reply, drop duplicates, and append rows to data.jsonl as they arrive.
Running again on the same folder resumes; API keys are read from arguments or the environment only. What a row is and
how one is asked for lives in synthetic_rows."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import llm_clients
import runfolder
import text_duplicates
from synthetic_rows import (
    SYSTEM_PROMPT,
    Rejected,
    SyntheticConfig,
    build_prompt,
    load_document_chunks,
    parse_reply,
    row_schema,
)
from workspace import UserError, config_from_dict, read_json, write_json

log = logging.getLogger(__name__)

DATA_FILE = "data.jsonl"
FINGERPRINT_FILE = "synth_fingerprint.json"
# The settings that shape the rows: a folder's rows are only continued under the same values. Speed, retry, price
# and row-count settings may change between runs (raising num_rows extends a finished dataset).
CONTENT_FIELDS = (
    "provider",
    "model",
    "task",
    "topic",
    "seed_examples",
    "documents",
    "chunk_chars",
    "turns",
    "temperature",
    "max_tokens",
    "response_format",
    "min_chars",
    "max_chars",
    "near_duplicate_threshold",
)
STATUS_INTERVAL_S = 0.5


def synthetic_config_from_dict(data: dict[str, Any]) -> SyntheticConfig:
    return config_from_dict(SyntheticConfig, data, "synthetic data config")


@dataclass
class SynthSummary:
    """Counters of a generation run; the run folder's progress.json holds the latest (as its metrics), totals across
    resumes."""

    state: str  # running, done, stopped or failed
    rows_done: int
    num_rows: int
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    estimated_cost: float | None = None  # USD, when prices are given
    rows_this_run: int = 0
    elapsed_s: float = 0.0  # this run only
    error: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        """One human-readable line: rows, rejects by reason, retries, tokens, cost."""
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(self.rejected_by_reason.items()))
        text = (
            f"{self.rows_done}/{self.num_rows} rows, {self.rejected} rejected{f' ({reasons})' if reasons else ''}, "
            f"{self.retries} retries, {self.tokens_in:,} tokens in / {self.tokens_out:,} out"
        )
        return text + (f", ~${self.estimated_cost:.4f}" if self.estimated_cost is not None else "")


def job_env(config: SyntheticConfig, api_key: str | None = None) -> dict[str, str]:
    """Environment for jobs.start_job carrying the key to the job's process (never written to the run folder)."""
    return llm_clients.job_env(config.client(), api_key)


# ---------------------------------------------------------------- duplicates


normalize_text = text_duplicates.normalize_text  # the form two rows are compared in


class DuplicateIndex:
    """Exact and near duplicates of kept rows, through text_duplicates' MinHash LSH index (datasketch): the same
    test the dataset quality report applies."""

    def __init__(self, threshold: float) -> None:
        self.index = text_duplicates.DuplicateIndex(threshold)
        self.kept = 0

    def check(self, text: str) -> str | None:
        """Why `text` repeats a kept row ("duplicate" or "near_duplicate"), or None when it is new."""
        found = self.index.find(text)
        return found[0] if found else None

    def add(self, text: str) -> None:
        self.index.add(self.kept, text)
        self.kept += 1


def row_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(message["content"] for message in messages)


# ---------------------------------------------------------------- the run


class _Run:
    """The state of one generation: rows written, duplicates index, counters; writes rows and reports progress."""

    def __init__(self, config: SyntheticConfig, out_dir: Path, reporter: runfolder.Reporter, rows: list[list[dict]]):
        self.config = config
        self.out_dir = out_dir
        self.reporter = reporter
        previous = runfolder.read_progress(out_dir).metrics
        self.index = DuplicateIndex(config.near_duplicate_threshold)
        for messages in rows:
            self.index.add(row_text(messages))
        self.summary = SynthSummary(
            state="running",
            rows_done=len(rows),
            num_rows=config.num_rows,
            rejected=int(previous.get("rejected", 0)),
            rejected_by_reason=dict(previous.get("rejected_by_reason", {})),
            retries=int(previous.get("retries", 0)),
            requests=int(previous.get("requests", 0)),
            tokens_in=int(previous.get("tokens_in", 0)),
            tokens_out=int(previous.get("tokens_out", 0)),
        )
        self.started = time.monotonic()
        self.consecutive_rejects: Counter[str] = Counter()
        self.last_reject_text = ""
        self.last_status_write = 0.0
        self.rng = random.Random()
        # Later requests continue the rotation of angles and document chunks where the last run left it.
        self.next_request = self.summary.requests
        self.fd = os.open(out_dir / DATA_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def take_request_number(self) -> int:
        self.next_request += 1
        return self.next_request - 1

    def count_retry(self) -> None:
        self.summary.retries += 1

    def count_reply(self, reply: llm_clients.Reply) -> None:
        self.summary.requests += 1
        self.summary.tokens_in += reply.tokens_in
        self.summary.tokens_out += reply.tokens_out

    def accept(self, reply: llm_clients.Reply) -> None:
        """Validate, filter and deduplicate one reply; a good row is appended to data.jsonl at once."""
        try:
            messages = parse_reply(reply.text, self.config)
            duplicate = self.index.check(row_text(messages))
            if duplicate:
                raise Rejected(duplicate)
        except Rejected as reason:
            self.summary.rejected += 1
            self.summary.rejected_by_reason[str(reason)] = self.summary.rejected_by_reason.get(str(reason), 0) + 1
            self.consecutive_rejects[str(reason)] += 1
            self.last_reject_text = reply.text
            return
        self.consecutive_rejects.clear()
        self.index.add(row_text(messages))
        # One write call per row: a killed process leaves at most one torn last line, which resume cuts off.
        os.write(self.fd, (json.dumps({"messages": messages}, ensure_ascii=False) + "\n").encode())
        self.summary.rows_done += 1
        self.summary.rows_this_run += 1

    def snapshot(self, state: str | None = None) -> SynthSummary:
        summary = self.summary
        if state:
            summary.state = state
        summary.elapsed_s = round(time.monotonic() - self.started, 3)
        prices = (self.config.price_per_million_input, self.config.price_per_million_output)
        if prices[0] is not None and prices[1] is not None:
            summary.estimated_cost = round((summary.tokens_in * prices[0] + summary.tokens_out * prices[1]) / 1e6, 6)
        return summary

    def report(self, force: bool = False) -> None:
        """Counters to the reporter, at most every STATUS_INTERVAL_S unless `force`."""
        now = time.monotonic()
        if force or now - self.last_status_write >= STATUS_INTERVAL_S:
            self.last_status_write = now
            snapshot = self.snapshot()
            self.reporter.progress(
                snapshot.rows_done,
                snapshot.num_rows,
                snapshot.line(),
                force=True,
                **asdict(snapshot),
                rows_per_s=round(snapshot.rows_per_s, 3),
            )

    def close(self) -> None:
        os.close(self.fd)


async def _generate(
    run: _Run,
    client: llm_clients.Client,
    chunks: list[str],
    should_stop: Callable[[], bool],
) -> str:
    config = run.config
    schema = row_schema(config)
    await client.check()
    pending: set[asyncio.Task] = set()
    try:
        while run.summary.rows_done < config.num_rows:
            if should_stop():
                return "stopped"
            # Only as many requests as rows still missing: the last rows do not start surplus (paid) requests.
            while len(pending) < config.concurrency and run.summary.rows_done + len(pending) < config.num_rows:
                prompt = build_prompt(config, run.take_request_number(), chunks, run.rng)
                pending.add(asyncio.create_task(client.complete(prompt, SYSTEM_PROMPT, schema, schema_name="row")))
            finished, pending = await asyncio.wait(pending, timeout=0.25, return_when=asyncio.FIRST_COMPLETED)
            errors = [task.exception() for task in finished if task.exception() is not None]
            if errors:
                raise errors[0]
            for task in finished:
                reply = task.result()
                run.count_reply(reply)
                if run.summary.rows_done < config.num_rows:
                    run.accept(reply)
            if sum(run.consecutive_rejects.values()) >= config.max_consecutive_rejects:
                raise UserError(_rejects_message(run))
            if finished:
                run.report()
        return "done"
    finally:
        await llm_clients.cancel_and_close(pending, client)


def _rejects_message(run: _Run) -> str:
    reason, _ = run.consecutive_rejects.most_common(1)[0]
    what = {
        "invalid_json": "were not valid JSON",
        "wrong_shape": "did not have the asked JSON shape",
        "too_short": "had a turn shorter than min_chars",
        "too_long": "had a turn longer than max_chars",
        "duplicate": "repeated earlier rows",
        "near_duplicate": "nearly repeated earlier rows",
    }[reason]
    snippet = llm_clients.shorten(run.last_reject_text, 200)
    return (
        f"Stopped: the last {sum(run.consecutive_rejects.values())} replies from '{run.config.model}' were "
        f"unusable (most {what}; the last began: {snippet!r}). So far: {run.snapshot().line()}. A stronger "
        "model, another temperature or a clearer topic usually helps; running again resumes."
    )


def _content_settings(config: SyntheticConfig) -> dict[str, Any]:
    values = asdict(config)
    return {name: values[name] for name in CONTENT_FIELDS}


def fingerprint(config: SyntheticConfig) -> str:
    """A hash of the settings that shape rows; rows in a folder are only continued under the same fingerprint."""
    return hashlib.sha256(json.dumps(_content_settings(config), sort_keys=True).encode()).hexdigest()[:16]


def _claim_folder(config: SyntheticConfig, out_dir: Path) -> None:
    """Refuse a folder holding rows of other settings; otherwise record this config's fingerprint there."""
    data = out_dir / DATA_FILE
    stored = read_json(out_dir / FINGERPRINT_FILE)
    has_rows = data.exists() and data.stat().st_size > 0
    if stored is None:
        if has_rows:
            raise UserError(
                f"{out_dir} already holds a {DATA_FILE} that was not generated here; choose an empty folder."
            )
        write_json(
            out_dir / FINGERPRINT_FILE, {"fingerprint": fingerprint(config), "settings": _content_settings(config)}
        )
        return
    if stored.get("fingerprint") != fingerprint(config) and has_rows:
        old, new = stored.get("settings", {}), _content_settings(config)
        changed = [name for name in CONTENT_FIELDS if old.get(name) != new.get(name)]
        raise UserError(
            f"{out_dir} already holds rows generated with other settings (changed: "
            f"{', '.join(changed) or 'unknown'}). Generate into a new folder, or put those settings back "
            "to continue that dataset."
        )
    if stored.get("fingerprint") != fingerprint(config):
        # Counters of the old settings, which made no rows.
        (out_dir / "progress.json").unlink(missing_ok=True)
        write_json(
            out_dir / FINGERPRINT_FILE, {"fingerprint": fingerprint(config), "settings": _content_settings(config)}
        )


def read_rows(out_dir: Path) -> list[list[dict]]:
    """The rows already in data.jsonl; a torn last line (the process was killed mid-write) is cut off."""
    path = Path(out_dir) / DATA_FILE
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        keep = raw.rfind(b"\n") + 1
        log.warning("cutting off a torn last line of %s", path)
        with open(path, "r+b") as handle:
            handle.truncate(keep)
        raw = raw[:keep]
    rows = []
    for number, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line)["messages"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(
                f"{path} line {number} is not a generated row; was the file edited? Fix or remove that line to resume."
            ) from None
    return rows


def generate(
    config: SyntheticConfig,
    out_dir: str | Path,
    api_key: str | None = None,
    reporter: runfolder.Reporter | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SynthSummary:
    """Generate rows into out_dir/data.jsonl until it holds config.num_rows; resumes a folder of the same settings.

    The reporter gets the counters after batches of replies (by default one writing out_dir/progress.json and
    events.jsonl); should_stop is polled to end early
    ("stopped"). Raises UserError for problems a user can fix (server unreachable, unknown model, bad key, a model
    whose replies keep being unusable); rows written so far stay.
    """
    config.validate()
    key = llm_clients.resolve_api_key(config.client(), api_key)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chunks = load_document_chunks(config.documents, config.chunk_chars) if config.task == "documents" else []
    _claim_folder(config, out_dir)
    run = _Run(config, out_dir, reporter or runfolder.Reporter(out_dir), read_rows(out_dir))
    llm_clients.quiet_http_logs()
    log.info(
        "generating %d %s rows with %s model %s (%d already done)",
        config.num_rows,
        config.task,
        config.provider,
        config.model,
        run.summary.rows_done,
    )
    state = "failed"
    try:
        if run.summary.rows_done >= config.num_rows:
            state = "done"
        else:
            client = llm_clients.open_client(config.client(), key, on_retry=run.count_retry)
            state = asyncio.run(_generate(run, client, chunks, should_stop or (lambda: False)))
    except UserError as exc:
        # Every message from the server was cleaned on the way; this catches the key quoted anywhere else (a reply).
        message = llm_clients.redact(str(exc), key)
        if isinstance(exc, llm_clients.ServerBusy):
            message += " The rows so far are saved: resume later."
        run.summary.error = message
        if message != str(exc):
            raise UserError(message) from None
        raise
    finally:
        run.close()
        summary = run.snapshot(state)
        run.report(force=True)
    log.info("%s: %s", state, summary.line())
    return summary


def synth_job(config: SyntheticConfig, ctx: runfolder.JobContext) -> str:
    """The synthetic-data stage's job: the run folder is the output folder; the key comes from the environment."""
    return generate(config, ctx.run_dir, reporter=ctx.reporter, should_stop=ctx.stop).state
