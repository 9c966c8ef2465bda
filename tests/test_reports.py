"""Communication and memory reports: a compiled Transformer step beside the theory."""

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import mesh_of

from eqxpar.pipeline import OneFOneB
from eqxpar.profile import communication_report, step_memory_report
from eqxpar.train import Strategy, init_state, make_train_step
from models import Transformer, TransformerConfig

# Pairwise-distinct sizes: vocab, dim, hidden, seq, per-shard batches.
CONFIG = TransformerConfig(
    vocab_size=56, dim=40, num_layers=4, num_heads=4, mlp_dim=72, max_seq_len=16
)
SEQ = 12
OPTIMIZER = optax.adam(1e-3)
CASES = {  # name: (config changes, mesh, strategy, global batch, microbatches)
    "tp": ({}, dict(data=2, tensor=4), "dp", 10, 1),
    "tp+sp": (dict(sequence_parallel=True), dict(data=2, tensor=4), "dp", 10, 1),
    "dp": ({}, dict(data=8), "dp", 24, 1),
    "fsdp": ({}, dict(data=8), "fsdp", 24, 1),
    "fsdp+accumulate": ({}, dict(data=8), "fsdp", 48, 3),
    "1f1b": (dict(pipeline_stages=4), dict(data=2, pipeline=4), "dp", 16, 4),
    "1f1b+tp": (dict(pipeline_stages=2), dict(data=2, tensor=2, pipeline=2), "dp", 12, 3),
}


def _compile(name):
    changes, sizes, kind, batch, m = CASES[name]
    config = CONFIG.replace(**changes)
    mesh = mesh_of(**sizes)
    strategy = Strategy(kind)
    with jax.numpy_dtype_promotion("standard"):
        state = init_state(
            Transformer,
            config,
            key=jax.random.key(0),
            optimizer=OPTIMIZER,
            mesh=mesh,
            strategy=strategy,
        )

    def loss_fn(model, x, y, key):
        if "pipeline" in sizes:
            return model.loss(x, y, schedule=OneFOneB(), microbatches=m)
        return model.loss(x, y)

    accumulate = m if "pipeline" not in sizes else 1
    step = make_train_step(
        loss_fn, OPTIMIZER, mesh=mesh, strategy=strategy, accumulation_steps=accumulate
    )
    x = jnp.zeros((batch, SEQ), jnp.int32)
    # Optax's Adam mixes Python floats with its int32 step count, which the suite's
    # strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        compiled = step.lower(state, x, x).compile()
    kw = dict(strategy=strategy, microbatches=m)

    def comm(**changes):  # the communication report, as the step's layout or another
        return communication_report(compiled, mesh, config, batch=batch, seq=SEQ, **kw | changes)

    return comm(), step_memory_report(compiled, mesh, config, batch=batch, seq=SEQ, **kw), comm


