"""Mixture of experts with expert parallelism: the layer against a per-token reference
and against itself on one device, the dropped count, the all-to-alls in the HLO, and a
Transformer with MoE blocks trained on data x expert against single-device training."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_trees_close, mesh_of
from jax.sharding import PartitionSpec as P

import eqxpar as ep
from eqxpar.nn import MoE, capacity
from eqxpar.profile import count_collectives
from eqxpar.train import Strategy, init_state, make_train_step
from models import Transformer, TransformerConfig, count_params, flops_per_token

# Pairwise-distinct sizes: batch, sequence, width, expert hidden, experts.
B, S, DIM, HIDDEN, E = 8, 6, 12, 10, 8
TOKENS = ("data", "expert")  # the batch dim is split over both


def make_moe(capacity_factor=8.0, activation="swiglu", top_k=2):
    return MoE(
        DIM,
        HIDDEN,
        E,
        top_k=top_k,
        capacity_factor=capacity_factor,
        activation=activation,
        key=jax.random.key(0),
    )


def inputs(seed=1):
    return jax.random.normal(jax.random.key(seed), (B, S, DIM))


@eqx.filter_jit
def per_token_reference(moe, x):
    """Each token through its top-k experts, weighted by its renormalised router
    probabilities: the definition, one token at a time, no capacity."""
    up, down = moe.experts.up.weight, moe.experts.down.weight

    def expert(e, v):
        h = up[e] @ v
        if moe.experts.activation == "swiglu":  # rows interleaved: gate 2i, value 2i+1
            h = jax.nn.silu(h[0::2]) * h[1::2]
        else:
            h = jax.nn.gelu(h)
        return down[e] @ h

    def token(v):
        probs = jax.nn.softmax(moe.router @ v)
        weight, chosen = jax.lax.top_k(probs, moe.top_k)
        weight = weight / jnp.sum(weight)
        return sum(weight[j] * expert(chosen[j], v) for j in range(moe.top_k))

    return jax.vmap(jax.vmap(token))(x)


def moe_loss(moe, x, ct):
    """A scalar of everything the layer returns: output against a cotangent, plus
    the auxiliary loss."""
    y, stats = moe(x)
    return jnp.sum(y * ct) + stats.aux_loss, stats


@functools.cache
def one_device(activation="swiglu"):
    moe, x = make_moe(activation=activation), inputs()
    ct = jax.random.normal(jax.random.key(2), x.shape)
    fn = eqx.filter_jit(eqx.filter_value_and_grad(moe_loss, has_aux=True))
    return moe, x, ct, fn(moe, x, ct)


@pytest.mark.parametrize("activation", ["swiglu", pytest.param("gelu", marks=pytest.mark.slow)])
def test_equals_the_per_token_reference_when_nothing_is_dropped(activation):
    moe, x, _, _ = one_device(activation)
    y, stats = eqx.filter_jit(lambda m, x: m(x))(moe, x)
    assert float(stats.dropped) == 0.0
    np.testing.assert_allclose(y, per_token_reference(moe, x), rtol=1e-5, atol=1e-6)


MESHES = [
    pytest.param(dict(expert=2), marks=pytest.mark.slow),
    pytest.param(dict(expert=4), marks=pytest.mark.slow),
    dict(expert=2, tensor=2),
    dict(data=2, expert=4),
]


@pytest.mark.parametrize(
    "sizes", MESHES, ids=["expert2", "expert4", "expert2xtensor2", "data2xexpert4"]
)
def test_sharded_equals_one_device(sizes):
    moe, x, ct, ((want_loss, want_stats), want_grads) = one_device()
    mesh = mesh_of(**sizes)

    def local(m, x, ct):
        loss, stats = moe_loss(m, x, ct)
        # The output part is a sum over this shard's tokens; the auxiliary loss is
        # already global (averaged over data and expert inside the layer).
        return jax.lax.psum(loss - stats.aux_loss, TOKENS) + stats.aux_loss, stats

    mapped = ep.filter_shard_map(
        local, mesh=mesh, in_specs=(None, P(TOKENS), P(TOKENS)), out_specs=(P(), P())
    )
    fn = eqx.filter_jit(eqx.filter_value_and_grad(mapped, has_aux=True))
    (loss, stats), grads = fn(ep.place(moe, mesh), x, ct)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(stats, want_stats, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, want_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_tokens_replicated_over_the_expert_axis():
    """Decoding holds the prompt on every device: each device runs its own experts on
    all tokens and one all-reduce sums them (no all-to-all); the same result."""
    moe, x, _, _ = one_device()
    mesh = mesh_of(expert=4)
    mapped = ep.filter_shard_map(
        lambda m, x: m(x, dropless=True), mesh=mesh, in_specs=(None, P()), out_specs=(P(), P())
    )
    y, stats = eqx.filter_jit(mapped)(ep.place(moe, mesh), x)
    want, want_stats = eqx.filter_jit(lambda m, x: m(x, dropless=True))(moe, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert_trees_close(stats, want_stats, rtol=1e-5, atol=1e-6)


def direct_drop_count(moe, x):
    """Assignments beyond capacity, counted one by one: every token's first choice,
    in token order, then every second choice; an expert full at `capacity` drops
    the rest."""
    tokens = np.asarray(x).reshape(-1, DIM)
    probs = np.asarray(jax.nn.softmax(tokens @ np.asarray(moe.router).T, axis=-1))
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : moe.top_k]
    cap = capacity(len(tokens), E, moe.top_k, moe.capacity_factor)
    load, dropped = np.zeros(E, int), 0
    for slot in range(moe.top_k):
        for t in range(len(tokens)):
            e = chosen[t, slot]
            if load[e] < cap:
                load[e] += 1
            else:
                dropped += 1
    return dropped


def test_a_small_capacity_drops_what_a_direct_count_drops():
    moe, x = make_moe(capacity_factor=0.5), inputs()
    y, stats = eqx.filter_jit(lambda m, x: m(x))(moe, x)
    want = direct_drop_count(moe, x)
    assert want > 0
    assert int(stats.dropped) == want
    np.testing.assert_allclose(stats.dropped_fraction, want / (B * S * 2))


@pytest.mark.slow
def test_each_device_drops_within_its_own_group():
    moe, x = make_moe(capacity_factor=0.5), inputs()
    # On expert=4 each device routes its own quarter of the batch (a group).
    mesh = mesh_of(expert=4)
    mapped = ep.filter_shard_map(
        lambda m, x: m(x)[1], mesh=mesh, in_specs=(None, P("expert")), out_specs=P()
    )
    groups = sum(direct_drop_count(moe, part) for part in np.split(np.asarray(x), 4))
    assert int(eqx.filter_jit(mapped)(ep.place(moe, mesh), x).dropped) == groups


def test_two_all_to_alls_forward_two_backward():
    moe, x, ct, _ = one_device()
    mesh = mesh_of(data=2, expert=4)

    def compiled(grad):
        fn = ep.filter_shard_map(
            lambda m, x, ct: jax.lax.psum(moe_loss(m, x, ct)[0], TOKENS),
            mesh=mesh,
            in_specs=(None, P(TOKENS), P(TOKENS)),
            out_specs=P(),
        )
        if grad:  # with respect to the input too, as inside a model
            fn = eqx.filter_grad(lambda mx, ct, fn=fn: fn(*mx, ct))
            return count_collectives(eqx.filter_jit(fn).lower((moe, x), ct).compile(), mesh)
        return count_collectives(eqx.filter_jit(fn).lower(moe, x, ct).compile(), mesh)

    forward, both = compiled(False), compiled(True)
    assert forward.count("all-to-all", "expert") == 2  # dispatch, combine
    assert both.count("all-to-all", "expert") == 4  # and their transposes
    assert both.count("all-to-all") == 4  # nothing else crosses the mesh that way


# ---------------------------------------------------------------------------------------
# A Transformer with MoE blocks.

CONFIG = TransformerConfig(
    vocab_size=40,
    dim=24,
    num_layers=4,
    num_heads=4,
    mlp_dim=20,
    max_seq_len=16,
    activation="swiglu",
    num_experts=4,
    moe_every=2,
    capacity_factor=4.0,
)
OPTIMIZER = optax.sgd(0.5, momentum=0.9)


def lm_data(seed):
    x = jax.random.randint(jax.random.key(seed), (B, S + 1), 0, CONFIG.vocab_size)
    return x[:, :-1], x[:, 1:]


def test_counts_total_and_active_parameters():
    model = eqx.filter_eval_shape(Transformer, CONFIG, key=jax.random.key(0))
    assert count_params(model) == CONFIG.num_params
    expert = CONFIG.dim * 2 * CONFIG.hidden + CONFIG.hidden * CONFIG.dim
    # Two MoE blocks, each using top_k=2 of its 4 experts.
    assert CONFIG.num_params - CONFIG.num_active_params == 2 * 2 * expert
    dense = CONFIG.replace(num_experts=0)
    router = CONFIG.num_experts * CONFIG.dim
    # An MoE block's token: the router and two experts, where a dense block has one MLP.
    want = flops_per_token(dense, S) + 3 * 2 * 2 * (router + expert)
    assert flops_per_token(CONFIG, S) == want


@pytest.mark.slow  # the MoE layer's parity on data x expert is in the fast suite
def test_two_train_steps_on_data_and_expert_equal_single_device_training():
    mesh = mesh_of(data=2, expert=4)
    plan = Strategy("zero2", min_shard_size=256)

    def loss_fn(model, x, y, key):
        return model.loss_and_metrics(x, y)

    state = init_state(
        Transformer, CONFIG, key=jax.random.key(3), optimizer=OPTIMIZER, mesh=mesh, strategy=plan
    )
    step = make_train_step(
        loss_fn, OPTIMIZER, mesh=mesh, strategy=plan, batch_specs=(P(TOKENS),) * 2
    )
    # The dense twin: plain Optax on one device, the batch whole.
    model = Transformer(CONFIG, key=jax.random.key(3))
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def dense_step(model, opt_state, x, y):
        (loss, metrics), grads = eqx.filter_value_and_grad(
            lambda m: m.loss_and_metrics(x, y), has_aux=True
        )(model)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss, metrics

    for x, y in [lm_data(seed) for seed in (4, 5)]:
        state, metrics = step(state, x, y)
        model, opt_state, loss, want = dense_step(model, opt_state, x, y)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        np.testing.assert_allclose(
            metrics["moe_load_balance_loss"], want["moe_load_balance_loss"], rtol=1e-5
        )
        assert float(metrics["moe_dropped_fraction"]) == 0.0
    assert_trees_close(
        eqx.filter(state.model, eqx.is_array), eqx.filter(model, eqx.is_array), atol=2e-6
    )


@pytest.mark.slow
def test_generation_with_moe_blocks_matches_recomputation():
    model = Transformer(CONFIG.replace(moe_every=1), key=jax.random.key(6))
    prompt = lm_data(7)[0][:2, :3]
    out = eqx.filter_jit(lambda m, p: m.generate(p, 4))(model, prompt)
    # Greedy: each new token is the argmax of the full model on the tokens before it.
    logits = eqx.filter_jit(lambda m, t: m(t))(model, out[:, :-1])
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:], axis=-1))


def test_misconfigurations_raise():
    with pytest.raises(ValueError, match="top_k"):
        CONFIG.replace(top_k=5)
    with pytest.raises(ValueError, match="moe_every"):
        CONFIG.replace(moe_every=3)
    for change in (
        dict(pipeline_stages=2),
        dict(sequence_parallel=True),
        dict(context_parallel="ring"),
    ):
        with pytest.raises(ValueError, match="with num_experts > 0 is not supported yet"):
            CONFIG.replace(**change)
    moe = make_moe()
    mesh = mesh_of(expert=8)
    odd = MoE(DIM, HIDDEN, 6, key=jax.random.key(0))
    fn = ep.filter_shard_map(
        lambda m, x: m(x)[0], mesh=mesh, in_specs=(None, P("expert")), out_specs=P("expert")
    )
    assert moe.num_experts == 8
    with pytest.raises(ValueError):  # 6 experts cannot be split 8 ways (placement says so)
        eqx.filter_eval_shape(fn, odd, inputs())
