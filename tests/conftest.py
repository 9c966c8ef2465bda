"""Test configuration: 8 simulated CPU devices, strict numerics, a `getkey` fixture.

The device count is set through `jax.config` before any backend starts; importing
`jax` does not start one, so collection stays cheap.
"""

import itertools
import os

# The suite compiles hundreds of small programs, and LLVM's optimisation passes are
# most of XLA:CPU's compile time. Skip them (XLA's own HLO passes, which decide the
# collectives the tests count, still run). XLA reads this when its backend starts,
# so it is set before JAX is imported; example subprocesses inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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
