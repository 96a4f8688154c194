import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in float64 (finite differences need it); restores float32 afterwards."""
    with jax.enable_x64(True):
        yield
