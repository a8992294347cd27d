"""Results records -> mean +- std over seeds -> markdown tables.

Records are grouped by (model, name, sparsity), where ``name`` is the variant, or
``<variant>_twin`` for an AC/DC variant's dense twin. The std is the sample standard deviation
(n - 1); one seed shows no std.
Each row's score is its task's headline (:func:`sparsetrain.tasks.headline`): test accuracy for
a classifier, validation bits per byte for a language model.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sparsetrain.tasks import CLASSIFICATION, Headline, headline

__all__ = ["Row", "aggregate", "ast_table", "detail_table", "mean_std", "score_table"]


@dataclass(frozen=True)
class Row:
    """One (model, name, sparsity) group of records."""

    model: str
    name: str
    sparsity: float
    seeds: int
    headline: Headline  # what score_mean and score_std measure
    score_mean: float
    score_std: float
    params: float  # means over seeds
    inference_flops: float
    train_flops_rel: float
    wall_s: float


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0.0 for a single value)."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: Iterable[dict[str, Any]], order: Sequence[str] = ()) -> list[Row]:
    """Rows grouped over seeds, sorted by model, then ``order`` of names, then sparsity."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["model"], r["name"], float(r["sparsity"]))].append(r)
    rank = {name: i for i, name in enumerate(order)}
    rows = []
    for (model, name, sparsity), group in groups.items():
        score = headline(group[0].get("task", CLASSIFICATION))
        score_mean, score_std = mean_std([r[score.key] for r in group])
        rows.append(
            Row(
                model=model,
                name=name,
                sparsity=sparsity,
                seeds=len({r["seed"] for r in group}),
                headline=score,
                score_mean=score_mean,
                score_std=score_std,
                params=statistics.fmean(r["params"] for r in group),
                inference_flops=statistics.fmean(r["inference_flops"] for r in group),
                train_flops_rel=statistics.fmean(r["train_flops_rel"] for r in group),
                wall_s=statistics.fmean(r["wall_s"] for r in group),
            )
        )
    rows.sort(key=lambda r: (r.model, rank.get(r.name, len(rank)), r.name, r.sparsity))
    return rows


def _score(row: Row | None) -> str:
    if row is None:
        return "-"
    mean = row.headline.format(row.score_mean)
    return f"{mean} ± {row.headline.format(row.score_std)}" if row.seeds > 1 else mean


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def _pct(s: float) -> str:
    return f"{100 * s:g}%"


def _names(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.name for r in rows))


def score_table(rows: Sequence[Row], model: str) -> str:
    """The headline score of ``model``: one row per name, one column per sparsity."""
    rows = [r for r in rows if r.model == model]
    levels = sorted({r.sparsity for r in rows})
    at = {(r.name, r.sparsity): r for r in rows}
    body = [[name, *(_score(at.get((name, s))) for s in levels)] for name in _names(rows)]
    return _table(["method", *(_pct(s) for s in levels)], body)


def _human(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def detail_table(rows: Sequence[Row], model: str) -> str:
    """Every measure of ``model``'s rows (score, parameters, FLOPs, wall time, seeds)."""
    mine = [r for r in rows if r.model == model]
    header = [
        "method",
        "sparsity",
        mine[0].headline.label if mine else "score",
        "params",
        "inference FLOPs",
        "train FLOPs / dense",
        "wall s",
        "seeds",
    ]
    body = [
        [
            r.name,
            _pct(r.sparsity),
            _score(r),
            _human(r.params),
            _human(r.inference_flops),
            f"{r.train_flops_rel:.3f}",
            f"{r.wall_s:.0f}",
            str(r.seeds),
        ]
        for r in mine
    ]
    return _table(header, body)


def ast_table(
    rows: Sequence[Row], model: str, ast: str = "ast", counterparts: Sequence[str] = ()
) -> str:
    """AST's sub-networks beside separately trained runs at the same sparsity (``counterparts``)."""
    at = {(r.name, r.sparsity): r for r in rows if r.model == model}
    levels = sorted(s for (name, s) in at if name == ast)
    header = ["sparsity", "AST sub-net (one run)", *(f"{c} (own run)" for c in counterparts)]
    body = []
    for s in levels:
        own = [at.get((c, s)) for c in counterparts]
        body.append([_pct(s), _score(at[(ast, s)]), *(_score(r) for r in own)])
    return _table(header, body)
