"""Run a comparison grid cell by cell with the training loop, one JSON line per result.

Each cell is one :func:`sparsetrain.train.entry.train` call writing its own run directory under
``OUT/runs/``. Its results are appended to ``OUT/results.jsonl`` together, once the cell is done;
a cell whose key is already there is skipped, so an interrupted grid resumes where it stopped (a
cell that did not finish starts over in its cleared run directory).
A cell yields one record per model it produces: AC/DC its sparse model and its dense twin, AST
each sub-network.

Every record carries the test accuracy and loss (and a language model's bits per byte), the
active parameters, the inference FLOPs per example and the training FLOPs from the run's report,
both also relative to the dense full-width model of the same steps (so a thin dense model is
compared with the wide one), and the wall time of the run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sparsetrain import tasks
from sparsetrain.compare.grid import Cell, Grid, expand
from sparsetrain.data import dataset_info
from sparsetrain.errors import ConfigError, SparsetrainError
from sparsetrain.models.thin import thin_width_for
from sparsetrain.report.flops import inference_flops, training_flops_per_step
from sparsetrain.train.builders import build_model_for
from sparsetrain.train.config import Config
from sparsetrain.train.entry import train
from sparsetrain.train.rundir import clear_run
from sparsetrain.train.state import RunResult

__all__ = ["ACDC_TWIN", "GridRun", "RESULTS", "TWIN_SUFFIX", "load_records", "run_cell", "run_grid"]

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
TWIN_SUFFIX = "_twin"  # record name of an AC/DC variant's dense twin: <variant>_twin
ACDC_TWIN = "acdc" + TWIN_SUFFIX


@dataclass
class GridRun:
    """What :func:`run_grid` did."""

    records: list[dict[str, Any]]  # every record in results.jsonl after the run
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> error


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a results file (none when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise SparsetrainError(f"{path}:{number}: not a JSON record ({error})") from None
    return records


_REFERENCES: dict[str, tuple[int, int]] = {}


def _dense_reference(config: Config) -> tuple[int, int]:
    """(parameters, forward FLOPs per example) of the config's model, dense and full width."""
    key = json.dumps(
        [config.model.name, config.model.options, config.data.name, config.data.options]
    )
    if key not in _REFERENCES:
        info = dataset_info(config.data.name, **config.data.options)
        wide = replace(config, model=replace(config.model, width=1.0))
        model = build_model_for(wide, info)
        example = info.example_input()
        params = sum(p.numel() for p in model.parameters())
        _REFERENCES[key] = params, inference_flops(model, example).dense
    return _REFERENCES[key]


def _thin(config: Config, sparsity: float) -> Config:
    """``config`` with the model narrowed to the parameter count of its sparse counterpart."""
    info = dataset_info(config.data.name, **config.data.options)
    width = thin_width_for(
        config.model.name,
        sparsity,
        exclude=config.sparsity.dense,
        dense_first=config.sparsity.dense_first,
        dense_last=config.sparsity.dense_last,
        width=config.model.width,
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        image_size=info.image_size,
        **config.model.options,
    )
    return replace(config, model=replace(config.model, width=width))


def _common(cell: Cell, grid: Grid, config: Config, result: RunResult, wall: float) -> dict:
    steps = result.state.step
    params, forward = _dense_reference(config)
    dense_train = training_flops_per_step(forward * steps, forward * steps, config.train.batch_size)
    return {
        "cell": cell.key,
        "setup": grid.setup_id(cell),
        "model": cell.model,
        "task": dataset_info(config.data.name, **config.data.options).task,
        "variant": cell.variant.name,
        "method": cell.variant.method,
        "distribution": config.sparsity.distribution,
        "seed": cell.seed,
        "epochs": config.train.epochs,
        "steps": steps,
        "width": config.model.width,
        "wall_s": round(wall, 2),
        "threads": torch.get_num_threads(),
        "dense_params": params,
        "dense_inference_flops": forward,
        "dense_train_flops": dense_train,
    }


def _record(common: dict, name: str, sparsity: float, acc: float, loss: float, **kw: Any) -> dict:
    out = {**common, "name": name, "sparsity": sparsity, "test_acc": acc, "test_loss": loss, **kw}
    out.update(tasks.derived_metrics(common["task"], loss, prefix="test_"))
    out["params_rel"] = out["params"] / common["dense_params"]
    out["inference_flops_rel"] = out["inference_flops"] / common["dense_inference_flops"]
    out["train_flops_rel"] = out["train_flops"] / common["dense_train_flops"]
    return out


def _measures(report: Any) -> dict[str, Any]:
    return {
        "actual_sparsity": report.sparsity.sparsity,
        "params": report.sparsity.total_active,
        "inference_flops": report.flops.sparse,
    }


