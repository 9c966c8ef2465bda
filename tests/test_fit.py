"""The fit loop and Orbax checkpoints: resuming loses nothing, on the same mesh or
another; a crash mid-save keeps the last good checkpoint; a damaged one says so, and
resuming can fall back past it; NaN and Ctrl-C guards; progress lines off a terminal."""

import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close

import eqxpar as ep
from eqxpar.train import Checkpointer, CheckpointError, fit, init_state, make_train_step, resume
from models import Transformer, TransformerConfig

CONFIG = TransformerConfig(
    vocab_size=40, dim=24, num_layers=4, num_heads=4, mlp_dim=32, max_seq_len=16
)
OPTIMIZER = optax.sgd(0.3, momentum=0.9)


def batch_fn(i):
    x = jax.random.randint(jax.random.fold_in(jax.random.key(7), i), (8, 8), 0, 40)
    return x, jnp.roll(x, -1, axis=1)


def setup(mesh, config=CONFIG, strategy="zero2", microbatches=1):
    state = init_state(
        Transformer,
        config,
        key=jax.random.key(0),
        optimizer=OPTIMIZER,
        mesh=mesh,
        strategy=strategy,
    )
    step = make_train_step(
        lambda m, x, y, key: m.loss(x, y, microbatches=microbatches),
        OPTIMIZER,
        mesh=mesh,
        strategy=strategy,
    )
    return state, step


@pytest.fixture(scope="module")
def data8():
    return setup(ep.make_mesh(data=8))


@pytest.fixture(scope="module")
def uninterrupted(data8):
    state, step = data8
    final, rows = fit(step, state, batch_fn, steps=6, progress=False)
    return final, [r["loss"] for r in rows]


def test_resume_gives_the_same_losses(data8, uninterrupted, tmp_path):
    state, step = data8
    ckpt = Checkpointer(tmp_path / "run", keep=2)
    fit(
        step,
        state,
        batch_fn,
        steps=6,
        checkpointer=ckpt,
        checkpoint_every=3,
        progress=False,
        on_nonfinite="stop",
    )
    assert ckpt.all_steps() == [3, 6]  # keep-last-2 of every 3 steps and the end
    # A new process would do this: build the target state, restore, continue.
    restored, start = resume(
        Checkpointer(tmp_path / "run"), state, mesh=ep.make_mesh(data=8), strategy="zero2"
    )
    assert start == 6 and int(restored.step) == 6
    ckpt3 = Checkpointer(tmp_path / "run3")
    fit(step, state, batch_fn, steps=3, checkpointer=ckpt3, progress=False)
    again, start = resume(ckpt3, state, mesh=ep.make_mesh(data=8), strategy="zero2")
    assert start == 3
    final, rows = fit(step, again, batch_fn, steps=6, start=start, progress=False)
    want_final, want_losses = uninterrupted
    np.testing.assert_allclose([r["loss"] for r in rows], want_losses[3:], rtol=1e-6)
    assert_trees_close(
        eqx.filter(final, eqx.is_array), eqx.filter(want_final, eqx.is_array), rtol=1e-6, atol=1e-7
    )


def test_restore_onto_a_different_mesh(data8, uninterrupted, tmp_path):
    state, step = data8
    ckpt = Checkpointer(tmp_path / "run")
    fit(step, state, batch_fn, steps=3, checkpointer=ckpt, progress=False)
    mesh = ep.make_mesh(data=2, tensor=2, pipeline=2)
    like, step3d = setup(mesh, CONFIG.replace(pipeline_stages=2), strategy="fsdp", microbatches=2)
    restored, start = resume(ckpt, like, mesh=mesh, strategy="fsdp")
    assert "pipeline" in restored.model.layers.mlp.up.weight.sharding.spec
    _, rows = fit(step3d, restored, batch_fn, steps=6, start=start, progress=False)
    np.testing.assert_allclose([r["loss"] for r in rows], uninterrupted[1][3:], rtol=1e-5)


