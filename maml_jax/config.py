"""Experiment configuration: one frozen dataclass, Python config files, CLI overrides.

A config file is a Python module with ``get_config() -> Config`` (see ``experiments/configs``).
Overrides read ``key=value`` (from ``--config.key=value`` on the command line); each value is
parsed by the field's type and the result is validated, with errors that name the key.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import sys
import typing
from pathlib import Path

from maml_jax.models.conv4 import CONV_IMPLS


class ConfigError(ValueError):
    """A config key is unknown, mistyped or out of range."""


# dataset -> images per class (None: tasks are generated, not drawn from a finite pool)
DATASETS = {"sinusoid": None, "omniglot": 20, "miniimagenet": 600}


@dataclasses.dataclass(frozen=True)
class Config:
    """Every field an experiment reads. Defaults are the sinusoid setup of Finn et al. (2017),
    except ``kernel_init``: ``lecun_normal`` here, ``torch_default`` in ``experiments/configs/sinusoid.py``."""

    name: str = "sinusoid"
    dataset: str = "sinusoid"
    seed: int = 0
    # model
    model: str = "mlp"
    hidden_sizes: tuple[int, ...] = (40, 40)
    activation: str = "relu"
    kernel_init: str = "lecun_normal"
    # classification data (omniglot / miniimagenet)
    data_dir: str = ""  # "" = $MAML_JAX_DATA/<dataset> or the user cache dir
    omniglot_split: str = "paper"  # "paper" (1200 train characters) or "lake" (background/evaluation)
    rotations: bool = True  # omniglot: 90° rotations of the training characters are new classes
    # conv4 convolution (models/conv4.py): "patches" (im2col + matmul), "patches_per_image" (the same,
    # one image at a time: faster for MiniImageNet over two XLA:CPU devices), "lax", or "auto"
    # (conv4.resolve_conv_impl: "patches_per_image" for MiniImageNet on the CPU backend with the
    # tasks split over two or more devices, "patches" otherwise)
    conv_impl: str = "patches"
    # network compute dtype: "bfloat16" runs the model in bf16 with float32 parameters, loss and
    # inner-loop accumulation (maml_jax.precision; for GPU/TPU, emulated and slower on CPU)
    compute_dtype: str = "float32"
    check_dataset_counts: bool = True  # miniimagenet: insist on 64/16/20 classes x 600 images
    # tasks (for regression, shots = support points per task, queries = query points; for
    # classification, ways-way shots-shot with queries query examples per class)
    ways: int = 5
    shots: int = 10
    queries: int = 10
    # inner loop
    num_inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False
    # rescale each inner gradient to global norm <= inner_grad_clip before the SGD step, in
    # training (MAML/FOMAML) and in every SGD adaptation at evaluation, or before Meta-LSTM's
    # learned update rule sees it; 0 = off (the papers')
    inner_grad_clip: float = 0.0
    # rematerialise each inner step in the backward pass (jax.checkpoint): memory of a meta-step
    # nearly flat in num_inner_steps, at the cost of recomputing the inner forward passes (MAML)
    remat: bool = False
    # unroll the inner loop in training (MAML; lax.scan unroll=True): no loop in the compiled
    # step, one copy of the inner step per inner step; same numbers to float rounding, longer
    # compile; on XLA:CPU MiniImageNet a median 17% faster in one session, 3% in the next (README, Speed)
    inner_unroll: bool = False
    # which member of the family trains (maml_jax.algorithms.registry.ALGORITHMS); the options
    # below are read only by the algorithm their prefix names
    algorithm: str = "maml"
    imaml_lambda: float = 2.0  # iMAML proximal strength λ
    imaml_cg_iters: int = 5  # iMAML conjugate-gradient iterations
    mamlpp_multi_step_loss: bool = True  # MAML++ MSL
    mamlpp_msl_anneal_iters: int = 0  # MAML++: iterations over which the MSL weights anneal to the last step
    mamlpp_learned_inner_lrs: bool = True  # MAML++ LSLR
    mamlpp_first_order_iters: int = 0  # MAML++ derivative-order annealing: first order before this step
    mamlpp_per_step_bn: bool = False  # MAML++ per-step BN weights and statistics (conv4 only)
    cosine_outer_lr: bool = False  # cosine annealing of outer_lr over num_iterations (MAML++ CA)
    reptile_inner_batch: int = 0  # Reptile: examples per inner step (0 = the whole support set)
    reptile_inner_optimizer: str = "sgd"  # Reptile inner loop: "sgd" or "adam" (the paper's, beta1 = 0)
    meta_lstm_hidden: int = 20  # Meta-LSTM hidden units
    # outer loop
    meta_batch_size: int = 25
    outer_lr: float = 1e-3
    outer_grad_clip: float = 0.0  # clip the meta-gradient to this global norm before Adam; 0 = off
    num_iterations: int = 70_000
    # "vmap" (batched), "map" (lax.map, one task at a time: 1.65x faster for meta_lstm on a CPU,
    # experiments/results/compare_sinusoid/meta_lstm_task_map.md) or "auto" (core.resolve_task_map:
    # "map" on the CPU backend, "vmap" on GPU/TPU; the image configs' choice)
    task_map: str = "vmap"
    # devices the task batch is split over (maml_jax.parallel; gradients averaged across them);
    # 1 = no sharding, 0 = all of jax.devices(); meta_batch_size must divide evenly
    num_devices: int = 1
    steps_per_call: int = 500  # train steps fused into one compiled call (device-side sampling)
    log_every: int = 1000
    checkpoint_every: int = 5000
    checkpoint_keep: int = 3  # keep the latest k checkpoints (plus the best one by score)
    # held-out tasks scored at every log row (sinusoid only: classification has no validation
    # split here, so keep-best ranks by the training meta-loss); 0 = off
    validate_num_tasks: int = 0
    skip_nonfinite: bool = False  # skip (and count) non-finite steps instead of stopping
    # meta-test evaluation
    eval_num_tasks: int = 600
    eval_seed: int = 1_000_003
    eval_shots: tuple[int, ...] = (5, 10, 20)
    eval_inner_steps: tuple[int, ...] = (0, 1, 10)
    eval_grid_points: int = 100
    eval_queries: int = 15  # classification: query examples per class at meta-test
    eval_batch_tasks: int = 50  # classification: meta-test tasks adapted per compiled call
    # baselines trained with the same budget: "pretrained" = joint training, 0 inner steps
    baselines: tuple[str, ...] = ("pretrained",)
    # inner-loop step sizes tried for the pretrained baseline's fine-tuning (picked on
    # separate validation tasks, as the paper's "automatically tuned step size")
    baseline_lr_grid: tuple[float, ...] = (0.001, 0.003, 0.01, 0.02, 0.05)

    def validate(self) -> Config:
        positive = ["ways", "shots", "queries", "meta_batch_size", "num_iterations", "steps_per_call", "log_every"]
        positive += [
            "checkpoint_every",
            "checkpoint_keep",
            "eval_num_tasks",
            "eval_grid_points",
            "eval_queries",
            "eval_batch_tasks",
        ]
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"config.{key} must be > 0, got {getattr(self, key)}")
        if self.validate_num_tasks < 0:
            raise ConfigError(f"config.validate_num_tasks must be >= 0, got {self.validate_num_tasks}")
        if self.validate_num_tasks and self.dataset != "sinusoid":
            raise ConfigError(
                "config.validate_num_tasks: validation tasks exist for sinusoid only (image data sets have no "
                "validation split here; keep-best then ranks checkpoints by the training meta-loss); set it to 0"
            )
        if self.num_inner_steps < 0:
            raise ConfigError(f"config.num_inner_steps must be >= 0, got {self.num_inner_steps}")
        for key in ("inner_lr", "outer_lr", "inner_grad_clip", "outer_grad_clip"):
            v = getattr(self, key)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"config.{key} must be finite and >= 0, got {v}")
        if any(v <= 0 for v in self.eval_shots):
            raise ConfigError(f"config.eval_shots must all be > 0, got {self.eval_shots}")
        if any(v < 0 for v in self.eval_inner_steps):
            raise ConfigError(f"config.eval_inner_steps must all be >= 0, got {self.eval_inner_steps}")
        if any(v <= 0 or not math.isfinite(v) for v in self.baseline_lr_grid):
            raise ConfigError(f"config.baseline_lr_grid must be finite and > 0, got {self.baseline_lr_grid}")
        from maml_jax.algorithms.registry import ALGORITHMS  # the registry imports this module

        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"config.algorithm must be one of {list(ALGORITHMS)}, got {self.algorithm!r}")
        for key in ("imaml_lambda",):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) <= 0:
                raise ConfigError(f"config.{key} must be finite and > 0, got {getattr(self, key)}")
        for key in ("imaml_cg_iters", "mamlpp_msl_anneal_iters", "mamlpp_first_order_iters", "reptile_inner_batch"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config.{key} must be >= 0, got {getattr(self, key)}")
        if self.reptile_inner_optimizer not in ("sgd", "adam"):
            got = self.reptile_inner_optimizer
            raise ConfigError(f"config.reptile_inner_optimizer must be 'sgd' or 'adam', got {got!r}")
        if self.meta_lstm_hidden <= 0:
            raise ConfigError(f"config.meta_lstm_hidden must be > 0, got {self.meta_lstm_hidden}")
        if self.remat and self.algorithm != "maml":
            raise ConfigError(
                f"config.remat applies to algorithm='maml' (and FOMAML); got {self.algorithm!r} "
                "(iMAML's memory is already independent of the inner steps)"
            )
        if self.inner_unroll and self.algorithm != "maml":
            raise ConfigError(f"config.inner_unroll applies to algorithm='maml' (and FOMAML); got {self.algorithm!r}")
        if self.inner_grad_clip and self.algorithm not in ("maml", "meta_lstm"):
            raise ConfigError(
                f"config.inner_grad_clip applies to algorithm='maml' (and FOMAML) and 'meta_lstm'; got "
                f"{self.algorithm!r}, whose inner update is its own"
            )
        if self.algorithm == "protonets" and self.dataset == "sinusoid":
            raise ConfigError("config.algorithm='protonets' is for classification; dataset is 'sinusoid'")
        if self.mamlpp_per_step_bn and self.model != "conv4":
            raise ConfigError("config.mamlpp_per_step_bn needs model='conv4' (the MLP has no batch norm)")
        if self.num_devices < 0:
            raise ConfigError(f"config.num_devices must be >= 0 (0 = all devices), got {self.num_devices}")
        if self.num_devices > 0 and self.meta_batch_size % self.num_devices:
            raise ConfigError(
                f"config.meta_batch_size={self.meta_batch_size} does not split evenly over "
                f"config.num_devices={self.num_devices}"
            )
        if self.task_map not in ("vmap", "map", "auto"):
            raise ConfigError(f"config.task_map must be 'vmap', 'map' or 'auto', got {self.task_map!r}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"config.dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if self.model not in ("mlp", "conv4"):
            raise ConfigError(f"config.model must be 'mlp' or 'conv4', got {self.model!r}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"config.compute_dtype must be 'float32' or 'bfloat16', got {self.compute_dtype!r}")
        if self.conv_impl not in ("auto", *CONV_IMPLS):
            raise ConfigError(f"config.conv_impl must be 'auto' or one of {list(CONV_IMPLS)}, got {self.conv_impl!r}")
        if self.omniglot_split not in ("paper", "lake"):
            raise ConfigError(f"config.omniglot_split must be 'paper' or 'lake', got {self.omniglot_split!r}")
        per_class = DATASETS[self.dataset]
        if per_class is not None:
            for q_key in ("queries", "eval_queries"):
                if self.shots + getattr(self, q_key) > per_class:
                    raise ConfigError(
                        f"config.shots + config.{q_key} = {self.shots} + {getattr(self, q_key)} exceeds the "
                        f"{per_class} images per class of {self.dataset}"
                    )
        unknown = set(self.baselines) - {"pretrained"}
        if unknown:
            raise ConfigError(f"config.baselines: unknown baseline(s) {sorted(unknown)}; known: ['pretrained']")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse_value(key: str, typ, text: str):
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            low = text.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if typ is int:
            return int(text)
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if origin is tuple:
            (elem, _) = typing.get_args(typ)
            parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
            return tuple(_parse_value(key, elem, p.strip()) for p in parts)
    except ValueError:
        raise ConfigError(f"config.{key}: cannot read {text!r} as {getattr(typ, '__name__', typ)}") from None
    raise ConfigError(f"config.{key}: unsupported field type {typ}")


def apply_overrides(config: Config, overrides: dict[str, str]) -> Config:
    """Return ``config`` with ``{key: text}`` parsed by each field's type, then validated."""
    hints = typing.get_type_hints(Config)
    changes = {}
    for key, text in overrides.items():
        if key not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(Config))
            raise ConfigError(f"unknown config key {key!r}; known keys: {known}")
        changes[key] = _parse_value(key, hints[key], text)
    return dataclasses.replace(config, **changes).validate()


