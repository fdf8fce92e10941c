"""The built-in GRPO rewards, called as TRL calls them: (prompts, completions, **dataset columns) → scores."""

from __future__ import annotations

import time

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


# pytest-timeout's "thread" method ends the whole run when the limit passes, which still works while a match holds
# the interpreter inside `re` (the "signal" method's handler would wait for the match to end).
@pytest.mark.timeout(60, method="thread")
def test_a_backtracking_pattern_on_a_long_completion_ends_within_its_time_budget(caplog):
    long = "a" * 5000 + "#b"
    started = time.monotonic()
    assert score("format", [reply(long), reply("abc#")], pattern="^(.+)+#$") == [0.0, 1.0]
    assert score("format", [reply("a" * 50000 + "!")], pattern="^(a+)+$") == [0.0]
    assert score("equals", [reply("a" * 50000 + "!")], pattern="^(a+)+$", answer=["a"]) == [0.0]
    # three completions within their budgets, with room for a loaded machine
    assert time.monotonic() - started < 3 * rewards.PATTERN_TIMEOUT_S + 10
    assert any("backtracks without bound" in record.getMessage() for record in caplog.records)


def test_a_length_range_upside_down_is_refused():
    with pytest.raises(UserError, match="above reward_max_length"):
        rewards.make_reward("length", rewards.RewardSettings(min_length=10, max_length=5))


# ---------------------------------------------------------------- the LLM judge, against a real local HTTP server


def grpo_config(tmp_path, **changes):
    from conftest import demo_train_config, write_jsonl

    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Capital of France?", "answer": "Paris"}])
    values = dict(stage="grpo", per_device_train_batch_size=2, num_generations=2, max_completion_length=8)
    return demo_train_config(data, **{**values, **changes})


def fair_judge(prompt: str, number: int) -> str:
    """Scores 9 an answer naming Paris, else 2; the rubric must be in what it reads."""
    assert "[Rubric]\nNames the right city." in prompt
    answer = prompt.split("[Answer]\n", 1)[1]
    return '{"score": 9}' if "Paris" in answer.split("[Rubric]")[0] else "Score: 2"


@pytest.mark.parametrize("provider", ["openai", "anthropic", "ollama"])
def test_the_judge_reward_scores_completions_through_each_provider(tmp_path, provider):
    from fake_llm_servers import FakeLLMServer

    import preference_utils

    with FakeLLMServer(reply=fair_judge) as server:
        url = server.openai_url if provider == "openai" else server.url
        config = grpo_config(
            tmp_path,
            reward_funcs=["judge"],
            judge_provider=provider,
            judge_model="fake-model",
            judge_base_url=url,
            judge_rubric="Names the right city.",
            judge_min_score=0,
            judge_max_score=10,
        )
        config.validate()
        (judge,) = preference_utils.reward_functions(config)
        prompts = [[{"role": "user", "content": "Capital of France?"}]] * 2
        scores = judge(prompts, [reply("It is Paris."), reply("It is Lyon.")], answer=["Paris", "Paris"])
    assert judge.__name__ == "judge"
    assert scores == [pytest.approx(0.9), pytest.approx(0.2)]
    assert "[Reference answer]\nParis" in server.prompts[-1]


def test_judge_scores_are_read_and_mapped_onto_the_reward_range():
    assert rewards.parse_score('{"score": 7.5}') == 7.5
    assert rewards.parse_score("I would say 4 out of 5.") == 4.0
    assert rewards.parse_score("no idea") is None
    assert rewards.score_to_reward(3, 1, 5) == 0.5
    assert rewards.score_to_reward(12, 0, 10) == 1.0  # outside the scale: clipped


def test_a_judge_at_a_closed_port_is_refused_before_a_run_exists(tmp_path):
    import jobs
    import submit

    url = f"http://127.0.0.1:{jobs.free_port()}/v1"
    config = grpo_config(tmp_path, reward_funcs=["judge"], judge_model="fake-model", judge_base_url=url)
    with pytest.raises(UserError, match=r"Cannot reach the openai server at .*Is it running"):
        submit.submit("train", config, tmp_path, "judged")
    assert not (tmp_path / "runs" / "judged").exists()


def test_judge_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(UserError, match="needs a judge model"):
        grpo_config(tmp_path, reward_funcs=["judge"]).validate()
    with pytest.raises(UserError, match="must be above judge_min_score"):
        grpo_config(tmp_path, reward_funcs=["judge"], judge_model="m", judge_max_score=0).validate()


def test_the_judge_s_api_key_travels_in_the_job_environment_only(tmp_path):
    import preference_utils

    config = grpo_config(tmp_path, reward_funcs=["judge"], judge_provider="anthropic", judge_model="claude")
    assert preference_utils.job_env(config, "sk-secret") == {"ANTHROPIC_API_KEY": "sk-secret"}
    assert preference_utils.job_env(grpo_config(tmp_path), "sk-secret") == {}  # no judge, no key


