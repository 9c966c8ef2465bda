"""The Megatron Transformer: parity with the same model without a mesh, collectives,
remat, mixed precision, dropout RNG, generation."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_trees_close, mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
import models
from eqxpar.profile import count_collectives
from models import Transformer, TransformerConfig, count_params, flops_per_token

SMALL = TransformerConfig(
    vocab_size=40, dim=24, num_layers=2, num_heads=4, num_kv_heads=4, mlp_dim=32, max_seq_len=16
)
BATCH, SEQ = 4, 8


def tokens(seed=0, batch=BATCH, seq=SEQ, vocab=SMALL.vocab_size):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, vocab)


def sharded_loss_fn(mesh, *, key=None):
    """Mean loss over the global batch, computed in `filter_shard_map`."""

    def local(model, x, y):
        total = jnp.sum(model.per_token_loss(x, y, key=key))
        return jax.lax.psum(total, "data") / (BATCH * SEQ)

    return ep.filter_shard_map(
        local, mesh=mesh, in_specs=(None, P("data"), P("data")), out_specs=P()
    )


def dense_loss(model, x, y, *, key=None):
    return jnp.mean(model.per_token_loss(x, y, key=key))


# The dense references, compiled once per config (not dispatched primitive by primitive).
dense_value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(dense_loss))
dense_logits = eqx.filter_jit(lambda model, x: model(x))


@pytest.fixture(scope="module")
def data():
    x = tokens()
    return x, jnp.roll(x, -1, axis=1)


# (1, 2) and (2, 4) in the fast suite; one device and tensor=4 alone under `slow`.
MESHES = [
    pytest.param(d, t, id=f"d{d}t{t}", marks=[pytest.mark.slow] if d == 1 and t != 2 else [])
    for d, t in [(1, 1), (1, 2), (1, 4), (2, 4)]
]


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("data_size,tensor", MESHES)
def test_parity_with_unsharded_model(data, data_size, tensor, sequence_parallel, remat):
    config = SMALL.replace(sequence_parallel=sequence_parallel, remat=remat)
    model = Transformer(config, key=jax.random.key(1))
    x, y = data
    mesh = mesh_of(data_size, tensor)
    logits_fn = ep.filter_shard_map(
        lambda m, x: m(x),
        mesh=mesh,
        in_specs=(None, P("data")),
        out_specs=P("data", None, "tensor"),
    )
    step = eqx.filter_jit(
        lambda m, x, y: (logits_fn(m, x), eqx.filter_value_and_grad(sharded_loss_fn(mesh))(m, x, y))
    )
    logits, (loss, grads) = step(ep.place(model, mesh), x, y)
    want_loss, want_grads = dense_value_and_grad(model, x, y)
    assert_trees_close(logits, dense_logits(model, x))
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "changes",
    [
        dict(activation="swiglu", norm="layernorm", use_bias=True),
        dict(num_kv_heads=2, tie_embeddings=True),
        dict(remat="selective", sequence_parallel=True, collective_matmul="bidirectional"),
        dict(remat="offload"),
    ],
    ids=["swiglu-layernorm-bias", "gqa-tied", "selective-sp-async", "offload"],
)
def test_variants_match_unsharded(data, changes):
    config = SMALL.replace(**changes)
    model = Transformer(config, key=jax.random.key(2))
    x, y = data
    mesh = mesh_of(2, 2)
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(sharded_loss_fn(mesh)))(
        ep.place(model, mesh), x, y
    )
    want_loss, want_grads = dense_value_and_grad(model, x, y)
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)


def test_dropout_masks_do_not_depend_on_the_mesh(data):
    config = SMALL.replace(dropout=0.3, attention_dropout=0.2, sequence_parallel=True)
    model = Transformer(config, key=jax.random.key(3))
    x, y = data
    key = jax.random.key(4)
    mesh = mesh_of(1, 4)
    loss_fn = ep.filter_shard_map(
        lambda m, x, y: jnp.mean(m.per_token_loss(x, y, key=key)),
        mesh=mesh,
        in_specs=(None, P(), P()),
        out_specs=P(),
    )
    loss, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))(ep.place(model, mesh), x, y)
    want_loss, want_grads = dense_value_and_grad(model, x, y, key=key)
    assert_trees_close(loss, want_loss)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # Dropout really is on: a different key gives a different loss.
    assert abs(float(dense_loss(model, x, y, key=jax.random.key(5))) - float(want_loss)) > 1e-4


@functools.cache  # several assertions read the same compiled program
def _collectives(config, mesh, *, grad):
    model = ep.place(Transformer(config, key=jax.random.key(0)), mesh)
    x = tokens(batch=BATCH * mesh.shape["data"])
    fn = (
        ep.filter_shard_map(
            lambda m, x: jax.lax.pmean(jnp.mean(m.per_token_loss(x, x)), "data"),
            mesh=mesh,
            in_specs=(None, P("data")),
            out_specs=P(),
        )
        if grad
        else ep.filter_shard_map(
            lambda m, x: m(x),
            mesh=mesh,
            in_specs=(None, P("data")),
            out_specs=P("data", None, "tensor"),
        )
    )
    step = eqx.filter_grad(fn) if grad else fn
    return count_collectives(eqx.filter_jit(step).lower(model, x).compile(), mesh)


def _per_layer(config, mesh, kind, *, grad):
    """Collectives of `kind` over "tensor" added by each extra layer, and their bytes."""
    one = _collectives(config.replace(num_layers=1), mesh, grad=grad)
    three = _collectives(config.replace(num_layers=3), mesh, grad=grad)
    count = three.count(kind, axis="tensor") - one.count(kind, axis="tensor")
    nbytes = three.bytes(kind, axis="tensor") - one.bytes(kind, axis="tensor")
    return count / 2, nbytes / 2


ACT = BATCH * SEQ * SMALL.dim * 4  # bytes of one (b, s, h) float32 activation


def test_two_all_reduces_per_layer_forward_four_with_backward():
    mesh = mesh_of(1, 4)
    assert _per_layer(SMALL, mesh, "all-reduce", grad=False) == (2, 2 * ACT)
    assert _per_layer(SMALL, mesh, "all-reduce", grad=True) == (4, 4 * ACT)


@pytest.mark.slow  # four more programs to compile; the remat parity tests are fast
def test_remat_and_the_all_reduces_it_repeats():
    mesh = mesh_of(1, 4)
    # Selective remat saves collective outputs: no extra communication.
    selective = SMALL.replace(remat="selective")
    assert _per_layer(selective, mesh, "all-reduce", grad=True) == (4, 4 * ACT)
    # Full remat recomputes the forward, all-reduces included (Megatron's cost too),
    # except those XLA finds dead in the recomputation (the MLP's: the residual passes
    # its gradient through). So between 4 and 6 per layer, never 4.
    full, _ = _per_layer(SMALL.replace(remat="full"), mesh, "all-reduce", grad=True)
    assert 4 < full <= 6


def test_sequence_parallel_gathers_and_scatters_per_layer():
    mesh = mesh_of(1, 4)
    sp = SMALL.replace(sequence_parallel=True)
    assert _per_layer(sp, mesh, "all-gather", grad=False) == (2, 2 * ACT)
    assert _per_layer(sp, mesh, "reduce-scatter", grad=False) == (2, 2 * ACT // 4)
    assert _per_layer(sp, mesh, "all-reduce", grad=False) == (0, 0)
    assert _per_layer(sp, mesh, "all-gather", grad=True) == (4, 4 * ACT)
    assert _per_layer(sp, mesh, "reduce-scatter", grad=True) == (4, 4 * ACT // 4)


def test_greedy_generation_matches_recomputation():
    model = Transformer(SMALL, key=jax.random.key(6))
    prompt = tokens(seed=7, seq=3)
    out = eqx.filter_jit(lambda m, p: m.generate(p, 6))(model, prompt)
    assert out.shape == (BATCH, 9) and (out[:, :3] == prompt).all()
    # Each new token is the arg-max of a full (causal) forward pass over what precedes it:
    # one pass over the whole output checks every step of the cached decoding.
    want = jnp.argmax(model(out)[:, 2:-1], axis=-1)
    np.testing.assert_array_equal(out[:, 3:], want)


@pytest.mark.parametrize(
    "temperature,data_size,tensor", [(0.0, 2, 2), (0.8, 1, 4)], ids=["greedy-d2t2", "sample-t4"]
)
def test_sharded_generation_matches_dense(temperature, data_size, tensor):
    # Sampling noise is drawn for the whole vocabulary, so tensor sharding cannot change
    # it; a batch split over "data" would need the data index folded into the key.
    config = SMALL.replace(num_kv_heads=tensor)
    model = Transformer(config, key=jax.random.key(8))
    prompt = tokens(seed=9, seq=4)
    key = jax.random.key(10)
    mesh = mesh_of(data_size, tensor)
    gen = ep.filter_shard_map(
        lambda m, p: m.generate(p, 5, temperature=temperature, key=key),
        mesh=mesh,
        in_specs=(None, P("data")),
        out_specs=P("data"),
    )
    got = eqx.filter_jit(gen)(ep.place(model, mesh), prompt)
    np.testing.assert_array_equal(got, model.generate(prompt, 5, temperature=temperature, key=key))


def test_generation_refuses_sequence_parallel():
    model = Transformer(SMALL.replace(sequence_parallel=True), key=jax.random.key(0))
    with pytest.raises(ValueError, match="with_config"):
        model.generate(tokens(seq=2), 2)
    plain = model.with_config(sequence_parallel=False)
    assert not plain.config.sequence_parallel and plain.generate(tokens(seq=2), 2).shape == (4, 4)


def test_with_config_changes_only_switches_that_keep_the_weights():
    model = Transformer(SMALL, key=jax.random.key(0))
    # Same weights, another way of computing them: allowed.
    switched = model.with_config(remat="full", compute_dtype="bfloat16", max_seq_len=64)
    assert switched.config.remat == "full" and switched.embed.weight is model.embed.weight
    # Another model on the same weights: refused, naming the field.
    with pytest.raises(ValueError, match=r"with_config: num_kv_heads=4 -> 2 would give the same"):
        model.with_config(num_kv_heads=2)
    # Every offending field is named; here the weights even have the same sizes.
    with pytest.raises(
        ValueError,
        match=r"mlp_dim=32 -> 16, activation='gelu' -> 'swiglu', "
        r"rope_theta=10000.0 -> 500.0 would",
    ):
        model.with_config(rope_theta=500.0, activation="swiglu", mlp_dim=SMALL.hidden // 2)


def test_mixed_precision():
    config = SMALL.replace(compute_dtype="bfloat16")
    model = Transformer(config, key=jax.random.key(11))
    x = tokens()
    assert model.embed.weight.dtype == jnp.float32
    assert dense_logits(model, x).dtype == jnp.bfloat16
    loss, grads = dense_value_and_grad(model, x, x)
    assert loss.dtype == jnp.float32
    f32 = eqx.filter_jit(dense_loss)(model.with_config(compute_dtype="float32"), x, x)
    assert abs(float(loss) - float(f32)) < 2e-2 * float(f32)
    assert grads.embed.weight.dtype == jnp.float32
    bf16 = Transformer(
        SMALL.replace(param_dtype="bfloat16", compute_dtype="bfloat16"), key=jax.random.key(11)
    )
    assert bf16.layers.mlp.up.weight.dtype == jnp.bfloat16


def test_param_and_flop_counts():
    for config in [
        SMALL,
        SMALL.replace(
            activation="swiglu",
            num_kv_heads=2,
            use_bias=True,
            norm="layernorm",
            tie_embeddings=True,
        ),
    ]:
        assert count_params(Transformer(config, key=jax.random.key(0))) == config.num_params
    # GPT-2 small sizes: 124M parameters with a tied head (12 layers, 768 wide).
    gpt2 = TransformerConfig(
        vocab_size=50257,
        dim=768,
        num_layers=12,
        num_heads=12,
        max_seq_len=1024,
        norm="layernorm",
        use_bias=True,
        tie_embeddings=True,
    )
    assert 123e6 < gpt2.num_params < 125e6  # GPT-2 has 124M, with learned positions
    with pytest.warns(DeprecationWarning, match="use config.num_params"):
        assert models.param_count(gpt2) == gpt2.num_params
    n_matmul = 12 * 12 * 768**2 + 50257 * 768
    assert flops_per_token(gpt2, 1024) == 3 * (2 * n_matmul + 12 * 4 * 1024 * 768)


def test_config_errors():
    with pytest.raises(ValueError, match=r"TransformerConfig.num_kv_heads=3: must divide"):
        SMALL.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match=r"TransformerConfig.remat='some'"):
        SMALL.replace(remat="some")
    with jax.set_mesh(ep.make_mesh(tensor=8)):
        with pytest.raises(ValueError, match=r"num_kv_heads=4 cannot be split 8 ways"):
            Transformer(SMALL, key=jax.random.key(0))
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        Transformer(SMALL, key=jax.random.key(0))(tokens(seq=17))
