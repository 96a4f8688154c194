"""A tiny variant of every Table 1 config trains and evaluates end to end; eval and
eval-lake-runs on a run directory. Omniglot is the real data set from ../shared; MiniImageNet
a pickle fixture in its on-disk format."""

import json
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maml_jax.cli import main
from maml_jax.config import list_configs
from maml_jax.data import miniimagenet
from maml_jax.data.lake_runs import load_lake_runs, write_lake_runs_fixture
from maml_jax.experiment import load_trained

OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
# The default suite runs the tiny 5-way 1-shot variants of both data sets; the other rows'
# tiny variants (same code path, other shapes; ~30-100 s each on 2 cores) are marked slow.
FAST = {"omniglot_5w1s", "miniimagenet_5w1s"}
TABLE1 = [
    c if c in FAST else pytest.param(c, marks=pytest.mark.slow)
    for c in list_configs()
    if c.startswith(("omniglot", "miniimagenet"))
]


def tiny(ways_override=None):
    args = [
        "--config.num_iterations=2",
        "--config.steps_per_call=1",
        "--config.log_every=1",
        "--config.checkpoint_every=1",
        "--config.meta_batch_size=2",
        "--config.queries=1",
        "--config.eval_queries=1",
        "--config.eval_num_tasks=3",
        "--config.eval_batch_tasks=2",
        "--config.eval_inner_steps=0,1",
        "--no-progress",
    ]
    return args + ([f"--config.ways={ways_override}"] if ways_override else [])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """MAML_JAX_DATA-style root: omniglot cache dir + a MiniImageNet pickle fixture."""
    root = tmp_path_factory.mktemp("data")
    mini = root / "miniimagenet"
    mini.mkdir()
    rng = np.random.default_rng(0)
    for split, classes in (("train", 6), ("val", 5), ("test", 5)):
        data = rng.integers(0, 256, (classes * 7, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"n{split}{c:02d}": list(range(c * 7, (c + 1) * 7)) for c in range(classes)}
        with open(miniimagenet.pickle_path(mini, split), "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f)
    return root


def config_args(name, data_root):
    if name.startswith("omniglot"):
        if not OMNIGLOT.is_dir():
            pytest.skip(f"Omniglot not found at {OMNIGLOT}")
        return [f"--config.data_dir={OMNIGLOT}"]
    return [f"--config.data_dir={data_root / 'miniimagenet'}", "--config.check_dataset_counts=false"]


def assert_accuracy_summary(accuracy, workdir):
    """``accuracy``: eval.json's ``{steps: [mean, ci95, median, nonfinite]}`` for the step
    counts ``tiny()`` evaluates (0 and 1). Beyond lying in [0, 1]: every one of the
    ``eval_num_tasks`` tasks scores a whole number of correct answers out of its
    ``ways * eval_queries`` queries, so the mean is a multiple of 1 / (tasks * queries) and the
    median of 1 / queries (odd task count), no task is non-finite, and the CI is finite and >= 0."""
    config = json.loads((workdir / "config.json").read_text())
    queries, tasks = config["ways"] * config["eval_queries"], config["eval_num_tasks"]
    assert tasks % 2 == 1  # the median is one task's accuracy
    assert set(accuracy) == {"0", "1"}
    for steps, summary in accuracy.items():
        assert len(summary) == 4, (steps, summary)
        mean, ci95, median, nonfinite = summary
        assert nonfinite == 0 and np.isfinite([mean, ci95, median]).all(), (steps, summary)
        assert 0.0 <= mean <= 1.0 and 0.0 <= median <= 1.0 and ci95 >= 0.0, (steps, summary)
        assert mean * tasks * queries == pytest.approx(round(mean * tasks * queries), abs=1e-4), (steps, summary)
        assert median * queries == pytest.approx(round(median * queries), abs=1e-5), (steps, summary)


@pytest.mark.parametrize("name", TABLE1)
def test_tiny_variant_of_each_table1_config(name, data_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MAML_JAX_DATA", str(data_root))
    workdir = tmp_path / name
    # 20-way configs shrink to 5 ways to keep the test fast; everything else is the config's
    ways = 5 if "_20w" in name else None
    assert main(["train", name, "--workdir", str(workdir), *config_args(name, data_root), *tiny(ways)]) == 0
    results = json.loads((workdir / "eval.json").read_text())["results"]
    label = "fomaml" if name.endswith("fomaml") else "maml"
    accuracy = results[label]["by_shots"][str(json.loads((workdir / "config.json").read_text())["shots"])]["accuracy"]
    assert_accuracy_summary(accuracy, workdir)
    assert "accuracy (%) after 1 step" in capsys.readouterr().out
    # the task map follows the backend: lax.map on XLA:CPU, vmap on GPU/TPU (README, Speed)
    assert json.loads((workdir / "config.json").read_text())["task_map"] == "auto"
    resolved = "map" if jax.default_backend() == "cpu" else "vmap"
    assert json.loads((workdir / "run.json").read_text())["task_map"] == resolved
    # MiniImageNet's "auto" convolution is one image at a time only over two or more CPU devices
    # (tests/test_conv4.py); these runs use one, so every config runs "patches", as Omniglot's say
    assert json.loads((workdir / "run.json").read_text())["conv_impl"] == "patches"


def test_eval_and_lake_runs_on_a_20_way_omniglot_run(data_root, tmp_path, monkeypatch, capsys):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"Omniglot not found at {OMNIGLOT}")
    monkeypatch.setenv("MAML_JAX_DATA", str(data_root))
    workdir = tmp_path / "run"
    args = ["train", "omniglot_20w1s", "--workdir", str(workdir), f"--config.data_dir={OMNIGLOT}", *tiny()]
    assert main(args + ["--config.num_inner_steps=1", "--config.meta_batch_size=1"]) == 0
    capsys.readouterr()

    assert main(["eval", "--run-dir", str(workdir), "--num-tasks", "2"]) == 0
    assert "model at step 2" in capsys.readouterr().out
    assert (workdir / "eval-step2.json").exists()
    first = json.loads((workdir / "eval-step2.json").read_text())["results"]

    # the data moved: --data-dir replaces the run's data_dir; a --config override is refused
    moved = tmp_path / "moved_omniglot"
    moved.symlink_to(OMNIGLOT, target_is_directory=True)
    assert main(["eval", "--run-dir", str(workdir), "--num-tasks", "2", "--data-dir", str(moved)]) == 0
    assert json.loads((workdir / "eval-step2.json").read_text())["results"] == first
    capsys.readouterr()
    assert main(["eval", "--run-dir", str(workdir), "--data-dir", str(tmp_path / "gone")]) == 4
    assert str(tmp_path / "gone") in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(workdir), f"--config.data_dir={moved}"]) == 2
    assert "apply to train only" in capsys.readouterr().err

    runs = write_lake_runs_fixture(tmp_path / "lake", num_runs=20)
    assert main(["eval-lake-runs", "--run-dir", str(workdir), "--runs", str(runs)]) == 0
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1
    out = json.loads(line[0])
    assert len(out["runs"]) == 20 and 0.0 <= out["mean_accuracy"] <= 1.0
    assert out["mean_accuracy"] == pytest.approx(np.mean(list(out["runs"].values())))
    assert out["inner_steps"] == 1 and out["model_step"] == 2
    assert out["runs"] == pytest.approx(_lake_run_accuracies(workdir, runs))


