"""Dataset tab: upload or name the data, see its detected format, map columns, preview rendered and masked rows."""

from __future__ import annotations

import dataclasses
import html
import json
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

import dataset_report
import dataset_utils
import model_utils
import planning
import preference_data
import settings
from dataset_utils import prepare_training_data
from train_config import TrainConfig
from ui import forms
from ui.common import guarded, save_upload
from workspace import UserError

PREVIEW_EXAMPLES = 3
RAW_ROWS = 5
NOT_MAPPED = ("(same name)", "")
MAPPING_TITLE = "Column mapping (when your columns have other names)"
FIRST_VALUE_CHARS = 40  # of a column's first value, shown beside its name in the mapping's choices
TRAINED = "#16a34a"
REJECTED = "#dc2626"
FIELDS = settings.keys(TrainConfig)  # the form's keys, named through the config's fields


@dataclass
class DatasetTab:
    upload: gr.File
    load: gr.Button
    preview: gr.Button
    summary: gr.Markdown
    raw: gr.Dataframe
    stats: gr.Markdown
    rendered: gr.HighlightedText
    lengths: gr.BarPlot
    report: gr.Button
    clean: gr.Button
    report_text: gr.Markdown
    pairs: gr.HTML | None = None  # preference pairs (DPO), side by side
    mapping: gr.Accordion | None = None  # the column mapping, opened where detection fails
    use_cleaned: gr.Button | None = None  # after Save cleaned copy: train on it
    cleaned: gr.State | None = None  # the cleaned copy's path


def build(form: forms.Form) -> DatasetTab:
    gr.Markdown(
        "Upload a file (JSONL, JSON, CSV, Parquet or TXT) or name one, check how it is read, then preview "
        "the rows as the model will see them: the highlighted text is what the model learns to write."
    )
    upload = gr.File(
        label="Upload a data file", file_types=list(dataset_utils.LOCAL_SUFFIXES), elem_id="dataset-upload"
    )
    with gr.Row():
        forms.setting(form, FIELDS.dataset.source, scale=3, elem_id="dataset-source")
        forms.setting(form, FIELDS.dataset.subset, scale=1, elem_id="dataset-subset")
        forms.setting(form, FIELDS.dataset.split, scale=1)
        forms.setting(form, FIELDS.dataset.format, scale=1, elem_id="dataset-format")
    with gr.Row():
        forms.setting(
            form,
            FIELDS.dataset.chat_template,
            component=gr.Dropdown,
            choices=[("The model's own", ""), *[(name, name) for name in dataset_utils.BUILTIN_TEMPLATES]],
            allow_custom_value=True,
        )
        forms.setting(form, FIELDS.dataset.system_prompt)
        forms.setting(form, FIELDS.dataset.max_rows)
    with gr.Row():
        load = gr.Button("Load and detect format", elem_id="dataset-load")
        preview = gr.Button("Preview rendered rows", variant="primary", elem_id="dataset-preview")
    summary = gr.Markdown(elem_id="dataset-summary")
    # Right under the detection's verdict, opened when it fails: each column offered with its first value.
    with gr.Accordion(MAPPING_TITLE, open=False, elem_id="dataset-mapping") as mapping:
        with gr.Row():
            for name in forms.MAP_FIELDS:
                form.add(
                    f"map.{name}",
                    gr.Dropdown(
                        choices=[NOT_MAPPED], value="", label=f"{name} ←", min_width=220, elem_id=f"map-{name}"
                    ),
                )
    raw = gr.Dataframe(label="First rows as read", interactive=False, wrap=True, max_height=260, elem_id="dataset-raw")
    pairs = gr.HTML(elem_id="dataset-pairs")
    stats = gr.Markdown(elem_id="dataset-stats")
    rendered = gr.HighlightedText(
        label="Rendered rows (highlighted = trained on)",
        color_map={"trained": TRAINED},
        show_legend=True,
        combine_adjacent=True,
        elem_id="dataset-rendered",
    )
    lengths = gr.BarPlot(
        x="tokens", y="rows", title="Token lengths (train rows)", height=240, elem_id="dataset-lengths"
    )
    with gr.Accordion("Quality report", open=True, elem_id="dataset-report-section"):
        gr.Markdown(
            "Duplicates, empty replies, rows the template drops or cuts at the max sequence length (Train tab), "
            "token lengths and eval leakage, each with its row numbers. The cleaned copy drops duplicates and "
            "empty replies into a new file; your file is never changed."
        )
        with gr.Row():
            report = gr.Button("Report", elem_id="dataset-report")
            clean = gr.Button("Save cleaned copy", elem_id="dataset-clean")
            use_cleaned = gr.Button("Use the cleaned copy", visible=False, elem_id="dataset-use-cleaned")
        report_text = gr.Markdown(elem_id="dataset-report-text")
    return DatasetTab(
        upload,
        load,
        preview,
        summary,
        raw,
        stats,
        rendered,
        lengths,
        report,
        clean,
        report_text,
        pairs=pairs,
        mapping=mapping,
        use_cleaned=use_cleaned,
        cleaned=gr.State(""),
    )


