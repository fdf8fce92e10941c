"""Data for preference tuning and RL: pairs (prompt / chosen / rejected) for DPO and ORPO, unpaired rows (prompt /
completion / a true-or-false label) or pairs for KTO, and prompts (with an optional reference answer) for GRPO, read
from any file the Dataset tab reads.

Rows become TRL's conversational format (lists of {role, content} messages), so TRL renders them with the model's
chat template exactly as at inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import dataset_utils
import stages
from dataset_utils import DatasetConfig
from workspace import UserError

log = logging.getLogger(__name__)

# The formats a stage may train on (its record's data_formats), with the columns each reads: prompt is optional for
# pairs whose sides are whole conversations; prompts come from any SFT format's rows.
NEEDED_COLUMNS = {
    "pairs": "prompt / chosen / rejected",
    "unpaired": "prompt / completion / label",
    "prompts": "prompt (or any SFT format's)",
}
# Column names a reference answer for GRPO is looked for under when none is named.
REFERENCE_COLUMNS = ("answer", "reference", "solution")


@dataclass
class PreferenceData:
    """Rows ready for a TRL trainer, and what was learned about the source on the way."""

    train: Any  # datasets.Dataset
    eval: Any | None
    format: str
    source_rows: int
    dropped_rows: int


def detect_preference_format(columns: list[str], column_map: dict[str, str] | None = None) -> str | None:
    """'pairs' (prompt / chosen / rejected) or 'unpaired' (prompt / completion / label, KTO's) when the columns
    (after the column map) hold preference data, else None."""
    available = set(columns) | set((column_map or {}).keys())
    if {"chosen", "rejected"} <= available:
        return "pairs"
    if {"completion", "label"} <= available:
        return "unpaired"
    return None


def _column(row: dict, name: str, column_map: dict[str, str]) -> Any:
    return row.get(column_map.get(name, name))


def _messages(value: Any, where: str, role: str) -> list[dict]:
    """A side of a pair as messages: text becomes one `role` turn, a list of turns is checked turn by turn."""
    if isinstance(value, list):
        turns = []
        for number, turn in enumerate(value, start=1):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise UserError(f"{where}: turn {number} must be an object with 'role' and 'content'.")
            turns.append({"role": str(turn["role"]), "content": dataset_utils.as_text(turn["content"], where)})
        return turns
    text = dataset_utils.as_text(value, where)
    return [{"role": role, "content": text}] if text.strip() else []


def _split_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(shared prompt, chosen reply, rejected reply) of two whole conversations: the turns they share lead."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def pair_row(row: dict, column_map: dict[str, str], number: int, system_prompt: str = "") -> dict:
    """One source row as {prompt, chosen, rejected} messages, or UserError naming the row and what is wrong."""
    where = f"Row {number}"
    prompt = _messages(_column(row, "prompt", column_map), f"{where} prompt", "user")
    chosen = _messages(_column(row, "chosen", column_map), f"{where} chosen", "assistant")
    rejected = _messages(_column(row, "rejected", column_map), f"{where} rejected", "assistant")
    if not prompt and chosen and rejected:
        prompt, chosen, rejected = _split_prompt(chosen, rejected)
    for side, turns in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not turns or not any(turn["content"].strip() for turn in turns):
            raise UserError(
                f"{where}: the {side} side is empty; every pair needs a prompt, a chosen and a rejected reply."
            )
    if chosen == rejected:
        raise UserError(f"{where}: chosen and rejected are identical, so the pair teaches nothing; fix or remove it.")
    return {"prompt": _with_system(prompt, system_prompt), "chosen": chosen, "rejected": rejected}


def _label(value: Any, where: str) -> bool:
    """A KTO label: true (a desirable completion) or false; text "true" / "false" too, as CSV files hold them."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(
        f"{where}: label must be true (a desirable completion) or false (an undesirable one), not {value!r}."
    )


