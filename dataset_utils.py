"""Dataset preparation: the rows of a dataset (dataset_files) in their format (dataset_formats), rendered with the
chat template and tokenized with loss masks (dataset_render), filtered, split and cached; and the preview of what
is trained. The rest of the app imports the dataset API from here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataset_files import (
    DEFAULT_MAX_SEQ_LENGTH,
    DEFAULT_SEED,
    LOCAL_SUFFIXES,
    DatasetConfig,
    check_data_file,
    is_hub_dataset,
    load_local_file,
    load_rows,
    local_file,
    parse_jsonl,
    preview_hub_rows,
    read_rows,
)
from dataset_formats import (
    FORMAT_FIELDS,
    FORMATS,
    as_text,
    detect_format,
    resolve_columns,
    row_to_messages,
    suggest_column_map,
)
from dataset_render import (
    BUILTIN_TEMPLATES,
    CHATML_TEMPLATE,
    UNCUT,
    ChatTurns,
    assistant_spans,
    chat_turns,
    control_pattern,
    encode_rows,
    ensure_chat_template,
    fast_turns,
    render_chat,
    render_row,
    spans_from_turns,
)
from workspace import UserError, workspace_root

# The dataset API the app imports from this module (defined in the three modules above, or here).
__all__ = [
    "BUILTIN_TEMPLATES",
    "CHATML_TEMPLATE",
    "DEFAULT_MAX_SEQ_LENGTH",
    "DEFAULT_SEED",
    "FORMATS",
    "FORMAT_FIELDS",
    "LOCAL_SUFFIXES",
    "ChatTurns",
    "DatasetConfig",
    "EncodedRows",
    "PreparedDataset",
    "as_text",
    "assistant_spans",
    "chat_turns",
    "control_pattern",
    "detect_format",
    "encode_rows",
    "encode_source",
    "ensure_chat_template",
    "fast_turns",
    "format_segments",
    "is_hub_dataset",
    "load_local_file",
    "load_rows",
    "local_file",
    "loss_segments",
    "parse_jsonl",
    "prepare_dataset",
    "preview_hub_rows",
    "read_rows",
    "render_chat",
    "render_row",
    "resolve_columns",
    "row_to_messages",
    "spans_from_turns",
    "split_train_eval",
    "suggest_column_map",
]

log = logging.getLogger(__name__)

PREPARE_VERSION = "4"  # bump when the prepared layout changes, so old caches are not reused
# What became of each source row (EncodedRows.encoded): why it cannot be rendered ("" when it can), its tokens and
# trained tokens whole, and the trained tokens before the cut at max_seq_length. The dataset report reads them.
OUTCOMES = ("error", "tokens", "trained", "kept")


@dataclass
class PreparedDataset:
    """Tokenized rows ready for the trainer, and what was learned about the source on the way."""

    train: Any  # datasets.Dataset with input_ids, labels
    eval: Any | None
    format: str
    source_rows: int
    dropped_rows: int
    cache_hit: bool
    cache_dir: Path
    # What the dataset report reads (dataset_report.report_of_preparation), so a job prepares its rows once:
    outcomes: Any = None  # datasets.Dataset of OUTCOMES, one row per source row (cached with the prepared rows)
    fields: dict[str, str] = field(default_factory=dict)  # format field -> column
    source: Any = None  # the rows as read, every column; None on a cache hit (read_rows(config, local) reads them)
    local: Path | None = None  # the resolved data file; None for a Hub dataset


@dataclass
class EncodedRows:
    """Every source row rendered and tokenized: input_ids / labels cut at max_seq_length, text, OUTCOMES and usable."""

    source: Any  # the rows as read, every column (datasets.Dataset)
    format: str
    fields: dict[str, str]  # format field -> column
    encoded: Any  # datasets.Dataset, one row per source row


def prepare_dataset(
    config: DatasetConfig,
    tokenizer,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    train_on_responses_only: bool = True,
    eval_split: float = 0.0,
    seed: int = DEFAULT_SEED,
    workspace: str | Path | None = None,
    num_proc: int | None = None,
) -> PreparedDataset:
    """Load → detect → map → render → tokenize → filter → split; the result is cached under the workspace."""
    if not 0 <= eval_split < 1:
        raise UserError("eval_split must be a fraction between 0 (no evaluation) and 1, e.g. 0.1.")
    config.validate()
    if config.chat_template:
        ensure_chat_template(tokenizer, config.chat_template)
    # A local file is keyed by its bytes, so a cached preparation is found without parsing the file again.
    local = local_file(config, workspace)
    if local is not None:
        check_data_file(local)  # before hashing it: reading a named pipe would never end
    raw = None if local is not None else read_rows(config, None)
    key = _cache_key(config, local, raw, tokenizer, max_seq_length, train_on_responses_only, eval_split, seed)
    cache_dir = workspace_root(workspace) / "cache" / "datasets" / key
    if (cache_dir / "done.json").exists():
        return _load_prepared(cache_dir, local)

    rows = encode_source(
        config,
        tokenizer,
        raw if raw is not None else read_rows(config, local),
        max_seq_length,
        train_on_responses_only,
        num_proc,
    )
    encoded, read = rows.encoded, len(rows.source)
    errors = [index for index, message in enumerate(encoded["error"]) if message]
    keep = [index for index, usable in enumerate(encoded["usable"]) if usable]
    usable = encoded.select(keep, keep_in_memory=True).remove_columns(["usable", *OUTCOMES])
    if len(usable) == 0:
        reason = (
            f" First problem: {_problem(encoded, errors[0])}"
            if errors
            else " Every row lost its trained tokens to truncation; raise max_seq_length."
        )
        raise UserError(f"No usable rows in the dataset after filtering ({read} rows read).{reason}")
    if errors:
        log.warning("%d of %d rows skipped; first problem: %s", len(errors), read, _problem(encoded, errors[0]))

    train, evaluation = split_train_eval(usable, eval_split, seed)
    outcomes = encoded.select_columns(list(OUTCOMES))
    meta = {"source_rows": read, "dropped_rows": read - len(usable), "format": rows.format, "fields": rows.fields}
    _save_prepared(cache_dir, train, evaluation, outcomes, meta)
    return PreparedDataset(
        train,
        evaluation,
        rows.format,
        read,
        read - len(usable),
        False,
        cache_dir,
        outcomes,
        rows.fields,
        rows.source,
        local,
    )


def _problem(encoded, index: int) -> str:
    return f"Row {index + 1}: {encoded[index]['error']}"


def _load_prepared(cache_dir: Path, local: Path | None) -> PreparedDataset:
    import datasets

    meta = json.loads((cache_dir / "done.json").read_text())
    train = datasets.load_from_disk(str(cache_dir / "train"))
    evaluation = datasets.load_from_disk(str(cache_dir / "eval")) if (cache_dir / "eval").exists() else None
    outcomes = datasets.load_from_disk(str(cache_dir / "outcomes"))
    return PreparedDataset(
        train,
        evaluation,
        meta["format"],
        meta["source_rows"],
        meta["dropped_rows"],
        True,
        cache_dir,
        outcomes,
        meta["fields"],
        None,
        local,
    )


def encode_source(
    config: DatasetConfig,
    tokenizer,
    raw,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    train_on_responses_only: bool = True,
    num_proc: int | None = None,
) -> EncodedRows:
    """Detect → map → render → tokenize every row as read (`raw`, from read_rows), keeping what became of each
    (OUTCOMES): the preparation filters and splits them, the dataset report counts them. A template chosen in the
    config is applied by the caller first (prepare_dataset: before its cache key)."""
    column_map = suggest_column_map(raw.column_names, config.column_map)
    fmt = config.format if config.format != "auto" else detect_format(raw.column_names, column_map)
    suggested = {key: value for key, value in column_map.items() if key in FORMAT_FIELDS[fmt]}
    fields = resolve_columns(raw.column_names, fmt, {**suggested, **config.column_map})
    # Every step below costs more per column (see dataset_files._check_column_count); only the format's columns are
    # read.
    rows = raw.select_columns(list(dict.fromkeys(fields.values())))
    turns = None
    if fmt != "text":
        ensure_chat_template(tokenizer)
        if train_on_responses_only:
            turns = fast_turns(_sample_conversations(rows, fmt, fields, config.system_prompt), tokenizer)
    # Rendering is Python work: a second process pays off on large datasets only (start-up and pickling cost).
    processes = num_proc if num_proc is not None else (min(4, os.cpu_count() or 1) if len(rows) >= 20000 else None)
    encoded = rows.map(
        _encode_batch,
        batched=True,
        with_indices=True,
        batch_size=1000,
        num_proc=processes,
        remove_columns=rows.column_names,
        fn_kwargs={
            "fmt": fmt,
            "fields": fields,
            "tokenizer": tokenizer,
            "max_seq_length": max_seq_length,
            "train_on_responses_only": train_on_responses_only,
            "system_prompt": config.system_prompt,
            "turns": turns,
        },
        desc="Rendering and tokenizing",
        load_from_cache_file=False,
        keep_in_memory=True,
    )
    return EncodedRows(raw, fmt, fields, encoded)


def _encode_batch(
    batch: dict[str, list],
    indices: list[int],
    fmt: str,
    fields: dict[str, str],
    tokenizer,
    max_seq_length: int,
    train_on_responses_only: bool,
    system_prompt: str,
    turns: ChatTurns | None,
) -> dict[str, list]:
    size = len(indices)
    texts, spans, ranges, errors = [""] * size, [None] * size, [[] for _ in range(size)], [""] * size
    pattern = control_pattern(tokenizer)
    for index in range(size):
        row = {key: values[index] for key, values in batch.items()}
        try:
            texts[index], spans[index], ranges[index] = render_row(
                row, fmt, fields, tokenizer, train_on_responses_only, system_prompt, turns, pattern
            )
        except UserError as exc:
            errors[index] = str(exc)
    good = [index for index in range(size) if not errors[index]]
    # Tokenized whole, then cut: the tokens a cut at max_seq_length loses are counted (the tokenizer's own
    # truncation keeps the same first tokens).
    encoded = dict(
        zip(
            good,
            encode_rows(
                [texts[i] for i in good],
                [spans[i] for i in good],
                tokenizer,
                UNCUT,
                [ranges[i] for i in good],
            ),
            strict=True,
        )
    )
    empty: dict[str, list] = {"input_ids": [], "labels": []}
    whole = [encoded.get(index, empty) for index in range(size)]
    cut = [row["labels"][:max_seq_length] for row in whole]
    kept = [len(labels) - labels.count(-100) for labels in cut]
    return {
        "input_ids": [row["input_ids"][:max_seq_length] for row in whole],
        "labels": cut,
        "text": texts,
        "error": errors,
        "tokens": [len(row["input_ids"]) for row in whole],
        "trained": [len(row["labels"]) - row["labels"].count(-100) for row in whole],
        "kept": kept,
        # A row whose trained tokens were all cut off by truncation teaches nothing.
        "usable": [not errors[i] and kept[i] > 0 for i in range(size)],
    }


def _sample_conversations(raw, fmt: str, fields: dict[str, str], system_prompt: str, count: int = 64) -> list:
    """Up to `count` readable conversations from the start of the rows, to check the template shortcut on."""
    conversations = []
    for row in raw.select(range(min(count, len(raw)))):
        try:
            conversations.append(row_to_messages(row, fmt, fields, system_prompt))
        except UserError:
            continue  # reported with its row when the rows are encoded
    return conversations


def split_train_eval(dataset, eval_split: float, seed: int):
    """(train, eval) with `eval_split` of the rows held out (at least one), or (dataset, None)."""
    if not eval_split:
        return dataset, None
    if len(dataset) < 2:
        raise UserError("eval_split needs at least 2 usable rows; set it to 0 or add rows.")
    eval_rows = max(1, round(len(dataset) * eval_split))
    parts = dataset.train_test_split(test_size=eval_rows, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def _cache_key(
    config: DatasetConfig,
    local: Path | None,
    raw,
    tokenizer,
    max_seq_length: int,
    train_on_responses_only: bool,
    eval_split: float,
    seed: int,
) -> str:
    """A key for everything the prepared rows depend on: the data (a local file's bytes, a Hub dataset's
    fingerprint), the options and the tokenizer."""
    parts = {
        "version": PREPARE_VERSION,
        "config": json.dumps(config.__dict__, sort_keys=True),
        "template": tokenizer.chat_template or "",
        "vocab": len(tokenizer),
        "tokenizer": tokenizer.name_or_path,
        "eos": tokenizer.eos_token or "",
        "max_seq_length": max_seq_length,
        "responses_only": train_on_responses_only,
        "eval_split": eval_split,
        "seed": seed,
    }
    if local is not None:
        parts["file"] = _file_digest(local)
    else:
        parts["data"] = raw._fingerprint
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def _file_digest(path: Path) -> str:
    """The file's content hash (BLAKE2: about 1 s per GB here), or '' for a path that is not a readable file (the
    preparation then reports it)."""
    digest = hashlib.blake2b(digest_size=20)
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _save_prepared(cache_dir: Path, train, evaluation, outcomes, meta: dict) -> None:
    from workspace import atomic_dir

    with atomic_dir(cache_dir) as tmp:
        train.save_to_disk(str(tmp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(tmp / "eval"))
        outcomes.save_to_disk(str(tmp / "outcomes"))
        (tmp / "done.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- preview


def loss_segments(input_ids: list[int], labels: list[int], tokenizer) -> list[tuple[str, bool]]:
    """The example as (text, trained?) runs, merging neighbouring tokens of the same kind."""
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    trained_run = None
    for token, label in zip(input_ids, labels, strict=True):
        trained = label != -100
        if trained_run is not None and trained != trained_run:
            segments.append((tokenizer.decode(run), trained_run))
            run = []
        run.append(token)
        trained_run = trained
    if run:
        segments.append((tokenizer.decode(run), bool(trained_run)))
    return segments


def format_segments(segments: list[tuple[str, bool]]) -> str:
    """Plain-text form for terminals: trained text between ⟦ and ⟧."""
    return "".join(f"⟦{text}⟧" if trained else text for text, trained in segments)


def preparation_settings(config) -> dict[str, Any]:
    """A TrainConfig's dataset preparation settings: training prepares with them, and the report reads the same."""
    return dict(
        max_seq_length=config.max_seq_length,
        train_on_responses_only=config.train_on_responses_only,
        eval_split=config.eval_split,
        seed=config.seed,
    )


def prepare_training_data(config, tokenizer, workspace: Path):
    """The SFT rows of a run, train and eval split, prepared with the settings the dataset report reads too: the
    training job, the Dataset tab's preview, evaluation and the arena's references get the same rows."""
    prepared = prepare_dataset(config.dataset, tokenizer, workspace=workspace, **preparation_settings(config))
    log.info(
        "dataset: %s, %d train rows, %d eval rows, %d skipped",
        prepared.format,
        len(prepared.train),
        len(prepared.eval) if prepared.eval is not None else 0,
        prepared.dropped_rows,
    )
    return prepared
