"""Layer-level cases: the TP MLP block (`tp_mlp.py`'s builders) side by side.

The baseline is `tp_mlp`'s GSPMD variant: the dense `eqx.nn.Linear` block under
`jax.jit`, its weights placed Megatron-style with `NamedSharding` on a mesh of Auto
axes; against it eqxpar's `ColumnParallelLinear -> RowParallelLinear`, without and with
sequence parallelism. The step is the loss `sum(mlp(x) ** 2)` and its gradients.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np
import optax
import tp_mlp
from _harness import Built, Case, Variant, compile_timed
from cases_transformer import B1, first_moment, jit_variant, optimizer
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, PRNGKeyArray

import eqxpar as ep
from eqxpar.train import init_state, make_train_step
from models import TPClassifier

F32 = 4
SIZES = {"full": (8, 256, 512), "smoke": (4, 16, 32)}  # batch, seq, h
MESH = {"data": 2, "tensor": 4}


def theory(batch: int, seq: int, h: int, *, sequence_parallel: bool) -> float:
    """Collective bytes per device as `count_collectives` counts them (output bytes):
    per direction one `(b/d, s, h)` all-reduce over `tensor` (with SP an all-gather of
    it and a reduce-scatter to `1/t` of it, each way), and the data all-reduce of the
    device's weight and bias gradients."""
    d, t = MESH["data"], MESH["tensor"]
    act = batch // d * seq * h * F32
    tensor = 2 * (act + act / t) if sequence_parallel else 2 * act
    grads = (2 * 4 * h * h / t + 4 * h / t + h) * F32
    return tensor + grads


def mlp_case(sizes: str) -> Built:
    batch, seq, h = SIZES["smoke" if "smoke" in sizes else "full"]
    mesh = ep.make_mesh(**MESH, devices=jax.devices()[:8])
    params = tp_mlp.init_params(h, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, seq, h))
    builders = {
        "jit auto (megatron)": (tp_mlp._gspmd, False),
        "eqxpar TP": (tp_mlp._eqxpar(), False),
        "eqxpar TP+SP": (tp_mlp._eqxpar(sequence_parallel=True), True),
    }
    variants = {}
    for name, (build, sp) in builders.items():
        step, args = build(params, x, mesh)
        compiled, seconds = compile_timed(step, *args)

        def probe(compiled: Any = compiled, args: tuple = args) -> tuple[Any, Any]:
            return compiled(*args)

        bytes_ = theory(batch, seq, h, sequence_parallel=sp)
        variants[name] = Variant(compiled, args, compiled, mesh, seconds, probe, bytes_)
    return Built(
        title=f"TP MLP block h={h}, batch={batch}, seq={seq}, {ep_text()}",
        variants=variants,
        flops=tp_mlp.step_flops(batch, seq, h),
        tokens=batch * seq,
        baselines=("jit auto (megatron)",),
        rtol=1e-4,
    )


def ep_text() -> str:
    return ",".join(f"{k}={v}" for k, v in MESH.items())


# -- TPClassifier --------------------------------------------------------------------------

CLASSIFIER = {"full": (784, 10, 512, 2048, 4, 1024), "smoke": (12, 5, 16, 32, 2, 16)}


class PlainClassifier(eqx.Module):
    """`models.TPClassifier` from `eqx.nn.Linear` and `eqx.nn.LayerNorm`: an input
    linear layer, `depth` residual blocks `x + down(gelu(up(norm(x))))`, norm, head."""

    embed: eqx.nn.Linear
    norms: list[eqx.nn.LayerNorm]
    ups: list[eqx.nn.Linear]
    downs: list[eqx.nn.Linear]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, model: TPClassifier, *, key: PRNGKeyArray):
        del key  # every weight comes from `model`

        def linear(layer: Any) -> eqx.nn.Linear:
            out, inp = layer.weight.shape
            plain = eqx.nn.Linear(inp, out, key=jax.random.key(0))
            return eqx.tree_at(lambda m: (m.weight, m.bias), plain, (layer.weight, layer.bias))

        self.embed, self.head = linear(model.embed), linear(model.head)
        self.norms = [b.norm for b in model.blocks]
        self.ups = [linear(b.up) for b in model.blocks]
        self.downs = [linear(b.down) for b in model.blocks]
        self.norm = model.norm

    def __call__(self, x: Array) -> Array:
        h = jax.vmap(self.embed)(x)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + jax.vmap(down)(jax.nn.gelu(jax.vmap(up)(jax.vmap(norm)(h))))
        return jax.vmap(self.head)(jax.vmap(self.norm)(h))


