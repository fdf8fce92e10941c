"""Dataset tab: upload or name the data, see its detected format, map columns, preview rendered and masked rows."""

from __future__ import annotations

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
    with gr.Accordion("Column mapping (when your columns have other names)", open=False):
        with gr.Row():
            for name in forms.MAP_FIELDS:
                form.add(
                    f"map.{name}",
                    gr.Dropdown(
                        choices=[NOT_MAPPED], value="", label=f"{name} ←", min_width=120, elem_id=f"map-{name}"
                    ),
                )
    with gr.Row():
        load = gr.Button("Load and detect format", elem_id="dataset-load")
        preview = gr.Button("Preview rendered rows", variant="primary", elem_id="dataset-preview")
    summary = gr.Markdown(elem_id="dataset-summary")
    raw = gr.Dataframe(label="First rows as read", interactive=False, wrap=True, max_height=260, elem_id="dataset-raw")
    pairs = gr.HTML(elem_id="dataset-pairs")
    stats = gr.Markdown(elem_id="dataset-stats")
    rendered = gr.HighlightedText(
        label="Rendered rows (highlighted = trained on)",
        color_map={"trained": "#16a34a"},
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
        report_text = gr.Markdown(elem_id="dataset-report-text")
    return DatasetTab(
        upload, load, preview, summary, raw, stats, rendered, lengths, report, clean, report_text, pairs=pairs
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
        maps = [
            gr.Dropdown(
                choices=[NOT_MAPPED, *columns],
                visible=name in shown,
                value=mapping.get(name, "") if mapping.get(name) in columns else "",
            )
            for name in forms.MAP_FIELDS
        ]
        return [summary, table, *maps, pairs_html(shown_pairs)]

    load_outputs = [tab.summary, tab.raw, *map_widgets, tab.pairs]
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
        prepared = prepare_training_data(config, tokenizer, workspace)
        return (
            _stats(prepared),
            _rendered(prepared.train, tokenizer),
            _histogram([len(ids) for ids in prepared.train["input_ids"]]),
        )

    tab.preview.click(preview, inputs=form.inputs(), outputs=[tab.stats, tab.rendered, tab.lengths])

    @guarded
    def report(data: dict) -> str:
        config = forms.values_to_config(form.values(data))
        return "```\n" + planning.dataset_report_for(config, workspace).text() + "\n```"

    @guarded
    def clean(data: dict) -> str:
        config = forms.values_to_config(form.values(data))
        found = planning.dataset_report_for(config, workspace)
        path, rows = dataset_report.write_cleaned_copy(config.dataset, found, workspace)
        return (
            f"```\n{found.text()}\n```\nSaved **{rows} of {found.rows} rows** to `{path}`; choose it as the "
            "dataset to train on it."
        )

    tab.report.click(report, inputs=form.inputs(), outputs=tab.report_text)
    tab.clean.click(clean, inputs=form.inputs(), outputs=tab.report_text)


def _cell(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _stats(prepared) -> str:
    eval_rows = len(prepared.eval) if prepared.eval is not None else 0
    skipped = f", **{prepared.dropped_rows} skipped** ({skipped_reason(prepared)})" if prepared.dropped_rows else ""
    return (
        f"Format **{prepared.format}**: {prepared.source_rows} rows read{skipped}; {len(prepared.train)} train, "
        f"{eval_rows} eval."
    )


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


def pairs_html(pairs: list[dict]) -> str:
    """Preference pairs as a table: the prompt, then the chosen and the rejected reply side by side."""
    if not pairs:
        return ""
    cells = "".join(
        f"<tr><td colspan='2'><b>Prompt</b><pre>{html.escape(pair['prompt'])}</pre></td></tr>"
        f"<tr><td><b>Chosen</b><pre>{html.escape(pair['chosen'])}</pre></td>"
        f"<td><b>Rejected</b><pre>{html.escape(pair['rejected'])}</pre></td></tr>"
        for pair in pairs
    )
    return f"<table class='preference-pairs' style='width:100%;table-layout:fixed'>{cells}</table>"


def skipped_reason(prepared) -> str:
    """Why rows were skipped, for the page: the first bad row's problem, else truncation (rows whose reply
    max_seq_length cut off whole train nothing)."""
    errors = prepared.outcomes["error"] if prepared.outcomes is not None else []
    for index, message in enumerate(errors):
        if message:
            return html.escape(f"first: row {index + 1}: {message}")
    return "their replies fall entirely beyond max_seq_length: raise it to keep them"