def config_from_dict(values: dict) -> Config:
    """Rebuild a ``Config`` from ``config.json`` of a run directory. Keys added to ``Config``
    after the run was made take their defaults; a key ``Config`` does not know is an error."""
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(unknown)}")
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}).validate()


def config_search_dirs() -> list[Path]:
    """Where config names are looked up: ``./experiments/configs`` then the repository's."""
    repo = Path(__file__).resolve().parent.parent / "experiments" / "configs"
    return [Path.cwd() / "experiments" / "configs", repo]


def load_config(name_or_path: str) -> Config:
    """Load ``get_config()`` from a ``.py`` path or a config name such as ``sinusoid``."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        candidates = [d / f"{name_or_path}.py" for d in config_search_dirs()]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise ConfigError(
                f"no config named {name_or_path!r}; looked in {[str(c.parent) for c in candidates]} "
                f"(available: {', '.join(list_configs()) or 'none'})"
            )
        path = found[0]
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"maml_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # configs may import shared bases beside them
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.resolve().parent))
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, Config):
        raise ConfigError(f"{path}: get_config() must return maml_jax.config.Config, got {type(config).__name__}")
    return config.validate()


def list_configs() -> list[str]:
    names = set()
    for d in config_search_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.py") if not p.stem.startswith("_"))
    return sorted(names)


# fields a resumed run may change: schedule, bookkeeping, evaluation, and how the same
# mathematics is laid out on the hardware (task mapping, devices, convolution formulation,
# inner-loop unrolling: float summation order only)
RESUMABLE_CHANGES = frozenset(
    {
        "name",
        "num_iterations",
        "log_every",
        "checkpoint_every",
        "checkpoint_keep",
        "steps_per_call",
        "validate_num_tasks",
        "skip_nonfinite",
        "data_dir",
        "task_map",
        "conv_impl",
        "inner_unroll",
        "num_devices",
        "eval_num_tasks",
        "eval_seed",
        "eval_shots",
        "eval_inner_steps",
        "eval_grid_points",
        "eval_queries",
        "eval_batch_tasks",
        "baselines",
        "baseline_lr_grid",
    }
)


def _schedule_spans_num_iterations(config: Config) -> bool:
    """Whether the training trajectory depends on ``num_iterations`` (not only where it stops).

    Only the cosine outer rate does. MAML++ with ``first_order`` passes ``num_iterations`` as its
    first-order span, but every step of any total lies inside it, so a new total changes nothing
    (tested against an uninterrupted run)."""
    return config.cosine_outer_lr


def check_resume_compatible(saved: dict, config: Config, where: str) -> None:
    """Raise ``ConfigError`` if ``config`` changes a field of the run in ``where`` (its saved
    ``config.json``) that decides the training trajectory, e.g. the algorithm or a learning
    rate: resuming would silently mix two experiments under one config.json."""
    old = config_from_dict(saved)
    changed = [
        f"{f.name}: {getattr(old, f.name)!r} -> {getattr(config, f.name)!r}"
        for f in dataclasses.fields(Config)
        if f.name not in RESUMABLE_CHANGES and getattr(old, f.name) != getattr(config, f.name)
    ]
    if old.num_iterations != config.num_iterations and _schedule_spans_num_iterations(config):
        # the cosine outer rate is a function of num_iterations: a new total would change every
        # step's rate from here on
        changed.append(f"num_iterations: {old.num_iterations!r} -> {config.num_iterations!r} (a schedule spans it)")
    if changed:
        raise ConfigError(
            f"{where} holds a run of a different experiment ({'; '.join(changed)}); resuming it would mix "
            "the two. Use a new --workdir, or the run's own settings to resume it"
        )
