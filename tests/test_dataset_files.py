"""Reading a dataset's rows (dataset_files): values nested deeper than Arrow and `datasets` can convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dataset_utils
import main
from dataset_utils import DatasetConfig


def nested(levels: int, make) -> object:
    value: object = "x"
    for _ in range(levels):
        value = make(value)
    return value


@pytest.fixture
def deep_extra_column(tmp_path) -> Path:
    """Alpaca rows with an extra column nested 900 levels deep (objects in one file, lists in another row)."""
    rows = [
        {"instruction": "Say hi", "output": "hi", "extra": nested(900, lambda value: {"a": value})},
        {"instruction": "Say yo", "output": "yo", "extra": nested(900, lambda value: [value])},
    ]
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_a_column_nested_900_levels_deep_is_read_as_json_text(deep_extra_column):
    rows = dataset_utils.load_rows(DatasetConfig(source=str(deep_extra_column)))
    assert rows["instruction"] == ["Say hi", "Say yo"]
    assert json.loads(rows["extra"][0]) == nested(900, lambda value: {"a": value})


def test_a_shallow_object_column_stays_an_object(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b", "meta": {"source": {"page": 3}}}) + "\n")
    assert dataset_utils.load_rows(DatasetConfig(source=str(path)))["meta"] == [{"source": {"page": 3}}]


@pytest.mark.parametrize("flags", [[], ["--report", "--clean"]])
def test_the_dataset_command_reads_a_deeply_nested_extra_column(deep_extra_column, demo_workspace, flags, capsys):
    argv = ["--workspace", str(demo_workspace), "dataset", str(deep_extra_column), *flags]
    assert main.main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "Traceback" not in capsys.readouterr().err
