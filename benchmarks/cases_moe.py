"""Mixture of experts against the dense model of the same active size.

The MoE Transformer (every block's MLP 8 GELU experts, top-2, capacity factor 1.25)
trains on data=2,expert=4, the batch split over `("data", "expert")`: eqxpar's
`models.Transformer` under `make_train_step` against the same model in plain Equinox
(`PlainMoETransformer` below) under `jax.jit`, on global arrays placed with
`NamedSharding` on a mesh of Auto axes, the experts' stacked weights `P("expert")`.
The plain model routes the tokens as GShard does, in the 8 groups eqxpar uses (a
device's batch rows each), so both drop the same assignments and must agree.

Beside them, the dense model of the same active size (one MLP of `top_k x` an expert's
hidden units per block: `cases_transformer.SIZES["full"]`'s model) on data=8, plain
and eqxpar, the eqxpar one checked against the plain one (`Built.references`).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _harness import Built, Case, Variant, compile_timed
from cases_transformer import (
    B1,
    PlainTransformer,
    Sizes,
    _per_token,
    attention_residual,
    auto_mesh,
    eqxpar_variant,
    first_moment,
    jit_variant,
    optimizer,
    plain_variant,
    tokens,
)
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

import eqxpar as ep
from eqxpar.train import init_state, make_train_step
from models import Transformer, TransformerConfig, flops_per_token

MESH = {"data": 2, "expert": 4}
GROUPS = 8  # the batch split over ("data", "expert"): one routing group per device
BATCH = P(("data", "expert"))
EXPERT_WEIGHTS = ("up.weight", "down.weight")  # stacked (layers, experts, ...)

SIZES = {
    "full": Sizes(
        TransformerConfig(
            vocab_size=4096, dim=512, num_layers=4, num_heads=8, max_seq_len=256,
            mlp_dim=1024, num_experts=8, top_k=2, moe_every=1, capacity_factor=1.25,
        ),
        batch=8,
        seq=256,
    ),
    # Pairwise-distinct sizes where they can be: 8 experts over expert=4, 16 rows in
    # 8 groups of 2 x 14 = 28 tokens, capacity ceil(1.25 * 28 * 2 / 8) = 9.
    "smoke": Sizes(
        TransformerConfig(
            vocab_size=56, dim=24, num_layers=3, num_heads=6, max_seq_len=14,
            mlp_dim=20, num_experts=8, top_k=2, moe_every=1, capacity_factor=1.25,
        ),
        batch=16,
        seq=14,
    ),
}  # fmt: skip


def dense_twin(config: TransformerConfig) -> TransformerConfig:
    """The dense model of the same active size: one MLP of `top_k x` an expert's
    hidden units per block."""
    return config.replace(num_experts=0, mlp_dim=config.top_k * config.hidden)


# -- the plain-Equinox MoE Transformer ----------------------------------------------------


def gshard_route(
    logits: Float[Array, "t e"], top_k: int, capacity: int
) -> tuple[Float[Array, "t e c"], Float[Array, "t e c"]]:
    """One group's dispatch and combine tensors (GShard).

    Each token goes to its `top_k` most probable experts, weighted by their router
    probabilities renormalised to sum to 1. An expert's buffer is filled with every
    token's first choice (tokens in order), then every second choice, ...; an
    assignment past `capacity` is dropped. `dispatch[t, e, c]` is 1 where token `t`
    sits in slot `c` of expert `e`; `combine` holds its weight there.
    """
    t, e = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    weight, expert = jax.lax.top_k(probs, top_k)
    weight = weight / jnp.sum(weight, axis=-1, keepdims=True)
    chosen = jax.nn.one_hot(expert, e, dtype=jnp.int32)  # (t, k, e)
    by_choice = jnp.swapaxes(chosen, 0, 1).reshape(top_k * t, e)
    filled = jnp.cumsum(by_choice, axis=0) * by_choice  # 1-based slot in its expert
    slot = jnp.swapaxes(jnp.sum(filled, axis=-1).reshape(top_k, t), 0, 1) - 1  # (t, k)
    # one_hot is all zeros for a slot past capacity: the assignment is dropped.
    where = chosen[..., None] * jax.nn.one_hot(slot, capacity, dtype=jnp.int32)[:, :, None]
    where = where.astype(logits.dtype)  # (t, k, e, c)
    return jnp.sum(where, axis=1), jnp.einsum("tk,tkec->tec", weight, where)


def router_losses(logits: Float[Array, "g t e"], top_k: int, config: TransformerConfig) -> Array:
    """The auxiliary loss of one MoE block, over all tokens of all groups: the load
    balance `E * sum_i f_i P_i` (`f_i` the fraction of assignments routed to expert
    `i`, without gradient; `P_i` its mean router probability) and the z-loss, the mean
    squared log-sum-exp of the logits, with the config's coefficients."""
    e = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    routed = jax.nn.one_hot(jax.lax.top_k(probs, top_k)[1], e).sum(axis=-2) / top_k
    fraction = jax.lax.stop_gradient(routed.mean(axis=(0, 1)))
    balance = e * jnp.sum(fraction * probs.mean(axis=(0, 1)))
    z = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    return config.load_balance_loss * balance + config.router_z_loss * z