@pytest.fixture(scope="module")
def reports():
    """Each case compiled once for the whole module."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _compile(name)
        return cache[name]

    return get


@pytest.mark.parametrize(
    "name,axis",
    [
        ("tp", "tensor"),
        ("tp", "data"),
        ("tp+sp", "tensor"),
        ("fsdp", "data"),
        ("fsdp+accumulate", "data"),
        ("1f1b", "data"),
        # The tensor all-reduces inside the executor's actions, counted once per action
        # (and the embedding's and head's on their one stage), not on every tick.
        ("1f1b+tp", "tensor"),
        ("1f1b+tp", "pipeline"),
    ],
)
def test_communication_matches_the_theory(reports, name, axis):
    comm, _, _ = reports(name)
    assert comm.axis_ratio(axis) == pytest.approx(1.0, abs=0.02), comm.table()
    for row in comm.rows:  # every kind the theory names, one by one
        if row.axes == (axis,) and row.theory and row.theory > 1024:
            assert row.ratio == pytest.approx(1.0, abs=0.02), comm.table()


def test_tensor_parallel_counts_megatrons_four_all_reduces_per_layer(reports):
    comm, _, _ = reports("tp")
    act = 5 * SEQ * CONFIG.dim * 4  # one (b, s, h) float32 activation per data shard
    row = next(r for r in comm.rows if r.kind == "all-reduce" and r.axes == ("tensor",))
    assert row.theory == 18 * act + 3 * 5 * SEQ * 4  # 4 per layer, embedding, head, loss
    assert "tensor    all-reduce" in comm.table()


def test_pipeline_sends_only_what_the_schedule_carries(reports):
    # One activation forward and one gradient backward per microbatch and stage
    # boundary: 2 m (p - 1) sends of a (b/m, s, h) microbatch, over p devices.
    comm, _, again = reports("1f1b")
    table = OneFOneB().table(4, 4).split()
    row = next(r for r in comm.rows if r.kind == "collective-permute")
    mb_act = 16 // 2 // 4 * SEQ * CONFIG.dim * 4  # a microbatch on one data shard, float32
    assert row.measured == 2 * 4 * 3 * mb_act / 4 == row.theory
    # The permutes run on the 19 ticks where some stage receives, each over the stage
    # pairs that carry data that tick (one stage in 1F1B's steady state, not all three).
    arrays = table.as_arrays()
    assert row.count == int((arrays["permute_f"] > 0).sum() + (arrays["permute_b"] > 0).sum())
    assert row.count == 19 < 2 * table.num_ticks
    assert comm.ratio("all-reduce", "pipeline") == pytest.approx(1.0, abs=0.02)
    # A report for another schedule or microbatch count than the step's says so.
    with pytest.raises(ValueError, match="pass the step's `schedule` and `microbatches`"):
        again(microbatches=8)
    with pytest.raises(ValueError, match="are not those of gpipe with 4 microbatches"):
        again(schedule="gpipe")


@pytest.mark.parametrize("name", ["dp", "fsdp", "tp+sp", "1f1b", "tp", "fsdp+accumulate"])
def test_memory_estimate_within_15_percent(reports, name):
    _, memory, _ = reports(name)
    assert memory.ratio == pytest.approx(1.0, abs=0.15), memory.table()
    # The model states are exact: arguments are the parameters, Adam's moments, batch.
    assert memory.arguments == pytest.approx(memory.estimate.arguments, rel=0.01)


def test_layout_must_match_the_mesh():
    mesh = mesh_of(data=2, pipeline=4)
    with pytest.raises(ValueError, match="pipeline_stages=1 .* pipeline axis is 4"):
        communication_report("", mesh, CONFIG, batch=8, seq=SEQ)


def test_partition_table_and_pictures(tmp_path):
    import equinox as eqx

    from eqxpar.profile import mesh_table, partition_table, plot_mesh, plot_partition

    mesh = mesh_of(data=2, tensor=4)
    model = eqx.filter_eval_shape(Transformer, CONFIG, key=jax.random.key(0))
    table = partition_table(model, mesh)
    assert "layers.mlp.up.weight  (4, 72, 40)  P(None, 'tensor')  block (4, 18, 40)" in table
    assert "    [:, 18:36, :] on 1 5" in table  # tensor index 1 of both data rows
    assert "norm.weight  (40,)  P()  block (40,)\n    whole on every device" in table
    grid = mesh_table(mesh).splitlines()
    assert grid[0] == "pipeline=1 x data=2 x expert=1 x context=1 x tensor=4"
    assert grid[3].split() == ["data=1", "4", "(h0)", "5", "(h0)", "6", "(h0)", "7", "(h0)"]
    for draw in (lambda p: plot_mesh(mesh, p), lambda p: plot_partition(model, mesh, p)):
        path = tmp_path / "map.png"
        draw(path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no weight 'mlp.up'; weights: "):
        plot_partition(model, mesh, tmp_path / "x.png", names=["mlp.up"])
