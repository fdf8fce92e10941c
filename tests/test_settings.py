"""Field metadata as the one home of a setting: strict types from YAML, bounds, choices, the CLI's flags and the
keys code names settings by."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

import settings
from dataset_utils import DatasetConfig
from inference_utils import GenerationConfig
from settings import option
from train_config import TrainConfig, train_config_from_dict
from workspace import UserError, config_from_dict


@dataclasses.dataclass
class Inner:
    depth: int = option(3, help="How deep.", minimum=1, maximum=10)


@dataclasses.dataclass
class Sample:
    count: int = option(2, help="How many; 100% of them.", minimum=1, label="Count of things")
    ratio: float = option(0.5, help="A fraction.", minimum=0, maximum=1, exclusive_maximum=True)
    rate: float = option(1e-3, help="Above zero.", minimum=0, exclusive_minimum=True)
    colour: str = option("red", help="A colour.", choices=("red", "green"))
    shape: str = option("round", help="Read lazily.", choices=lambda: ["round", "square"])
    limit: int | None = option(None, help="None = no limit.", minimum=1)
    verbose: bool = option(False, help="Say more.", advanced=True)
    tags: list[str] = option(default_factory=list, help="Labels.")
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_a_fractional_number_for_a_whole_number_option_is_refused():
    with pytest.raises(UserError, match=r"per_device_train_batch_size' in train config must be a whole number .*2\.5"):
        train_config_from_dict({"per_device_train_batch_size": 2.5})


def test_a_whole_float_for_a_whole_number_option_becomes_an_int():
    config = train_config_from_dict({"per_device_train_batch_size": 16.0, "max_steps": 30.0, "learning_rate": 1})
    assert config.per_device_train_batch_size == 16 and type(config.per_device_train_batch_size) is int
    assert config.max_steps == 30 and type(config.max_steps) is int
    assert config.learning_rate == 1


def test_a_value_below_the_minimum_names_the_field_the_bound_and_a_fix():
    with pytest.raises(UserError, match=r"count must be at least 1 \(got 0\); try 2 \(the default\)"):
        settings.check(Sample(count=0))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ratio": 1.0}, r"ratio must be at least 0 and below 1 \(got 1.0\)"),
        ({"rate": 0.0}, r"rate must be above 0 \(got 0.0\)"),
        ({"rate": float("nan")}, r"rate must be a finite number \(got nan\)"),
        ({"limit": 0}, r"limit must be at least 1 \(got 0\); try 1\."),
    ],
)
def test_exclusive_bounds_and_nan_are_refused(changes, message):
    with pytest.raises(UserError, match=message):
        settings.check(Sample(**changes))


def test_a_value_outside_the_choices_lists_them():
    with pytest.raises(UserError, match=r"colour must be one of: red, green \(got 'blue'\)"):
        settings.check(Sample(colour="blue"))
    with pytest.raises(UserError, match=r"shape must be one of: round, square \(got 'oval'\)"):
        settings.check(Sample(shape="oval"))


def test_nested_configs_are_checked_with_a_dotted_name():
    with pytest.raises(UserError, match=r"inner\.depth must be at least 1 and at most 10 \(got 11\)"):
        settings.check(Sample(inner=Inner(depth=11)))
    with pytest.raises(UserError, match=r"dataset\.max_rows must be at least 0"):
        settings.check(TrainConfig(dataset=DatasetConfig(source="d.jsonl", max_rows=-1)))


def test_a_missing_number_from_a_form_is_refused_by_its_type():
    with pytest.raises(UserError, match=r"max_new_tokens must be a whole number \(got None\)"):
        GenerationConfig(max_new_tokens=None).validate()


def test_defaults_are_within_their_own_bounds_and_choices():
    for config in (Sample(), TrainConfig(dataset=DatasetConfig(source="d.jsonl")), GenerationConfig()):
        settings.check(config)


def test_describe_fills_in_a_label_and_reads_nested_fields():
    assert settings.describe(Sample, "count").label == "Count of things"
    assert settings.describe(Sample, "ratio").label == "Ratio"
    assert settings.describe(TrainConfig, "dataset.max_rows").minimum == 0
    assert "adamw_torch" in settings.describe(TrainConfig, "optim").choice_list()
    with pytest.raises(KeyError, match="not declared with settings.option"):
        settings.describe(Sample, "inner")


def test_choices_read_from_transformers_are_read_on_first_use_only():
    # Unsloth must be imported before transformers in a training process: the config module may not import it.
    code = "import training_utils, sys; assert 'transformers' not in sys.modules, 'transformers was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_argparse_flags_come_from_the_metadata():
    parser = argparse.ArgumentParser()
    settings.add_config_flags(parser, Sample)
    args = parser.parse_args([])
    assert settings.given_settings(args) == {}  # a flag not given leaves the YAML's value or the config's default
    args = parser.parse_args(
        ["--count", "5", "--colour", "green", "--limit", "3", "--verbose", "--tags", "a,b", "--inner.depth", "4"]
    )
    assert settings.given_settings(args) == {
        "count": 5,
        "colour": "green",
        "limit": 3,
        "verbose": True,
        "tags": ["a", "b"],
        "inner": {"depth": 4},
    }
    assert settings.given_settings(parser.parse_args(["--limit", "none", "--no-verbose"])) == {
        "limit": None,
        "verbose": False,
    }
    text = " ".join(parser.format_help().split())
    assert "How many; 100% of them. (at least 1; default: 2)" in text
    assert "advanced options" in text and "inner options" in text


def test_the_argparse_flags_refuse_wrong_types_bounds_and_fixed_choices():
    parser = argparse.ArgumentParser(exit_on_error=False)
    settings.add_config_flags(parser, Sample)
    with pytest.raises(argparse.ArgumentError, match="invalid int value"):
        parser.parse_args(["--count", "2.5"])
    with pytest.raises(argparse.ArgumentError, match="invalid choice"):
        parser.parse_args(["--colour", "blue"])
    # Bounds: the UserError the same value in YAML gets, which the CLI prints as one line.
    with pytest.raises(UserError, match=r"count must be at least 1 \(got 0\); try 2 \(the default\)"):
        parser.parse_args(["--count", "0"])
    with pytest.raises(UserError, match=r"inner\.depth must be at least 1 and at most 10 \(got 11\)"):
        parser.parse_args(["--inner.depth", "11"])
    with pytest.raises(UserError, match=r"rate must be a finite number \(got nan\)"):
        parser.parse_args(["--rate", "nan"])
    assert settings.given_settings(parser.parse_args(["--shape", "oval"])) == {"shape": "oval"}  # lazy: check() later


def test_the_dataset_command_reads_the_sequence_length_default_from_the_train_config():
    parser = argparse.ArgumentParser()
    settings.add_config_flags(parser, DatasetConfig, exclude=["source", "column_map"], section="dataset")
    settings.add_config_flags(parser, TrainConfig, names=["max_seq_length", "eval_split", "train_on_responses_only"])
    args = parser.parse_args(["--no-train-on-responses-only", "--split", "test", "--format", "alpaca"])
    given = settings.given_settings(args)
    assert given == {"train_on_responses_only": False, "dataset": {"split": "test", "format": "alpaca"}}
    assert f"default: {TrainConfig().max_seq_length})" in parser.format_help()
    assert config_from_dict(DatasetConfig, given["dataset"])


def test_sections_keep_two_configs_apart():
    parser = argparse.ArgumentParser()
    settings.add_config_flags(parser, Sample, names=["count"], section="sample")
    args = parser.parse_args(["--count", "7"])
    assert settings.given_settings(args) == {"sample": {"count": 7}}


def test_flags_merge_over_a_config_section_by_section():
    base = {"lora_r": 16, "dataset": {"source": "a.jsonl", "max_rows": 10}, "target_modules": ["q_proj"]}
    given = {"dataset": {"max_rows": 5}, "target_modules": ["v_proj"]}
    assert settings.merge_settings(base, given) == {
        "lora_r": 16,
        "dataset": {"source": "a.jsonl", "max_rows": 5},
        "target_modules": ["v_proj"],
    }
    assert base["dataset"]["max_rows"] == 10  # the base is left as it was


def test_every_option_has_a_key_nested_ones_dotted():
    keys = settings.option_keys(TrainConfig)
    assert "lora_r" in keys and "model.name_or_path" in keys and "dataset.source" in keys
    assert "model" not in keys and "dataset" not in keys


def test_keys_name_a_setting_through_its_dataclass():
    fields = settings.keys(TrainConfig)
    assert fields.dataset.source == "dataset.source"
    assert fields.model.name_or_path == "model.name_or_path"
    assert fields.lora_r == "lora_r" and str(fields.dataset) == "dataset"
    with pytest.raises(AttributeError, match="TrainConfig has no option 'lora_rank'"):
        fields.lora_rank  # noqa: B018
    with pytest.raises(AttributeError, match="DatasetConfig has no option 'path'"):
        fields.dataset.path  # noqa: B018


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_check_refuses_non_finite_numbers_from_widgets(value):
    with pytest.raises(UserError, match="ratio must be a finite number"):
        settings.check(Sample(ratio=value))


def test_config_from_dict_refuses_non_finite_numbers():
    with pytest.raises(UserError, match="Option 'rate' in config must be a finite number"):
        config_from_dict(Sample, {"rate": float("inf")})


def test_bounds_are_written_as_whole_numbers_when_whole():
    assert settings.describe(TrainConfig, "max_seq_length").bounds_text() == "at least 1 and at most 1048576"


def test_yaml_reads_an_exponent_without_a_dot_as_a_number(tmp_path):
    from workspace import load_yaml

    path = tmp_path / "train.yaml"
    path.write_text("learning_rate: 2e-4\nweight_decay: 1E-2\nname: e5\nversion: '2e-4'\n", encoding="utf-8")
    data = load_yaml(path)
    assert data == {"learning_rate": 2e-4, "weight_decay": 0.01, "name": "e5", "version": "2e-4"}
    assert train_config_from_dict({"dataset": {"source": "d.jsonl"}, "learning_rate": data["learning_rate"]})


def test_yaml_refuses_a_key_given_twice_naming_it_and_its_line(tmp_path):
    from workspace import load_yaml

    path = tmp_path / "train.yaml"
    path.write_text("dataset:\n  source: a.jsonl\nlearning_rate: 1.0e-4\nlearning_rate: 1.0e-3\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"gives the key 'learning_rate' twice \(again at line 4\)"):
        load_yaml(path)


def test_yaml_merge_keys_may_still_override(tmp_path):
    from workspace import load_yaml

    path = tmp_path / "train.yaml"
    path.write_text("base: &base {lora_r: 8}\ntrain: {<<: *base, lora_r: 16}\n", encoding="utf-8")
    assert load_yaml(path)["train"] == {"lora_r": 16}
