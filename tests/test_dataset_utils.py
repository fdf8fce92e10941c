"""Dataset loading, format detection, mapping, rendering, masking and caching."""

from __future__ import annotations

import json
import time

import pytest

import dataset_files
import dataset_render
import dataset_utils
from conftest import capital_rows, write_jsonl
from dataset_files import DatasetConfig
from dataset_formats import detect_format, row_to_messages
from dataset_utils import prepare_dataset
from workspace import UserError


def prepare(tmp_path, tokenizer, name: str, content: str | bytes, **kwargs):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    config = DatasetConfig(source=str(path), **{k: v for k, v in kwargs.items() if k in DatasetConfig.__annotations__})
    extra = {k: v for k, v in kwargs.items() if k not in DatasetConfig.__annotations__}
    return prepare_dataset(config, tokenizer, workspace=tmp_path / "ws", **extra)


# ---------------------------------------------------------------- detection per format


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["instruction", "input", "output"], "alpaca"),
        (["conversations"], "sharegpt"),
        (["messages"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["text"], "text"),
    ],
)
def test_detect_format_recognises_each_format(columns, expected):
    assert detect_format(columns) == expected


def test_detect_format_lists_columns_when_nothing_matches():
    with pytest.raises(UserError, match="question, answer"):
        detect_format(["question", "answer"])