def wire(tab: DatasetTab, form: forms.Form, workspace: Path) -> None:
    source = form.widgets[FIELDS.dataset.source]
    map_widgets = [form.widgets[f"map.{name}"] for name in forms.MAP_FIELDS]

    @guarded
    def uploaded(path: str | None) -> str:
        if not path:
            return gr.skip()
        return str(save_upload(path, workspace))

    @guarded
    def remapped(data: dict) -> list:
        """The detection again once the user maps a column, so that the verdict above the mapping follows it."""
        config = forms.values_to_config(form.values(data)).dataset
        if not str(config.source).strip():
            return [gr.skip(), gr.skip()]
        loaded = dataset_utils.load_rows(config, workspace)
        columns = list(loaded.column_names)
        read = f"**{len(loaded)} rows**, columns: {', '.join(f'`{c}`' for c in columns)}."
        try:
            detected = dataset_utils.detect_format(columns, config.column_map)
        except UserError as exc:
            return [f"{read} **Format not detected:** {exc}", mapping_section(True)]
        return [f"{read} Detected format: **{detected}** with your mapping.", gr.Accordion(MAPPING_TITLE, open=True)]

    for widget in map_widgets:
        widget.input(remapped, inputs=form.inputs(), outputs=[tab.summary, tab.mapping])

    @guarded
    def load(data: dict) -> list:
        values = form.values(data)
        config = forms.values_to_config(values).dataset
        if dataset_utils.is_hub_dataset(config.source):
            # A Hub dataset is previewed by streaming its first rows; the full download runs when training starts.
            streamed = dataset_utils.preview_hub_rows(config, RAW_ROWS)
            rows = pd.DataFrame(streamed["rows"]).to_dict(orient="list")
            columns, count = streamed["columns"], f"first {len(streamed['rows'])} rows (streamed)"
        else:
            loaded = dataset_utils.load_rows(config, workspace)
            rows, columns, count = loaded[:RAW_ROWS], loaded.column_names, f"{len(loaded)} rows"
        mapping = dataset_utils.suggest_column_map(columns, config.column_map)
        shown_pairs = preference_data.preview_pairs(pd.DataFrame(rows).to_dict(orient="records"), columns, {})
        try:
            detected = dataset_utils.detect_format(columns, mapping)
            found = f"Detected format: **{detected}**."
        except UserError as exc:
            detected, found = None, f"**Format not detected:** {exc}"
        if shown_pairs:  # preference data: trained with a preference stage (Train tab)
            kind = preference_data.detect_preference_format(columns, {})
            found = (
                "Detected format: **preference pairs** (prompt / chosen / rejected) for DPO, ORPO or KTO."
                if kind == "pairs"
                else "Detected format: **KTO rows** (prompt / completion / label) for KTO."
            )
            detected = None
        fmt = config.format if config.format != "auto" else detected
        shown = dataset_utils.FORMAT_FIELDS[fmt] if fmt else forms.MAP_FIELDS
        suggested = {key: value for key, value in mapping.items() if key not in config.column_map}
        hint = (
            " Mapped from common column names: " + ", ".join(f"`{c}` → {k}" for k, c in suggested.items()) + "."
            if suggested
            else ""
        )
        summary = f"**{count}**, columns: {', '.join(f'`{c}`' for c in columns)}. {found}{hint}"
        # A slice reads the first rows as columns; select() would rebuild the schema, slow for wide files.
        first = rows
        table = pd.DataFrame({column: [_cell(value) for value in values] for column, values in first.items()})
        choices = [NOT_MAPPED, *column_choices(columns, rows)]
        maps = [
            gr.Dropdown(
                choices=choices,
                visible=name in shown,
                value=mapping.get(name, "") if mapping.get(name) in columns else "",
            )
            for name in forms.MAP_FIELDS
        ]
        mapping_shown = mapping_section(detected is None and not shown_pairs)
        # a report or cleaned copy of the data shown before would read as this data's
        return [summary, table, *maps, pairs_html(shown_pairs), mapping_shown, "", gr.Button(visible=False)]

    load_outputs = [tab.summary, tab.raw, *map_widgets, tab.pairs, tab.mapping, tab.report_text, tab.use_cleaned]
    tab.upload.upload(uploaded, inputs=tab.upload, outputs=source).success(
        load, inputs=form.inputs(), outputs=load_outputs
    )
    tab.load.click(load, inputs=form.inputs(), outputs=load_outputs)

    @guarded
    def preview(data: dict) -> tuple[str, list, gr.BarPlot]:
        config = forms.values_to_config(form.values(data))
        config.model.validate()
        config.dataset.validate()
        tokenizer = model_utils.load_tokenizer(
            model_utils.resolve_model_path(config.model.name_or_path, workspace), config.model.trust_remote_code
        )
        stage = preference_data.stage_of_source(config.dataset, config.stage, workspace)
        if preference_data.reads_stage_format(stage):
            return _stage_preview(dataclasses.replace(config, stage=stage), config.stage, tokenizer, workspace)
        prepared = prepare_training_data(config, tokenizer, workspace)
        return (
            _stats(prepared),
            gr.HighlightedText(_rendered(prepared.train, tokenizer), color_map={"trained": TRAINED}),
            _histogram([len(ids) for ids in prepared.train["input_ids"]]),
            gr.skip(),
        )

    tab.preview.click(preview, inputs=form.inputs(), outputs=[tab.stats, tab.rendered, tab.lengths, tab.pairs])

    def report_config(data: dict) -> TrainConfig:
        """The form's config, its stage the one whose format the data are read in (pairs as DPO under SFT)."""
        config = forms.values_to_config(form.values(data))
        if not str(config.dataset.source).strip():
            raise UserError("Choose a dataset first: upload a file or name one above.")
        stage = preference_data.stage_of_source(config.dataset, config.stage, workspace)
        return dataclasses.replace(config, stage=stage)

    @guarded
    def report(data: dict) -> str:
        config = report_config(data)
        return "```\n" + planning.dataset_report_for(config, workspace).text() + "\n```"

    @guarded
    def clean(data: dict) -> list:
        config = report_config(data)
        found = planning.dataset_report_for(config, workspace)
        path, rows = dataset_report.write_cleaned_copy(config.dataset, found, workspace)
        text = (
            f"```\n{found.text()}\n```\nSaved **{rows} of {found.rows} rows** to `{path}`: *Use the cleaned copy* "
            "makes it the dataset to train on."
        )
        return [text, gr.Button(visible=True), str(path)]

    tab.report.click(report, inputs=form.inputs(), outputs=tab.report_text)
    tab.clean.click(clean, inputs=form.inputs(), outputs=[tab.report_text, tab.use_cleaned, tab.cleaned])

    def use_cleaned(path: str) -> list:
        return [path, gr.Button(visible=False)]

    tab.use_cleaned.click(use_cleaned, inputs=tab.cleaned, outputs=[source, tab.use_cleaned]).then(
        load, inputs=form.inputs(), outputs=load_outputs
    )


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _stats(prepared) -> str:
    eval_rows = len(prepared.eval) if prepared.eval is not None else 0
    skipped = f", **{prepared.dropped_rows} skipped** ({_first_problem(prepared)})" if prepared.dropped_rows else ""
    return (
        f"Format **{prepared.format}**: {prepared.source_rows} rows read{skipped}; {len(prepared.train)} train, "
        f"{eval_rows} eval."
    )


