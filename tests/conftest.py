import jax
import pytest


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
