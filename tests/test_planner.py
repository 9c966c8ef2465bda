"""The planner: its choice fits, brute force does not beat it, and what it rejects."""

import subprocess
import sys

import pytest

import eqxpar as ep
from eqxpar.profile import Layout, plan, train_flops
from eqxpar.profile._planner import Hardware, evaluate, layouts, parse_bytes
from models import TransformerConfig, flops_per_token

SEVEN_B = TransformerConfig(
    vocab_size=32000,
    dim=4096,
    num_layers=32,
    num_heads=32,
    max_seq_len=4096,
    compute_dtype="bfloat16",
)
MID = TransformerConfig(  # a 1.3B-ish model: every kind of layout fits somewhere
    vocab_size=50176,
    dim=2048,
    num_layers=24,
    num_heads=16,
    max_seq_len=2048,
    compute_dtype="bfloat16",
)


@pytest.mark.parametrize(
    "config,devices,memory,batch,seq",
    [(MID, 8, "40GB", 64, 2048), (MID, 16, "24GB", 128, 2048), (SEVEN_B, 8, "80GB", 64, 4096)],
)
def test_choice_fits_and_brute_force_does_not_beat_it(config, devices, memory, batch, seq):
    result = plan(config, devices=devices, memory_per_device=memory, batch=batch, seq=seq)
    best = result.best
    assert best.fits and best.memory.peak <= parse_bytes(memory)
    assert best.layout.devices == devices
    hw = result.hardware
    brute = [
        evaluate(config, lay, hw, batch=batch, seq=seq)
        for lay in layouts(config, devices=devices, batch=batch, seq=seq, full=True)
    ]
    fastest = min(c.time for c in brute if c.fits)
    assert fastest >= best.time / 1.10
    assert len(brute) > len(result.ranked) + len(result.rejected)  # it really searched more


def test_plain_data_parallel_7b_on_8x80gb_is_rejected():
    result = plan(SEVEN_B, devices=8, memory_per_device="80GB", batch=64, seq=4096)
    for remat in ("none", "selective", "full"):
        reason = result.rejection(Layout(data=8, remat=remat))
        assert reason.startswith("model states alone need 107.3 GB > 80 GB"), reason
        assert "16.0 bytes per parameter" in reason
    table = result.table()
    assert "why " in table and "beats " in table and "rejected" in table


def test_plan_table_explains_the_winner():
    result = plan(MID, devices=8, memory_per_device="40GB", batch=64, seq=2048)
    lines = result.table(top=3).splitlines()
    assert lines[0].startswith("8 devices (8 per host), 40 GB, 989 TFLOP/s each:")
    assert lines[2].split()[1:3] == str(result.best.layout).split()[:2]
    assert any(line.startswith("why ") for line in lines)


def test_step_time_parts():
    hw = Hardware(devices_per_host=4)
    lay = Layout(data=2, tensor=2, pipeline=2, microbatches=4)
    c = evaluate(MID, lay, hw, batch=16, seq=512)
    t = c.times
    assert t["bubble"] == pytest.approx(t["compute"] * 1 / 4)  # (p - 1) / m
    assert t["total"] == pytest.approx(
        t["compute"] + t["bubble"] + t["tensor"] + t["pipeline"] + t["data"]
    )
    # The pipeline axis is outermost: with 4 devices per host it crosses hosts.
    far = evaluate(MID, lay, Hardware(devices_per_host=8), batch=16, seq=512).times
    assert t["pipeline"] == pytest.approx(far["pipeline"] * 450 / 50)


def test_train_flops_match_the_models_count():
    assert train_flops(MID, batch=3, seq=512) == 3 * 512 * flops_per_token(MID, 512)


def test_eqxpar_plan_is_the_function_in_both_import_orders():
    for code in (
        "import eqxpar, eqxpar.plan; assert callable(eqxpar.plan) and "
        "eqxpar.plan is eqxpar.profile.plan",
        "import eqxpar.plan; import eqxpar; from eqxpar.plan import main; "
        "assert eqxpar.plan is eqxpar.profile.plan and callable(main)",
    ):
        subprocess.run([sys.executable, "-c", code], check=True)
    assert ep.plan is plan


def test_cli_prints_the_table(capsys):
    from eqxpar.plan import main

    main(
        "--dim 4096 --layers 32 --heads 32 --vocab 32000 --seq 4096 --batch 512 "
        "--devices 64 --memory 80GB --devices-per-host 8 --flops 989e12".split()
    )
    out = capsys.readouterr().out
    assert out.startswith("Transformer with 6.70e9 parameters, batch 512 x 4096 tokens")
    assert "64 devices (8 per host), 80 GB" in out and "why " in out


def test_bad_arguments():
    with pytest.raises(ValueError, match="memory_per_device='eighty': use bytes"):
        plan(MID, devices=8, memory_per_device="eighty", batch=64, seq=2048)
    with pytest.raises(ValueError, match="No layout of 8 devices fits in 1 GB"):
        _ = plan(SEVEN_B, devices=8, memory_per_device="1GB", batch=64, seq=4096).best
    with pytest.raises(ValueError, match="sequence_parallel=True, tensor=1"):
        Layout(sequence_parallel=True)


def test_check_layout_compiles_the_plans_choice_abstractly():
    from eqxpar.profile import check_layout
    from models import Transformer

    small = TransformerConfig(
        vocab_size=56, dim=40, num_layers=4, num_heads=4, mlp_dim=72, max_seq_len=16
    )
    best = plan(small, devices=8, memory_per_device=2**20, batch=16, seq=12).best
    comm, memory = check_layout(Transformer, small, best.layout, batch=16, seq=12)
    assert memory.layout == best.layout and comm.layout == best.layout
    # The model states are exact; the estimate does not under-count the total.
    assert memory.arguments == pytest.approx(memory.estimate.arguments, rel=0.01)
    assert memory.total <= 1.15 * memory.estimate_total
    # It fits by the compiler too (state donated: arguments and temporaries).
    assert memory.arguments + memory.temporaries <= 2**20
    assert comm.axis_ratio("data") == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="needs 16 devices, 8 are available"):
        check_layout(Transformer, small, Layout(data=16), batch=16, seq=12)
