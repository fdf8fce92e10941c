"""The dataset quality report: duplicates (exact, and near through datasketch's MinHash LSH), empty replies, rows the
template drops, rows cut at max_seq_length, token-length percentiles, train/eval prompt leakage and the mix of
formats and scripts; every figure carries the row numbers behind it (1-based, as in the preparation's messages).
Also the cleaned copy of a file: duplicates and empty replies dropped, the original untouched."""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataset_files import DatasetConfig, load_rows, read_rows
from dataset_formats import detect_format, row_to_messages
from dataset_render import ensure_chat_template
from dataset_utils import (
    DEFAULT_MAX_SEQ_LENGTH,
    DEFAULT_SEED,
    PreparedDataset,
    encode_source,
    preparation_settings,
    split_train_eval,
)
from text_duplicates import DuplicateIndex, normalize_text
from workspace import UserError, atomic_write_text, workspace_root

log = logging.getLogger(__name__)

SHOWN_ROWS = 20  # row numbers printed per line of the text form; the JSON form has them all


# ---------------------------------------------------------------- the report


@dataclass
class DatasetReport:
    """Figures about one dataset; each list holds 1-based row numbers."""

    source: str
    format: str
    rows: int
    max_seq_length: int
    duplicates: list[int] = field(default_factory=list)  # exact repeats of an earlier row (the first is kept)
    near_duplicates: list[int] = field(default_factory=list)
    duplicate_of: dict[int, int] = field(default_factory=dict)  # row → the earlier row it repeats
    empty_replies: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # row → why the template / preparation drops it
    truncated: list[int] = field(default_factory=list)
    reply_tokens: int = 0
    reply_tokens_lost: int = 0
    lengths: dict[str, int] = field(default_factory=dict)  # p50, p95, p99, max (tokens)
    longest_row: int = 0
    usable_rows: int = 0
    eval_split: float = 0.0
    leaked: list[int] = field(default_factory=list)  # eval rows whose prompt a train row also has
    formats: dict[str, list[int]] = field(default_factory=dict)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lost_share(self) -> float:
        return self.reply_tokens_lost / self.reply_tokens if self.reply_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "lost_share": round(self.lost_share, 4)}

    def lines(self) -> list[str]:
        """The report as plain text lines, for the CLI and the training log."""
        out = [f"dataset report: {self.source} ({self.format}, {self.rows} rows, {self.usable_rows} usable)"]
        out.append(f"exact duplicates: {_count(self.duplicates)}")
        out.append(f"near duplicates: {_count(self.near_duplicates)}")
        out.append(f"empty replies: {_count(self.empty_replies)}")
        reasons = Counter(self.dropped.values())
        out.append(f"rows the template drops: {_count(sorted(self.dropped))}")
        out += [f"  {count} × {reason}" for reason, count in reasons.most_common(5)]
        out.append(
            f"rows cut at max_seq_length {self.max_seq_length}: {_count(self.truncated)}; "
            f"reply tokens lost: {self.reply_tokens_lost} of {self.reply_tokens} ({self.lost_share:.1%})"
        )
        if self.lengths:
            out.append(
                "token lengths: "
                + ", ".join(f"{name} {value}" for name, value in self.lengths.items())
                + f" (longest: row {self.longest_row})"
            )
        if self.eval_split:
            out.append(f"eval prompts also in train (leakage): {_count(self.leaked)}")
        for title, mix in (("formats", self.formats), ("scripts", self.scripts)):
            if len(mix) > 1:
                out.append(
                    f"{title} mixed: " + "; ".join(f"{name} {_share(rows, self.rows)}" for name, rows in mix.items())
                )
        out += [f"note: {note}" for note in self.notes]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())


def _count(rows: list[int]) -> str:
    if not rows:
        return "0"
    shown = ", ".join(str(row) for row in rows[:SHOWN_ROWS])
    more = f", … {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    return f"{len(rows)} (rows {shown}{more})"


def _share(rows: list[int], total: int) -> str:
    return f"{len(rows) / total:.0%} ({_count(rows)})"


def report_for_training(config, tokenizer, workspace: str | Path | None = None) -> DatasetReport:
    """The report of a TrainConfig's dataset, prepared with the settings its training run uses."""
    return build_report(config.dataset, tokenizer, workspace=workspace, **preparation_settings(config))


def report_of_preparation(config, prepared: PreparedDataset) -> DatasetReport:
    """The report of a training job's dataset from the job's own preparation (prepare_dataset with
    preparation_settings(config)): its rendered and tokenized rows are counted, not prepared a second time."""
    source = prepared.source if prepared.source is not None else read_rows(config.dataset, prepared.local)
    prepared.source = None  # only the report reads the rows as read: the job trains on the prepared ones
    return _report(
        config.dataset,
        source,
        prepared.format,
        prepared.fields,
        prepared.outcomes,
        config.max_seq_length,
        config.eval_split,
        config.seed,
    )


