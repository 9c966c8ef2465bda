"""The example scripts run and learn (real data: scikit-learn's bundled digits)."""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


@pytest.fixture(autouse=True)
def standard_promotion():
    # Optax's Adam mixes Python floats with its int32 step count, which the suite's
    # strict promotion refuses; the examples run with JAX's default promotion.
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_mesh_and_devices_flags_come_from_eqxpar_cli():
    from eqxpar.cli import parse_mesh, start_devices

    assert parse_mesh("tensor=4, pipeline=2,") == {"tensor": 4, "pipeline": 2}
    with pytest.raises(argparse.ArgumentTypeError, match=r"'dta=2'.*did you mean data=2\?"):
        parse_mesh("dta=2")
    with pytest.raises(argparse.ArgumentTypeError, match="'data=4': axis 'data' is already"):
        parse_mesh("data=2,data=4")
    assert start_devices(8).startswith("8 x ")  # conftest's 8 devices: nothing changes


@pytest.mark.slow  # 300 steps; the classifier's flags and the simple model run fast below
def test_tp_classifier_learns_digits(tmp_path):
    import train_classifier

    acc = train_classifier.main(
        ["--model", "tp", "--mesh", "data=2,tensor=4", "--steps", "300", "--out", str(tmp_path)]
    )
    assert acc > 0.95
    out = tmp_path / "classifier-tp"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 300 and np.mean(losses[-20:]) < 0.2 * losses[0]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # PPClassifier on pipeline meshes is tested fast in test_pipeline.py
def test_pp_classifier_trains_on_a_pipeline_mesh(tmp_path):
    import train_classifier

    acc = train_classifier.main(
        [
            "--model",
            "pp",
            "--mesh",
            "data=2,tensor=2,pipeline=2",
            "--schedule",
            "interleaved",
            "--steps",
            "100",
            "--out",
            str(tmp_path),
        ]
    )
    assert acc > 0.9


def test_simple_classifier_runs(tmp_path):
    import train_classifier

    acc = train_classifier.main(["--model", "simple", "--steps", "60", "--out", str(tmp_path)])
    assert acc > 0.8


def test_classifier_strategy_is_the_data_parallel_strategy(tmp_path, capsys):
    import train_classifier

    acc = train_classifier.main(
        ["--model", "tp", "--strategy", "fsdp", "--steps", "60", "--out", str(tmp_path)]
    )
    assert "TPClassifier on data=2,tensor=4 (fsdp)" in capsys.readouterr().out
    assert acc > 0.8


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--mesh", "data=3,tensor=4"], "--mesh: make_mesh(data=3 x tensor=4) needs 12 device(s)"),
        (["--mesh", "dta=2"], "--mesh: bad entry 'dta=2'"),
        (["--batch-size", "129"], "--batch-size: 129 does not split over data=2"),
        (["--strategy", "zero"], "--strategy: invalid choice: 'zero'"),
        (["--strategy", "tp"], "--strategy: 'tp' is not a data-parallel strategy; use --model tp"),
        (["--model", "dp"], "--model: invalid choice: 'dp'"),
        (["--mesh", "pipeline=2,data=4"], "--mesh: pipeline=2 needs --model pp"),
    ],
)
def test_bad_flags_give_one_line_errors(flags, message, capsys):
    assert_fails_with("train_classifier", flags, message, capsys)


def assert_fails_with(script, flags, message, capsys):
    """`script.main` exits non-zero, with `message` in its exit message (`sys.exit`) or
    in the last line it wrote to stderr (argparse). Run in this process: a new one per
    case would start JAX again (see the subprocess test below for the real thing)."""
    module = __import__(script)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--steps", "1", *flags])
    code = exit_info.value.code
    assert code not in (0, None)
    last = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last


def test_a_bad_flag_ends_the_process_with_one_line():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_transformer.py"), "--schedule", "zigzag"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "--schedule: invalid choice: 'zigzag'" in run.stderr.strip().splitlines()[-1]


def test_transformer_learns_real_text(tmp_path):
    import train_transformer

    result = train_transformer.main(
        [
            "--steps",
            "60",
            "--layers",
            "2",
            "--dim",
            "64",
            "--seq-len",
            "64",
            "--eval-every",
            "30",
            "--sample-tokens",
            "20",
            "--sequence-parallel",
            "--out",
            str(tmp_path),
        ]
    )
    evals = [r["eval_loss"] for r in result["rows"] if "eval_loss" in r]
    losses = [r["loss"] for r in result["rows"] if "loss" in r]
    assert evals[-1] < result["baseline"]  # beats the best context-free model
    assert losses[-1] < 0.6 * losses[0]
    assert len(result["sample"]) == len(b"The ") + 20
    assert (tmp_path / "transformer" / "loss.png").exists()


