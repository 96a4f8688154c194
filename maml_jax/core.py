"""The MAML core: inner adaptation, the meta-objective, and its task-batched form.

Finn, Abbeel & Levine (2017), "Model-Agnostic Meta-Learning", Algorithm 1/2:

    θ'_i = θ − α ∇_θ L_support_i(θ)                    (inner_adapt, K times)
    meta_loss(θ) = L_query_i(θ'_i)                       (meta_loss)
    θ ← θ − β ∇_θ (1/T) Σ_i meta_loss_i(θ)             (batched_meta_loss + optax)

Everything here is a pure function of pytrees; compose with ``jax.grad``, ``jax.vmap`` and
``jax.jit``. Second-order by default: gradients flow through the inner updates, Hessian
terms included. ``first_order=True`` stops the gradient of the inner gradients (FOMAML).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from maml_jax.inner_updates import sgd
from maml_jax.types import Batch, InnerUpdateFn, Metrics, Params, Task, TaskLossFn
from maml_jax.validation import HyperparameterError, check_batch, check_num_steps, check_task

TaskMap = Literal["vmap", "map"]


def inner_adapt(
    params: Params,
    support: Batch,
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float | jax.Array | None = None,
    inner_update_fn: InnerUpdateFn | None = None,
    first_order: bool = False,
    step_metrics_fn: Callable[[Params], Any] | None = None,
    loss_takes_step: bool = False,
    post_step_fn: Callable[[Params, jax.Array], Any] | None = None,
    update_takes_loss: bool = False,
    remat: bool = False,
    remat_policy: Callable[..., bool] | None = None,
    unroll: int | bool = 1,
) -> tuple[Params, dict[str, Any]]:
    """Adapt ``params`` to one task's support set with ``num_inner_steps`` update steps.

    Args:
      params: the meta-parameters θ (any pytree).
      support: ``Batch(x: [n, *features], y: [n, *targets])`` of one task.
      task_loss_fn: ``(params, batch) -> (loss, aux)``.
      num_inner_steps: K >= 0 (static). 0 returns ``params``. The first step runs on its
        own and the other K − 1 in one ``lax.scan`` (none when K = 1).
      inner_lr: α for plain SGD; or give ``inner_update_fn`` (exactly one of the two).
      inner_update_fn: ``(params, grads, step) -> params``, see ``maml_jax.inner_updates``.
      first_order: FOMAML: treat the inner gradients as constants (``stop_gradient``).
      step_metrics_fn: optional ``params -> pytree`` evaluated on the parameters *before*
        each step (e.g. the query loss along the adaptation path).
      loss_takes_step: call ``task_loss_fn(params, batch, step)`` with the inner step index
        (traced int32), e.g. for MAML++'s per-step batch-norm weights.
      post_step_fn: optional ``(params_after_step, step) -> pytree`` evaluated on the
        parameters *after* each update (MAML++'s multi-step loss: the query loss after step i).
      update_takes_loss: call ``inner_update_fn(params, grads, step, loss)`` with the support
        loss before the step (a scalar; learned update rules such as Meta-LSTM read it).
      remat: wrap the scanned inner step in ``jax.checkpoint`` (rematerialisation): the
        backward pass recomputes each step's forward activations instead of storing them, so
        a second-order meta-gradient keeps only the K parameter carries, not K steps of
        activations (Chen et al. 2016, "Training deep nets with sublinear memory cost").
        Same numbers, more compute (about one extra forward+backward per inner step).
      remat_policy: the ``jax.checkpoint`` policy (``jax.checkpoint_policies.*``) saying what
        may be saved; default ``nothing_saveable`` (smallest memory). Only with ``remat``.
      unroll: ``lax.scan``'s ``unroll`` for the K − 1 later steps; ``True`` unrolls them all
        (no loop, one copy of the step per inner step in the program). The same values up to
        float rounding; longer compiles. On XLA:CPU the MiniImageNet meta-step (K = 5) ran a
        median 17% faster unrolled in one session, 3% (within noise) in the next (README, Speed).

    Returns:
      ``(adapted_params, trace)`` where ``trace["support_loss"]: [K]`` is the support loss
      before each step, ``trace["step_metrics"]`` (if requested) stacks
      ``step_metrics_fn`` over the K steps, and ``trace["post_step"]`` stacks ``post_step_fn``.
    """
    check_num_steps(num_inner_steps)
    check_batch(support, "support")
    if (inner_lr is None) == (inner_update_fn is None):
        raise HyperparameterError("give exactly one of inner_lr and inner_update_fn")
    if update_takes_loss and inner_update_fn is None:
        raise HyperparameterError("update_takes_loss needs an inner_update_fn(params, grads, step, loss)")
    update = sgd(inner_lr) if inner_update_fn is None else inner_update_fn
    grad_fn = jax.value_and_grad(task_loss_fn, has_aux=True)

    def one_step(p, step):
        (loss, _), grads = grad_fn(p, support, step) if loss_takes_step else grad_fn(p, support)
        if first_order:
            grads = jax.lax.stop_gradient(grads)
        out = {"support_loss": loss}
        if step_metrics_fn is not None:
            out["step_metrics"] = step_metrics_fn(p)
        new = update(p, grads, step, loss) if update_takes_loss else update(p, grads, step)
        if post_step_fn is not None:
            out["post_step"] = post_step_fn(new, step)
        return new, out

    if remat:
        policy = jax.checkpoint_policies.nothing_saveable if remat_policy is None else remat_policy
        one_step = jax.checkpoint(one_step, policy=policy)
    elif remat_policy is not None:
        raise HyperparameterError("remat_policy is only used with remat=True")
    if num_inner_steps == 0:
        return jax.lax.scan(one_step, params, jnp.arange(0))
    # The first step runs outside the scan: under ``vmap`` its input is the shared θ, not a
    # per-task copy (a scan carry is batched from the start), so its forward and backward
    # passes are ordinary batched ops rather than per-task (grouped) ones.
    first, out0 = one_step(params, jnp.zeros((), jnp.int32))
    if num_inner_steps == 1:
        # No empty scan: its body would be traced, differentiated and lowered for nothing
        # (XLA drops the zero-trip loop, so only the compile time changes).
        return first, jax.tree.map(lambda a: a[None], out0)
    adapted, trace = jax.lax.scan(one_step, first, jnp.arange(1, num_inner_steps), unroll=unroll)
    trace = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), out0, trace)
    return adapted, trace


def meta_loss(
    meta_params: Params,
    task: Task,
    task_loss_fn: TaskLossFn,
    *,
    num_inner_steps: int,
    inner_lr: float | jax.Array | None = None,
    inner_update_fn: InnerUpdateFn | None = None,
    first_order: bool = False,
    remat: bool = False,
    remat_policy: Callable[..., bool] | None = None,
    unroll: int | bool = 1,
) -> tuple[jax.Array, Metrics]:
    """Query loss of the adapted parameters, ``L_query(θ')`` with θ' = inner_adapt(θ).

    ``task``: ``Task(support=Batch([n_s, *f], ...), query=Batch([n_q, *f], ...))``.
    Differentiable w.r.t. ``meta_params`` (second order unless ``first_order``).
    ``remat``/``remat_policy``: rematerialise the inner steps; ``unroll``: unroll them (see ``inner_adapt``).

    Returns ``(loss, metrics)``; metrics hold ``query_loss``, the support loss before
    adaptation (``support_loss``, when K > 0) and the task loss's aux as ``query_<name>``.
    """
    check_task(task)
    adapted, trace = inner_adapt(
        meta_params,
        task.support,
        task_loss_fn,
        num_inner_steps=num_inner_steps,
        inner_lr=inner_lr,
        inner_update_fn=inner_update_fn,
        first_order=first_order,
        remat=remat,
        remat_policy=remat_policy,
        unroll=unroll,
    )
    loss, aux = task_loss_fn(adapted, task.query)
    metrics = {"query_loss": loss, **{f"query_{k}": v for k, v in aux.items()}}
    if num_inner_steps > 0:
        metrics["support_loss"] = trace["support_loss"][0]
    return loss, metrics


def resolve_task_map(task_map: str, backend: str | None = None) -> TaskMap:
    """``"vmap"`` or ``"map"`` for a config's ``task_map``: ``"auto"`` is ``"map"`` on the CPU
    backend and ``"vmap"`` on a GPU or TPU (``backend``, default ``jax.default_backend()``).

    Tuned for the conv4 image configs, which use it (README, Speed): with per-task gradients
    ``lax.map`` ran them at 1.4-1.9x the ``vmap`` rate on a 2-core CPU (``maml_jax.bench``), and
    at 0.16-0.17x ``vmap`` on an H200. (The sinusoid MLP runs faster under ``vmap`` on a CPU too;
    its configs say ``"vmap"``.)
    """
    if task_map == "auto":
        return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"
    if task_map not in ("vmap", "map"):
        raise HyperparameterError(f"task_map must be 'vmap', 'map' or 'auto', got {task_map!r}")
    return task_map


def map_tasks(fn: Callable[[Task], Any], tasks: Task, task_map: TaskMap = "vmap") -> Any:
    """Apply ``fn`` to every task of a batch ``[tasks, ...]``: ``jax.vmap`` or ``lax.map``.

    ``vmap`` batches the tasks into one computation (best on GPU/TPU and for small models);
    ``map`` runs them one after another inside the compiled program, which avoids the
    grouped convolutions that per-task weights create under ``vmap`` (faster on XLA:CPU).
    """
    if task_map == "vmap":
        return jax.vmap(fn)(tasks)
    if task_map == "map":
        return jax.lax.map(fn, tasks)
    raise HyperparameterError(f"task_map must be 'vmap' or 'map', got {task_map!r}")


def mean_over_tasks(fn: Callable[[Task], Any], tasks: Task, task_map: TaskMap = "vmap") -> Any:
    """``1/T Σ_i fn(task_i)`` over a batch ``[T, ...]``, leaf by leaf (integer leaves averaged
    as floats, like ``jnp.mean``).

    ``vmap``: ``jnp.mean`` over the task axis of ``map_tasks(fn, tasks, "vmap")``. ``map``: a
    ``lax.scan`` that adds each task's output to a running sum, one task after another, then
    divides by ``T`` (half-width floats summed in float32), so no ``[T, ...]`` stack of the
    outputs (e.g. per-task gradients) is kept.
    On XLA:CPU this is also faster than ``lax.map`` followed by ``jnp.mean(axis=0)``: that
    reduction over the task axis goes to YNNPACK, which took about 5% of the omniglot-5w1s step
    (README, Speed). The sum runs in task order, so its rounding differs from ``jnp.mean``'s.
    ``fn`` is traced once (``jax.jit(fn, inline=True)``): that one trace gives the running sum's
    shapes and the loop body, and the compiled program is the one two traces gave.
    """
    if task_map == "vmap":
        return jax.tree.map(lambda a: jnp.mean(a, axis=0), jax.vmap(fn)(tasks))
    if task_map != "map":
        raise HyperparameterError(f"task_map must be 'vmap' or 'map', got {task_map!r}")
    count = jax.tree.leaves(tasks)[0].shape[0]
    # One trace of fn serves both the output shapes and the loop body: jit caches the trace of
    # its function by argument shapes (a plain fn is traced twice, by eval_shape and by scan, and
    # for a second-order task gradient that trace is most of JAX's share of the compile), and
    # inline=True puts the traced equations in the loop body itself, so the program is unchanged.
    fn = jax.jit(fn, inline=True)
    out = jax.eval_shape(fn, jax.tree.map(lambda a: a[0], tasks))
    mean_dtypes = jax.tree.map(lambda s: jax.eval_shape(lambda: jnp.mean(jnp.zeros((1,), s.dtype))).dtype, out)
    # Like jnp.mean, half-width floats (bf16, f16) are summed in float32 and cast back at the end.
    sum_dtype = lambda d: jnp.float32 if jnp.dtype(d).itemsize < 4 else d  # noqa: E731
    zeros = jax.tree.map(lambda s, d: jnp.zeros(s.shape, sum_dtype(d)), out, mean_dtypes)

    def add(total, task):
        return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total, fn(task)), None

    total, _ = jax.lax.scan(add, zeros, tasks)
    return jax.tree.map(lambda t, d: (t / count).astype(d), total, mean_dtypes)


def batched_meta_loss(
    meta_params: Params,
    tasks: Task,
    task_loss_fn: TaskLossFn,
    *,
    task_map: TaskMap = "vmap",
    **adapt_kwargs,
) -> tuple[jax.Array, Metrics]:
    """Mean ``meta_loss`` over a task batch ``[tasks, n, *features]``.

    ``adapt_kwargs`` are ``meta_loss``'s keyword arguments (``num_inner_steps``,
    ``inner_lr`` or ``inner_update_fn``, ``first_order``, ``remat``). Metrics are task means.
    """
    check_task(tasks, task_axis=True)

    def one(task):
        return meta_loss(meta_params, task, task_loss_fn, **adapt_kwargs)

    losses, metrics = map_tasks(one, tasks, task_map)
    return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)
