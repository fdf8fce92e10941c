"""The dataset quality report on files with known duplicates, empty replies and over-long rows; the cleaned copy."""

from __future__ import annotations

import json

import pytest

import dataset_report
import dataset_utils
import main
import text_duplicates
from conftest import write_jsonl
from dataset_utils import DatasetConfig
from workspace import UserError

SHADE = "Name a herb that grows well in the shade of a tall apple tree in a small garden"
LONG_REPLY = " ".join(["Water the seedlings every morning and keep the soil moist."] * 12)


def known_rows() -> list[dict]:
    """Rows 2 and 3 repeat row 1 (3 only after folding case and punctuation), row 4 nearly does, row 5 has a blank
    reply, row 6 is far longer than 64 tokens, row 7 is Cyrillic, row 8 is the only one the template drops."""
    return [
        {"instruction": SHADE, "output": "Mint grows well in shade."},
        {"instruction": SHADE, "output": "Mint grows well in shade."},
        {"instruction": SHADE.upper() + "!", "output": "mint, grows well in shade"},
        {"instruction": SHADE, "output": "Mint grows well in shade too."},
        {"instruction": "What is the capital of France?", "output": "   "},
        {"instruction": "How do I care for seedlings?", "output": LONG_REPLY},
        {"instruction": "Как дела у огорода?", "output": "Хорошо, всё растёт."},
        {"instruction": " ", "output": "Which tree fruits first? The cherry."},
    ]


def report_of(path, tokenizer, **options) -> dataset_report.DatasetReport:
    options.setdefault("max_seq_length", 64)
    return dataset_report.build_report(DatasetConfig(source=str(path)), tokenizer, **options)


def test_report_counts_duplicates_empty_replies_and_cut_rows(tmp_path, demo_tokenizer):
    report = report_of(write_jsonl(tmp_path / "known.jsonl", known_rows()), demo_tokenizer)
    assert report.rows == 8 and report.format == "alpaca"
    assert report.duplicates == [2, 3]
    assert report.near_duplicates == [4]
    assert report.duplicate_of == {2: 1, 3: 1, 4: 1}
    assert report.empty_replies == [5]
    assert sorted(report.dropped) == [8]
    assert "turn 1 (user) is empty" in report.dropped[8].lower()
    assert report.truncated == [3, 6, 7]  # the upper-case and the Cyrillic rows take many tokens too
    assert 0 < report.reply_tokens_lost < report.reply_tokens
    assert report.lengths["max"] > 64 and report.longest_row == 6
    assert report.lengths["p50"] <= report.lengths["p95"] <= report.lengths["p99"] <= report.lengths["max"]
    assert report.scripts == {"latin": [1, 2, 3, 4, 5, 6, 8], "cyrillic": [7]}
    text = report.text()
    assert "exact duplicates: 2 (rows 2, 3)" in text
    assert "empty replies: 1 (rows 5)" in text
    assert "rows cut at max_seq_length 64: 3 (rows 3, 6, 7)" in text


def test_reply_tokens_lost_are_the_trained_tokens_past_the_cut(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "Care?", "output": LONG_REPLY}])
    whole = report_of(path, demo_tokenizer, max_seq_length=4096)
    cut = report_of(path, demo_tokenizer, max_seq_length=64)
    assert whole.truncated == [] and whole.reply_tokens_lost == 0
    prompt_tokens = whole.lengths["max"] - whole.reply_tokens  # everything before (and around) the reply
    assert cut.reply_tokens == whole.reply_tokens
    assert cut.reply_tokens_lost == whole.reply_tokens - (64 - prompt_tokens)
    assert cut.lost_share == pytest.approx(cut.reply_tokens_lost / cut.reply_tokens)


def test_a_row_cut_before_its_reply_is_reported_as_dropped(tmp_path, demo_tokenizer):
    rows = [
        {"instruction": " ".join(["long question"] * 60), "output": "Yes."},
        {"instruction": "Hi", "output": "Hello"},
    ]
    report = report_of(write_jsonl(tmp_path / "cut.jsonl", rows), demo_tokenizer)
    assert report.truncated == [1]
    assert report.dropped == {1: "every trained token is past max_seq_length"}
    assert report.usable_rows == 1


def test_eval_prompts_shared_with_train_rows_are_leakage(tmp_path, demo_tokenizer):
    rows = [{"instruction": "What is two plus two?", "output": f"Four, answer {i}."} for i in range(10)]
    rows += [{"instruction": f"Unique question number {i}?", "output": "Yes."} for i in range(10)]
    report = report_of(write_jsonl(tmp_path / "leak.jsonl", rows), demo_tokenizer, eval_split=0.5)
    assert report.leaked, "ten rows share one prompt: a 50% split puts some of them on both sides"
    assert all(row <= 10 for row in report.leaked)  # only the shared prompt leaks, never a unique one