def build_report(
    config: DatasetConfig,
    tokenizer,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    train_on_responses_only: bool = True,
    eval_split: float = 0.0,
    seed: int = DEFAULT_SEED,
    workspace: str | Path | None = None,
) -> DatasetReport:
    """The report for the rows prepare_dataset would read, rendered and tokenized as it does (dataset_utils.
    encode_source) but neither filtered, split nor cached: a dataset whose every row is dropped gets its report."""
    raw = load_rows(config, workspace)
    if config.chat_template:
        ensure_chat_template(tokenizer, config.chat_template)
    rows = encode_source(config, tokenizer, raw, max_seq_length, train_on_responses_only)
    return _report(config, raw, rows.format, rows.fields, rows.encoded, max_seq_length, eval_split, seed)


def _report(
    config: DatasetConfig,
    raw,
    fmt: str,
    fields: dict[str, str],
    outcomes,
    max_seq_length: int,
    eval_split: float,
    seed: int,
) -> DatasetReport:
    """The figures of the rows as read (`raw`) and what became of each when it was rendered and tokenized
    (`outcomes`: dataset_utils.OUTCOMES, one per row)."""
    report = DatasetReport(str(config.source), fmt, len(raw), max_seq_length, eval_split=eval_split)
    if len(raw) < 2:
        report.notes.append(f"only {len(raw)} row: too few for duplicates, an eval split or a useful run.")
    errors = list(outcomes["error"])
    index = DuplicateIndex()
    prompts: dict[int, str] = {}
    for number, row in enumerate(raw, start=1):
        _mix(report, number, row, config.column_map)
        text, prompt, reply = _row_parts(row, fmt, fields, config.system_prompt)
        if fmt != "text" and reply is not None and not reply.strip():
            report.empty_replies.append(number)
        if text is not None:
            found = index.find(text)
            if found:
                kind, first = found
                (report.duplicates if kind == "duplicate" else report.near_duplicates).append(number)
                report.duplicate_of[number] = first
            else:
                index.add(number, text)
        if errors[number - 1]:  # the template refuses the row
            if number not in report.empty_replies:
                report.dropped[number] = errors[number - 1]
            continue
        prompts[number] = normalize_text(prompt or "")
    _measure_tokens(report, sorted(prompts), outcomes)
    if eval_split and report.usable_rows >= 2:
        _leakage(report, sorted(prompts), prompts, eval_split, seed)
    elif eval_split:
        report.notes.append("eval_split needs at least 2 usable rows; leakage not measured.")
    return report


def report_of_measured(
    config: DatasetConfig,
    fmt: str,
    measured: list[dict | str],
    max_seq_length: int,
    eval_split: float = 0.0,
    seed: int = DEFAULT_SEED,
) -> DatasetReport:
    """The report of preference or prompt rows (preference_data.measure_rows: per row why it cannot train, or its
    texts and token counts): duplicates, empty sides, rows cut, leakage, and the lengths of each prompt with its
    longer reply (what the trainer's max_length cuts); prompts alone where the replies are generated (GRPO)."""
    import numpy as np

    report = DatasetReport(str(config.source), fmt, len(measured), max_seq_length, eval_split=eval_split)
    if len(measured) < 2:
        report.notes.append(f"only {len(measured)} row: too few for duplicates, an eval split or a useful run.")
    index, prompts, lengths = DuplicateIndex(), {}, {}
    for number, row in enumerate(measured, start=1):
        if isinstance(row, str):
            # preference_data names an empty side "… is empty": counted with the SFT report's empty replies
            if " is empty" in row:
                report.empty_replies.append(number)
            else:
                report.dropped[number] = row
            continue
        found = index.find(row["text"])
        if found:
            kind, earlier = found
            (report.duplicates if kind == "duplicate" else report.near_duplicates).append(number)
            report.duplicate_of[number] = earlier
        else:
            index.add(number, row["text"])
        replies, room = row["reply_tokens"], max(0, max_seq_length - row["prompt_tokens"])
        lengths[number] = row["prompt_tokens"] + max(replies, default=0)
        report.reply_tokens += sum(replies)
        report.reply_tokens_lost += sum(max(0, reply - room) for reply in replies)
        if lengths[number] > max_seq_length:
            report.truncated.append(number)
        if replies and room == 0:
            report.dropped[number] = "the prompt alone fills max_seq_length: no reply token is left to train"
            continue
        prompts[number] = normalize_text(row["prompt"])
    report.usable_rows = len(prompts)
    if lengths:
        values = np.percentile(list(lengths.values()), [50, 95, 99])
        report.lengths = {
            "p50": int(np.ceil(values[0])),
            "p95": int(np.ceil(values[1])),
            "p99": int(np.ceil(values[2])),
            "max": max(lengths.values()),
        }
        report.longest_row = max(lengths, key=lengths.get)
    if fmt == "prompts":
        report.notes.append("lengths are the prompts': GRPO generates the replies (max_completion_length).")
    if eval_split and report.usable_rows >= 2:
        _leakage(report, sorted(prompts), prompts, eval_split, seed)
    elif eval_split:
        report.notes.append("eval_split needs at least 2 usable rows; leakage not measured.")
    return report