def _first_problem(prepared) -> str:
    """Why the first skipped row is skipped, from the preparation's per-row outcomes (the *Report* lists all)."""
    errors = list(prepared.outcomes["error"]) if prepared.outcomes is not None else []
    first = next(((number, error) for number, error in enumerate(errors, start=1) if error), None)
    return f"first: row {first[0]}: {first[1].rstrip('.')}; *Report* lists every one" if first else "see *Report*"


def _rendered(train, tokenizer) -> list[tuple[str, str | None]]:
    pieces: list[tuple[str, str | None]] = []
    for index in range(min(PREVIEW_EXAMPLES, len(train))):
        row = train[index]
        pieces.append((f"── example {index + 1} · {len(row['input_ids'])} tokens ──\n", None))
        segments = dataset_utils.loss_segments(row["input_ids"], row["labels"], tokenizer)
        pieces.extend((text, "trained" if trained else None) for text, trained in segments)
        pieces.append(("\n\n", None))
    return pieces


def _histogram(lengths: list[int]) -> gr.BarPlot:
    import numpy as np

    counts, edges = np.histogram(lengths, bins=min(20, max(1, len(set(lengths)))))
    labels = [f"{int(edges[i])}–{int(edges[i + 1])}" for i in range(len(counts))]
    return gr.BarPlot(pd.DataFrame({"tokens": labels, "rows": counts}), sort=labels)


