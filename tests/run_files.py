"""Read what ``maml-jax train`` writes into a run directory, for tests that compare runs."""

import json
from pathlib import Path


def jsonl_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (``metrics.jsonl``, ``timing.jsonl``, ``sessions.jsonl``)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metric_rows(workdir: Path) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl``, one dict per logged step, in file order."""
    return jsonl_rows(Path(workdir) / "metrics.jsonl")
