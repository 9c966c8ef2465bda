"""Test configuration: 8 simulated CPU devices, strict numerics, a `getkey` fixture.

The device count is set through `jax.config` before any backend starts; importing
`jax` does not start one, so collection stays cheap.
"""

import itertools

import jax
import pytest

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Returns a function that hands out a fresh PRNG key on every call."""
    counter = itertools.count()
    base = jax.random.key(0)

    def _getkey():
        return jax.random.fold_in(base, next(counter))

    return _getkey
