"""Bytes per device of a train state, beside the ZeRO paper's theoretical numbers."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import equinox as eqx
import jax

from ._state import TrainState
from ._strategy import Strategy, as_strategy, plan, plan_leaves


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Per-device bytes of a training run.

    **Fields:**

    - `strategy`: the strategy's kind; `data_size`: the data-axis size `N_d`.
    - `params`, `grads`, `opt_state`: measured bytes on the fullest device (gradients
      are not stored between steps: their bytes follow from the strategy's layout).
    - `theory_params`, `theory_grads`, `theory_opt_state`: the ZeRO paper's numbers for
      the same arrays: `Psi` (bytes of one tensor-parallel replica of the parameters)
      whole or divided by `N_d`.
    - `temp`: the compiled step's temporary buffers (`memory_analysis`), if given.
    """

    strategy: str
    data_size: int
    params: int
    grads: int
    opt_state: int
    theory_params: float
    theory_grads: float
    theory_opt_state: float
    temp: int | None = None

    def table(self) -> str:
        """A plain-text table: measured and theoretical MiB per device."""
        mib = 2.0**20
        rows = [
            ("parameters", self.params, self.theory_params),
            ("gradients", self.grads, self.theory_grads),
            ("optimizer state", self.opt_state, self.theory_opt_state),
        ]
        lines = [
            f"{self.strategy} on data={self.data_size}: MiB per device",
            f"{'':18}{'measured':>10}{'theory':>10}",
        ]
        lines += [f"{name:18}{m / mib:10.3f}{t / mib:10.3f}" for name, m, t in rows]
        total = sum(m for _, m, _ in rows)
        theory = sum(t for *_, t in rows)
        lines.append(f"{'model states':18}{total / mib:10.3f}{theory / mib:10.3f}")
        if self.temp is not None:
            lines.append(f"{'step temporaries':18}{self.temp / mib:10.3f}{'':>10}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _per_device(tree: Any) -> int:
    """Bytes on the device holding the most of `tree`'s arrays."""
    totals: dict[Any, int] = {}
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
        for shard in leaf.addressable_shards:
            totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
    return max(totals.values(), default=0)


def memory_report(
    state: TrainState, strategy: str | Strategy, mesh: Any, *, compiled: Any = None
) -> MemoryReport:
    """Measures a placed `TrainState` and sets it beside the theory.

    **Arguments:**

    - `state`: a `TrainState` from `init_state` (or after steps).
    - `strategy`: the strategy it was built with.
    - `mesh`: its mesh.
    - `compiled`: optionally the compiled step (`step.lower(state, *batch).compile()`),
      to add its temporary bytes.

    **Returns:**

    A `MemoryReport`; `print` it for the table.
    """
    strategy = as_strategy(strategy)
    sizes = dict(mesh.shape)
    n = sizes[strategy.data_axis]
    plans = plan(state.model, strategy, mesh)
    params = eqx.filter(state.model, eqx.is_array)
    psi = 0.0  # bytes of one tensor-parallel replica of the parameters
    grads = 0.0
    for p, leaf in zip(plan_leaves(plans), jax.tree.leaves(params)):
        tp = math.prod(sizes[a] for a in p.sharded_axes(strategy.data_axis, False))
        replica = leaf.nbytes / tp
        psi += replica
        grads += replica / n if p.grad_split(strategy.kind) else replica
    opt_replica = (
        sum(leaf.nbytes for leaf in jax.tree.leaves(eqx.filter(state.opt_state, eqx.is_array)))
        * psi
        / max(sum(leaf.nbytes for leaf in jax.tree.leaves(params)), 1)
    )
    kind = strategy.kind
    temp = None
    if compiled is not None:
        stats = getattr(compiled, "compiled", compiled).memory_analysis()
        temp = int(stats.temp_size_in_bytes)
    return MemoryReport(
        strategy=kind,
        data_size=n,
        params=_per_device(state.model),
        grads=int(grads),
        opt_state=_per_device(state.opt_state),
        theory_params=psi / n if kind == "fsdp" else psi,
        theory_grads=psi / n if kind in ("zero2", "fsdp") else psi,
        theory_opt_state=opt_replica if kind == "dp" else opt_replica / n,
        temp=temp,
    )