def _experts(key: PRNGKeyArray, n: int, inp: int, out: int) -> eqx.nn.Linear:
    """`n` bias-free `eqx.nn.Linear(inp, out)` stacked: weight `(n, out, inp)`."""
    return eqx.filter_vmap(lambda k: eqx.nn.Linear(inp, out, use_bias=False, key=k))(
        jax.random.split(key, n)
    )


class PlainMoEBlock(eqx.Module):
    """`cases_transformer.PlainBlock` with a mixture of experts for its MLP: a router
    `eqx.nn.Linear(dim, E)` and the experts' `up` / `down` layers stacked `(E, ...)`."""

    attn_norm: eqx.nn.RMSNorm
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    mlp_norm: eqx.nn.RMSNorm
    router: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    config: TransformerConfig = eqx.field(static=True)

    def __init__(self, c: TransformerConfig, *, key: PRNGKeyArray):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        d, h = c.head_dim, c.dim
        self.attn_norm = eqx.nn.RMSNorm(h, eps=1e-6, use_bias=False)
        self.qkv = eqx.nn.Linear(h, (c.num_heads + 2 * c.kv_heads) * d, use_bias=False, key=k1)
        self.out = eqx.nn.Linear(c.num_heads * d, h, use_bias=False, key=k2)
        self.mlp_norm = eqx.nn.RMSNorm(h, eps=1e-6, use_bias=False)
        self.router = eqx.nn.Linear(h, c.num_experts, use_bias=False, key=k3)
        self.up = _experts(k4, c.num_experts, h, c.hidden)
        self.down = _experts(k5, c.num_experts, c.hidden, h)
        self.config = c

    def attention(self, x: Float[Array, "b s h"]) -> Float[Array, "b s h"]:
        """`x + out(attention(qkv(norm(x))))`, causal, rotary, as in `PlainBlock`."""
        c = self.config
        return attention_residual(self, x, (c.num_heads, c.kv_heads, c.rope_theta), None, False)

    def experts(self, buffer: Float[Array, "e c h"]) -> Float[Array, "e c h"]:
        """Expert `i`'s GELU MLP on row `i` of one group's buffer."""

        def mlp(up: eqx.nn.Linear, down: eqx.nn.Linear, rows: Array) -> Array:
            return jax.vmap(down)(jax.nn.gelu(jax.vmap(up)(rows)))

        return eqx.filter_vmap(mlp)(self.up, self.down, buffer)

    def __call__(self, x: Float[Array, "b s h"]) -> tuple[Float[Array, "b s h"], Array]:
        """The block and its auxiliary loss. The batch rows are split into `GROUPS`
        equal groups (those `P(("data", "expert"))` puts on each device), each routed
        on its own with capacity `ceil(capacity_factor * t * top_k / E)` for its `t`
        tokens."""
        c = self.config
        x = self.attention(x)
        b, s, h = x.shape
        tokens = _per_token(self.mlp_norm, x).reshape(GROUPS, b // GROUPS * s, h)
        logits = jax.vmap(jax.vmap(self.router))(tokens)
        cap = math.ceil(c.capacity_factor * tokens.shape[1] * c.top_k / c.num_experts)
        dispatch, combine = jax.vmap(lambda g: gshard_route(g, c.top_k, max(1, cap)))(logits)
        buffer = jnp.einsum("gtec,gtd->gecd", dispatch, tokens)
        out = jax.vmap(self.experts)(buffer)
        y = jnp.einsum("gtec,gecd->gtd", combine, out)
        return x + y.reshape(b, s, h), router_losses(logits, c.top_k, c)


class PlainMoETransformer(eqx.Module):
    """`cases_transformer.PlainTransformer` with `PlainMoEBlock`s (stacked, scanned);
    returns the logits and the blocks' summed auxiliary loss."""

    embed: eqx.nn.Embedding
    layers: PlainMoEBlock
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, c: TransformerConfig, *, key: PRNGKeyArray):
        ke, kl, kh = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(c.vocab_size, c.dim, key=ke)
        keys = jax.random.split(kl, c.num_layers)
        self.layers = eqx.filter_vmap(lambda k: PlainMoEBlock(c, key=k))(keys)
        self.norm = eqx.nn.RMSNorm(c.dim, eps=1e-6, use_bias=False)
        self.head = eqx.nn.Linear(c.dim, c.vocab_size, use_bias=False, key=kh)

    def __call__(self, tokens: Int[Array, "b s"]) -> tuple[Float[Array, "b s vocab"], Array]:
        x = jax.vmap(jax.vmap(self.embed))(tokens)
        params, static = eqx.partition(self.layers, eqx.is_array)

        def body(x: Array, p: Any) -> tuple[Array, Array]:
            return eqx.combine(p, static)(x)

        x, aux = jax.lax.scan(body, x, params)
        return _per_token(self.head, _per_token(self.norm, x)), jnp.sum(aux)