def test_restore_onto_a_shape_only_target(data8, uninterrupted, tmp_path):
    # `eqx.filter_eval_shape` of the state (typed PRNG key included) is a valid target:
    # nothing is allocated before the read, and the restored state trains on.
    state, step = data8
    ckpt = Checkpointer(tmp_path / "run")
    fit(step, state, batch_fn, steps=3, checkpointer=ckpt, progress=False)
    like = eqx.filter_eval_shape(lambda: state)
    restored, start = resume(ckpt, like, mesh=ep.make_mesh(data=8))
    assert start == 3
    _, rows = fit(step, restored, batch_fn, steps=6, start=start, progress=False)
    np.testing.assert_allclose([r["loss"] for r in rows], uninterrupted[1][3:], rtol=1e-5)


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, jax, jax.numpy as jnp
        import eqxpar as ep
        from eqxpar.train import Checkpointer, TrainState
        ep.simulate_cpu_devices(2)
        ckpt = Checkpointer({str(tmp_path / "run")!r})
        def state(step, size):
            return TrainState(jnp.ones((size, size)), (), jnp.asarray(step, jnp.int32),
                              jax.random.key(0))
        ckpt.save(state(1, 8)); ckpt.wait()
        ckpt.save(state(2, 6000))  # ~144 MB: still being written when the process dies
        os._exit(1)
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1, run.stderr
    ckpt = Checkpointer(tmp_path / "run")
    assert ckpt.latest_step() == 1
    like = ep.train.TrainState(jnp.zeros((8, 8)), (), jnp.zeros((), jnp.int32), jax.random.key(3))
    mesh = ep.make_mesh(data=2, devices=jax.devices()[:2])
    restored, _ = ckpt.restore(like, mesh=mesh)
    assert int(restored.step) == 1 and float(restored.model.sum()) == 64.0
    assert (jax.random.key_data(restored.key) == jax.random.key_data(jax.random.key(0))).all()


def test_nonfinite_loss_stops_or_skips(data8, tmp_path):
    state, step = data8

    def nan_step(state, x, y):
        new, metrics = step(state, x, y)
        bad = int(new.step) == 3
        return new, {**metrics, "loss": jnp.where(bad, jnp.nan, metrics["loss"])}

    ckpt = Checkpointer(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="step 2: the loss is nan") as err:
        fit(nan_step, state, batch_fn, steps=5, checkpointer=ckpt, progress=False)
    assert int(err.value.state.step) == 2 and ckpt.latest_step() == 2
    final, rows = fit(nan_step, state, batch_fn, steps=5, on_nonfinite="skip", progress=False)
    assert [r.get("skipped", False) for r in rows] == [False, False, True, True, True]
    assert int(final.step) == 2


def test_ctrl_c_saves_and_stops(data8, tmp_path):
    state, step = data8

    def interrupting(i):
        if i == 2:
            raise KeyboardInterrupt
        return batch_fn(i)

    ckpt = Checkpointer(tmp_path / "run")
    final, rows = fit(
        step,
        state,
        interrupting,
        steps=5,
        checkpointer=ckpt,
        progress=False,
        metrics_path=tmp_path / "m.jsonl",
        plot_path=tmp_path / "loss.png",
    )
    assert int(final.step) == 2 and len(rows) == 2
    assert ckpt.latest_step() == 2
    _, start = resume(ckpt, state, mesh=ep.make_mesh(data=8), strategy="zero2")
    assert start == 2
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 2


@pytest.fixture(scope="module")
def saved(data8, tmp_path_factory):
    """A directory with the checkpoints of steps 3 and 6 of the uninterrupted run."""
    state, step = data8
    directory = tmp_path_factory.mktemp("saved") / "run"
    ckpt = Checkpointer(directory, keep=2)
    fit(step, state, batch_fn, steps=6, checkpointer=ckpt, checkpoint_every=3, progress=False)
    assert ckpt.all_steps() == [3, 6]
    ckpt.close()
    return directory


def copy_of(saved, tmp_path):
    return pathlib.Path(shutil.copytree(saved, tmp_path / "run"))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def overwrite(path):
    path.write_bytes(b"\x5a" * path.stat().st_size)


def chunk_files(step_dir):
    """The files of the OCDBT store that hold the array chunks (not its index)."""
    files = sorted(p for p in (step_dir / "state").glob("ocdbt.process_*/d/*") if p.is_file())
    assert files, sorted(str(p) for p in step_dir.rglob("*"))
    return files


