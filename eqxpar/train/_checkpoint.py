"""Orbax checkpoints of a `TrainState`: sharded, asynchronous, atomic, keep-last-N,
restorable onto a different mesh."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.sharding import NamedSharding

from ._state import TrainState, state_spec_tree
from ._strategy import Strategy, as_strategy


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - the `examples` extra installs it
        raise ImportError(
            "eqxpar checkpoints need orbax-checkpoint: pip install 'eqxpar[examples]' or "
            "pip install orbax-checkpoint."
        ) from e
    return ocp


def _to_storable(tree: Any) -> Any:
    """Typed PRNG keys -> their raw uint32 data (Orbax stores plain arrays)."""
    return jax.tree.map(
        lambda x: (
            jax.random.key_data(x)
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x
        ),
        tree,
    )


class CheckpointError(RuntimeError):
    """A checkpoint that is on disk but cannot be read: its metadata or its array data
    is damaged (truncated, overwritten, or a file missing).

    The message names the step, its directory, the part that is unreadable and why,
    and ends with the fix. The same facts are attributes: `step`, `path`, `part`
    (`"metadata"` or `"array data"`) and `reason`; the underlying error is the
    `__cause__`.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int | None = None,
        path: str | None = None,
        part: str | None = None,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.step, self.path, self.part, self.reason = step, path, part, reason


