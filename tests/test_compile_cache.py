"""``--compile-cache``: a second run loads its programs from the cache and trains bitwise the same."""

import json
import os
import re
import subprocess
import sys

import chex
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


def _train(workdir, *extra, env=None):
    """``maml-jax train sinusoid`` in a fresh process (JAX fixes its cache setting once per process)."""
    cmd = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--workdir", str(workdir), *SHORT, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _params(workdir):
    return serialization.msgpack_restore((workdir / "maml" / "params.msgpack").read_bytes())


def test_a_second_run_loads_the_cached_programs_and_trains_bitwise_the_same(tmp_path):
    cache = tmp_path / "xla-cache"
    plain = _train(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    assert "compile cache" not in plain.stderr  # off unless asked for
    # the first cached run compiles and saves; the directory is created for it
    cold = _train(tmp_path / "cold", "--compile-cache", str(cache))
    assert cold.returncode == 0, cold.stderr
    (path, loaded, saved) = SUMMARY.search(cold.stderr).groups()
    # (a program the process builds twice, e.g. under another jit, is loaded the second time)
    assert path == str(cache.resolve()) and int(saved) > 0
    assert len(cache_entries(cache)) == int(saved)
    cold_requests = int(loaded) + int(saved)
    # the second, through the environment variable, finds them there
    env = {**os.environ, "MAML_JAX_COMPILE_CACHE": str(cache)}
    warm = _train(tmp_path / "warm", env=env)
    assert warm.returncode == 0, warm.stderr
    (_, loaded, saved) = SUMMARY.search(warm.stderr).groups()
    if REFUSED in warm.stderr:
        assert "were already in the cache but were compiled again" in warm.stderr  # said, not silent
        pytest.skip("XLA:CPU refuses its own cache entries on this CPU (jax-ml/jax#38445)")
    assert int(loaded) == cold_requests and int(saved) == 0  # every program came from the cache
    # a loaded program is the program that was compiled: the same bits as without a cache
    runs = {name: json.loads((tmp_path / name / "run.json").read_text()) for name in ("plain", "cold", "warm")}
    assert runs["plain"]["compile_cache"] is None
    assert runs["cold"]["compile_cache"] == runs["warm"]["compile_cache"] == str(cache.resolve())
    chex.assert_trees_all_equal(_params(tmp_path / "plain"), _params(tmp_path / "cold"))
    chex.assert_trees_all_equal(_params(tmp_path / "plain"), _params(tmp_path / "warm"))


def test_a_cache_dir_that_cannot_be_made_is_a_usage_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit) as exc:
        main(["train", "sinusoid", "--workdir", str(tmp_path / "w"), "--compile-cache", str(blocker / "c")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--compile-cache" in err and "cannot create the directory" in err
    assert not (tmp_path / "w").exists()  # refused before the run started
    with pytest.raises(ValueError, match="min_compile_time_s must be >= 0"):
        enable_compile_cache(tmp_path / "c", min_compile_time_s=-1)


def test_enabling_the_cache_after_a_compilation_is_refused(tmp_path):
    """JAX decides at its first compilation whether to use a cache: a later call would be ignored
    silently, so it raises instead."""
    code = (
        "import jax\n"
        "jax.jit(lambda x: x + 1)(1.0)\n"
        "from maml_jax.compile_cache import enable_compile_cache\n"
        "try:\n"
        f"    enable_compile_cache({str(tmp_path / 'c')!r})\n"
        "except RuntimeError as err:\n"
        "    print('refused:', err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert "refused: enable_compile_cache must run before this process compiles anything" in out.stdout


def test_cache_use_counts_loads_saves_and_refused_entries(tmp_path):
    """The monitoring events and the directory's new entries give the summary, including the
    case where XLA compiled and saved a program whose entry was already there."""
    (tmp_path / "old-cache").write_bytes(b"")
    with CacheUse(tmp_path) as use:
        use._listen("/jax/compilation_cache/cache_hits")
        use._listen("/jax/compilation_cache/cache_misses")  # saved, but the entry was there already
        use._listen("/jax/compilation_cache/compile_requests_use_cache")  # not counted
        assert (use.loaded, use.saved, use.new_entries, use.rejected) == (1, 1, 0, 1)
        assert "1 of them were already in the cache but were compiled again" in use.summary()
        (tmp_path / "new-cache").write_bytes(b"")
        use._listen("/jax/compilation_cache/cache_misses")
        assert (use.saved, use.new_entries, use.rejected) == (2, 1, 1)
    assert cache_entries(tmp_path) == {"old", "new"}
    assert "refused" not in CacheUse(tmp_path).summary()