def test_mixed_formats_are_counted_per_row(tmp_path, demo_tokenizer):
    rows = [
        {"instruction": "Name a colour.", "output": "Blue."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ]
    report = report_of(write_jsonl(tmp_path / "mixed.jsonl", rows), demo_tokenizer)
    assert report.formats == {"alpaca": [1], "messages": [2]}
    assert "formats mixed" in report.text()


def test_one_row_file_gets_a_report_with_a_note(tmp_path, demo_tokenizer):
    report = report_of(write_jsonl(tmp_path / "one.jsonl", known_rows()[:1]), demo_tokenizer, eval_split=0.1)
    assert report.rows == 1 and report.usable_rows == 1
    assert report.duplicates == [] and report.leaked == []
    assert any("only 1 row" in note for note in report.notes)
    assert any("eval_split needs at least 2" in note for note in report.notes)


def test_empty_file_is_refused(tmp_path, demo_tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        report_of(tmp_path / "empty.jsonl", demo_tokenizer)


def test_cleaned_copy_drops_duplicates_and_empty_replies_and_keeps_the_original(tmp_path, demo_tokenizer):
    source = write_jsonl(tmp_path / "known.jsonl", known_rows())
    original = source.read_bytes()
    config = DatasetConfig(source=str(source))
    report = dataset_report.build_report(config, demo_tokenizer, max_seq_length=64)
    path, rows = dataset_report.write_cleaned_copy(config, report, tmp_path / "ws")
    assert source.read_bytes() == original
    assert path == tmp_path / "ws" / "data" / "known.cleaned.jsonl"
    kept = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == 4 and kept == [known_rows()[i] for i in (0, 5, 6, 7)]


def test_near_duplicate_index_uses_minhash_lsh_and_checks_candidates():
    index = text_duplicates.DuplicateIndex(0.6)
    index.add("a", "one two three four five six seven eight")
    assert index.find("One, two three four five six seven eight!") == ("duplicate", "a")
    assert index.find("one two three four five six seven nine") == ("near_duplicate", "a")
    assert index.find("alpha beta gamma delta") is None
    assert type(index.lsh).__module__.startswith("datasketch")
    exact_only = text_duplicates.DuplicateIndex(1.0)
    exact_only.add(1, "one two three four five six seven eight")
    assert exact_only.find("one two three four five six seven nine") is None


def test_cli_prints_the_report_and_writes_the_cleaned_copy(demo_workspace, capsys):
    source = write_jsonl(demo_workspace / "known.jsonl", known_rows())
    code = main.main(
        ["--workspace", str(demo_workspace), "dataset", str(source), "--report", "--clean", "--max-seq-length", "64"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "exact duplicates: 2 (rows 2, 3)" in out
    assert f"cleaned copy: {demo_workspace / 'data' / 'known.cleaned.jsonl'} (4 of 8 rows)" in out


@pytest.mark.parametrize("options", [{}, {"eval_split": 0.25, "train_on_responses_only": False}])
def test_a_jobs_report_is_counted_from_its_preparation_rendering_each_row_once(
    tmp_path, demo_tokenizer, monkeypatch, options
):
    """A training job prepares its rows and logs their report: every row is rendered once (the report counts the
    preparation's own rows), and the report is the one `dataset --report` prints; a cached preparation renders none
    and gives the same report."""
    from train_config import TrainConfig

    source = write_jsonl(tmp_path / "known.jsonl", known_rows())
    config = TrainConfig(dataset=DatasetConfig(source=str(source)), max_seq_length=64, **options)
    rendered = []
    render_row = dataset_utils.render_row
    monkeypatch.setattr(
        dataset_utils, "render_row", lambda *args, **kwargs: rendered.append(1) or render_row(*args, **kwargs)
    )
    settings = dataset_utils.preparation_settings(config)

    def job_report():
        prepared = dataset_utils.prepare_dataset(config.dataset, demo_tokenizer, workspace=tmp_path / "ws", **settings)
        return prepared, dataset_report.report_of_preparation(config, prepared)

    first, report = job_report()
    assert not first.cache_hit and len(rendered) == len(known_rows())
    assert first.source is None  # the rows as read are let go once counted
    again, from_cache = job_report()
    assert again.cache_hit and len(rendered) == len(known_rows())
    alone = dataset_report.build_report(config.dataset, demo_tokenizer, **settings)
    assert report.to_dict() == from_cache.to_dict() == alone.to_dict()
    assert report.duplicates == [2, 3] and sorted(report.dropped) == [8]