class Checkpointer:
    """Saves and restores `TrainState`s with Orbax's `CheckpointManager`.

    Each device writes its own shards; saves run in the background (`wait()` blocks
    until the last one is on disk). A save is written to a temporary directory and
    renamed when complete, so a crash mid-save leaves the previous checkpoint intact:
    `latest_step()` and `restore()` only see finished ones. Only the newest `keep`
    checkpoints are kept.

    A finished checkpoint damaged later (a truncated or overwritten file) makes
    `restore()` raise a `CheckpointError`; `resume(..., fallback=True)` then goes back
    to the newest readable one, and a later `save()` of the damaged step replaces it.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
        """**Arguments:**

        - `directory`: where the checkpoints live (created if needed).
        - `keep`: how many of the newest checkpoints to keep.
        - `async_save`: write in the background.
        """
        ocp = _ocp()
        self.directory = os.fspath(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "extra")
        )
        self._damaged: set[int] = set()  # steps that `restore` found unreadable

    def save(self, state: TrainState, extra: dict | None = None, *, force: bool = True) -> None:
        """Starts saving `state` (and a JSON-able `extra`, e.g. the data position) as step
        `state.step`; does nothing if that step is already saved, unless `restore` found
        it damaged: then it is replaced."""
        ocp = _ocp()
        if int(state.step) in self._manager.all_steps():
            if int(state.step) not in self._damaged:
                return  # already saved (e.g. a run resumed at its last step)
            self._manager.delete(int(state.step))
            self._damaged.discard(int(state.step))
        arrays = _to_storable(eqx.filter(state, eqx.is_array))
        # Global shapes, in flattening order: a restore into another layout needs them.
        shapes = [list(x.shape) for x in jax.tree.leaves(arrays)]
        self._manager.save(
            int(state.step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(arrays),
                extra=ocp.args.JsonSave({"user": extra or {}, "shapes": shapes}),
            ),
            force=force,
        )

    def wait(self) -> None:
        """Blocks until every started save is complete."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or `None`."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> str:
        """The directory of checkpoint `step`."""
        return os.path.join(self.directory, str(step))

    def restore(
        self,
        like: TrainState,
        *,
        mesh: Any,
        strategy: str | Strategy = "dp",
        step: int | None = None,
    ) -> tuple[TrainState, dict]:
        """Restores a checkpoint into the structure and mesh of `like`.

        `like` is a `TrainState` for the *target* run (e.g. from `init_state`, or its
        `eqx.filter_eval_shape`): the checkpoint's arrays are read directly into its
        shardings on `mesh` under `strategy`, so a run saved on one mesh resumes on any
        other. If a stored array's shape differs from the target's only by a reshape (a
        different pipeline layout of the same layers), it is read split like the target
        where the two layouts agree (the trailing dims they share, and the leading dim
        where both divide), and reshaped on the devices into the target's sharding: no
        host ever holds a whole array, so it works across processes too.

        With several processes (`eqxpar.distributed`), every process calls `save` and
        `restore` alike and reads or writes only its own devices' shards; a checkpoint
        written by N processes restores in M processes on another mesh.

        **Arguments:**

        - `like`: the target `TrainState` (arrays or `jax.ShapeDtypeStruct`s).
        - `mesh`: the target mesh.
        - `strategy`: the target strategy.
        - `step`: the checkpoint to read; the newest by default.

        **Returns:**

        `(state, extra)`: the state, with the shardings of `like` on `mesh`, and the
        `extra` dict given to `save`.

        **Raises:**

        `CheckpointError` if the checkpoint's metadata or array data cannot be read (it
        is damaged); `FileNotFoundError` if there is no such checkpoint; `ValueError` if
        it holds another model or optimizer.
        """
        ocp = _ocp()
        from etils import epath  # installed with orbax

        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no complete checkpoint of step {step} in {self.directory}; the complete "
                f"ones are steps {self.all_steps()}."
            )
        specs = state_spec_tree(like, as_strategy(strategy), mesh)
        flat_specs = jax.tree.structure(like).flatten_up_to(specs)
        leaves = jax.tree.leaves(like)
        try:  # the small JSON files first: the `extra` item, then the state's tree
            extra = self._manager.restore(
                step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())
            )
            handler = ocp.PyTreeCheckpointHandler()
            try:
                handler.metadata(epath.Path(self.step_path(step), "state"))
            finally:
                handler.close()
        except Exception as e:  # anything that stops these reads is damage
            raise self._damage(step, _unreadable_part(e) or "metadata", e) from e
        saved = dict(extra["extra"] or {})
        shapes = [tuple(s) for s in saved.get("shapes", [])]
        arrays = [(x, spec) for x, spec in zip(leaves, flat_specs, strict=True) if _is_arr(x)]
        if len(shapes) != len(arrays):
            raise ValueError(
                f"checkpoint step {step} holds {len(shapes)} arrays but the target state has "
                f"{len(arrays)}: it is a different model or optimizer."
            )
        targets, reshapes = [], []
        for (x, spec), stored in zip(arrays, shapes, strict=True):
            raw = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x  # concrete or not
            shape = tuple(raw.shape)
            if int(np.prod(stored)) != int(np.prod(shape)):
                raise ValueError(
                    f"checkpoint step {step} has an array of shape {stored} where the target "
                    f"has {shape}: it is a different model."
                )
            same = stored == shape
            read = spec if same else _reshape_source_spec(stored, shape, spec, mesh)
            target = NamedSharding(mesh, read)
            targets.append(jax.ShapeDtypeStruct(stored, raw.dtype, sharding=target))
            reshapes.append(None if same else (shape, NamedSharding(mesh, spec)))
        template = _to_storable(eqx.filter(like, _is_arr))
        treedef = jax.tree.structure(template)
        target_tree = jax.tree.unflatten(treedef, targets)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        target_tree,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target_tree),
                    ),
                ),
            )
        except Exception as e:
            part = _unreadable_part(e)
            if part is None:
                raise  # not damage: e.g. a target tree that does not match the checkpoint's
            raise self._damage(step, part, e) from e
        values = []
        for value, (x, _), reshape in zip(
            jax.tree.leaves(restored["state"]), arrays, reshapes, strict=True
        ):
            if reshape is not None:  # another layout of the same array (pipeline chunks)
                shape, sharding = reshape
                value = _reshape_on_device(value, shape, sharding)
            values.append(jax.random.wrap_key_data(value) if _is_key(x) else value)
        it = iter(values)
        state = jax.tree.unflatten(
            jax.tree.structure(like), [next(it) if _is_arr(x) else x for x in leaves]
        )
        return state, dict(saved.get("user", {}))

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _damage(self, step: int, part: str, error: BaseException) -> CheckpointError:
        """The `CheckpointError` for an unreadable `part` of checkpoint `step`."""
        self._damaged.add(step)
        path = self.step_path(step)
        reason = _describe(_root_cause(error))
        older = [s for s in self.all_steps() if s < step]
        if older:
            fix = (
                f"Restore an older checkpoint with restore(..., step={older[-1]}) (complete "
                f"steps: {self.all_steps()}), or call resume(..., fallback=True) to fall back "
                f"to the newest readable one."
            )
        else:
            fix = (
                "There is no older checkpoint to fall back to: restore a backup copy of "
                f"{path}, or start from scratch."
            )
        return CheckpointError(
            f"checkpoint step {step} at {path} is damaged: its {part} cannot be read "
            f"({reason}). {fix}",
            step=step,
            path=path,
            part=part,
            reason=reason,
        )