def plain_moe_loss(model: PlainMoETransformer, x: Array, y: Array) -> Array:
    """Mean cross-entropy plus the MoE blocks' auxiliary losses."""
    logits, aux = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + aux


def plain_moe_like(template: PlainMoETransformer, model: Any) -> PlainMoETransformer:
    """`template` with the arrays of `model` (a `Transformer` whose blocks are all MoE
    blocks, or a tree shaped like one: its gradients, its Adam moments)."""
    layers = model.moe_layers
    arrays = (
        model.embed.weight, model.norm.weight, model.head.weight,
        layers.attn_norm.weight, layers.attn.qkv.weight, layers.attn.out.weight,
        layers.mlp_norm.weight, layers.mlp.router,
        layers.mlp.experts.up.weight, layers.mlp.experts.down.weight,
    )  # fmt: skip

    def where(m: PlainMoETransformer) -> tuple:
        b = m.layers
        return (
            m.embed.weight, m.norm.weight, m.head.weight,
            b.attn_norm.weight, b.qkv.weight, b.out.weight,
            b.mlp_norm.weight, b.router.weight, b.up.weight, b.down.weight,
        )  # fmt: skip

    return eqx.tree_at(where, template, arrays)


def place_moe(model: PlainMoETransformer, mesh: Any) -> tuple[Any, Any]:
    """`(arrays, static)`: the experts' stacked weights `(layers, E, ...)` split over
    `expert`, every other array replicated."""
    params, static = eqx.partition(model, eqx.is_array)

    def place(path: Any, a: Array) -> Array:
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        spec = P(None, "expert") if key.endswith(EXPERT_WEIGHTS) else P()
        return jax.device_put(a, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, params), static


# -- the variants ---------------------------------------------------------------------------


