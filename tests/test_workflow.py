"""Research workflow: Orbax checkpoints (keep-last/best, atomic, exact resume, SIGTERM),
TensorBoard events, progress bar, plots, non-finite guards, reproducible metrics, --help."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from run_files import jsonl_rows, metric_rows

from maml_jax import checkpoint, mlp, rundir
from maml_jax.cli import main
from maml_jax.train import init_train_state

TINY = [
    "--config.num_iterations=400",
    "--config.steps_per_call=50",
    "--config.log_every=100",
    "--config.checkpoint_every=200",
    "--config.eval_num_tasks=20",
    "--config.baselines=",
    "--config.eval_shots=5",
    "--config.eval_inner_steps=0,1",
    "--config.validate_num_tasks=20",
    "--no-progress",
]
HALF = [a if "num_iterations" not in a else "--config.num_iterations=200" for a in TINY]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two finished tiny runs shared by the tests below: 400 steps and 200 steps (seed 0)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "sinusoid", "--workdir", str(root / "full"), *TINY]) == 0
    assert main(["train", "sinusoid", "--workdir", str(root / "half"), *HALF]) == 0
    return root


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def template_state():
    params = mlp((40, 40), 1).init(jax.random.PRNGKey(0), jnp.zeros((1, 1)))
    return init_train_state(params, optax.adam(1e-3), jax.random.PRNGKey(0))


def final_params(workdir):
    template = mlp((40, 40), 1).init(jax.random.PRNGKey(0), np.zeros((1, 1), np.float32))
    return rundir.load_pytree(Path(workdir) / "maml" / "params.msgpack", template)


def with_step(state, step):
    return state._replace(
        step=jnp.asarray(step, jnp.int32), meta_params=jax.tree.map(lambda a: a + step, state.meta_params)
    )


def test_checkpointer_keeps_last_k_and_the_best(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "ck", keep=2)
    state = template_state()
    for step, score in zip([1, 2, 3, 4, 5], [5.0, 1.0, 4.0, 3.0, 2.0], strict=True):
        ckpt.save(step, with_step(state, step), {"note": step}, score=score)
    assert ckpt.steps() == [2, 4, 5]  # the latest two, plus step 2 with the lowest score
    assert ckpt.best_step() == 2
    restored, extra = ckpt.restore(state, step=2)
    assert extra["note"] == 2
    chex.assert_trees_all_equal(restored, with_step(state, 2))
    assert int(restored.step) == 2 and isinstance(restored, type(state))
    ckpt.close()


def test_metrics_writer_appends_under_the_first_rows_columns_and_closes_its_files(tmp_path):
    """A resumed run appends to ``metrics.csv`` under the header it already has (a new key is
    dropped there, kept in the JSONL), and reading that header leaves no file open."""
    import csv
    import gc
    import warnings

    writer = rundir.MetricsWriter(tmp_path, tensorboard=False)
    writer.write({"step": 1, "loss": 0.5})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rundir.MetricsWriter(tmp_path, tensorboard=False).write({"step": 2, "loss": 0.25, "extra": 1})
        gc.collect()
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert list(csv.reader(f)) == [["loss", "step"], ["0.5", "1"], ["0.25", "2"]]
    rows = metric_rows(tmp_path)
    assert rows[1] == {"step": 2, "loss": 0.25, "extra": 1}


def test_oserror_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    ckpt = checkpoint.Checkpointer(tmp_path / "ck", keep=3)
    state = template_state()
    ckpt.save(10, with_step(state, 10))

    async def disk_full(*args, **kwargs):  # fails when awaited, as a write would
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save(20, with_step(state, 20))
    monkeypatch.undo()
    ckpt.close()
    fresh = checkpoint.Checkpointer(tmp_path / "ck", keep=3)
    assert fresh.steps() == [10]
    restored, _ = fresh.restore(state)
    chex.assert_trees_all_equal(restored, with_step(state, 10))
    fresh.close()


def test_legacy_msgpack_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.msgpack"
    state = template_state()
    rundir.save_pytree(path, with_step(state, 3))
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        rundir.save_pytree(path, with_step(state, 4))
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_corrupt_or_incompatible_checkpoint_is_an_error_naming_it(tmp_path, capsys):
    state = template_state()
    ckpt = checkpoint.Checkpointer(tmp_path / "maml" / "checkpoints", keep=2)
    ckpt.save(200, with_step(state, 200))
    ckpt.close()
    # incompatible: a wider network than the checkpoint's
    wide = init_train_state(
        mlp((41, 40), 1).init(jax.random.PRNGKey(0), jnp.zeros((1, 1))), optax.adam(1e-3), jax.random.PRNGKey(0)
    )
    with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "maml" / "checkpoints" / "200")):
        checkpoint.restore_latest(tmp_path / "maml", wide)
    # corrupt: every data file of the array store overwritten with garbage
    for f in (tmp_path / "maml" / "checkpoints" / "200" / "state").rglob("*"):
        if f.is_file() and "ocdbt" in str(f.relative_to(tmp_path / "maml" / "checkpoints" / "200" / "state")):
            f.write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match="200"):
        checkpoint.restore_latest(tmp_path / "maml", state)
    # the CLI refuses to start from scratch: exit 4, the checkpoint named
    assert main(["train", "sinusoid", "--workdir", str(tmp_path), *TINY]) == 4
    assert str(tmp_path / "maml" / "checkpoints" / "200") in capsys.readouterr().err
    # a corrupt legacy file too
    legacy = tmp_path / "other" / "checkpoint.msgpack"
    legacy.parent.mkdir()
    legacy.write_bytes(b"\x00not msgpack")
    with pytest.raises(checkpoint.CheckpointError, match=str(legacy)):
        checkpoint.restore_latest(legacy.parent, state)


def test_resume_from_orbax_and_from_a_legacy_msgpack_checkpoint_is_bitwise_exact(trained, tmp_path, capsys):
    full = trained / "full"
    part = copy_run(trained / "half", tmp_path / "part")
    # the same half-trained state in the pre-Orbax format (runs/omniglot_5w1s has one)
    restored = checkpoint.restore_latest(part / "maml", template_state())
    assert restored is not None and int(restored[0].step) == 200
    legacy = tmp_path / "legacy"
    rundir.save_pytree(legacy / "maml" / "checkpoint.msgpack", restored[0])
    capsys.readouterr()
    with_bar = [a for a in TINY if a != "--no-progress"]
    assert main(["train", "sinusoid", "--workdir", str(part), *with_bar]) == 0  # resumes at 200
    err = capsys.readouterr().err  # the progress bar: ETA and the running meta-loss / validation MSE
    assert "400/400" in err and "meta_loss=" in err and "val_mse=" in err and "<00:" in err
    assert main(["train", "sinusoid", "--workdir", str(legacy), *TINY]) == 0
    for workdir in (part, legacy):
        chex.assert_trees_all_equal(final_params(full), final_params(workdir))
    assert (full / "metrics.jsonl").read_bytes() == (part / "metrics.jsonl").read_bytes()
    assert sorted(int(p.name) for p in (part / "maml" / "checkpoints").iterdir()) == [200, 400]


def test_resume_after_a_crash_past_the_last_checkpoint_leaves_no_duplicate_rows(trained, tmp_path, capsys):
    # a crash after the step-300 and step-400 log rows but before the step-400 checkpoint
    full = trained / "full"
    run = copy_run(full, tmp_path / "crashed")
    shutil.rmtree(run / "maml" / "checkpoints" / "400")
    (run / "maml" / "params.msgpack").unlink()
    assert main(["train", "sinusoid", "--workdir", str(run), *TINY]) == 0
    assert "dropped 2 metric row(s) logged after step 200" in capsys.readouterr().out
    for name in ("metrics.jsonl", "metrics.csv"):
        assert (full / name).read_bytes() == (run / name).read_bytes(), name
    timing = jsonl_rows(run / "timing.jsonl")
    assert [t["step"] for t in timing] == [100, 200, 300, 400]


def test_same_config_and_seed_give_identical_metrics_files(trained, tmp_path):
    a, b = trained / "half", tmp_path / "again"
    assert main(["train", "sinusoid", "--workdir", str(b), *HALF]) == 0
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    rows = metric_rows(a)
    assert [r["step"] for r in rows] == [100, 200] and all("val_mse" in r and "steps_per_s" not in r for r in rows)
    timing = jsonl_rows(a / "timing.jsonl")
    assert [t["step"] for t in timing] == [100, 200] and all(t["steps_per_s"] > 0 for t in timing)


def test_tensorboard_events_hold_the_logged_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = trained / "full"
    assert list((run / "tb" / "maml").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tb" / "maml"))
    events.Reload()
    assert {"meta_loss", "grad_norm", "val_mse", "steps_per_s"} <= set(events.Tags()["scalars"])
    rows = metric_rows(run)
    logged = [(e.step, e.value) for e in events.Scalars("meta_loss")]
    assert logged == [(r["step"], pytest.approx(r["meta_loss"], rel=1e-6)) for r in rows]


def test_nonfinite_stops_naming_step_quantity_and_checkpoint_or_skips(trained, tmp_path, capsys):
    tmp_path = copy_run(trained / "half", tmp_path / "run")
    (tmp_path / "maml" / "params.msgpack").unlink()  # as if the run had stopped at its checkpoint
    blow_up = "--config.inner_lr=1e30"  # the adapted parameters overflow: loss and gradients non-finite
    saved = json.loads((tmp_path / "config.json").read_text())  # the run's own config, so it resumes
    (tmp_path / "config.json").write_text(json.dumps({**saved, "inner_lr": 1e30}))
    assert main(["train", "sinusoid", "--workdir", str(tmp_path), *TINY, blow_up]) == 3
    err = capsys.readouterr().err
    assert "at step 200" in err and "non-finite" in err and "meta_loss" in err
    assert f"last good checkpoint: {tmp_path / 'maml' / 'checkpoints' / '200'}" in err
    assert main(["train", "sinusoid", "--workdir", str(tmp_path), *TINY, blow_up, "--config.skip_nonfinite=true"]) == 0
    rows = metric_rows(tmp_path)
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(100, 0), (200, 0), (300, 100), (400, 100)]
    # every step was skipped, so the parameters are those of the checkpoint at step 200
    at_200 = checkpoint.Checkpointer(tmp_path / "maml" / "checkpoints").restore(template_state(), step=200)[0]
    chex.assert_trees_all_equal(final_params(tmp_path), at_200.meta_params)


def test_plot_writes_curves_inner_steps_and_sinusoid_figures(trained, tmp_path, capsys):
    runs = [trained / "full", trained / "half"]
    assert main(["plot", *map(str, runs), "--out", str(tmp_path / "fig" / "cmp")]) == 0
    written = capsys.readouterr().out.split()
    for name in ("cmp_curves", "cmp_inner_steps", "cmp_sinusoid"):
        png = (tmp_path / "fig" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert (tmp_path / "fig" / f"{name}.pdf").read_bytes()[:4] == b"%PDF"
        assert str(tmp_path / "fig" / f"{name}.png") in written
    assert main(["plot", str(tmp_path / "nope")]) == 4


@pytest.mark.parametrize("command", ["train", "eval", "eval-lake-runs", "bench", "plot", "list-configs"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--help" in out


def main_with_fallback_handlers(argv):
    """``main(argv)`` with recording SIGINT/SIGTERM handlers installed around it: a signal the
    command does not catch lands there (not in pytest's default handlers, which would end the
    test run), and the command goes on. Returns the exit code, the signals that landed there,
    and ``"fallback"`` if those handlers were back in place when ``main`` returned."""
    missed = []

    def fallback(s, frame):
        missed.append(s)

    previous = {s: signal.signal(s, fallback) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = main(argv)
        after = [signal.getsignal(s) for s in previous]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, missed, "fallback" if after == [fallback, fallback] else after


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_after_a_chunk_checkpoints_exits_128_plus_signum_and_resumes_exactly(
    signum, trained, tmp_path, monkeypatch, capsys
):
    """In process: the signal arrives while the first chunk (steps 0-50) is being booked; training
    stops at step 50, mid log window, with a checkpoint; the same command resumes and ends as the
    uninterrupted run does (parameters, and metric rows whose window spans the stop)."""
    from maml_jax import experiment, plotting

    concat, sent = experiment._concat, []

    def concat_then_signal(pending, metrics):  # called once per chunk, after its metrics arrive
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return concat(pending, metrics)

    monkeypatch.setattr(experiment, "_concat", concat_then_signal)
    part = tmp_path / "part"
    code, missed, handlers_after = main_with_fallback_handlers(["train", "sinusoid", "--workdir", str(part), *TINY])
    err = capsys.readouterr().err
    assert sent == [signum] and missed == []
    assert handlers_after == "fallback"  # the handlers from before training are back
    assert code == 128 + signum, err
    saved = part / "maml" / "checkpoints" / "50"
    assert f"{signal.Signals(signum).name} at step 50: checkpoint saved to {saved}" in err
    assert sorted(p.name for p in (part / "maml" / "checkpoints").iterdir()) == ["50"]
    assert not (part / "maml" / "params.msgpack").exists() and not (part / "eval.json").exists()

    monkeypatch.undo()
    monkeypatch.setattr(plotting, "sinusoid_figure", lambda *args, **kwargs: None)  # 3 s, not under test here
    assert main(["train", "sinusoid", "--workdir", str(part), *TINY]) == 0  # resumes at step 50
    full = trained / "full"
    chex.assert_trees_all_equal(final_params(full), final_params(part))
    for name in ("metrics.jsonl", "metrics.csv"):
        assert (full / name).read_bytes() == (part / name).read_bytes(), name


STOPPED_HINTS = {
    "train": "stopped outside a training chunk (setting up, or evaluating after training)",
    "eval": "evaluation stopped before it finished; run the same command again",
    "plot": "plotting stopped; a figure may be half written: run the same command again",
}


@pytest.mark.parametrize(
    ("command", "signum", "during"),
    [
        ("train", signal.SIGTERM, "evaluation"),
        ("train", signal.SIGINT, "restore"),
        ("eval", signal.SIGINT, "evaluation"),
        ("plot", signal.SIGTERM, "savefig"),
    ],
    ids=["train-evaluating-SIGTERM", "train-restoring-SIGINT", "eval-SIGINT", "plot-SIGTERM"],
)
def test_signal_outside_training_chunks_exits_128_plus_signum_with_a_message(
    command, signum, during, trained, tmp_path, monkeypatch, capsys
):
    """Outside the training chunks (evaluating a finished run, restoring its checkpoint, or
    plotting) a signal stops the command with a message and ``128 + signum``: not a traceback (SIGINT), a
    silent death (SIGTERM), or a restore error that calls a good checkpoint corrupt. No results
    file is written, and the same command then finishes the job without training again,
    writing the final parameters if the run had stopped before they were written."""
    import matplotlib.figure
    import orbax.checkpoint as ocp

    from maml_jax import experiment, plotting

    run = copy_run(trained / "full", tmp_path / "run")
    for name in ("eval.json", "eval.md"):
        (run / name).unlink()
    if command == "train":  # as if stopped after the last checkpoint, before params.msgpack
        (run / "maml" / "params.msgpack").unlink()
    metrics = (run / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(plotting, "sinusoid_figure", lambda *args, **kwargs: None)  # not under test here
    # restore: inside Checkpointer.restore's ``except Exception``, which turns errors into CheckpointError
    owner, name = {
        "evaluation": (experiment, "format_table"),
        "restore": (ocp.CheckpointManager, "restore"),
        "savefig": (matplotlib.figure.Figure, "savefig"),
    }[during]
    original, sent = getattr(owner, name), []

    def signal_then_call(*args, **kwargs):  # format_table: the results are computed, not yet written
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, signal_then_call)
    argv = {
        "train": ["train", "sinusoid", "--workdir", str(run), *TINY],
        "eval": ["eval", "--run-dir", str(run)],
        "plot": ["plot", str(run)],
    }[command]
    code, missed, handlers_after = main_with_fallback_handlers(argv)
    err = capsys.readouterr().err
    assert sent == [signum] and missed == [] and handlers_after == "fallback"
    assert code == 128 + signum, err
    assert f"maml-jax: {signal.Signals(signum).name}: {STOPPED_HINTS[command]}" in err
    assert "Traceback" not in err and "corrupt" not in err
    written = {"train": "eval.json", "eval": "eval-step400.json", "plot": "plots/compare_curves.png"}[command]
    assert not (run / written).exists()

    assert main(argv) == 0  # the hook signals only once
    assert (run / written).is_file()
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing trained again
    if command == "train":
        assert (run / "eval.json").read_bytes() == (trained / "full" / "eval.json").read_bytes()
        chex.assert_trees_all_equal(final_params(run), final_params(trained / "full"))


# The child: ``maml-jax train`` whose 20th chunk (steps 380-400) waits, once booked, until a real
# SIGTERM from the parent has reached the training handler, so the stop step does not depend on timing.
WAIT_FOR_SIGTERM_AT_CHUNK_20 = """
import signal, sys, threading
from pathlib import Path
from maml_jax import experiment
from maml_jax.cli import main