def test_alpaca_row_joins_instruction_and_input():
    fields = {"instruction": "instruction", "input": "input", "output": "output"}
    messages = row_to_messages({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca", fields)
    assert messages == [{"role": "user", "content": "Translate\n\nchat"}, {"role": "assistant", "content": "cat"}]


def test_sharegpt_roles_are_mapped():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    messages = row_to_messages(row, "sharegpt", {"conversations": "conversations"})
    assert [m["role"] for m in messages] == ["user", "assistant"]


def test_system_prompt_added_when_row_has_none():
    fields = {"prompt": "prompt", "completion": "completion"}
    messages = row_to_messages(
        {"prompt": "a", "completion": "b"}, "prompt_completion", fields, system_prompt="Be brief"
    )
    assert messages[0] == {"role": "system", "content": "Be brief"}


@pytest.mark.parametrize(
    "name, content",
    [
        ("data.csv", "instruction,output\nSay hi,hi\nSay bye,bye\n"),
        (
            "data.json",
            json.dumps([{"instruction": "Say hi", "output": "hi"}, {"instruction": "Say bye", "output": "bye"}]),
        ),
        ("data.jsonl", '{"prompt": "Say hi", "completion": "hi"}\n{"prompt": "Say bye", "completion": "bye"}\n'),
        ("data.txt", "First document.\n\nSecond document.\n"),
    ],
)
def test_each_local_file_type_prepares(tmp_path, demo_tokenizer, name, content):
    prepared = prepare(tmp_path, demo_tokenizer, name, content)
    assert len(prepared.train) == 2
    assert all(any(label != -100 for label in row["labels"]) for row in prepared.train)


def test_parquet_file_prepares(tmp_path, demo_tokenizer):
    import pandas as pd

    path = tmp_path / "data.parquet"
    pd.DataFrame({"text": ["one document", "another document"]}).to_parquet(path)
    prepared = prepare_dataset(DatasetConfig(source=str(path)), demo_tokenizer, workspace=tmp_path / "ws")
    assert prepared.format == "text" and len(prepared.train) == 2


def test_sharegpt_and_csv_list_cells(tmp_path, demo_tokenizer):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    prepared = prepare(tmp_path, demo_tokenizer, "d.jsonl", json.dumps(row) + "\n")
    assert prepared.format == "sharegpt"


# ---------------------------------------------------------------- rendering and masks


def test_rendered_text_equals_the_tokenizers_chat_template(tmp_path, demo_tokenizer):
    rows = capital_rows(4)
    prepared = prepare(tmp_path, demo_tokenizer, "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    expected = {demo_tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows}
    assert set(prepared.train["text"]) == expected


def test_only_assistant_tokens_carry_loss(tmp_path, demo_tokenizer):
    rows = capital_rows(1)
    prepared = prepare(tmp_path, demo_tokenizer, "chat.jsonl", json.dumps(rows[0]) + "\n")
    row = prepared.train[0]
    trained = [
        text
        for text, is_trained in dataset_utils.loss_segments(row["input_ids"], row["labels"], demo_tokenizer)
        if is_trained
    ]
    assert "".join(trained).startswith("The capital of France is Paris.")
    assert "What is the capital" not in "".join(trained)


def test_train_on_all_tokens_when_asked(tmp_path, demo_tokenizer):
    prepared = prepare(
        tmp_path, demo_tokenizer, "chat.jsonl", json.dumps(capital_rows(1)[0]) + "\n", train_on_responses_only=False
    )
    assert -100 not in prepared.train[0]["labels"]


def test_truncation_to_max_seq_length(tmp_path, demo_tokenizer):
    row = {"text": "word " * 500}
    prepared = prepare(tmp_path, demo_tokenizer, "long.jsonl", json.dumps(row) + "\n", max_seq_length=64)
    assert len(prepared.train[0]["input_ids"]) == 64


def test_custom_template_for_a_model_without_one(tmp_path, demo_tokenizer):
    import copy

    bare = copy.deepcopy(demo_tokenizer)
    bare.chat_template = None
    content = json.dumps(capital_rows(1)[0]) + "\n"
    with pytest.raises(UserError, match="no chat template"):
        prepare(tmp_path, bare, "chat.jsonl", content)
    prepared = prepare(tmp_path, bare, "chat.jsonl", content, chat_template="chatml")
    assert prepared.train[0]["text"].startswith("<|im_start|>user\nWhat is the capital of France?")


def test_column_map_renames_columns(tmp_path, demo_tokenizer):
    content = '{"question": "Say hi", "answer": "hi"}\n'
    prepared = prepare(
        tmp_path, demo_tokenizer, "qa.jsonl", content, column_map={"instruction": "question", "output": "answer"}
    )
    assert prepared.format == "alpaca"


def test_eval_split_holds_out_rows(tmp_path, demo_tokenizer):
    content = "".join(json.dumps(r) + "\n" for r in capital_rows(20))
    prepared = prepare(tmp_path, demo_tokenizer, "chat.jsonl", content, eval_split=0.2)
    assert (len(prepared.train), len(prepared.eval)) == (16, 4)


def test_second_preparation_comes_from_cache(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", capital_rows(300))
    config = DatasetConfig(source=str(path))
    first = prepare_dataset(config, demo_tokenizer, workspace=tmp_path / "ws")
    started = time.perf_counter()
    second = prepare_dataset(config, demo_tokenizer, workspace=tmp_path / "ws")
    assert not first.cache_hit and second.cache_hit
    assert second.train["input_ids"] == first.train["input_ids"]
    assert time.perf_counter() - started < 5  # generous: a miss re-renders every row


def test_changed_file_is_not_served_from_cache(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", capital_rows(4))
    prepare_dataset(DatasetConfig(source=str(path)), demo_tokenizer, workspace=tmp_path / "ws")
    write_jsonl(path, capital_rows(6))
    again = prepare_dataset(DatasetConfig(source=str(path)), demo_tokenizer, workspace=tmp_path / "ws")
    assert not again.cache_hit and len(again.train) == 6


# ---------------------------------------------------------------- bad input: clear error, nothing written

BAD_FILES = [
    ("empty.jsonl", b"", "empty"),
    ("latin1.csv", "instruction,output\ncaf\xe9,ok\n".encode("latin-1"), "not UTF-8"),
    ("object.json", b'{"a": 1, "b": 2}', "JSON list of objects"),
    ("numbers.json", b"[1, 2, 3]", "JSON list of objects"),
    ("broken.jsonl", b'{"text": "ok"}\n{"text": "ok"}\n{"text": broken}\n', "line 3"),
    ("missing.csv", b"instruction,notes\nSay hi,hi\n", "output"),
    (
        "alternate.jsonl",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "user", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            }
        ).encode()
        + b"\n",
        "do not alternate",
    ),
    (
        "no_assistant.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "a"}]}).encode() + b"\n",
        "no assistant turn",
    ),
    ("data.xlsx", b"PK\x03\x04", "Unsupported file type"),
]


@pytest.mark.parametrize("name, content, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_file_gives_clear_error_and_writes_nothing(tmp_path, demo_tokenizer, name, content, message):
    with pytest.raises(UserError, match=message):
        prepare(tmp_path, demo_tokenizer, name, content)
    cache = tmp_path / "ws" / "cache" / "datasets"
    assert not cache.exists() or not any(cache.iterdir())


def test_column_map_naming_an_absent_column(tmp_path, demo_tokenizer):
    with pytest.raises(UserError, match="Column 'reply' .*not found"):
        prepare(
            tmp_path, demo_tokenizer, "d.jsonl", '{"instruction": "a", "output": "b"}\n', column_map={"output": "reply"}
        )


def test_directory_instead_of_file(tmp_path, demo_tokenizer):
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        prepare_dataset(DatasetConfig(source=str(tmp_path / "folder.jsonl")), demo_tokenizer, workspace=tmp_path)


def test_path_outside_workspace_refused_when_shared(tmp_path, demo_tokenizer, monkeypatch):
    outside = write_jsonl(tmp_path / "outside.jsonl", capital_rows(2))
    monkeypatch.setenv("FINETUNER_CONFINE_PATHS", "1")
    (tmp_path / "ws").mkdir()
    with pytest.raises(UserError, match="outside the workspace"):
        prepare_dataset(DatasetConfig(source=str(outside)), demo_tokenizer, workspace=tmp_path / "ws")


def test_offline_hub_dataset_names_the_id(tmp_path, demo_tokenizer):
    with pytest.raises(UserError, match="someone/missing-dataset"):
        prepare_dataset(DatasetConfig(source="someone/missing-dataset"), demo_tokenizer, workspace=tmp_path)


# ---------------------------------------------------------------- the template shortcut (one render per row)

SHORTCUT_CONVERSATIONS = [
    [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of Chile?"},
        {"role": "assistant", "content": "Santiago"},
        {"role": "user", "content": "And of Bolivia?"},
        {"role": "assistant", "content": "Sucre, and La Paz is the seat of government."},
    ],
]
# Drops the system turn and trims contents: rendering it per role is not what the template does.
TRIMMING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}<{{ message['role'] }}>"
    "{{ message['content'] | trim }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.mark.parametrize("messages", SHORTCUT_CONVERSATIONS)
def test_template_pieces_give_the_same_text_and_spans_as_rendering(demo_tokenizer, messages):
    turns = dataset_render.fast_turns(SHORTCUT_CONVERSATIONS, demo_tokenizer)
    assert turns is not None  # the demo model's ChatML template, with its default system turn
    assert dataset_render.spans_from_turns(messages, turns) == dataset_render.assistant_spans(messages, demo_tokenizer)


def test_a_template_the_pieces_cannot_reproduce_is_rendered_per_row(tmp_path, demo_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer.name_or_path)
    tokenizer.chat_template = TRIMMING_TEMPLATE
    assert dataset_render.fast_turns(SHORTCUT_CONVERSATIONS, tokenizer) is None
    rows = [{"messages": messages} for messages in SHORTCUT_CONVERSATIONS]
    prepared = prepare(tmp_path, tokenizer, "chat.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert set(prepared.train["text"]) == {tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows}


def test_outer_whitespace_in_a_reply_is_left_to_the_template(tmp_path, demo_tokenizer):
    messages = [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": " Lima.\n"}]
    turns = dataset_render.chat_turns(demo_tokenizer)
    assert dataset_render.spans_from_turns(messages, turns) is None
    prepared = prepare(tmp_path, demo_tokenizer, "chat.jsonl", json.dumps({"messages": messages}) + "\n")
    text, spans = dataset_render.assistant_spans(messages, demo_tokenizer)
    assert prepared.train[0]["text"] == text
    row = prepared.train[0]
    trained = [
        piece for piece, on in dataset_utils.loss_segments(row["input_ids"], row["labels"], demo_tokenizer) if on
    ]
    assert "".join(trained).startswith(" Lima.")


# ---------------------------------------------------------------- issue 13: values kept, refused or split as text


def test_csv_cell_keeps_its_line_breaks(tmp_path, demo_tokenizer):
    code = "def double(x):\n    return 2 * x\n"
    content = f'instruction,output\nWrite double in Python,"{code}"\nSay hi,hi\n'
    prepared = prepare(tmp_path, demo_tokenizer, "code.csv", content)
    assert len(prepared.train) == 2
    assert any(code.strip() in text for text in prepared.train["text"])


def test_openai_text_parts_are_joined_into_the_content(tmp_path, demo_tokenizer):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of Peru?"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "Lima."}]}
    prepared = prepare(tmp_path, demo_tokenizer, "parts.jsonl", json.dumps(row) + "\n")
    joined = [{"role": "user", "content": "What is the capital of Peru?"}, {"role": "assistant", "content": "Lima."}]
    assert prepared.train["text"] == [demo_tokenizer.apply_chat_template(joined, tokenize=False)]


def test_parquet_content_parts_are_joined(tmp_path, demo_tokenizer):
    import pandas as pd

    # Arrow gives every part every key of the column, so a text part arrives with image_url=None.
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Capital of Chile?", "image_url": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Santiago.", "image_url": None}]},
    ]
    path = tmp_path / "parts.parquet"
    pd.DataFrame({"messages": [messages]}).to_parquet(path)
    prepared = prepare_dataset(DatasetConfig(source=str(path)), demo_tokenizer, workspace=tmp_path / "ws")
    assert "Capital of Chile?" in prepared.train[0]["text"] and "Santiago." in prepared.train[0]["text"]
    assert "'type'" not in prepared.train[0]["text"]


def test_conversation_ending_with_a_user_turn_is_refused():
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ]
    }
    with pytest.raises(UserError, match="must end with an assistant reply"):
        row_to_messages(row, "messages", {"messages": "messages"})


