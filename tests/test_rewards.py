"""The built-in GRPO rewards, called as TRL calls them: (prompts, completions, **dataset columns) → scores."""

from __future__ import annotations

import pytest

import rewards
from workspace import UserError


def reply(text: str) -> list[dict]:
    """A conversational completion, as TRL passes it for messages data."""
    return [{"role": "assistant", "content": text}]


def score(name: str, completions, **kwargs) -> list[float]:
    settings = rewards.RewardSettings(
        kwargs.pop("pattern", ""), kwargs.pop("min_length", 0), kwargs.pop("max_length", 0)
    )
    return rewards.make_reward(name, settings)([None] * len(completions), completions, **kwargs)


def test_format_scores_completions_that_match_the_pattern():
    got = score(
        "format", [reply("<answer>4</answer>"), reply("four"), "<answer>x</answer>"], pattern="^<answer>.*</answer>$"
    )
    assert got == [1.0, 0.0, 1.0]


def test_equals_compares_numbers_as_numbers_and_reads_the_pattern_group():
    completions = [reply("<answer>3.0</answer>"), reply("<answer>3</answer>"), reply("<answer>4</answer>")]
    assert score("equals", completions, pattern=r"<answer>(.*)</answer>", answer=["3", "3", "3"]) == [1.0, 1.0, 0.0]
    assert score("equals", [reply(" Paris ")], answer=["paris"]) == [1.0]


def test_contains_finds_the_reference_as_a_number_or_text():
    assert score("contains", [reply("It is 12.0 apples"), reply("It is 120")], answer=["12", "12"]) == [1.0, 0.0]
    assert score("contains", [reply("The capital is Paris.")], answer=["paris"]) == [1.0]


def test_json_and_length_rewards():
    assert score("json", [reply('{"a": 1}'), reply("{a: 1}")]) == [1.0, 0.0]
    assert score("length", [reply("abc"), reply("abcdefgh")], min_length=2, max_length=5) == [1.0, 0.0]


def test_each_reward_is_named_for_trl_logs():
    assert rewards.make_reward("json", rewards.RewardSettings()).__name__ == "json"


def test_a_pattern_that_does_not_compile_is_named():
    with pytest.raises(UserError, match="not a valid regular expression"):
        rewards.make_reward("format", rewards.RewardSettings(pattern="<answer>(.*"))


def test_equals_without_a_reference_column_says_which_column_it_needs():
    with pytest.raises(UserError, match="reference answer column"):
        score("equals", [reply("3")])


def test_a_length_range_upside_down_is_refused():
    with pytest.raises(UserError, match="above reward_max_length"):
        rewards.make_reward("length", rewards.RewardSettings(min_length=10, max_length=5))
