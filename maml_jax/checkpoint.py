"""Training checkpoints with Orbax: keep the last k, keep the best, atomic, exact resume.

One ``CheckpointManager`` per trained model, in ``<workdir>/<label>/checkpoints/<step>/``.
Each checkpoint holds two items:

* ``state``: the whole ``TrainState`` (step, meta-parameters, optimizer state, base PRNG key).
  The task sampler has no state of its own: the tasks of step ``t`` are drawn from
  ``fold_in(rng, t)`` (``train.make_sampling_train_chunk``), so step + key *is* the sampler
  state, and a resumed run draws exactly the tasks an uninterrupted one would.
* ``extra``: JSON, the metrics of the log window in progress (so that the metrics rows of an
  interrupted and resumed run equal those of an uninterrupted one) and the score used to rank
  checkpoints.

Retention: the latest ``keep`` checkpoints, plus the one with the lowest ``score`` (a
validation MSE, or the training meta-loss; see ``experiment.train_model``).

Atomicity: Orbax writes a checkpoint into a temporary directory and renames it into place only
after every item is written (and marks it ``commit_success``); a crash or an ``OSError`` (disk
full) mid-save leaves the previous checkpoints as they were, and an uncommitted directory is
never listed as a step.

Runs made before Orbax (``<label>/checkpoint.msgpack``, flax msgpack) still resume and
evaluate: ``restore_latest`` reads them when no newer Orbax checkpoint exists.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import numpy as np

LEGACY_NAME = "checkpoint.msgpack"
CHECKPOINTS_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be restored (corrupt, or made by a different config)."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived during training: the chunk in progress was finished and
    checkpointed. The CLI exits with ``128 + signum`` (130 for SIGINT, 143 for SIGTERM), as
    shells report a process ended by that signal."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: checkpoint saved to {path}; run the same command to resume")


def _ocp():
    import orbax.checkpoint as ocp  # imported lazily: orbax is slow to import

    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    return ocp


class Checkpointer:
    """Orbax ``CheckpointManager`` of one model's ``TrainState`` under ``directory``.

    ``keep``: how many of the latest checkpoints to keep; the best one by ``score`` (lower is
    better) is kept as well. Saves are synchronous, so a checkpoint is complete on return.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        ocp = _ocp()
        from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy(
            policies=[
                pp.LatestN(n=keep),
                # ascending sort with reverse=True puts the lowest score last: BestN keeps it
                pp.BestN(get_metric_fn=lambda m: m["score"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            preservation_policy=policy,
            best_fn=lambda m: m["score"],
            best_mode="min",
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps(read=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        return self._manager.best_step()

    def path(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, extra: dict | None = None, score: float | None = None) -> Path:
        """Write ``state`` (a pytree) and the JSON-able ``extra`` as checkpoint ``step``.

        ``score`` (lower is better) ranks checkpoints for keep-best. Raises ``OSError`` (the
        previous checkpoints intact) when the write fails."""
        import jax

        ocp = _ocp()
        metrics = None if score is None or not np.isfinite(score) else {"score": float(score)}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(jax.device_get(state)), extra=ocp.args.JsonSave(extra or {})
        )
        self._manager.save(step, args=args, metrics=metrics, force=True)
        self._manager.wait_until_finished()
        return self.path(step)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """``(state, extra)`` of checkpoint ``step`` (default the latest) in the structure of
        ``template``; ``CheckpointError`` naming the directory when it cannot be read or does not
        match ``template`` (shapes, dtypes, tree structure)."""
        import jax

        ocp = _ocp()
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.path(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(jax.device_get(template)), extra=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
            state, extra = restored["state"], restored["extra"]
        except Exception as err:  # tensorstore / orbax / structure errors come in many types
            raise CheckpointError(
                f"cannot restore checkpoint {path}: corrupt or made by a different config ({type(err).__name__}: "
                f"{str(err)[:300]}). Move it away to resume from an older one, or train in a new --workdir."
            ) from err
        check_matches(template, state, path)
        return state, dict(extra or {})

    def close(self) -> None:
        self._manager.close()


def check_matches(template: Any, restored: Any, path: Path) -> None:
    """``CheckpointError`` unless ``restored`` has the tree structure, shapes and dtypes of ``template``."""
    import jax

    t_leaves, t_def = jax.tree.flatten(template)
    r_leaves, r_def = jax.tree.flatten(restored)
    if t_def != r_def:
        raise CheckpointError(f"checkpoint {path} has a different structure than this config's model: {r_def}")
    for t, r in zip(t_leaves, r_leaves, strict=True):
        if np.shape(t) != np.shape(r) or np.asarray(t).dtype != np.asarray(r).dtype:
            raise CheckpointError(
                f"checkpoint {path} does not match this config's model: an array of shape {np.shape(r)} "
                f"{np.asarray(r).dtype} where {np.shape(t)} {np.asarray(t).dtype} was expected"
            )


def restore_latest(label_dir: str | Path, template: Any, keep: int = 3) -> tuple[Any, dict, Path] | None:
    """The newest checkpoint of one model: ``(state, extra, path)``, or ``None`` when
    ``label_dir`` holds no checkpoint at all (a fresh run).

    Looks at the Orbax checkpoints and at a legacy ``checkpoint.msgpack`` (runs made before
    Orbax) and takes whichever has the larger step. A checkpoint that exists but cannot be read
    raises ``CheckpointError``: a run never silently starts again from scratch."""
    from maml_jax import rundir

    label_dir = Path(label_dir)
    found = []
    if (label_dir / CHECKPOINTS_DIR).is_dir():
        ckpt = Checkpointer(label_dir / CHECKPOINTS_DIR, keep=keep)
        try:
            if ckpt.latest_step() is not None:
                state, extra = ckpt.restore(template)
                found.append((int(state.step), state, extra, ckpt.path(ckpt.latest_step())))
        finally:
            ckpt.close()
    legacy = label_dir / LEGACY_NAME
    if legacy.exists():
        try:
            state = rundir.load_pytree(legacy, template)
        except ValueError as err:
            raise CheckpointError(str(err)) from err
        check_matches(template, state, legacy)
        found.append((int(state.step), state, {}, legacy))
    if not found:
        return None
    _, state, extra, path = max(found, key=lambda f: f[0])
    return state, extra, path