# TensorStore's errors for bytes that are missing, short or fail their checksum or
# decompression; other codes (out of memory, a bad request) are not damage.
_TENSORSTORE_DAMAGE = re.compile(r"(DATA_LOSS|NOT_FOUND|OUT_OF_RANGE|FAILED_PRECONDITION): ")


def _unreadable_part(error: BaseException) -> str | None:
    """`"array data"` if `error` comes from unreadable bytes of the OCDBT store that
    holds the arrays (its manifest, index or chunks), `"metadata"` if from an unreadable
    JSON file (Orbax's `_METADATA`, `_sharding`, `array_metadatas/`, the `extra` item),
    `None` if it is not damage."""
    root = _root_cause(error)
    if _TENSORSTORE_DAMAGE.match(str(root)):
        return "array data" if "OCDBT" in str(root) else "metadata"
    if isinstance(root, (json.JSONDecodeError, UnicodeDecodeError, OSError)):
        return "metadata"
    return None


def _root_cause(error: BaseException) -> BaseException:
    """The innermost `raise ... from` cause (Orbax wraps TensorStore's error)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _describe(error: BaseException) -> str:
    """`Type: message`, without TensorStore's long spec dumps, on one line."""
    text = re.split(r" \[(?:tensorstore_spec|source locations)", str(error))[0]
    text = " ".join(text.split())
    text = text if len(text) <= 400 else text[:397] + "..."
    return text if _TENSORSTORE_DAMAGE.match(text) else f"{type(error).__name__}: {text}"


def _reshape_source_spec(
    stored: tuple[int, ...], shape: tuple[int, ...], spec: Any, mesh: Any
) -> jax.sharding.PartitionSpec:
    """How to read an array stored as `stored` that is restored into `shape` split as
    `spec`: the target's splits of the trailing dims both shapes share, and its split of
    the leading dim (the first of size > 1) where the stored leading dim divides by it
    too (a row-major reshape keeps equal blocks of the leading dim, so each device reads
    what it will hold)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))
    suffix = 0
    while (
        suffix < min(len(stored), len(shape)) - 1
        and stored[len(stored) - 1 - suffix] == shape[len(shape) - 1 - suffix]
    ):
        suffix += 1
    read: list[Any] = [None] * len(stored)
    if suffix:
        read[len(stored) - suffix :] = entries[len(shape) - suffix :]
    # The first dims of size > 1 (size-1 dims do not change the row-major order).
    i = next((d for d, n in enumerate(shape) if n > 1), None)
    j = next((d for d, n in enumerate(stored) if n > 1), None)
    if i is not None and j is not None and entries[i] is not None:
        if i < len(shape) - suffix and j < len(stored) - suffix:
            names = entries[i] if isinstance(entries[i], tuple) else (entries[i],)
            split = int(np.prod([mesh.shape[n] for n in names]))
            if stored[j] % split == 0:
                read[j] = entries[i]
    return jax.sharding.PartitionSpec(*read)


def _reshape_on_device(value: jax.Array, shape: tuple[int, ...], sharding: Any) -> jax.Array:
    """`value.reshape(shape)`, computed where the shards are, into `sharding`."""
    return jax.jit(lambda v: v.reshape(shape), out_shardings=sharding)(value)


def _is_arr(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
