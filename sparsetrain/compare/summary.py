"""``OUT/summary.md`` and the figures of a comparison, from its ``results.jsonl``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparsetrain.compare.aggregate import aggregate, ast_table, detail_table, score_table
from sparsetrain.compare.plots import plot_score_vs_sparsity, plot_score_vs_train_flops
from sparsetrain.compare.runner import ACDC_TWIN, TWIN_SUFFIX

__all__ = ["AST_COUNTERPARTS", "name_order", "render_summary", "write_summary"]

# Separately trained runs AST's sub-networks are set beside (those the grid has).
AST_COUNTERPARTS = ("static_uniform", "static_erk", "gmp", "rigl")
# Score-vs-sparsity panels: sparse from the start | dense phases or several models per run.
PANELS = (
    (
        "sparse from the start",
        ("thin_dense", "static_uniform", "static_erk", "set", "rigl", "dsr"),
    ),
    (
        "dense phases, or several models per run",
        ("gmp", "acdc", ACDC_TWIN, "cgap", "pgap", "ast"),
    ),
)


def name_order(variants: Sequence[str]) -> list[str]:
    """Table order: the grid's variants, each AC/DC variant's twin right after it."""
    return [n for name in variants for n in (name, name + TWIN_SUFFIX)]


def render_summary(
    records: Sequence[dict[str, Any]], order: Sequence[str] = (), figures: Sequence[Path] = ()
) -> str:
    """Markdown: per model the score table, the detail table and AST beside its counterparts."""
    rows = aggregate(records, order)
    lines = []
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        score = mine[0].headline
        better = "higher" if score.higher_is_better else "lower"
        lines += [f"## {model}", "", f"{score.label}, mean ± std over seeds ({better} is better):"]
        lines += ["", score_table(rows, model), "", "All measures (means over seeds):", ""]
        lines += [detail_table(rows, model), ""]
        if any(r.name == "ast" for r in mine):
            present = [c for c in AST_COUNTERPARTS if any(r.name == c for r in mine)]
            lines += ["AST sub-networks (one run) beside separately trained runs:", ""]
            lines += [ast_table(rows, model, counterparts=present), ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines).rstrip() + "\n"


def write_summary(
    records: Sequence[dict[str, Any]], out: str | Path, variants: Sequence[str] = ()
) -> list[Path]:
    """Write ``summary.md`` and the figures into ``out``; the paths written."""
    out = Path(out)
    order = name_order(variants)
    rows = aggregate(records, order)
    models = list(dict.fromkeys(r.model for r in rows))
    figures = [
        plot_score_vs_sparsity(rows, m, out / f"compare_score_{m}.png", PANELS)
        for m in models
    ]
    if rows:
        figures.append(plot_score_vs_train_flops(rows, out / "compare_train_flops.png"))
    summary = out / "summary.md"
    summary.write_text(render_summary(records, order, figures))
    return [summary, *figures]