def unpaired_row(row: dict, column_map: dict[str, str], number: int, system_prompt: str = "") -> dict:
    """One source row as KTO's {prompt, completion, label}, or UserError naming the row and what is wrong."""
    where = f"Row {number}"
    prompt = _messages(_column(row, "prompt", column_map), f"{where} prompt", "user")
    completion = _messages(_column(row, "completion", column_map), f"{where} completion", "assistant")
    for side, turns in (("prompt", prompt), ("completion", completion)):
        if not turns or not any(turn["content"].strip() for turn in turns):
            raise UserError(f"{where}: the {side} is empty; every row needs a prompt and a completion.")
    label = _label(_column(row, "label", column_map), where)
    return {"prompt": _with_system(prompt, system_prompt), "completion": completion, "label": label}


def unpair(pairs: list[dict]) -> list[dict]:
    """Pairs as KTO rows: each chosen reply desirable, each rejected one undesirable, under the same prompt."""
    return [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen"}
        for pair in pairs
        for side in ("chosen", "rejected")
    ]


def prompt_row(row: dict, fmt: str, fields: dict[str, str], reference: str, system_prompt: str = "") -> dict:
    """One row of any SFT format as {prompt, answer} for GRPO: the turns before the last reply, and the reference
    answer (the `reference` column, else the row's own last reply)."""
    if fmt == "text":
        text = dataset_utils.as_text(row.get(fields["text"]), "Column 'text'")
        prompt = [{"role": "user", "content": text}]
        answer = ""
    else:
        messages = dataset_utils.row_to_messages(row, fmt, fields, system_prompt)
        prompt, answer = messages[:-1], messages[-1]["content"]
    if reference:
        answer = dataset_utils.as_text(row.get(reference), f"Column '{reference}'")
    return {"prompt": _with_system(prompt, system_prompt), "answer": answer}


