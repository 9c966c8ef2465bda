"""The benchmark harness at tiny sizes: every case's variants agree, and the table,
JSON and chart come out (each case in its own process, as `make bench` runs it)."""

import dataclasses
import json
import os
import re
import sys

import numpy as np
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


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`smoke(name)`: the case's figures at smoke sizes, run once per module."""
    results = {}

    def run(name):
        if name not in results:
            folder = str(tmp_path_factory.mktemp(name))
            found = _harness.drive([name], folder=folder, sizes="smoke", repeats=2, warmup=1)
            results[name] = found[name]
        return results[name]

    return run


@pytest.mark.parametrize("name", ["classifier-d2t4", "ring-c8", "moe-d2e4"])
def test_the_cases_without_a_theory_check_and_time_their_variants(smoke, name):
    # `check` exits unless every variant's loss and gradients match the baseline's, and
    # `run_case` then returns the error text instead of the figures.
    result = smoke(name)
    assert not isinstance(result, str), result
    rows = result["rows"]
    assert len(rows) >= 2
    for row in rows:
        assert row["loss_err"] <= 2e-4 and row["grad_err"] <= 2e-4
        assert row["collectives"] > 0 and row["coll_bytes"] > 0 and row["mem_bytes"] > 0
        assert row["ms_min"] <= row["ms"] <= row["ms_max"]
    # No theory for the classifier, the context axis or the expert axis (the MoE case's
    # dense rows have theirs: the next test).
    assert all(r["theory_bytes"] is None for r in rows if "dense" not in r["variant"])
    assert [r["variant"] for r in rows if r["baseline"]] == [rows[0]["variant"]]


def test_the_moe_case_drops_alike_and_sets_the_dense_model_beside_it(smoke):
    result = smoke("moe-d2e4")
    assert not isinstance(result, str), result
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == [
        "jit auto MoE",
        "eqxpar MoE",
        "jit auto dense (same active size)",
        "eqxpar dense (same active size)",
    ]
    # Capacity drops some assignments, and both MoE variants dropped the same ones: the
    # previous test found their gradients equal.
    dropped = float(result["title"].split("% of assignments dropped")[0].split(": ")[-1])
    assert dropped > 0
    # The plain dense model is a reference of its own (another model), eqxpar's dense
    # step is checked against it, not against the MoE baseline.
    assert rows["jit auto dense (same active size)"]["grad_err"] == 0.0
    assert 0 < rows["eqxpar dense (same active size)"]["grad_err"] <= 2e-4
    dense = rows["eqxpar dense (same active size)"]
    assert dense["coll_bytes"] == pytest.approx(dense["theory_bytes"], rel=0.02)


def test_the_pipeline_case_counts_the_sends_its_ticks_run(smoke):
    result = smoke("pipeline-d2t2p2")
    assert not isinstance(result, str), result
    rows = {r["variant"]: r for r in result["rows"]}
    ours = rows["eqxpar 1F1B"]
    assert ours["loss_err"] <= 2e-4 and ours["grad_err"] <= 2e-4
    # `communication_report`'s count (the permutes the schedule's ticks select), at the
    # cost model's minimum, not the counter's every-branch-every-tick upper bound.
    assert ours["coll_bytes"] == pytest.approx(ours["theory_bytes"], rel=0.02)
    assert sum(r["baseline"] for r in rows.values()) == 3
    assert min(r["ratio"] for r in rows.values() if r["baseline"]) == 1.0


def _fake(loss, grads):
    """A variant whose probe returns `(loss, grads)`, with nothing to time."""

    def probe():
        return np.float32(loss), [np.asarray(g, np.float32) for g in grads]

    return _harness.Variant(None, (), None, None, 0.0, probe)


def test_check_compares_a_variant_with_its_named_reference():
    variants = {
        "moe": _fake(1.0, [[3.0, 5.0]]),
        "moe again": _fake(1.0, [[3.0, 5.0]]),
        "dense": _fake(7.0, [[2.0, 11.0]]),
        "dense again": _fake(7.0, [[2.0, 11.0 * (1 + 1e-5)]]),
    }
    refs = {"dense": None, "dense again": "dense"}
    built = _harness.Built("fake", variants, 1.0, 1, ("moe",), references=refs)
    errors = _harness.check(built)
    assert errors["moe"] == errors["moe again"] == errors["dense"] == (0.0, 0.0)
    assert 0 < errors["dense again"][1] < 2e-4
    # Without the references the dense variants are checked against the first variant.
    with pytest.raises(SystemExit, match="variant 'dense' computed loss 7"):
        _harness.check(dataclasses.replace(built, references={}))
    wrong = dict(variants, **{"dense again": _fake(7.0, [[2.0, 13.0]])})
    with pytest.raises(SystemExit, match="'dense again'.*the reference 'dense'"):
        _harness.check(dataclasses.replace(built, variants=wrong))


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


@pytest.mark.slow  # about 18 compiles of pipelined steps
def test_the_pipeline_benchmark_times_every_schedule_at_each_microbatch_size():
    import subprocess

    flags = "--devices 8 --repeats 1 --warmup 0 --width 16 --hidden 16 --features 4"
    flags += " --microbatches 4 8 --batch 8 --time-batch 2 4 --time-microbatches 4"
    flags += " --slowdown 1000 --flat 1000 --gpipe-growth 0"
    run = subprocess.run(
        [sys.executable, os.path.join(HERE, "pipeline.py"), *flags.split()],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for rows in (2, 4):
        for name in (
            "GPipe",
            "1F1B",
            "interleaved v=2",
            "ZB-H1",
            "plain jax.jit DP",
            "plain DP, accumulated",
        ):
            assert re.search(rf"^\| {rows} +\| +{re.escape(name)} \|", out, re.M), out
        assert (
            f"{rows} rows: 1F1B loss" in out and f"{rows} rows: plain DP, accumulated loss" in out
        )
    assert "at 4 rows per microbatch the 1F1B step costs" in out
    assert re.search(r"^\| 4 +\| +[0-9.]+ \| +[0-9.]+ \| +-?[0-9.]+ \| +-?[0-9]+% \|", out, re.M)
    assert "FAIL" not in out