def test_control_tokens_typed_in_the_data_are_text(tmp_path, demo_tokenizer):
    end, start = (demo_tokenizer.convert_tokens_to_ids(token) for token in ("<|im_end|>", "<|im_start|>"))
    messages = [
        {"role": "user", "content": "Explain what <|im_end|> means."},
        {"role": "assistant", "content": "It closes a turn, like <|im_start|> opens one."},
    ]
    prepared = prepare(tmp_path, demo_tokenizer, "tokens.jsonl", json.dumps({"messages": messages}) + "\n")
    row = prepared.train[0]
    text = demo_tokenizer.apply_chat_template(messages, tokenize=False)
    turns = text.count("<|im_start|>") - 1  # the template's own: the default system, the user, the assistant
    assert row["input_ids"].count(start) == turns == 3
    assert row["input_ids"].count(end) == text.count("<|im_end|>") - 1 == 3
    assert demo_tokenizer.decode(row["input_ids"]) == text
    trained = "".join(
        piece for piece, on in dataset_utils.loss_segments(row["input_ids"], row["labels"], demo_tokenizer) if on
    )
    assert trained.startswith("It closes a turn, like <|im_start|> opens one.<|im_end|>")
    assert row["labels"][-2] == end  # the reply's real turn end is trained, as a control token