def _row_parts(
    row: dict, fmt: str, fields: dict[str, str], system_prompt: str
) -> tuple[str | None, str | None, str | None]:
    """(the row's whole text, its prompt, its last reply), read leniently: a row the template refuses still
    counts for duplicates and empty replies."""
    if fmt == "text":
        value = row.get(fields["text"])
        return (value if isinstance(value, str) else None), None, None
    try:
        messages = row_to_messages(row, fmt, fields, system_prompt)
    except UserError:
        messages = _lenient_messages(row, fmt, fields)
    if not messages:
        return None, None, None
    prompt = "\n".join(m["content"] for m in messages if m["role"] != "assistant")
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    return "\n".join(m["content"] for m in messages), prompt, replies[-1] if replies else None


def _lenient_messages(row: dict, fmt: str, fields: dict[str, str]) -> list[dict]:
    def text(name: str) -> str:
        value = row.get(fields.get(name, ""))
        return value if isinstance(value, str) else ""

    if fmt == "alpaca":
        return [{"role": "user", "content": text("instruction")}, {"role": "assistant", "content": text("output")}]
    if fmt == "prompt_completion":
        return [{"role": "user", "content": text("prompt")}, {"role": "assistant", "content": text("completion")}]
    turns = row.get(fields.get("messages" if fmt == "messages" else "conversations", ""))
    messages = []
    for turn in turns if isinstance(turns, list) else []:
        if isinstance(turn, dict):
            role = turn.get("role", turn.get("from", ""))
            content = turn.get("content", turn.get("value", ""))
            role = "assistant" if role in ("assistant", "gpt", "model") else role
            messages.append({"role": role, "content": content if isinstance(content, str) else ""})
    return messages


def _measure_tokens(report: DatasetReport, numbers: list[int], outcomes) -> None:
    """Token figures of the rendered rows (`numbers`), from their token counts whole and before the cut."""
    import numpy as np

    tokens, trained, kept = list(outcomes["tokens"]), list(outcomes["trained"]), list(outcomes["kept"])
    lengths = []
    for number in numbers:
        row = number - 1
        report.reply_tokens += trained[row]
        report.reply_tokens_lost += trained[row] - kept[row]
        lengths.append(tokens[row])
        if tokens[row] > report.max_seq_length:
            report.truncated.append(number)
        if kept[row] == 0:
            report.dropped[number] = "every trained token is past max_seq_length"
        else:
            report.usable_rows += 1
    if lengths:
        values = np.percentile(lengths, [50, 95, 99])
        report.lengths = {
            "p50": int(np.ceil(values[0])),
            "p95": int(np.ceil(values[1])),
            "p99": int(np.ceil(values[2])),
            "max": max(lengths),
        }
        report.longest_row = numbers[int(np.argmax(lengths))]


def _leakage(report, numbers, prompts, eval_split, seed) -> None:
    """The eval rows prepare_dataset would hold out (the same split of the same usable rows) whose prompt a
    train row also has."""
    import datasets

    usable = [n for n in numbers if n not in report.dropped]
    train, evaluation = split_train_eval(datasets.Dataset.from_dict({"row": usable}), eval_split, seed)
    train_prompts = {prompts[n] for n in train["row"] if prompts[n]}
    report.leaked = sorted(n for n in evaluation["row"] if prompts[n] and prompts[n] in train_prompts)


def _mix(report: DatasetReport, number: int, row: dict, column_map: dict[str, str]) -> None:
    filled = [key for key, value in row.items() if value not in (None, "", [])]
    try:
        fmt = detect_format(filled, column_map)
    except UserError:
        fmt = "unknown"
    report.formats.setdefault(fmt, []).append(number)
    report.scripts.setdefault(script_of(_all_text(row)), []).append(number)


def _all_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return " ".join(_all_text(item) for item in value.values())
    if isinstance(value, list):
        return " ".join(_all_text(item) for item in value)
    return ""


def script_of(text: str) -> str:
    """The Unicode script most of the text's letters belong to (LATIN, CYRILLIC, CJK, …), or 'none'."""
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            counts[name.split(" ")[0] if name else "OTHER"] += 1
    return counts.most_common(1)[0][0].lower() if counts else "none"


# ---------------------------------------------------------------- the cleaned copy


def write_cleaned_copy(
    config: DatasetConfig, report: DatasetReport, workspace: str | Path | None = None
) -> tuple[Path, int]:
    """(path, rows written): a JSONL copy under <workspace>/data/ without the report's duplicates (exact and near;
    the first of each kept) and empty replies. The source is only read."""
    drop = set(report.duplicates) | set(report.near_duplicates) | set(report.empty_replies)
    raw = load_rows(config, workspace)
    kept = [row for number, row in enumerate(raw, start=1) if number not in drop]
    if not kept:
        raise UserError("Every row is a duplicate or has an empty reply: the cleaned copy would be empty.")
    stem = re.sub(r"[^\w.-]+", "_", Path(str(config.source)).stem) or "dataset"
    target = workspace_root(workspace) / "data" / f"{stem}.cleaned.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in kept))
    log.info("cleaned copy: %s (%d of %d rows, %d dropped)", target, len(kept), len(raw), len(drop))
    return target, len(kept)
