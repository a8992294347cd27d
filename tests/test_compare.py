"""``sparsetrain compare``: grid expansion, resuming, aggregation, tables, multi-model cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsetrain.cli import main
from sparsetrain.compare import (
    aggregate,
    expand,
    grid_from_dict,
    load_records,
    mean_std,
    run_cell,
    run_grid,
)
from sparsetrain.compare.aggregate import ast_table, detail_table, score_table
from sparsetrain.compare.runner import ACDC_TWIN, RESULTS
from sparsetrain.errors import ConfigError
from sparsetrain.train.loop import train

BASE = {
    "data": {"name": "synthetic", "options": {"num_samples": 64, "image_size": 8}},
    "train": {"epochs": 3, "batch_size": 16, "log_every": 0},
    "optimizer": {"lr": 0.05},
}


def _grid(variants: dict, overrides=(), **axes):
    raw = {
        "base": BASE,
        "models": ["mlp"],
        "sparsities": [0.5, 0.75],
        "seeds": [0],
        "variants": variants,
        **axes,
    }
    return grid_from_dict(raw, overrides=overrides)


def _counting(calls: list):
    def trainer(config):
        calls.append(config.train.out)
        return train(config)

    return trainer


def test_grid_expands_to_the_expected_cells():
    grid = _grid(
        {
            "dense": {"method": "dense", "kind": "dense"},
            "thin_dense": {"method": "dense", "kind": "thin"},
            "static": {"method": "static"},
            "ast": {"method": "ast", "kind": "multi", "sparsities": [0.5, 0.75]},
        },
        models={"mlp": {}, "small_cnn": {"seeds": [3]}},
        seeds=[0, 1],
    )
    keys = [cell.key for cell in expand(grid)]
    per_seed = ["dense/0", "thin_dense/0.5", "thin_dense/0.75", "static/0.5", "static/0.75"]
    per_seed.append("ast/0.5+0.75")
    expected = [f"mlp/{k}/seed{s}" for s in (0, 1) for k in per_seed]
    expected += [f"small_cnn/{k}/seed3" for k in per_seed]
    assert keys == expected
    grid = _grid({"static": {"method": "static"}}, models={"mlp": {}, "gpt": {"sparsities": [0.9]}})
    assert [c.key for c in expand(grid)] == [
        "mlp/static/0.5/seed0",
        "mlp/static/0.75/seed0",
        "gpt/static/0.9/seed0",
    ]


def test_cell_configs_share_the_setup_and_differ_in_method():
    grid = _grid({"dense": {"method": "dense", "kind": "dense"}, "gmp": {"method": "gmp"}})
    cells = expand(grid)
    configs = [grid.config_for(c, "out") for c in cells]
    assert [c.sparsity.method for c in configs] == ["dense", "gmp", "gmp"]
    assert [c.sparsity.sparsity for c in configs] == [0.0, 0.5, 0.75]
    assert {c.optimizer for c in configs} == {configs[0].optimizer}
    assert {grid.setup_id(c) for c in cells} == {grid.setup_id(cells[0])}


def test_variant_set_changes_its_sparsity_keys_and_variants_pick_rows():
    rows = {
        "acdc": {"method": "acdc"},
        "acdc_dense_last": {"method": "acdc", "set": ["sparsity.dense_last=true"]},
        "gmp": {"method": "gmp"},
    }
    raw = {"base": BASE, "models": ["mlp"], "sparsities": [0.5], "seeds": [0], "variants": rows}
    grid = grid_from_dict(raw)
    by_name = {c.variant.name: grid.config_for(c, "-") for c in expand(grid)}
    assert by_name["acdc_dense_last"].sparsity.dense_last
    assert not by_name["acdc"].sparsity.dense_last
    assert {grid.setup_id(c) for c in expand(grid)} == {grid.setup_id(expand(grid)[0])}
    picked = grid_from_dict(raw, variants=["gmp", "acdc"])
    assert [c.key for c in expand(picked)] == ["mlp/gmp/0.5/seed0", "mlp/acdc/0.5/seed0"]
    with pytest.raises(ConfigError, match="unknown variant.*the grid has acdc, acdc_dense_last"):
        grid_from_dict(raw, variants=["rigl"])
    rows["bad"] = {"method": "gmp", "set": ["train.epochs=9"]}
    with pytest.raises(ConfigError, match="only sparsity"):
        grid_from_dict(raw)


def test_grid_rejects_bad_input():
    with pytest.raises(ConfigError, match="kind"):
        _grid({"x": {"method": "static", "kind": "wide"}})
    with pytest.raises(ConfigError, match="sparsities are given exactly for kind multi"):
        _grid({"ast": {"method": "ast", "kind": "multi"}})
    with pytest.raises(ConfigError, match="unknown option"):
        _grid({"rigl": {"method": "rigl", "options": {"update_evry": 3}}})
    with pytest.raises(ConfigError, match="unknown key"):
        grid_from_dict({"base": BASE, "model": ["mlp"]})


def test_second_run_skips_finished_cells(tmp_path):
    grid = _grid(
        {"dense": {"method": "dense", "kind": "dense"}, "static": {"method": "static"}},
    )
    calls: list = []
    first = run_grid(grid, tmp_path, trainer=_counting(calls), progress=False)
    assert not first.failed and len(first.ran) == 3 and len(calls) == 3
    lines = (tmp_path / RESULTS).read_text().splitlines()
    assert len(lines) == 3

    second = run_grid(grid, tmp_path, trainer=_counting(calls), progress=False)
    assert second.ran == [] and len(second.skipped) == 3 and len(calls) == 3
    assert (tmp_path / RESULTS).read_text().splitlines() == lines

    (tmp_path / RESULTS).write_text("\n".join(lines[:2]) + "\n")  # as if stopped in cell 3
    third = run_grid(grid, tmp_path, trainer=_counting(calls), progress=False)
    assert third.ran == ["mlp/static/0.75/seed0"] and len(calls) == 4
    assert [json.loads(x)["cell"] for x in (tmp_path / RESULTS).read_text().splitlines()] == [
        json.loads(x)["cell"] for x in lines
    ]


def test_another_setup_is_refused_in_the_same_directory(tmp_path):
    variants = {"dense": {"method": "dense", "kind": "dense"}}
    run_grid(_grid(variants), tmp_path, progress=False)
    other = grid_from_dict(
        {
            "base": BASE,
            "models": ["mlp"],
            "sparsities": [0.5],
            "seeds": [0],
            "variants": variants,
        },
        overrides=["train.epochs=1"],
    )
    with pytest.raises(ConfigError, match="another setup"):
        run_grid(other, tmp_path, progress=False)


def test_records_measure_the_run(tmp_path):
    grid = _grid(
        {
            "static": {"method": "static"},
            "thin_dense": {"method": "dense", "kind": "thin"},
        },
        sparsities=[0.75],
    )
    static, thin = (run_cell(c, grid, tmp_path / c.variant.name)[0] for c in expand(grid))
    assert static["actual_sparsity"] == pytest.approx(0.75, abs=0.01)
    assert static["params"] < static["dense_params"]
    assert static["inference_flops_rel"] == pytest.approx(0.25, abs=0.02)
    assert static["train_flops_rel"] == pytest.approx(0.25, abs=0.02)
    assert static["steps"] == 3 * 4 and 0.0 <= static["test_acc"] <= 1.0
    assert thin["width"] < 1.0 and thin["actual_sparsity"] == 0.0
    assert thin["params"] == pytest.approx(static["params"], rel=0.1)


def test_ast_cell_gives_one_record_per_subnetwork(tmp_path):
    grid = _grid(
        {
            "ast": {
                "method": "ast",
                "kind": "multi",
                "sparsities": [0.5, 0.75, 0.9],
                "options": {"update_every": 2},
            }
        }
    )
    (cell,) = expand(grid)
    records = run_cell(cell, grid, tmp_path)
    assert [r["sparsity"] for r in records] == [0.5, 0.75, 0.9]
    assert [r["subnet"] for r in records] == [0, 1, 2]
    assert {r["cell"] for r in records} == {"mlp/ast/0.5+0.75+0.9/seed0"}
    params = [r["params"] for r in records]
    assert params[0] > params[1] > params[2]
    for r in records:
        assert r["actual_sparsity"] == pytest.approx(r["sparsity"], abs=0.01)
    assert len({r["train_flops"] for r in records}) == 1  # one run's cost


def test_acdc_cell_gives_sparse_and_dense_twin_records(tmp_path):
    # 48 steps: the preset's shortest phase (5% of training) still has 2 steps
    grid = _grid({"acdc": {"method": "acdc"}}, ["train.batch_size=4"], sparsities=[0.75])
    (cell,) = expand(grid)
    sparse, twin = run_cell(cell, grid, tmp_path)
    assert (sparse["name"], twin["name"]) == ("acdc", ACDC_TWIN)
    assert sparse["actual_sparsity"] == pytest.approx(0.75, abs=0.01)
    assert twin["actual_sparsity"] == 0.0 and twin["params"] == twin["dense_params"]
    assert twin["train_flops"] > sparse["train_flops"]
    result = json.loads((tmp_path / "report.json").read_text())
    assert twin["test_acc"] == result["extras"]["dense_twin_test_acc"]
    assert sparse["test_acc"] == result["metrics"]["test_acc"]
    grid = _grid(
        {"acdc_keep": {"method": "acdc", "options": {"reset_state": "none"}}},
        ["train.batch_size=4"],
        sparsities=[0.75],
    )
    names = [r["name"] for r in run_cell(expand(grid)[0], grid, tmp_path / "keep")]
    assert names == ["acdc_keep", "acdc_keep_twin"]  # each AC/DC variant's twin is its own row


def _record(name, sparsity, seed, acc, model="mlp"):
    return {
        "model": model,
        "name": name,
        "sparsity": sparsity,
        "seed": seed,
        "test_acc": acc,
        "params": 100 * (1 - sparsity),
        "inference_flops": 1000 * (1 - sparsity),
        "train_flops_rel": 1 - sparsity,
        "wall_s": 2.0 + seed,
    }


def test_mean_std_is_the_sample_statistic():
    assert mean_std([0.8, 0.9, 1.0]) == (pytest.approx(0.9), pytest.approx(0.1))
    assert mean_std([0.7]) == (0.7, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_aggregate_groups_over_seeds_in_grid_order():
    records = [
        _record("static", 0.9, 0, 0.80),
        _record("static", 0.9, 1, 0.84),
        _record("dense", 0.0, 0, 0.90),
        _record("dense", 0.0, 1, 0.92),
        _record("dense", 0.0, 2, 0.94),
        _record("static", 0.8, 0, 0.86),
        _record("dense", 0.0, 0, 0.5, model="cnn"),
    ]
    rows = aggregate(records, order=["dense", "static"])
    assert [(r.model, r.name, r.sparsity) for r in rows] == [
        ("cnn", "dense", 0.0),
        ("mlp", "dense", 0.0),
        ("mlp", "static", 0.8),
        ("mlp", "static", 0.9),
    ]
    dense = rows[1]
    assert dense.seeds == 3 and dense.score_mean == pytest.approx(0.92)
    assert dense.score_std == pytest.approx(0.02)
    static = rows[3]
    assert static.score_mean == pytest.approx(0.82) and static.wall_s == pytest.approx(2.5)
    assert static.score_std == pytest.approx(0.0282843, rel=1e-5)


def test_tables_render():
    records = [
        _record("dense", 0.0, 0, 0.90),
        _record("dense", 0.0, 1, 0.92),
        _record("static", 0.9, 0, 0.80),
        _record("static", 0.9, 1, 0.84),
        _record("ast", 0.9, 0, 0.83),
    ]
    rows = aggregate(records, order=["dense", "static", "ast"])
    table = score_table(rows, "mlp").splitlines()
    assert table[0] == "| method | 0% | 90% |"
    assert table[2] == "| dense | 91.00 ± 1.41 | - |"
    assert table[3] == "| static | - | 82.00 ± 2.83 |"
    assert table[4] == "| ast | - | 83.00 |"
    detail = detail_table(rows, "mlp").splitlines()
    assert detail[3].startswith("| static | 90% | 82.00 ± 2.83 | 10 | 100 | 0.100 | 2 | 2 |")
    side = ast_table(rows, "mlp", counterparts=["static"]).splitlines()
    assert side[2] == "| 90% | 83.00 | 82.00 ± 2.83 |"


def test_cli_compare_quick_runs_and_resumes(tmp_path, capsys):
    grid = {
        "base": BASE,
        "models": ["small_cnn"],
        "sparsities": [0.5, 0.9],
        "seeds": [0, 1],
        "variants": {
            "dense": {"method": "dense", "kind": "dense"},
            "static": {"method": "static"},
        },
        "quick": {
            "models": ["mlp"],
            "sparsities": [0.9],
            "seeds": [0],
            "set": ["train.epochs=1"],
        },
    }
    path = tmp_path / "grid.yaml"
    path.write_text(json.dumps(grid))
    out = tmp_path / "out"
    assert main(["-q", "compare", str(path), "--quick", "--out", str(out)]) == 0
    assert "2 cells run, 0 already done" in capsys.readouterr().out
    records = load_records(out / RESULTS)
    assert [(r["model"], r["cell"], r["epochs"]) for r in records] == [
        ("mlp", "mlp/dense/0/seed0", 1),
        ("mlp", "mlp/static/0.9/seed0", 1),
    ]
    assert (out / "summary.md").read_text().startswith("## mlp")
    assert (out / "compare_score_mlp.png").stat().st_size > 0
    assert main(["-q", "compare", str(path), "--quick", "--out", str(out)]) == 0
    assert "0 cells run, 2 already done" in capsys.readouterr().out


def test_train_subset_keeps_the_same_training_examples():
    from sparsetrain.data import load_dataset

    options = {"num_samples": 64, "image_size": 8}
    first, _ = load_dataset("synthetic", "train", train_subset=20, **options)
    again, _ = load_dataset("synthetic", "train", train_subset=20, **options)
    test, _ = load_dataset("synthetic", "test", train_subset=20, **options)
    whole_test, _ = load_dataset("synthetic", "test", **options)
    assert len(first) == 20
    assert all((a == b).all() for a, b in zip(first.tensors, again.tensors, strict=True))
    assert len(test) == len(whole_test)
    with pytest.raises(ConfigError, match="train_subset"):
        load_dataset("synthetic", "train", train_subset=0, **options)


def test_dense_gradient_steps_are_charged_in_training_flops():
    import torch

    from sparsetrain.report.summary import build_report

    model = torch.nn.Sequential(torch.nn.Linear(8, 4, bias=False))
    masks = {"0.weight": torch.arange(32).reshape(4, 8) % 4 == 0}  # 25% dense
    density = {"0.weight": 0.25 * 10}
    kw = {"density_sum": density, "steps": 10, "batch_size": 2}
    plain = build_report(model, masks, example_input=torch.zeros(1, 8), **kw)
    grown = build_report(
        model, masks, example_input=torch.zeros(1, 8), dense_gradient_steps=3, **kw
    )
    assert plain.flops.dense == 64 and plain.flops.sparse == 16
    assert plain.training_flops == 3 * 16 * 10 * 2
    assert grown.training_flops - plain.training_flops == 3 * (64 - 16) * 2
    assert grown.training_flops_dense == plain.training_flops_dense


def test_the_shipped_quick_grid_gives_every_cell_over_a_hundred_steps(tmp_path):
    """One epoch on 5k images (39 steps) left four methods at exactly chance."""
    from sparsetrain.compare.grid import expand, load_grid

    grid = load_grid(Path(__file__).resolve().parents[1] / "configs" / "compare.yaml", quick=True)
    for cell in expand(grid):
        config = grid.config_for(cell, tmp_path / cell.key)
        steps = config.train.epochs * (
            config.data.options["train_subset"] // config.train.batch_size
        )
        assert steps >= 100, cell.key


def test_parallel_jobs_give_the_records_of_a_serial_run(tmp_path):
    grid = _grid({"dense": {"method": "dense", "kind": "dense"}, "rigl": {"method": "rigl"}})
    serial = run_grid(grid, tmp_path / "serial", progress=False)
    parallel = run_grid(grid, tmp_path / "parallel", progress=False, jobs=2)
    assert sorted(parallel.ran) == sorted(serial.ran) and len(serial.ran) == 3
    assert not parallel.failed
    by_cell = {r["cell"]: r for r in load_records(tmp_path / "parallel" / RESULTS)}
    assert {r["threads"] for r in by_cell.values()} == {1}
    for record in serial.records:  # same masks and accuracies; one thread vs several rounds
        twin = by_cell[record["cell"]]
        assert twin["actual_sparsity"] == record["actual_sparsity"]
        assert twin["test_acc"] == pytest.approx(record["test_acc"], abs=0.05)


def test_cli_compare_refuses_a_bad_jobs_count(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "compare", "--jobs", "0"])
    assert "not a positive integer" in capsys.readouterr().err
