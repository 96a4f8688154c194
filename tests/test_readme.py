"""The README's Python blocks run as written (the API section's block first: it defines the
``task_loss``, ``params`` and ``tasks`` that the algorithm-family blocks use)."""

import re
from pathlib import Path

import jax
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_python_blocks_run_and_train():
    blocks = python_blocks()
    api = [b for b in blocks if "task_loss = mse_loss(model.apply)" in b]
    assert len(blocks) >= 3 and len(api) == 1
    namespace: dict = {}
    for block in api + [b for b in blocks if b is not api[0]]:
        exec(compile(block, str(README), "exec"), namespace)
    # the last block: a user-written variant through from_meta_loss, trained one step
    algo, state, after = namespace["algo"], namespace["state"], namespace["after"]
    assert algo.name == "per_layer_lr" and algo.meta_loss is not None
    assert int(state.step) == 1 and np.isfinite(float(namespace["metrics"]["meta_loss"]))
    initial = jax.tree.leaves(algo.init(namespace["params"])["lrs"])
    assert any(float(a) != float(b) for a, b in zip(jax.tree.leaves(state.meta_params["lrs"]), initial, strict=True))
    assert after["query_loss"].shape == (25,) and np.all(np.isfinite(after["query_loss"]))
