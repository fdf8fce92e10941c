"""The arena's verdict: each pair's wins, ties and losses over prompts judged in both orders, win rates with 95 %
Wilson intervals, a ranking, reference metrics (BLEU, chrF, ROUGE-L), and the report as JSON and Markdown."""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

from arena_config import ArenaConfig, Prompt, contestant_label
from arena_judge import UNPARSED

Z_95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (ties count as half a success); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def prompt_outcome(records: list[dict], a: str) -> float | None:
    """a's score on one prompt against one rival: the mean of its two orders' verdicts (win 1, tie ½, loss 0), so
    a judge that always prefers the first answer scores a tie; None when neither verdict could be read."""
    scores = [1.0 if r["winner"] == a else 0.5 if r["winner"] == "tie" else 0.0 for r in records if r["winner"]]
    return sum(scores) / len(scores) if scores else None


def build_report(config: ArenaConfig, prompts: list[Prompt], replies: dict, judged: dict) -> dict[str, Any]:
    """Counts, win rates with 95 % Wilson intervals, a ranking, reference metrics and the per-prompt table."""
    contestants = config.contestants
    pairs, totals = [], {c: {"wins": 0, "ties": 0, "losses": 0} for c in contestants}
    for a, b in combinations(contestants, 2):
        wins = ties = losses = unparsed = flipped = 0
        for prompt in prompts:
            records = [judged[(a, b, prompt.id, order)] for order in ("ab", "ba") if (a, b, prompt.id, order) in judged]
            score = prompt_outcome(records, a)
            if score is None:
                unparsed += 1
                continue
            wins, ties, losses = wins + (score > 0.5), ties + (score == 0.5), losses + (score < 0.5)
            read = [r["winner"] for r in records if r["winner"]]
            flipped += len(read) == 2 and read[0] != read[1]
        n = wins + ties + losses
        low, high = wilson_interval(wins + ties / 2, n)
        pairs.append(
            {
                "a": a,
                "b": b,
                "wins": wins,
                "ties": ties,
                "losses": losses,
                "unparsed": unparsed,
                "order_disagreements": flipped,
                "win_rate": round((wins + ties / 2) / n, 4) if n else None,
                "ci95": [round(low, 4), round(high, 4)],
            }
        )
        for name, (w, loss) in ((a, (wins, losses)), (b, (losses, wins))):
            totals[name]["wins"] += w
            totals[name]["losses"] += loss
            totals[name]["ties"] += ties
    ranking = []
    for name, counts in totals.items():
        n = counts["wins"] + counts["ties"] + counts["losses"]
        low, high = wilson_interval(counts["wins"] + counts["ties"] / 2, n)
        ranking.append(
            {
                "contestant": name,
                **counts,
                "score": round((counts["wins"] + counts["ties"] / 2) / n, 4) if n else None,
                "ci95": [round(low, 4), round(high, 4)],
                **speed(name, prompts, replies),
            }
        )
    ranking.sort(key=lambda row: -1 if row["score"] is None else row["score"], reverse=True)
    table = [
        {
            "prompt": prompt.id,
            "text": prompt.text,
            "reference": prompt.reference,
            "replies": {c: replies[(c, prompt.id)]["reply"] for c in contestants},
            "judgments": [
                {key: r[key] for key in ("a", "b", "order", "verdict", "winner", "reason")}
                for a, b in combinations(contestants, 2)
                for order in ("ab", "ba")
                if (r := judged.get((a, b, prompt.id, order)))
            ],
        }
        for prompt in prompts
    ]
    judgments = list(judged.values())
    return {
        "contestants": contestants,
        "judge": {"provider": config.judge_provider, "model": config.judge_model, "base_url": config.judge_base_url},
        "prompts": len(prompts),
        "prompt_source": config.prompt_source,
        "judgments": len(judgments),
        "unparsed_judgments": sum(1 for r in judgments if r["verdict"] == UNPARSED),
        "pairs": pairs,
        "ranking": ranking,
        "reference_metrics": reference_metrics(contestants, prompts, replies),
        "per_prompt": table,
    }