ready, concat, calls = Path(sys.argv[1]), experiment._concat, []

def concat_then_wait(pending, metrics):
    calls.append(1)
    if len(calls) == 20:
        handler, landed = signal.getsignal(signal.SIGTERM), threading.Event()

        def noting(signum, frame):
            landed.set()
            handler(signum, frame)

        signal.signal(signal.SIGTERM, noting)
        ready.touch()
        while not landed.wait(0.01):
            pass
    return concat(pending, metrics)

experiment._concat = concat_then_wait
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_real_sigterm_then_resume_matches_uninterrupted(tmp_path):
    """A ``maml-jax train`` subprocess gets a real SIGTERM from outside mid-run (step 400 of 1200,
    mid log window and between checkpoints): it checkpoints and exits 143; the same command
    resumes, and parameters and metrics equal those of an uninterrupted run."""
    args = [
        "--config.num_iterations=1200",
        "--config.steps_per_call=20",
        "--config.log_every=300",
        "--config.checkpoint_every=500",
        *TINY[4:],
    ]
    full, part, ready = tmp_path / "full", tmp_path / "part", tmp_path / "ready"
    assert main(["train", "sinusoid", "--workdir", str(full), *args]) == 0
    train = ["train", "sinusoid", "--workdir", str(part), *args]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    child = [sys.executable, "-c", WAIT_FOR_SIGTERM_AT_CHUNK_20, str(ready), *train]
    proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert ready.exists(), proc.communicate(timeout=10)[1] if proc.poll() is not None else "no chunk 20 in 240 s"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err
    saved = part / "maml" / "checkpoints" / "400"
    assert f"SIGTERM at step 400: checkpoint saved to {saved}" in err
    assert not (part / "maml" / "params.msgpack").exists()
    cmd = [sys.executable, "-m", "maml_jax", *train]
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert "maml: resuming from the checkpoint at step 400 of 1200" in resumed.stdout
    chex.assert_trees_all_equal(final_params(full), final_params(part))
    assert (full / "metrics.jsonl").read_bytes() == (part / "metrics.jsonl").read_bytes()


def test_missing_data_dir_names_the_path_and_the_layout(tmp_path, capsys):
    data = tmp_path / "no_omniglot_here"
    assert main(["train", "omniglot_5w1s", "--workdir", str(tmp_path / "run"), f"--config.data_dir={data}"]) == 4
    err = capsys.readouterr().err
    assert str(data) in err and "images_background" in err and "characterNN/*.png" in err


def test_metrics_writer_without_tensorboardx_warns_once_and_keeps_the_metrics(tmp_path, monkeypatch):
    """A machine without tensorboardX (as one GPU image was) still trains and logs: a warning
    when the writer is made, metrics.jsonl and metrics.csv written, no event files."""
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # makes the module unimportable
    with pytest.warns(UserWarning, match="tensorboardX is not installed") as caught:
        writer = rundir.MetricsWriter(tmp_path)
        writer.write({"step": 1, "run": "maml", "loss": 0.5})
        writer.write({"step": 2, "run": "maml", "loss": 0.25})
        writer.close()
    assert len(caught) == 1
    assert [r["loss"] for r in metric_rows(tmp_path)] == [0.5, 0.25]
    assert (tmp_path / "metrics.csv").exists() and not (tmp_path / "tb").exists()
