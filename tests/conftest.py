"""Shared fixtures, and the compile setting of the test processes.

Most of the default suite's time is XLA:CPU compiling small programs, and much of a compile is
LLVM optimising the generated code, which these tiny shapes do not repay. So when pytest runs the
default selection (``-m 'not slow'``, from pyproject.toml), the test processes (and the
subprocesses they start with their environment) compile with LLVM optimisation level 0, set in
``pytest_configure`` before JAX creates its backend: on a 2-core Zen3 EPYC the default suite took
1,060 s instead of 1,746 s (README, Set-up). The programs are the same; only their machine code
is less optimised. Any other selection (``-m slow``: long training runs, where executing the code
matters more than compiling it) keeps XLA's default level, and so does a level given in
``XLA_FLAGS``. Subprocess tests that add flags of their own (the forced device counts of
``test_parallel``) keep this one too; ``-m slow`` runs them at the default level.
"""

import os

import jax
import pytest


def pytest_configure(config):
    flags = os.environ.get("XLA_FLAGS", "")
    if config.option.markexpr == "not slow" and "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()


@pytest.fixture(autouse=True)
def _no_compile_cache_from_the_environment(monkeypatch):
    """``maml-jax train``/``eval`` default ``--compile-cache`` to ``$MAML_JAX_COMPILE_CACHE``: a
    developer's own setting must not switch the cache on inside the tests (tests that want it
    pass it themselves)."""
    monkeypatch.delenv("MAML_JAX_COMPILE_CACHE", raising=False)


@pytest.fixture
def x64():
    """Run a test in float64 (finite differences need it); restores float32 afterwards."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def omniglot_subset(tmp_path_factory):
    """A few real Omniglot characters at 14 px (``algo_harness.load_omniglot_subset``): 30 train
    and 10 held-out test classes. The cache goes to ``$MAML_JAX_DATA/omniglot`` when set, else a
    session tmp dir. Skips when ../shared/data/omniglot is missing."""
    import os

    from algo_harness import SHARED_OMNIGLOT, load_omniglot_subset

    if not (SHARED_OMNIGLOT / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found in {SHARED_OMNIGLOT}")
    if os.environ.get("MAML_JAX_DATA"):
        cache_dir = os.path.join(os.environ["MAML_JAX_DATA"], "omniglot")
    else:
        cache_dir = tmp_path_factory.mktemp("omniglot_subset_cache")
    return load_omniglot_subset(cache_dir)