def test_the_key_typed_in_the_train_tab_opens_a_judge_that_asks_for_one(tmp_path, monkeypatch):
    """The submit check uses the typed key, as the job will: no key is refused with a 401 before a run exists."""
    from fake_llm_servers import FakeLLMServer

    import preference_utils
    import submit

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with FakeLLMServer(reply=fair_judge, api_key="sk-typed") as server:
        config = grpo_config(
            tmp_path, reward_funcs=["judge"], judge_model="fake-model", judge_base_url=server.openai_url
        )
        with pytest.raises(UserError, match="401"):
            submit.submit("train", config, tmp_path, "no-key")
        assert not (tmp_path / "runs" / "no-key").exists()
        preference_utils.check_judge(config, "sk-typed")  # answers: the key the job will get is the one checked


# ---------------------------------------------------------------- a user's reward file

REWARD_FILE = """
def reward_short(prompts, completions, **kwargs):
    return [1.0 if len(c[0]["content"]) < 10 else 0.0 for c in completions]


def reward_polite(prompts, completions, **kwargs):
    return [1.0 if "please" in c[0]["content"] else 0.0 for c in completions]


def helper():
    return 1
"""


def test_reward_functions_from_a_file_are_used_when_allowed(tmp_path):
    import preference_utils

    path = tmp_path / "my_rewards.py"
    path.write_text(REWARD_FILE, encoding="utf-8")
    config = grpo_config(
        tmp_path, reward_funcs=["json"], reward_file=str(path), allow_reward_file=True, reward_weights=[1, 2, 0.5]
    )
    config.validate()
    functions = preference_utils.reward_functions(config)
    assert [f.__name__ for f in functions] == ["json", "reward_short", "reward_polite"]
    assert functions[2](None, [reply("yes please"), reply("no")]) == [1.0, 0.0]
    config.reward_file_functions = ["reward_polite"]
    config.reward_weights = []
    assert [f.__name__ for f in preference_utils.reward_functions(config)] == ["json", "reward_polite"]


def test_a_reward_file_runs_only_when_turned_on_and_never_in_a_shared_app(tmp_path, monkeypatch):
    from workspace import CONFINE_ENV

    path = tmp_path / "my_rewards.py"
    path.write_text("import sys\nsys.exit('ran')\n", encoding="utf-8")  # would end the test if it ran
    with pytest.raises(UserError, match="turn on allow_reward_file"):
        grpo_config(tmp_path, reward_file=str(path)).validate()
    monkeypatch.setenv(CONFINE_ENV, "1")
    with pytest.raises(UserError, match="refused in a shared app"):
        grpo_config(tmp_path, reward_file=str(path), allow_reward_file=True).validate()


@pytest.mark.parametrize(
    ("text", "functions", "message"),
    [
        (None, [], "does not exist"),
        ("def helper(): pass\n", [], "no function named reward_"),
        (REWARD_FILE, ["reward_missing"], "has no function 'reward_missing'; its functions are: reward_short"),
        ("def reward_x(:\n", [], "is not valid Python"),
    ],
)
def test_a_reward_file_that_cannot_give_rewards_is_a_clear_error(tmp_path, text, functions, message):
    path = tmp_path / "my_rewards.py"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    config = grpo_config(tmp_path, reward_file=str(path), allow_reward_file=True, reward_file_functions=functions)
    with pytest.raises(UserError, match=message):
        config.validate()


# ---------------------------------------------------------------- weights typed in the UI


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), float("-inf")])
def test_a_reward_weight_that_is_not_a_finite_number_is_refused(tmp_path, weight):
    config = grpo_config(tmp_path, reward_funcs=["format", "json"], reward_weights=[1.0, weight])
    with pytest.raises(UserError, match="is not a finite number"):
        config.validate()


@pytest.mark.parametrize("reward", ["equals", "contains"])
def test_a_reference_reward_on_rows_without_a_reference_is_refused_naming_the_column(tmp_path, reward):
    from conftest import write_jsonl

    data = write_jsonl(tmp_path / "bare.jsonl", [{"prompt": "Capital of France?"}, {"prompt": "2 + 2?"}])
    config = grpo_config(tmp_path, reward_funcs=[reward])
    config.dataset.source = str(data)
    with pytest.raises(
        UserError, match=r"no reference column \(answer, reference or solution; its columns are: prompt"
    ):
        config.validate()
    write_jsonl(data, [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "2 + 2?", "answer": " "}])
    with pytest.raises(UserError, match="row 2's 'answer' is empty"):
        config.validate()


def test_a_batch_without_reference_answers_fails_instead_of_scoring_zero():
    with pytest.raises(UserError, match="have none: add an answer column"):
        score("equals", [reply("3"), reply("4")], answer=["", ""])


def test_reward_weights_typed_as_text_are_numbers_one_per_reward(tmp_path):
    from ui import forms

    values = forms.config_to_values(grpo_config(tmp_path, reward_funcs=["format", "json"], reward_weights=[1, 0.5]))
    assert values["reward_weights"] == "1, 0.5"
    assert forms.values_to_config({**values, "reward_weights": "2, 0.25"}).reward_weights == [2.0, 0.25]
    with pytest.raises(UserError, match="'x' is not a number"):
        forms.values_to_config({**values, "reward_weights": "1, x"})
    with pytest.raises(UserError, match=r"1 values for 2 reward functions \(format, json\)"):
        forms.values_to_config({**values, "reward_weights": "3"}).validate()
