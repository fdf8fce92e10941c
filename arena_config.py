"""The arena's settings and the things it works on: ArenaConfig (who competes, on which prompts, who judges),
contestants written KIND:WHAT, and prompts. The job is arena_utils; the judge arena_judge; the verdict arena_report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import llm_clients
from settings import check, option
from workspace import UserError

PROMPT_SOURCES = ("file", "run", "generated")
CONTESTANT_KINDS = ("base", "run", "gguf")


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
        choices=llm_clients.PROVIDERS,
        label="Judge provider",
    )
    judge_model: str = option("", help="The judging model, e.g. gpt-4o-mini or claude-sonnet-4-5.", label="Judge model")
    judge_base_url: str = option(
        "", help="Empty: the provider's own API (Ollama: http://localhost:11434).", label="Judge base URL"
    )
    judge_response_format: str = option(
        "json_schema",
        help="json_object for python -m llama_cpp.server; none for servers without JSON modes.",
        choices=llm_clients.RESPONSE_FORMATS,
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

    def judge_client(self) -> llm_clients.ClientConfig:
        """The judge's client settings (provider, model, URL, timeouts, retries; temperature 0)."""
        return llm_clients.ClientConfig(
            provider=self.judge_provider,
            model=self.judge_model,
            base_url=self.judge_base_url,
            response_format=self.judge_response_format,
            temperature=0.0,
            max_tokens=self.judge_max_tokens,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
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
        self.judge_client().validate()


def parse_contestant(text: str) -> tuple[str, str]:
    """("base" | "run" | "gguf", what) from "kind:what"."""
    kind, sep, what = str(text).partition(":")
    if not sep or kind not in CONTESTANT_KINDS or not what.strip():
        raise UserError(
            f"Contestant '{text}' is not KIND:WHAT with KIND one of {', '.join(CONTESTANT_KINDS)} "
            "(e.g. base:demo, run:train-20261201-101500, gguf:/path/model.q4_k_m.gguf)."
        )
    return kind, what.strip()


def contestant_label(contestant: str) -> str:
    """A short name for tables: the run's or file's name."""
    kind, what = parse_contestant(contestant)
    return f"{kind}:{Path(what).name if kind in ('run', 'gguf') else what}"


@dataclass
class Prompt:
    """One prompt: the conversation up to the reply asked for, and the data's own reply when it has one."""

    id: int
    messages: list[dict]
    reference: str = ""

    @property
    def text(self) -> str:
        return self.messages[-1]["content"]