def _ce(logits: Array, y: Array) -> Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def megatron_spec(path: str, ndim: int) -> P:
    """Rows of the input and up layers over `tensor`, columns of down and head."""
    if path.startswith(("embed.", "ups.")):
        return P("tensor", *([None] * (ndim - 1)))
    if path.startswith(("downs.", "head.")) and path.endswith("weight"):
        return P(None, "tensor")
    return P()


def classifier_variants(mesh: Any, x: np.ndarray, y: np.ndarray, dims: tuple) -> dict:
    opt = optimizer()
    batch = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    ours = {
        name: eqxpar_classifier(mesh, opt, dims, xs, ys, sequence_parallel=sp)
        for name, sp in (("eqxpar", False), ("eqxpar SP", True))
    }
    plain = PlainClassifier(jax.device_get(ours["eqxpar"].args[0].model), key=jax.random.key(0))
    params, static = eqx.partition(plain, eqx.is_array)
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.device_put(
            a,
            NamedSharding(
                mesh, megatron_spec(jax.tree_util.keystr(p, simple=True, separator="."), a.ndim)
            ),
        ),
        params,
    )
    base = jit_variant(lambda m, x, y: _ce(m(x), y), params, static, mesh, x, y, P("data"))
    return {"jit auto (megatron)": base, **ours}


def eqxpar_classifier(
    mesh: Any, opt: Any, dims: tuple, xs: Any, ys: Any, *, sequence_parallel: bool
) -> Variant:
    """`models.TPClassifier`'s train step (key 0's weights, whatever `sequence_parallel`);
    its probe returns the loss and the bias-corrected first moments (the gradients) as
    a `PlainClassifier`, to compare with the baseline's."""
    state = init_state(
        TPClassifier,
        *dims,
        sequence_parallel=sequence_parallel,
        key=jax.random.key(0),
        optimizer=opt,
        mesh=mesh,
        strategy="dp",
    )
    step = make_train_step(lambda m, x, y, key: _ce(m(x), y), opt, mesh=mesh)
    compiled, seconds = compile_timed(step, state, xs, ys)

    def probe() -> tuple[Any, Any]:
        new, metrics = compiled(state, xs, ys)
        mu = jax.tree.map(lambda m: m / (1 - B1), first_moment(new.opt_state))
        return metrics["loss"], eqx.filter(PlainClassifier(mu, key=jax.random.key(0)), eqx.is_array)

    return Variant(compiled, (state, xs, ys), compiled, mesh, seconds, probe)


def classifier_case(sizes: str) -> Built:
    """`models.TPClassifier`'s AdamW step on data=2,tensor=4 against the plain-Equinox
    twin under `jit` with Megatron `NamedSharding`s (bytes: no theory)."""
    *dims, batch = CLASSIFIER["smoke" if "smoke" in sizes else "full"]
    features, classes, width, hidden, depth = dims
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, features)).astype(np.float32)
    y = rng.integers(0, classes, batch).astype(np.int32)
    mesh = ep.make_mesh(**MESH, devices=jax.devices()[:8])
    macs = features * width + depth * 2 * width * hidden + width * classes
    return Built(
        title=f"TPClassifier {features} -> {width} (x{depth} blocks of {hidden}) -> {classes}, "
        f"batch {batch}, {ep_text()}",
        variants=classifier_variants(mesh, x, y, tuple(dims)),
        flops=6 * macs * batch,
        tokens=batch,
        baselines=("jit auto (megatron)",),
    )


CASES = {
    "tp-mlp-d2t4": Case(8, mlp_case, "TP MLP block h -> 4h -> h (tp_mlp.py's builders)"),
    "classifier-d2t4": Case(8, classifier_case, "models.TPClassifier, AdamW step"),
}