def plain_moe_variant(
    template: PlainMoETransformer, model: Transformer, x: np.ndarray, y: np.ndarray
) -> Variant:
    """The baseline: the plain MoE model's AdamW step under `eqx.filter_jit` on an Auto
    mesh data=2,expert=4, experts split over `expert`, the batch over both axes."""
    mesh = auto_mesh(MESH)
    params, static = place_moe(plain_moe_like(template, jax.device_get(model)), mesh)
    return jit_variant(plain_moe_loss, params, static, mesh, x, y, BATCH)


def eqxpar_moe_variant(
    template: PlainMoETransformer, config: TransformerConfig, x: np.ndarray, y: np.ndarray
) -> tuple[Variant, Any, float]:
    """eqxpar's `make_train_step` of `models.Transformer` on data=2,expert=4, the batch
    `P(("data", "expert"))`, the loss `loss_and_metrics` (cross-entropy plus the
    auxiliary losses); also its global model and its dropped fraction of assignments."""
    mesh = ep.make_mesh(**MESH, devices=jax.devices()[:GROUPS])
    opt = optimizer()
    state = init_state(
        Transformer, config, key=jax.random.key(0), optimizer=opt, mesh=mesh, strategy="dp"
    )
    step = make_train_step(
        lambda model, x, y, key: model.loss_and_metrics(x, y),
        opt,
        mesh=mesh,
        strategy="dp",
        batch_specs=(BATCH, BATCH),
    )
    xs, ys = (jax.device_put(a, NamedSharding(mesh, BATCH)) for a in (x, y))
    compiled, seconds = compile_timed(step, state, xs, ys)

    def probe() -> tuple[Any, Any]:
        new, metrics = compiled(state, xs, ys)
        mu = jax.tree.map(lambda m: m / (1 - B1), first_moment(new.opt_state))
        return metrics["loss"], plain_moe_like(template, mu)

    dropped = float(compiled(state, xs, ys)[1]["moe_dropped_fraction"])
    variant = Variant(compiled, (state, xs, ys), compiled, mesh, seconds, probe)
    return variant, state.model, dropped


def moe_case(sizes: str) -> Built:
    """The MoE Transformer, plain and eqxpar, on data=2,expert=4 (the plain one the
    baseline), then the dense model of the same active size, plain and eqxpar, on
    data=8 (the eqxpar one checked against the plain one). The case's FLOPs are the MoE
    model's (`flops_per_token` counts the router and `top_k` experts per token)."""
    s = SIZES["smoke" if "smoke" in sizes else "full"]
    config, dense = s.config, dense_twin(s.config)
    x, y = tokens(s)
    template = PlainMoETransformer(config, key=jax.random.key(1))
    ours, model, dropped = eqxpar_moe_variant(template, config, x, y)
    plain = plain_moe_variant(template, model, x, y)
    dense_template = PlainTransformer(dense, key=jax.random.key(1))
    dense_ours, dense_model = eqxpar_variant(dense_template, dense, {"data": 8}, "dp", x, y)
    dense_plain = plain_variant(dense_template, dense_model, {"data": 8}, "replicated", x, y)
    dense_plain.theory_bytes = dense_ours.theory_bytes  # the layout's minimum, for both
    names = ("jit auto dense (same active size)", "eqxpar dense (same active size)")
    return Built(
        title=f"MoE Transformer ({config.num_experts} experts, top-{config.top_k}, capacity "
        f"factor {config.capacity_factor}: {100 * dropped:.1f}% of assignments dropped), "
        f"data=2,expert=4, against the dense model of MLP {dense.hidden} on data=8",
        variants={"jit auto MoE": plain, "eqxpar MoE": ours,
                  names[0]: dense_plain, names[1]: dense_ours},
        flops=flops_per_token(config, s.seq) * s.batch * s.seq,
        tokens=s.batch * s.seq,
        baselines=("jit auto MoE",),
        references={names[0]: None, names[1]: names[0]},
    )  # fmt: skip


CASES = {
    "moe-d2e4": Case(
        8, moe_case, "MoE (8 experts, top-2) on data=2,expert=4 vs the dense of its active size"
    ),
}