def speed(contestant: str, prompts: list[Prompt], replies: dict) -> dict[str, float]:
    records = [replies[(contestant, prompt.id)] for prompt in prompts]
    seconds = sum(r["seconds"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    return {
        "reply_tokens": tokens,
        "reply_seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
    }


def reference_metrics(contestants: list[str], prompts: list[Prompt], replies: dict) -> dict[str, dict] | None:
    """BLEU and chrF (sacrebleu) and ROUGE-L F1 (rouge-score) of each contestant's replies against the data's own
    answers, over the prompts that have one; None when none has."""
    with_reference = [prompt for prompt in prompts if prompt.reference.strip()]
    if not with_reference:
        return None
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    references = [prompt.reference for prompt in with_reference]
    metrics = {}
    for contestant in contestants:
        hypotheses = [replies[(contestant, prompt.id)]["reply"] for prompt in with_reference]
        rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for ref, hyp in zip(references, hypotheses, strict=True)]
        metrics[contestant] = {
            "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
            "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
            "rougeL": round(100 * sum(rouge) / len(rouge), 2),
            "prompts": len(with_reference),
        }
    return metrics


def verdict_line(report: dict[str, Any]) -> str:
    """One line: the leader and its score, or each pair's counts."""
    parts = []
    for pair in report["pairs"]:
        rate = f"{pair['win_rate']:.0%}" if pair["win_rate"] is not None else "–"
        parts.append(
            f"{contestant_label(pair['a'])} vs {contestant_label(pair['b'])}: {pair['wins']}-{pair['ties']}-"
            f"{pair['losses']} ({rate})"
        )
    return "; ".join(parts) + (f"; {report['unparsed_judgments']} unparsed" if report["unparsed_judgments"] else "")


def _cell(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: pairs, ranking, reference metrics, every prompt with its replies and reasons."""
    label = contestant_label
    judge = report["judge"]
    lines = [
        "# Arena report",
        "",
        f"{report['prompts']} prompts ({report['prompt_source']}), {len(report['contestants'])} contestants, judge "
        f"{judge['provider']}:{judge['model']}; {report['judgments']} judgements ({report['unparsed_judgments']} "
        "unparsed). Each prompt is judged in both orders; a prompt's outcome is the mean of the two (win 1, tie ½, "
        "loss 0), so verdicts that flip with the order count as a tie. Intervals: 95 % Wilson, ties as half a win.",
        "",
        "## Pairs",
        "",
        "| A | B | A wins | ties | B wins | unparsed | order flips | A's win rate | 95 % CI |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for pair in report["pairs"]:
        low, high = pair["ci95"]
        lines.append(
            f"| {_cell(label(pair['a']))} | {_cell(label(pair['b']))} | {pair['wins']} | {pair['ties']} | "
            f"{pair['losses']} | {pair['unparsed']} | {pair['order_disagreements']} | {_percent(pair['win_rate'])} | "
            f"{100 * low:.1f}–{100 * high:.1f} % |"
        )
    lines += [
        "",
        "## Ranking (win rate against all others)",
        "",
        "| # | contestant | wins | ties | losses | score | 95 % CI | tokens/s |",
        "|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for place, row in enumerate(report["ranking"], 1):
        low, high = row["ci95"]
        lines.append(
            f"| {place} | {_cell(label(row['contestant']))} | {row['wins']} | {row['ties']} | {row['losses']} | "
            f"{_percent(row['score'])} | {100 * low:.1f}–{100 * high:.1f} % | {row['tokens_per_s']:.1f} |"
        )
    if report["reference_metrics"]:
        lines += [
            "",
            "## Against the reference answers",
            "",
            "| contestant | BLEU | chrF | ROUGE-L | prompts |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, values in report["reference_metrics"].items():
            lines.append(
                f"| {_cell(label(name))} | {values['bleu']:.2f} | {values['chrf']:.2f} | {values['rougeL']:.2f} | "
                f"{values['prompts']} |"
            )
    names = report["contestants"]
    lines += [
        "",
        "## Per prompt",
        "",
        "| # | prompt | " + " | ".join(_cell(label(name)) for name in names) + " | verdicts (order: reason) |",
        "|---:|---|" + "---|" * len(names) + "---|",
    ]
    for row in report["per_prompt"]:
        verdicts = "<br>".join(
            f"{label(j['a'])} vs {label(j['b'])} [{j['order']}]: "
            f"{label(j['winner']) if j['winner'] and j['winner'] != 'tie' else j['winner'] or UNPARSED}"
            f"{' — ' + j['reason'] if j['reason'] else ''}"
            for j in row["judgments"]
        )
        cells = [_cell(row["replies"][name]) for name in names]
        lines.append(f"| {row['prompt'] + 1} | {_cell(row['text'])} | " + " | ".join(cells) + f" | {_cell(verdicts)} |")
    return "\n".join(lines) + "\n"