@pytest.mark.slow  # resuming (same and other mesh) is tested fast in test_fit.py
def test_transformer_example_resumes_from_a_checkpoint(tmp_path):
    import train_transformer

    common = [
        "--layers",
        "2",
        "--dim",
        "32",
        "--seq-len",
        "32",
        "--eval-every",
        "6",
        "--sample-tokens",
        "4",
        "--out",
        str(tmp_path),
    ]
    ckpt = ["--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "3"]
    full = train_transformer.main([*common, *ckpt, "--steps", "6"])
    # As if the run had died after step 3: drop the final checkpoint, then resume on
    # another mesh shape and finish.
    shutil.rmtree(tmp_path / "ckpt" / "6")
    resumed = train_transformer.main(
        [*common, *ckpt, "--steps", "6", "--resume", "--mesh", "data=4,tensor=2"]
    )
    want = [r["loss"] for r in full["rows"] if "loss" in r][3:]
    got = [r["loss"] for r in resumed["rows"] if "loss" in r]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.slow  # FSDP x pipeline training is tested fast in test_pipeline.py
def test_transformer_on_a_pipeline_mesh_with_fsdp(tmp_path):
    import train_transformer

    result = train_transformer.main(
        [
            "--mesh",
            "data=2,tensor=2,pipeline=2",
            "--strategy",
            "fsdp",
            "--schedule",
            "interleaved",
            "--steps",
            "20",
            "--layers",
            "4",
            "--dim",
            "64",
            "--seq-len",
            "32",
            "--eval-every",
            "20",
            "--sample-tokens",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    losses = [r["loss"] for r in result["rows"] if "loss" in r]
    assert losses[-1] < 0.75 * losses[0]


@pytest.mark.slow  # ring attention and the context train step are tested fast in test_context.py
def test_transformer_on_a_context_mesh(tmp_path):
    import train_transformer

    result = train_transformer.main(
        [
            "--mesh",
            "data=2,context=4",
            "--steps",
            "30",
            "--layers",
            "2",
            "--dim",
            "64",
            "--seq-len",
            "64",
            "--eval-every",
            "30",
            "--sample-tokens",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    losses = [r["loss"] for r in result["rows"] if "loss" in r]
    assert losses[-1] < 0.75 * losses[0]
    assert len(result["sample"]) == len(b"The ") + 8


@pytest.mark.slow  # MoE parity and training on data x expert are tested in test_moe.py
def test_transformer_with_experts_learns_real_text(tmp_path, capsys):
    import train_transformer

    result = train_transformer.main(
        [
            "--mesh",
            "data=2,expert=4",
            "--experts",
            "8",
            "--moe-every",
            "2",
            "--steps",
            "60",
            "--layers",
            "2",
            "--dim",
            "64",
            "--seq-len",
            "64",
            "--eval-every",
            "60",
            "--sample-tokens",
            "8",
            "--out",
            str(tmp_path),
        ]
    )
    evals = [r["eval_loss"] for r in result["rows"] if "eval_loss" in r]
    assert evals[-1] < result["baseline"]
    rows = [r for r in result["rows"] if "loss" in r]
    assert all(0.0 <= r["moe_dropped_fraction"] < 1.0 for r in rows)
    assert rows[-1]["moe_dropped_fraction"] < 0.5  # the balance loss spreads the tokens
    assert "moe_dropped_fraction" in capsys.readouterr().out  # in the progress lines


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--schedule", "zigzag"], "--schedule: invalid choice: 'zigzag'"),
        (["--resume", "--checkpoint-dir", "/nonexistent-eqxpar"], "--resume: no checkpoint in"),
        (
            ["--mesh", "pipeline=2,data=4", "--microbatches", "3"],
            "--microbatches: 3 does not divide the per-data-shard batch of 4",
        ),
        (["--mesh", "data=2,tensor=8"], "--mesh: make_mesh(data=2 x tensor=8) needs 16"),
        (["--seq-len", "30", "--sequence-parallel"], "--seq-len: 30 does not split over tensor=4"),
        (
            ["--mesh", "data=2,context=4", "--seq-len", "60"],
            "--seq-len: 60 does not split into 2 * context = 8 chunks",
        ),
        (
            ["--mesh", "data=2,expert=4", "--experts", "6"],
            "--experts: 6 experts do not split over expert=4",
        ),
        (["--data", "/no/such/file"], "--data: /no/such/file is not a file"),
        (["--heads", "3"], "model: TransformerConfig.dim=128: must be divisible by num_heads=3"),
    ],
)
def test_transformer_bad_flags(flags, message, capsys):
    assert_fails_with("train_transformer", flags, message, capsys)
