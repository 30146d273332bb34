"""Orbax checkpoints of a run: what is saved, how a resume finds the newest readable one.

A checkpoint holds three items: ``state`` (the train state and the best-on-valid params),
``data`` (the grain iterator state, so the data order resumes exactly) and ``meta`` (the
best-on-valid bookkeeping, JSON). Checkpoints are written synchronously; orbax writes each one to
a temp folder and renames it into place, so a killed run leaves either the old or the new step.
"""

import os
import time

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from modalimmune_jax.training.errors import CheckpointError


def abstract_checkpoint(abstract_state, sharding):
    """The checkpointed pytree's shapes: the train state plus the best-on-valid params."""
    tree = {"train": abstract_state, "best_params": abstract_state["params"]}
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    """The CheckpointManager of ``workdir/checkpoints`` (orbax needs an absolute path)."""
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=("state", "data", "meta"))


class IteratorState:
    """Stands in for a grain iterator at save time: the state it had after a given batch.

    With batches prefetched, the live iterator has read ahead; the trainer saves the state that
    followed the last batch it *consumed*, so a resumed run sees exactly the batches it would
    have.
    """

    def __init__(self, state: bytes):
        self._state = state

    def get_state(self) -> bytes:
        return self._state


def save(mngr, step: int, *, state, data_state: bytes, meta: dict) -> None:
    """Saves one checkpoint (state pytree, iterator state, JSON meta) at `step`."""
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain_ckpt.CheckpointSave(IteratorState(data_state)),
        meta=ocp.args.JsonSave(meta)), force=True)


def _one_line(e) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _set_aside(mngr, steps):
    """Moves unreadable checkpoints to ``checkpoints.unreadable/`` (kept for inspection).

    The resumed run saves those steps again, and orbax refuses to overwrite an existing step.
    """
    folder = os.fspath(mngr.directory)
    if jax.process_index() == 0:
        os.makedirs(folder + ".unreadable", exist_ok=True)
        for step in steps:
            os.replace(os.path.join(folder, str(step)),
                       os.path.join(folder + ".unreadable", f"{step}.{time.time_ns()}"))
            logging.warning("moved the unreadable checkpoint %d to %s.unreadable/", step, folder)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoints set aside")
    mngr.reload()


def restore_latest(mngr, abstract_state, data_iter):
    """Restores the newest readable checkpoint; falls back past corrupt ones with a warning.

    Unreadable newer checkpoints are set aside once an older one restores; with none readable
    the workdir is left as it is and `CheckpointError` says so (never a silent fresh start).
    Returns ``(state, meta)`` or ``(None, None)`` when there is no checkpoint; `data_iter` is
    restored in place.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    unreadable = []
    for step in steps:
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain_ckpt.CheckpointRestore(data_iter),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint gets the same fallback
            # tensorstore's messages run to kilobytes of JSON spec: the first 300 characters.
            logging.warning("checkpoint at step %d is unreadable (%s: %.300s); trying an older "
                            "one", step, type(e).__name__, _one_line(e))
            unreadable.append(step)
            continue
        if unreadable:
            _set_aside(mngr, unreadable)
        return restored["state"], restored["meta"]
    if steps:
        raise CheckpointError(f"no readable checkpoint among steps {steps} in {mngr.directory}; "
                              "move the workdir aside to start over")
    return None, None


def restore_state(mngr, abstract_state):
    """``(state, meta, step)`` of the latest checkpoint, without the data iterator."""
    step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"{mngr.directory}: no checkpoint to restore")
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"], step