def test_control_tokens_in_a_text_row_are_text_but_its_eos_is_not(tmp_path, demo_tokenizer):
    eos = demo_tokenizer.eos_token_id
    content = json.dumps({"text": f"A file ends with {demo_tokenizer.eos_token} in it."}) + "\n"
    prepared = prepare(tmp_path, demo_tokenizer, "text.jsonl", content)
    ids = prepared.train[0]["input_ids"]
    assert ids.count(eos) == 1 and ids[-1] == eos


def test_deeply_nested_json_is_refused(tmp_path, demo_tokenizer):
    deep = "[" * 50_000 + "]" * 50_000
    with pytest.raises(UserError, match="'deep.json' is nested too deeply"):
        prepare(tmp_path, demo_tokenizer, "deep.json", deep)
    with pytest.raises(UserError, match="'deep.jsonl' line 2 is nested too deeply"):
        prepare(tmp_path, demo_tokenizer, "deep.jsonl", '{"text": "ok"}\n{"text": ' + deep + "}\n")


def test_named_pipe_is_refused_without_opening_it(tmp_path, demo_tokenizer):
    import os
    import threading

    pipe = tmp_path / "x.jsonl"
    os.mkfifo(pipe)
    errors = []

    def load():
        try:
            prepare_dataset(DatasetConfig(source=str(pipe)), demo_tokenizer, workspace=tmp_path / "ws")
        except UserError as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=load, daemon=True)  # opening the pipe would block until a writer comes
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail("the loader opened the named pipe")
    assert errors and "is not a regular file" in errors[0]


def wide_csv(path, columns: int, rows: int = 20):
    header = ["instruction", "output", *(f"feature_{i}" for i in range(columns - 2))]
    line = ",".join(["Say hi", "hi", *(str(i % 10) for i in range(columns - 2))])
    path.write_text(",".join(header) + "\n" + (line + "\n") * rows, encoding="utf-8")
    return path


def test_csv_with_ten_thousand_columns_is_refused(tmp_path, demo_tokenizer):
    path = wide_csv(tmp_path / "wide.csv", 10_000)
    with pytest.raises(UserError, match="'wide.csv' has 10000 columns; at most 1000 are read"):
        dataset_files.load_rows(DatasetConfig(source=str(path)))
    with pytest.raises(UserError, match="has 10000 columns"):
        prepare_dataset(DatasetConfig(source=str(path)), demo_tokenizer, workspace=tmp_path / "ws")


def test_wide_csv_within_the_limit_prepares(tmp_path, demo_tokenizer):
    path = wide_csv(tmp_path / "wide.csv", 300)
    rows = dataset_files.load_rows(DatasetConfig(source=str(path)))
    assert len(rows.column_names) == 300
    prepared = prepare_dataset(DatasetConfig(source=str(path)), demo_tokenizer, workspace=tmp_path / "ws")
    assert prepared.format == "alpaca" and len(prepared.train) == 20