# Long replies wrap inside their own cell: a <pre> keeps its lines whole by default and runs under the next cell.
CELL_STYLE = "vertical-align:top;width:50%;overflow:hidden"
PRE_STYLE = "white-space:pre-wrap;overflow-wrap:anywhere;margin:0;max-width:100%"


def pairs_html(pairs: list[dict]) -> str:
    """Preference pairs as a table: the prompt, then the chosen and the rejected reply side by side."""
    if not pairs:
        return ""

    def cell(title: str, text: str, columns: int = 1) -> str:
        return (
            f"<td style='{CELL_STYLE}' colspan='{columns}'><b>{title}</b>"
            f"<pre style='{PRE_STYLE}'>{html.escape(text)}</pre></td>"
        )

    cells = "".join(
        f"<tr>{cell('Prompt', pair['prompt'], 2)}</tr>"
        f"<tr>{cell('Chosen', pair['chosen'])}{cell('Rejected', pair['rejected'])}</tr>"
        for pair in pairs
    )
    return f"<table class='preference-pairs' style='width:100%;table-layout:fixed'>{cells}</table>"


def column_choices(columns: list[str], rows: dict[str, list]) -> list[tuple[str, str]]:
    """(label, column) for the mapping's dropdowns: each column with its first value, so it is known by its data."""
    choices = []
    for column in columns:
        values = rows.get(column) or [None]
        first = " ".join(_cell(values[0]).split())
        short = first[:FIRST_VALUE_CHARS] + ("…" if len(first) > FIRST_VALUE_CHARS else "")
        choices.append((f"{column} — “{short}”" if short else column, column))
    return choices


def mapping_section(failed: bool) -> gr.Accordion:
    """The mapping opened, with a title that says why, when the format was not detected; closed otherwise."""
    if failed:
        return gr.Accordion(
            "Map your columns: the format was not detected (each column shows its first value)", open=True
        )
    return gr.Accordion(MAPPING_TITLE, open=False)


def _stage_preview(config: TrainConfig, chosen_stage: str, tokenizer, workspace: Path) -> tuple:
    """The preview of preference or prompt data as config.stage reads it: the first rows rendered with the chat
    template (prompt, then each reply coloured by its side), the report's figures and lengths, and the pairs side
    by side as rendered."""
    import stages

    dataset = config.dataset
    fmt, shown = preference_data.rendered_rows(
        dataset, config.stage, tokenizer, PREVIEW_EXAMPLES, workspace, config.reference_column
    )
    found_format, measured = preference_data.measure_rows(
        dataset, config.stage, tokenizer, workspace, config.reference_column
    )
    found = dataset_report.report_of_measured(
        dataset, found_format, measured, config.max_seq_length, config.eval_split, config.seed
    )
    lengths = [row["prompt_tokens"] + max(row["reply_tokens"], default=0) for row in measured if isinstance(row, dict)]
    title = stages.get(config.stage).title
    unusable = found.rows - found.usable_rows
    stats = (
        f"Format **{fmt}**, read as **{title}** reads it: {found.rows} rows read, {found.usable_rows} usable"
        + (f", **{unusable} cannot train** (see *Report*)" if unusable else "")
        + "."
    )
    if chosen_stage != config.stage:
        stats += (
            f" The Train tab's stage is {stages.get(chosen_stage).title}: choose {title} (or another stage for this "
            "data) there to train on it."
        )
    pieces: list[tuple[str, str | None]] = []
    for number, example in enumerate(shown, start=1):
        pieces.append((f"── example {number} ──\n", None))
        if "error" in example:
            pieces.append((f"cannot train: {example['error']}\n\n", None))
            continue
        pieces.append((example["prompt"], None))
        for side in ("chosen", "rejected", "completion"):
            if side in example:
                label = side if side != "completion" else ("chosen" if example["label"] == "desirable" else "rejected")
                pieces += [(f"\n[{side}]\n", None), (example[side], label)]
        if example.get("answer"):
            pieces.append((f"\n[reference answer, for the rewards] {example['answer']}", None))
        pieces.append(("\n\n", None))
    sides = [example for example in shown if "chosen" in example]
    return (
        stats,
        gr.HighlightedText(pieces, color_map={"chosen": TRAINED, "rejected": REJECTED}),
        _histogram(lengths) if lengths else gr.skip(),
        pairs_html(sides),
    )
