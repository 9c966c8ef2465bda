"""Shared test utilities: meshes of a given size and tree comparisons."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import eqxpar as ep


def mesh_of(data: int = 1, tensor: int = 1, **axes: int):
    """An eqxpar mesh on the first `data * tensor * ...` simulated devices."""
    n = data * tensor * int(np.prod(list(axes.values()) or [1]))
    return ep.make_mesh(data=data, tensor=tensor, devices=jax.devices()[:n], **axes)


def assert_trees_close(got, want, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """Every array leaf of `got` equals the matching leaf of `want` within tolerance."""
    got_leaves, got_def = jax.tree.flatten(got)
    want_leaves, want_def = jax.tree.flatten(want)
    assert got_def == want_def, f"tree structures differ:\n{got_def}\n{want_def}"
    for path_leaf, g, w in zip(
        jax.tree_util.tree_leaves_with_path(got), got_leaves, want_leaves, strict=True
    ):
        path = jax.tree_util.keystr(path_leaf[0])
        if isinstance(g, jax.Array) and jax.dtypes.issubdtype(g.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        if isinstance(g, jax.Array | np.ndarray):
            assert g.shape == w.shape, f"{path}: shape {g.shape} != {w.shape}"
            np.testing.assert_allclose(
                np.asarray(g), np.asarray(w), rtol=rtol, atol=atol, err_msg=path
            )
        else:
            assert g == w, f"{path}: {g!r} != {w!r}"


def cotangent_loss(fn, ct):
    """`loss(*args) = sum(fn(*args) * ct)`: its gradient is the VJP of `fn` against `ct`."""

    def loss(*args):
        return jnp.sum(fn(*args) * ct)

    return loss