def run_cell(
    cell: Cell, grid: Grid, run_dir: str | Path, trainer: Callable[[Config], RunResult] = train
) -> list[dict[str, Any]]:
    """Train ``cell`` into ``run_dir``; its result records (one per model it produces)."""
    config = grid.config_for(cell, run_dir)
    if cell.variant.kind == "thin":
        config = _thin(config, float(cell.sparsity))
    start = time.perf_counter()
    result = trainer(config)
    wall = time.perf_counter() - start
    common = _common(cell, grid, result.config, result, wall)
    report = result.report
    train_flops = report.training_flops
    if cell.variant.kind == "multi":
        return _subnet_records(cell, result, common)
    level = cell.sparsity if isinstance(cell.sparsity, float) else 0.0
    records = [
        _record(
            common,
            cell.variant.name,
            level,
            result.test_acc,
            result.test_loss,
            train_flops=train_flops,
            **_measures(report),
        )
    ]
    twin_acc = result.extras.get("dense_twin_test_acc")
    if twin_acc is not None:  # AC/DC: the twin trained densely over the final phase's steps
        method = result.state.sparsifier.method
        twin_steps = method.final_phase.length
        forward = common["dense_inference_flops"]
        batch = result.config.train.batch_size
        twin_cost = training_flops_per_step(forward * twin_steps, forward * twin_steps, batch)
        records.append(
            _record(
                common,
                cell.variant.name + TWIN_SUFFIX,
                level,
                twin_acc,
                result.extras["dense_twin_test_loss"],
                train_flops=train_flops + twin_cost,
                actual_sparsity=0.0,
                params=common["dense_params"],
                inference_flops=forward,
            )
        )
    return records


def _subnet_records(cell: Cell, result: RunResult, common: dict) -> list[dict[str, Any]]:
    """One record per AST sub-network: its own masks' parameters and FLOPs, the run's cost."""
    sp = result.state.sparsifier
    records = []
    for i, level in enumerate(cell.variant.sparsities):
        sp.use_subnet(i)
        records.append(
            _record(
                common,
                cell.variant.name,
                level,
                result.extras[f"subnet{i}_test_acc"],
                result.extras[f"subnet{i}_test_loss"],
                train_flops=result.report.training_flops,
                subnet=i,
                **_measures(sp.report()),
            )
        )
    return records


def _check_setup(records: list[dict[str, Any]], grid: Grid, cells: list[Cell], out: Path) -> None:
    """Refuse to add results of another setup (epochs, data, optimizer, ...) to the same file."""
    expected = {cell.model: grid.setup_id(cell) for cell in cells}
    for record in records:
        want = expected.get(record.get("model"))
        if want is not None and record.get("setup") != want:
            raise ConfigError(
                f"{out / RESULTS} holds {record['model']} results of another setup (epochs, data, "
                f"optimizer or lr schedule differ; cell {record.get('cell')}); "
                "use another --out directory"
            )


def _run_one(
    cell: Cell, grid: Grid, run_dir: Path, trainer: Callable[[Config], RunResult]
) -> list[dict[str, Any]]:
    clear_run(run_dir)  # a cell not in the results never finished: it starts over
    return run_cell(cell, grid, run_dir, trainer)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def _completed(
    pending: list[Cell],
    grid: Grid,
    out: Path,
    trainer: Callable[[Config], RunResult],
    jobs: int,
) -> Iterator[tuple[Cell, list[dict[str, Any]] | BaseException]]:
    """(cell, its records or the error it raised), in the order the cells finish."""

    def run_dir(cell: Cell) -> Path:
        return out / "runs" / cell.key.replace("/", "_")

    if jobs == 1:
        for cell in pending:
            try:
                yield cell, _run_one(cell, grid, run_dir(cell), trainer)
            except Exception as error:  # noqa: BLE001 - reported at the end, the grid goes on
                log.debug("%s", traceback.format_exc())
                yield cell, error
        return
    threads = max(1, torch.get_num_threads() // jobs)  # the cores shared out, not oversubscribed
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_set_threads, initargs=(threads,)
    ) as pool:
        futures = {pool.submit(_run_one, c, grid, run_dir(c), trainer): c for c in pending}
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], error if error is not None else future.result()


def run_grid(
    grid: Grid,
    out: str | Path,
    *,
    trainer: Callable[[Config], RunResult] = train,
    progress: bool | None = None,
    jobs: int = 1,
) -> GridRun:
    """Run every cell of ``grid`` not yet in ``OUT/results.jsonl``; failures are logged and
    returned, and the other cells still run (an hour-long grid should not stop at one error).

    ``jobs`` > 1 trains that many cells at once in spawned processes, the torch threads shared
    out among them (``trainer`` must then be picklable). Small models use several threads
    poorly, so two one-thread cells finish sooner than two two-thread cells in turn.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    records = load_records(path)
    cells = expand(grid)
    _check_setup(records, grid, cells, out)
    done = {r["cell"] for r in records}
    outcome = GridRun(records=records)
    outcome.skipped = [cell.key for cell in cells if cell.key in done]
    pending = [cell for cell in cells if cell.key not in done]
    bar = tqdm(
        total=len(pending),
        desc="compare",
        unit="cell",
        disable=None if progress is None else not progress,
    )
    for cell, new in _completed(pending, grid, out, trainer, jobs):
        bar.update()
        if isinstance(new, BaseException):
            log.error("cell %s failed: %s", cell.key, new)
            outcome.failed[cell.key] = f"{type(new).__name__}: {new}"
            continue
        with path.open("a") as f:  # all of a cell's records at once: a cell is done or not
            f.write("".join(json.dumps(r) + "\n" for r in new))
        records.extend(new)
        outcome.ran.append(cell.key)
        score = tasks.headline(new[0]["task"])
        scores = ", ".join(
            f"{r['name']}@{r['sparsity']:g} {score.format(r[score.key])}" for r in new
        )
        log.info("%s: %s %s (%.0fs)", cell.key, score.label, scores, new[0]["wall_s"])
    bar.close()
    return outcome