def _lake_run_accuracies(workdir, runs_path):
    """Per-run accuracy of the run's MAML model on the one-shot runs, recomputed without
    ``evaluate_lake_runs``, ``lake_run(s)_task(s)`` or ``adaptation_curve``: plain SGD with
    ``jax.grad`` for ``max(eval_inner_steps)`` steps at ``inner_lr`` on the 20 training images
    (labels 0..19), then argmax on the 20 test items against their ``class_labels.txt`` labels."""
    config, model, params, _ = load_trained(workdir)
    steps = max(config.eval_inner_steps)
    assert steps == 1 and config.algorithm == "maml" and config.inner_grad_clip == 0  # as tiny() trains it

    def support_loss(p, x):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), jnp.arange(20)).mean()

    @jax.jit
    def predict(p, support_x, query_x):
        for _ in range(steps):
            grads = jax.grad(support_loss)(p, support_x)
            p = jax.tree.map(lambda w, g: w - config.inner_lr * g, p, grads)
        return jnp.argmax(model.apply(p, query_x), -1)

    def pixels(images):
        return jnp.asarray(images, jnp.float32)[..., None] / 255.0

    return {
        run.name: float(
            np.mean(np.asarray(predict(params, pixels(run.train_images), pixels(run.test_images))) == run.test_labels)
        )
        for run in load_lake_runs(runs_path)
    }


def test_lake_runs_refuse_a_5_way_model_and_eval_a_non_run_directory(data_root, tmp_path, monkeypatch, capsys):
    if not OMNIGLOT.is_dir():
        pytest.skip(f"Omniglot not found at {OMNIGLOT}")
    monkeypatch.setenv("MAML_JAX_DATA", str(data_root))
    workdir = tmp_path / "run5"
    assert main(["train", "omniglot_5w1s", "--workdir", str(workdir), f"--config.data_dir={OMNIGLOT}", *tiny()]) == 0
    assert main(["eval-lake-runs", "--run-dir", str(workdir), "--runs", str(tmp_path)]) == 2
    assert "needs a 20-way Omniglot model" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(tmp_path / "nothing")]) == 4
    assert "not a run directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("protonets", []),
        ("maml++", ["--config.mamlpp_per_step_bn=true", "--config.mamlpp_msl_anneal_iters=5"]),
    ],
)
def test_classification_only_algorithm_pieces_train_on_omniglot(algorithm, extra, data_root, tmp_path, monkeypatch):
    """ProtoNets (conv4 body without head) and MAML++ with per-step BN (conv4 with one BN row
    per inner step) through the entry point; ``eval`` reloads them and reproduces eval.json."""
    if not OMNIGLOT.is_dir():
        pytest.skip(f"Omniglot not found at {OMNIGLOT}")
    monkeypatch.setenv("MAML_JAX_DATA", str(data_root))
    workdir = tmp_path / algorithm
    args = ["train", "omniglot_5w1s", "--workdir", str(workdir), f"--config.data_dir={OMNIGLOT}", *tiny()]
    assert main(args + [f"--config.algorithm={algorithm}", "--config.num_inner_steps=2", *extra]) == 0
    accuracy = json.loads((workdir / "eval.json").read_text())["results"][algorithm]["by_shots"]["1"]["accuracy"]
    assert_accuracy_summary(accuracy, workdir)
    assert main(["eval", "--run-dir", str(workdir)]) == 0
    again = json.loads((workdir / "eval-step2.json").read_text())["results"][algorithm]["by_shots"]["1"]["accuracy"]
    assert again == accuracy
