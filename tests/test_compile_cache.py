"""``--compile-cache``: a second run loads its programs from the cache and trains bitwise the same."""

import json
import os
import re
import subprocess
import sys

import chex
import jax
import pytest
from flax import serialization

from maml_jax.cli import main
from maml_jax.compile_cache import CacheUse, cache_entries, enable_compile_cache

SHORT = [
    "--config.num_iterations=40",
    "--config.steps_per_call=20",
    "--config.log_every=20",
    "--config.checkpoint_every=20",
    "--config.eval_num_tasks=4",
    "--config.eval_inner_steps=0,1",
    "--config.eval_shots=5",
    "--config.baselines=",
    "--no-progress",
]
SUMMARY = re.compile(r"compile cache (\S+): (\d+) programs loaded, (\d+) compiled and saved")
# XLA:CPU's loader refusing an entry it wrote itself (jax-ml/jax#38445) logs this line
REFUSED = "Machine type used for XLA:CPU compilation doesn't match"
# the environment of the child processes, without a cache setting of the developer's
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("MAML_JAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}


def _train(workdir, *extra, env=CLEAN_ENV):
    """``maml-jax train sinusoid`` in a fresh process, so that each run starts with no compiled program."""
    cmd = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--workdir", str(workdir), *SHORT, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _summary(proc) -> tuple[str, int, int]:
    match = SUMMARY.search(proc.stderr)
    assert match, proc.stderr
    return match[1], int(match[2]), int(match[3])


def _params(workdir):
    return serialization.msgpack_restore((workdir / "maml" / "params.msgpack").read_bytes())


def test_a_second_run_loads_the_cached_programs_and_trains_bitwise_the_same(tmp_path):
    cache = tmp_path / "xla-cache"
    plain = _train(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    assert "compile cache" not in plain.stderr  # off unless asked for
    # the first cached run compiles and saves; the directory is created for it (a program the
    # process builds twice, e.g. under another jit, is loaded the second time)
    cold = _train(tmp_path / "cold", "--compile-cache", str(cache))
    assert cold.returncode == 0, cold.stderr
    path, loaded, saved = _summary(cold)
    assert path == str(cache.resolve()) and saved > 0 and len(cache_entries(cache)) == saved
    # the second, through the environment variable, finds them there
    warm = _train(tmp_path / "warm", env={**CLEAN_ENV, "MAML_JAX_COMPILE_CACHE": str(cache)})
    assert warm.returncode == 0, warm.stderr
    _, warm_loaded, warm_saved = _summary(warm)
    if REFUSED in warm.stderr:
        assert "compiled again although an entry was already there" in warm.stderr  # said, not silent
        pytest.skip("XLA:CPU refuses its own cache entries on this CPU (jax-ml/jax#38445)")
    assert warm_loaded == loaded + saved and warm_saved == 0  # every program came from the cache
    runs = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in ("plain", "cold", "warm")}
    assert runs["plain"]["compile_cache"] is None
    assert runs["cold"]["compile_cache"] == runs["warm"]["compile_cache"] == str(cache.resolve())
    # a loaded program is the program that was compiled: the same bits as without a cache
    chex.assert_trees_all_equal(_params(tmp_path / "plain"), _params(tmp_path / "cold"))
    chex.assert_trees_all_equal(_params(tmp_path / "plain"), _params(tmp_path / "warm"))


def test_bad_cache_settings_are_usage_errors_before_anything_is_made(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        main(["train", "sinusoid", "--workdir", str(tmp_path / "w"), "--compile-cache", str(blocker / "c")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--compile-cache" in err and "cannot create the directory" in err
    assert not (tmp_path / "w").exists()  # refused before the run started
    # a bad config stops before the cache directory is made (and before any cache report)
    argv = ["train", "sinusoid", "--config.inner_rate=1", "--compile-cache", str(tmp_path / "c")]
    assert main(argv) == 2
    assert not (tmp_path / "c").exists() and "compile cache" not in capsys.readouterr().err
    # with JAX's cache switched off the directory would be ignored: refused instead
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        with pytest.raises(ValueError, match="switched off in this process"):
            enable_compile_cache(tmp_path / "c")
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    with pytest.raises(ValueError, match="min_compile_time_s must be >= 0"):
        enable_compile_cache(tmp_path / "c", min_compile_time_s=-1)


def test_the_cache_can_be_switched_on_after_compiling_and_moved(tmp_path):
    """JAX opens the cache directory at the first compilation after it is set: programs compiled
    after ``enable_compile_cache`` go to its directory, also after another directory was in use."""
    d, e = tmp_path / "d", tmp_path / "e"
    code = (
        "import jax\n"
        "from maml_jax.compile_cache import enable_compile_cache\n"
        "jax.jit(lambda x: x + 1.0)(1.0)\n"  # compiled before any cache
        f"enable_compile_cache({str(d)!r})\n"
        "jax.jit(lambda x: x * 2.0)(1.0)\n"
        f"enable_compile_cache({str(d)!r})\n"  # the same directory again: nothing changes
        "jax.jit(lambda x: x * 3.0)(1.0)\n"
        f"enable_compile_cache({str(e)!r})\n"
        "jax.jit(lambda x: x - 4.0)(1.0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=CLEAN_ENV)
    assert out.returncode == 0, out.stderr
    assert len(cache_entries(d)) == 2 and len(cache_entries(e)) == 1


def test_cache_use_counts_loads_saves_and_refused_entries(tmp_path):
    """The monitoring events and the directory's new entries give the summary, including the
    case where XLA compiled and saved a program whose entry was already there."""
    (tmp_path / "old-cache").write_bytes(b"")
    with CacheUse(tmp_path) as use:
        assert "no program went through the cache" in use.summary()
        use._listen("/jax/compilation_cache/cache_hits")
        use._listen("/jax/compilation_cache/cache_misses")  # saved, but the entry was there already
        use._listen("/jax/compilation_cache/compile_requests_use_cache")  # not counted
        assert (use.loaded, use.saved, use.new_entries, use.rejected) == (1, 1, 0, 1)
        assert "1 of them were compiled again although an entry was already there" in use.summary()
        (tmp_path / "new-cache").write_bytes(b"")
        use._listen("/jax/compilation_cache/cache_misses")
        assert (use.saved, use.new_entries, use.rejected) == (2, 1, 1)
        use._listen("/jax/compilation_cache/cache_misses")
        (tmp_path / "newer-cache").write_bytes(b"")
        assert use.rejected == 1 and "compiled again" in use.summary()
    assert cache_entries(tmp_path) == {"old", "new", "newer"}
