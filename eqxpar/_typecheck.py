"""Runtime shape checking: jaxtyping annotations enforced by beartype.

Checks run when a function is *traced*, so under `jit` they cost nothing per step.
They are on by default. Turn them off for a process with the environment variable
`EQXPAR_TYPECHECK=0`, or in code with `eqxpar.set_typecheck(False)` (which also works
as a context manager).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

from beartype import beartype
from jaxtyping import jaxtyped

F = TypeVar("F", bound=Callable[..., Any])

_enabled = os.environ.get("EQXPAR_TYPECHECK", "1").strip().lower() not in ("0", "false", "no")


class ShardShapeError(TypeError):
    """A per-shard array does not have the size its layer expects on this mesh."""


class _Restore:
    """Returned by `set_typecheck`: the new setting already holds; leaving a `with`
    block restores the previous one."""

    def __init__(self, previous: bool):
        self._previous = previous

    def __enter__(self) -> _Restore:
        return self

    def __exit__(self, *exc: Any) -> None:
        global _enabled
        _enabled = self._previous


def set_typecheck(enabled: bool) -> _Restore:
    """Turns eqxpar's runtime shape checks on or off, at once.

    Also usable as a context manager, `with eqxpar.set_typecheck(False): ...`, which
    restores the previous setting on leaving the block.

    **Arguments:**

    - `enabled`: whether annotated functions are checked when traced.

    **Returns:**

    A context manager that restores the previous setting on exit.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return _Restore(previous)


def typecheck_enabled() -> bool:
    """Whether eqxpar's runtime shape checks are on."""
    return _enabled


def typechecked(fn: F) -> F:
    """Decorates `fn` so its jaxtyping annotations are checked by beartype when on."""
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return (checked if _enabled else fn)(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_shard(layer: str, dim: str, got: int, global_size: int, axis: Any, parts: int) -> None:
    """Raises `ShardShapeError` unless `got == global_size // parts`.

    **Arguments:**

    - `layer`: the layer's name, e.g. `"ColumnParallelLinear"`.
    - `dim`: the annotated dim's name, e.g. `"in_shard"`.
    - `got`: the size the input actually has.
    - `global_size`: the layer's global size of that dim.
    - `axis`: the mesh axis the dim is split over (for the message).
    - `parts`: the size of that axis here (1 outside `shard_map`).
    """
    if not _enabled:
        return
    want = global_size // parts
    if got != want:
        where = f"split {parts} ways over mesh axis {axis!r}" if parts > 1 else "not split"
        raise ShardShapeError(
            f"{layer}: dim '{dim}' of the input has size {got}, but this layer's global "
            f"size is {global_size}, {where}, so each shard must have {want}. Pass the "
            f"per-shard block (check the in_specs of filter_shard_map), or the whole array "
            f"outside shard_map."
        )