@pytest.mark.parametrize(
    "name, damage", [("extra/metadata", truncate), ("state/_METADATA", overwrite)]
)
def test_damaged_metadata_is_a_checkpoint_error(data8, saved, tmp_path, name, damage):
    state, _ = data8
    directory = copy_of(saved, tmp_path)
    damage(directory / "6" / name)
    mesh = ep.make_mesh(data=8)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(directory).restore(state, mesh=mesh, strategy="zero2")
    message = str(err.value)
    assert message.startswith(
        f"checkpoint step 6 at {directory / '6'} is damaged: its metadata cannot be read "
        f"(JSONDecodeError: "
    ), message
    assert message.endswith(
        "Restore an older checkpoint with restore(..., step=3) (complete steps: [3, 6]), or "
        "call resume(..., fallback=True) to fall back to the newest readable one."
    ), message
    assert (err.value.step, err.value.path, err.value.part) == (6, str(directory / "6"), "metadata")
    # Without fallback, resume lets the error through; with it, but nothing readable, too.
    with pytest.raises(CheckpointError, match="checkpoint step 6 at "):
        resume(Checkpointer(directory), state, mesh=mesh, strategy="zero2")
    damage(directory / "3" / name)
    with pytest.raises(CheckpointError, match=r"no readable checkpoint in .*: all 2 are damaged"):
        resume(Checkpointer(directory), state, mesh=mesh, strategy="zero2", fallback=True)


@pytest.mark.parametrize("damage", [truncate, overwrite])
def test_damaged_array_data_is_a_checkpoint_error(data8, saved, tmp_path, damage):
    state, _ = data8
    directory = copy_of(saved, tmp_path)
    for path in chunk_files(directory / "6"):
        damage(path)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(directory).restore(state, mesh=ep.make_mesh(data=8), strategy="zero2")
    message = str(err.value)
    assert message.startswith(
        f"checkpoint step 6 at {directory / '6'} is damaged: its array data cannot be read ("
    ), message
    assert "OCDBT database" in message and "tensorstore_spec" not in message
    assert message.endswith(
        "or call resume(..., fallback=True) to fall back to the newest readable one."
    )
    assert (err.value.step, err.value.part) == (6, "array data")


def test_resume_falls_back_past_a_damaged_checkpoint(data8, uninterrupted, saved, tmp_path, capsys):
    state, step = data8
    directory = copy_of(saved, tmp_path)
    for path in chunk_files(directory / "6"):
        truncate(path)
    ckpt = Checkpointer(directory, keep=2)
    restored, start = resume(
        ckpt, state, mesh=ep.make_mesh(data=8), strategy="zero2", fallback=True
    )
    assert start == 3 and int(restored.step) == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(
        "skipping damaged checkpoint step 6: its array data cannot be read ("
    ), lines[0]
    assert f'OCDBT database at local file "{directory / "6"}' in lines[0], lines[0]
    assert lines[1] == "restored checkpoint step 3 (skipped damaged step 6)"
    _, rows = fit(step, restored, batch_fn, steps=6, start=start, checkpointer=ckpt, progress=False)
    want_final, want_losses = uninterrupted
    np.testing.assert_allclose([r["loss"] for r in rows], want_losses[3:], rtol=1e-6)
    # The save at step 6 replaced the damaged checkpoint: it restores without fallback.
    again, start = resume(
        Checkpointer(directory), state, mesh=ep.make_mesh(data=8), strategy="zero2"
    )
    assert start == 6
    assert_trees_close(
        eqx.filter(again, eqx.is_array), eqx.filter(want_final, eqx.is_array), rtol=1e-6, atol=1e-7
    )


def test_progress_off_a_terminal_is_plain_lines(data8, capfd):
    state, step = data8
    line = re.compile(r"step (\d)/6  loss \d+\.\d{4}  [\d,]+ items/s  \d+ ms/step")
    fit(step, state, batch_fn, steps=6, progress_every=4, items_per_step=64)
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert [line.fullmatch(ln)[1] for ln in out.splitlines()] == ["4", "6"], out
    # By default a tenth of the steps run (here, every step), from where it starts.
    fit(step, state, batch_fn, start=3, steps=6, items_per_step=64)
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    assert [line.fullmatch(ln)[1] for ln in out.splitlines()] == ["4", "5", "6"], out