def _with_system(prompt: list[dict], system_prompt: str) -> list[dict]:
    if system_prompt and not (prompt and prompt[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def _prompt_fields(columns: list[str], config: DatasetConfig) -> tuple[str, dict[str, str]]:
    if config.format in dataset_utils.FORMATS:
        fmt = config.format
    elif "prompt" in columns and "completion" not in columns and "prompt" not in config.column_map:
        return "text", {"text": "prompt"}  # a file of bare prompts
    else:
        fmt = dataset_utils.detect_format(columns, config.column_map)
    sft_map = {key: value for key, value in config.column_map.items() if key in dataset_utils.FORMAT_FIELDS[fmt]}
    return fmt, dataset_utils.resolve_columns(columns, fmt, sft_map)


def convert_rows(rows: list[dict], columns: list[str], stage: str, config: DatasetConfig, reference_column: str = ""):
    """(format, converted rows) of `rows` for `stage`; a broken row is a UserError naming it.

    The stage's first data format is the one its trainer takes; pairs for a stage of unpaired rows (KTO) become a
    desirable and an undesirable row each."""
    column_map = dict(config.column_map)
    record = stages.get(stage)
    formats = record.data_formats
    if formats[0] == "prompts":
        fmt, fields = _prompt_fields(columns, config)
        reference = reference_column or next((name for name in REFERENCE_COLUMNS if name in columns), "")
        if reference and reference not in columns:
            raise UserError(f"Reference column '{reference}' not found; columns are: {', '.join(columns)}.")
        return "prompts", [prompt_row(row, fmt, fields, reference, config.system_prompt) for row in rows]
    fmt = _pair_format(columns, stage, column_map)
    if fmt == "unpaired":
        converted = [unpaired_row(row, column_map, n, config.system_prompt) for n, row in enumerate(rows, start=1)]
    else:
        converted = [pair_row(row, column_map, n, config.system_prompt) for n, row in enumerate(rows, start=1)]
    if formats[0] == "unpaired":
        converted = unpair(converted) if fmt == "pairs" else converted
        labels = {row["label"] for row in converted}
        if len(labels) < 2:
            kind = "desirable (true)" if True in labels else "undesirable (false)"
            raise UserError(
                f"Every row is labelled {kind}: {record.title} learns from both desirable (label true) and undesirable "
                "(label false) completions; add rows of the other kind."
            )
    return fmt, converted


def _pair_format(columns: list[str], stage: str, column_map: dict[str, str]) -> str:
    """The columns' preference format when `stage` trains on it, else UserError naming the columns it needs."""
    record = stages.get(stage)
    fmt = detect_preference_format(columns, column_map)
    if fmt not in record.data_formats:
        needed = " columns, or ".join(NEEDED_COLUMNS[name] for name in record.data_formats)
        raise UserError(
            f"{record.title} needs {needed} columns; this dataset has: {', '.join(columns)}. "
            "Map them in the Dataset tab (column_map)."
        )
    return fmt


def prepare_preference_data(
    config: DatasetConfig,
    stage: str,
    tokenizer,
    eval_split: float = 0.0,
    seed: int = dataset_utils.DEFAULT_SEED,
    workspace=None,
    reference_column: str = "",
) -> PreferenceData:
    """Load → detect → convert → split; the trainer tokenizes with the model's chat template."""
    import datasets

    dataset_utils.ensure_chat_template(tokenizer, config.chat_template)
    raw = dataset_utils.load_rows(config, workspace)
    rows = raw.to_list()
    if not rows:
        raise UserError("The dataset has no rows.")
    fmt, converted = convert_rows(rows, list(raw.column_names), stage, config, reference_column)
    dataset = datasets.Dataset.from_list(converted)
    train, evaluation = dataset_utils.split_train_eval(dataset, eval_split, seed)
    log.info("%s data: %s, %d rows", stage, fmt, len(dataset))
    return PreferenceData(train, evaluation, fmt, len(rows), len(rows) - len(converted))


def check_rows(config: DatasetConfig, stage: str, reference_column: str = "") -> str:
    """The format of a local file's rows for `stage`, or UserError naming the first row that cannot train it."""
    raw = dataset_utils.load_rows(config)
    if not len(raw):
        raise UserError("The dataset has no rows.")
    fmt, _ = convert_rows(raw.to_list(), list(raw.column_names), stage, config, reference_column)
    return fmt


def preview_pairs(rows: list[dict], columns: list[str], column_map: dict[str, str], limit: int = 5) -> list[dict]:
    """The first pairs as {prompt, chosen, rejected} texts for a side-by-side preview (empty when not preference
    data); a KTO row shows its completion as chosen when desirable, as rejected when not, the other side empty."""
    fmt = detect_preference_format(columns, column_map)
    if fmt is None:
        return []

    def text(turns: list[dict]) -> str:
        return "\n\n".join(turn["content"] for turn in turns)

    shown = []
    for number, row in enumerate(rows[:limit], start=1):
        try:
            one = pair_row(row, column_map, number) if fmt == "pairs" else unpaired_row(row, column_map, number)
        except UserError as exc:  # shown in its place: the rows around it still preview
            shown.append({"prompt": f"cannot train: {exc}", "chosen": "", "rejected": ""})
            continue
        if fmt == "pairs":
            shown.append({side: text(one[side]) for side in one})
        else:
            completion = text(one["completion"])
            shown.append(
                {
                    "prompt": text(one["prompt"]),
                    "chosen": completion if one["label"] else "",
                    "rejected": "" if one["label"] else completion,
                }
            )
    return shown


# ---------------------------------------------------------------- the preview and the report, as the stage reads them


def view_stage(stage: str, columns: list[str], column_map: dict[str, str] | None = None) -> str:
    """The stage whose data format a preview or report reads: `stage` itself unless it trains on SFT rows while the
    columns hold preference data (then DPO for pairs, KTO for unpaired rows: how such a file is trained)."""
    if not reads_stage_format(stage):
        found = detect_preference_format(columns, column_map)
        if found is not None:
            return "dpo" if found == "pairs" else "kto"
    return stage


def stage_of_source(config: DatasetConfig, stage: str, workspace=None) -> str:
    """view_stage of a dataset's columns (its rows are read for them)."""
    return view_stage(stage, list(dataset_utils.load_rows(config, workspace).column_names), config.column_map)


def reads_stage_format(stage: str) -> bool:
    """Whether `stage` trains on preference or prompt rows (read here), not on SFT rows (dataset_utils)."""
    return stages.get(stage).data_formats[0] in NEEDED_COLUMNS


def convert_each(
    rows: list[dict], columns: list[str], stage: str, config: DatasetConfig, reference_column: str = ""
) -> tuple[str, list[dict | str]]:
    """(format, per row: its example as convert_rows makes it, or why it cannot train `stage`): a view's reading,
    where one broken row is reported with its reason instead of failing the whole view. Pairs stay pairs for KTO
    (its trainer's data splits them in two)."""
    if stages.get(stage).data_formats[0] == "prompts":
        fmt, fields = _prompt_fields(columns, config)
        reference = reference_column or next((name for name in REFERENCE_COLUMNS if name in columns), "")
        if reference and reference not in columns:
            raise UserError(f"Reference column '{reference}' not found; columns are: {', '.join(columns)}.")

        def convert(row: dict, number: int) -> dict:
            return prompt_row(row, fmt, fields, reference, config.system_prompt)

        found = "prompts"
    else:
        column_map = dict(config.column_map)
        found = _pair_format(columns, stage, column_map)
        one = unpaired_row if found == "unpaired" else pair_row

        def convert(row: dict, number: int) -> dict:
            return one(row, column_map, number, config.system_prompt)

    out: list[dict | str] = []
    for number, row in enumerate(rows, start=1):
        try:
            out.append(convert(row, number))
        except UserError as exc:
            out.append(str(exc))
    return found, out


def render_example(example: dict, tokenizer) -> dict[str, str]:
    """An example's texts as TRL renders a conversational row: the prompt with the chat template's generation
    prompt, and each reply (chosen, rejected, completion) as the text the template adds after that prompt."""
    prompt = dataset_utils.render_chat(example["prompt"], tokenizer, add_generation_prompt=True)
    shown = {"prompt": prompt}
    for side in ("chosen", "rejected", "completion"):
        if side in example:
            whole = dataset_utils.render_chat(example["prompt"] + example[side], tokenizer)
            shown[side] = whole[len(prompt) :] if whole.startswith(prompt) else whole
    if "answer" in example:
        shown["answer"] = example["answer"]
    if "label" in example:
        shown["label"] = "desirable" if example["label"] else "undesirable"
    return shown


def rendered_rows(
    config: DatasetConfig, stage: str, tokenizer, limit: int, workspace=None, reference_column: str = ""
) -> tuple[str, list[dict[str, str]]]:
    """(format, the first `limit` rows rendered as `stage` trains them, see render_example; a row that cannot
    train it as {"row": its number, "error": why}): the Dataset tab's preview and `main.py dataset --examples`."""
    dataset_utils.ensure_chat_template(tokenizer, config.chat_template)
    raw = dataset_utils.load_rows(config, workspace)
    first = raw.select(range(min(limit, len(raw)))).to_list()
    fmt, examples = convert_each(first, list(raw.column_names), stage, config, reference_column)
    shown = [
        {"row": str(number), "error": example} if isinstance(example, str) else render_example(example, tokenizer)
        for number, example in enumerate(examples, start=1)
    ]
    return fmt, shown


def measure_rows(
    config: DatasetConfig, stage: str, tokenizer, workspace=None, reference_column: str = ""
) -> tuple[str, list[dict | str]]:
    """(format, per source row: why it cannot train `stage`, or its figures for dataset_report.report_of_measured:
    its whole text (duplicates), its prompt's text (leakage), and the token counts of its prompt and each reply
    rendered with the chat template as the trainer reads them)."""
    dataset_utils.ensure_chat_template(tokenizer, config.chat_template)
    raw = dataset_utils.load_rows(config, workspace)
    fmt, examples = convert_each(raw.to_list(), list(raw.column_names), stage, config, reference_column)
    measured: list[dict | str] = []
    for example in examples:
        if isinstance(example, str):
            measured.append(example)
            continue
        shown = render_example(example, tokenizer)
        sides = [side for side in ("chosen", "rejected", "completion") if side in example]
        prompt = _text(example["prompt"])
        replies = [_text(example[side]) for side in sides] + ([example["answer"]] if "answer" in example else [])
        measured.append(
            {
                "text": "\n".join([prompt, *replies]),
                "prompt": prompt,
                "prompt_tokens": _tokens(shown["prompt"], tokenizer),
                "reply_tokens": [_tokens(shown[side], tokenizer) for side in sides],
            }
        )
    return fmt, measured


def _text(turns: list[dict]) -> str:
    return "\n".join(turn["content"] for turn in turns)


def _tokens(text: str, tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
