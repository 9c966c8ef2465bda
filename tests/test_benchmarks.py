"""The benchmark harness at tiny sizes: every case's variants agree, and the table,
JSON and chart come out (each case in its own process, as `make bench` runs it)."""

import json
import os
import sys

import pytest

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")
sys.path.insert(0, HERE)

import _harness  # noqa: E402


def test_every_case_is_registered_with_its_device_count():
    cases = _harness.all_cases()
    assert cases["transformer-1dev"].devices == 1
    assert cases["transformer-d2t4"].devices == 8
    assert any(c.gpu for c in cases.values())


@pytest.mark.parametrize("name", ["transformer-d2t4", "fsdp-data8"])
def test_a_case_checks_times_and_counts_its_variants(tmp_path, name):
    results = _harness.drive([name], folder=str(tmp_path), sizes="smoke", repeats=2, warmup=1)
    result = results[name]
    assert not isinstance(result, str), result
    rows = {r["variant"]: r for r in result["rows"]}
    base = next(r for r in rows.values() if r["baseline"])
    assert base["ratio"] <= 1.0 or len([r for r in rows.values() if r["baseline"]]) == 1
    for row in rows.values():
        assert row["loss_err"] <= 2e-4 and row["grad_err"] <= 2e-4
        assert row["ms_min"] <= row["ms"] <= row["ms_max"]
        assert row["coll_bytes"] > 0 and row["mem_bytes"] > 0 and row["compile_s"] > 0
        assert 0 < row["mfu"] < 1
    ours = next(r for r in rows.values() if not r["baseline"])
    # eqxpar's collectives at the cost model's minimum (a few bytes of scalars over)
    assert ours["coll_bytes"] == pytest.approx(ours["theory_bytes"], rel=0.02)
    with open(tmp_path / "bench.json") as f:
        assert json.load(f)[name]["rows"]
    assert (tmp_path / "bench.png").stat().st_size > 1000


@pytest.mark.parametrize("name", ["classifier-d2t4", "ring-c8"])
def test_the_cases_without_a_theory_check_and_time_their_variants(tmp_path, name):
    # `check` exits unless every variant's loss and gradients match the baseline's, and
    # `run_case` then returns the error text instead of the figures.
    results = _harness.drive([name], folder=str(tmp_path), sizes="smoke", repeats=2, warmup=1)
    result = results[name]
    assert not isinstance(result, str), result
    rows = result["rows"]
    assert len(rows) >= 2
    for row in rows:
        assert row["loss_err"] <= 2e-4 and row["grad_err"] <= 2e-4
        assert row["theory_bytes"] is None
        assert row["collectives"] > 0 and row["coll_bytes"] > 0 and row["mem_bytes"] > 0
        assert row["ms_min"] <= row["ms"] <= row["ms_max"]
    assert [r["variant"] for r in rows if r["baseline"]] == [rows[0]["variant"]]


def test_gpu_mode_runs_its_code_path_on_cpu(tmp_path):
    gpu = [n for n, c in _harness.all_cases().items() if c.gpu]
    results = _harness.drive(gpu, folder=str(tmp_path), sizes="gpu-smoke", repeats=1, warmup=0)
    for name in gpu:
        assert not isinstance(results[name], str), results[name]
        assert len(results[name]["rows"]) >= 2


def test_a_failing_case_is_reported_not_raised(tmp_path):
    result = _harness.run_case(
        "no-such-case", str(tmp_path / "x.json"), sizes="smoke", repeats=1, warmup=0
    )
    assert isinstance(result, str) and "no-such-case" in result
    assert "FAILED" in _harness.table({"no-such-case": result})
