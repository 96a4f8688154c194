"""bench: fused steps per call (it_per_s stays meta-steps/s) and the peers comparison table,
with a stand-in peers script (the real one needs torch)."""

import json
import sys
import textwrap
from types import SimpleNamespace

import chex
import jax
import jax.numpy as jnp
import pytest

from maml_jax import bench

FAKE_PEERS = textwrap.dedent(
    """
    import argparse, json
    ap = argparse.ArgumentParser()
    for f in ("--peers", "--workloads", "--iters", "--warmup"):
        ap.add_argument(f)
    a = ap.parse_args()
    for w in a.workloads.split(","):
        for i, p in enumerate(a.peers.split(",")):
            if p != "higher":  # a peer that is not installed prints nothing
                print(json.dumps(dict(peer=p, workload=w, it_per_s=2.0 * (i + 1), iters=int(a.iters))))
    """
)


SECONDS_PER_STEP = 0.125  # a power of two: the expected rates below are exact in floating point


class _TimedChunk:
    """A chunk (or its ``lower(...).compile()``) that moves ``clock`` by ``SECONDS_PER_STEP``
    for each meta-step it runs (read from the state's step counter) and records the steps per
    call in ``clock.calls``."""

    def __init__(self, fn, clock):
        self.fn, self.clock = fn, clock

    def __call__(self, state, data):
        before = int(state.step)  # read before the call donates the state
        state, metrics = self.fn(state, data)
        steps = int(state.step) - before
        self.clock.calls.append(steps)
        self.clock.now += SECONDS_PER_STEP * steps
        return state, metrics

    def lower(self, *args):
        lowered = self.fn.lower(*args)
        return SimpleNamespace(compile=lambda: _TimedChunk(lowered.compile(), self.clock))


@pytest.fixture
def step_clock(monkeypatch):
    """``bench``'s ``time.perf_counter`` reads a clock that only the benchmarked chunks move,
    ``SECONDS_PER_STEP`` per meta-step, so however often it is read, ``it_per_s`` must be
    ``1 / SECONDS_PER_STEP`` exactly."""
    clock = SimpleNamespace(now=1000.0, calls=[])
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    real_build_chunk = bench.build_chunk

    def build_chunk(*args, **kwargs):
        chunk, *rest = real_build_chunk(*args, **kwargs)
        return (_TimedChunk(chunk, clock), *rest)

    monkeypatch.setattr(bench, "build_chunk", build_chunk)
    return clock


def test_fused_steps_count_meta_steps(step_clock):
    # 13 iters at 3 steps per call: 4 calls, timed in 2 windows of 2 calls; 12 meta-steps timed
    r = bench.measure("sinusoid", iters=13, warmup=0, num_tasks=2, steps_per_call=3, windows=2)
    assert step_clock.calls == [3, 3, 3, 3]
    assert r["steps_per_call"] == 3 and r["iters"] == 12
    # meta-steps per second (calls per second would be 8 / 3)
    assert r["it_per_s"] == r["it_per_s_min"] == r["it_per_s_max"] == 1 / SECONDS_PER_STEP == 8.0
    assert r["flops_per_step"] > 0


@pytest.mark.parametrize("as_json", [False, True])
def test_compare_peers_table_and_json(tmp_path, capsys, as_json):
    script = tmp_path / "peers.py"
    script.write_text(FAKE_PEERS)
    argv = ["--workload", "sinusoid", "--iters", "2", "--warmup", "0", "--tasks", "2", "--compare-peers"]
    argv += ["--peers-python", sys.executable, "--peers-script", str(script), "--peers", "torchfunc,loop,higher"]
    argv += ["--peak-size", "128"] + (["--json"] if as_json else [])
    assert bench.main(argv) == 0
    out, err = capsys.readouterr()
    # progress on stderr as each measurement finishes: the peak, then ours and each peer that ran
    progress = [line for line in err.splitlines() if line.startswith("[bench] ")]
    assert progress[0].startswith("[bench] matmul peak ") and len(progress) == 2
    assert progress[1].startswith("[bench] sinusoid round 1/1: maml_jax ")
    assert progress[1].endswith("; peers: torchfunc 2, loop 4 it/s")
    if as_json:
        (r,) = [json.loads(line) for line in out.splitlines()]
        assert set(r["peers"]) == {"torchfunc", "loop"}
        assert r["steps_per_call"] == 2  # the default (100 for sinusoid) is capped at --iters
        assert r["ratios"]["loop"] == pytest.approx(r["it_per_s"] / 4.0)
        assert r["matmul_peak_gflops"] > 0 and 0 < r["peak_fraction"] == pytest.approx(
            r["flops_per_step"] * r["it_per_s"] / (r["matmul_peak_gflops"] * 1e9)
        )
    else:
        assert "ours sampling tasks on device each step" in out  # the mode the ratios are for
        header, _, row = out.strip().splitlines()[-3:]
        assert "ours/torchfunc" in header and "ours/higher" in header
        cells = [c.strip() for c in row.strip("|").split("|")]
        ours = float(cells[1])  # printed rounded, so the ratio is checked to that precision
        assert cells[0] == "sinusoid" and cells[2] == "1" and cells[8] == "-"  # sinusoid pinned to 1 CPU
        peer, ratio = cells[6].split(" ", 1)
        assert peer == "2" and ratio.startswith("(") and ratio.endswith("x)")
        assert float(ratio[1:-2]) == pytest.approx(ours / 2, rel=0.01, abs=0.1)


def test_round_progress_names_the_round_our_rate_and_each_peer_that_ran():
    ours = {"it_per_s": 0.30842, "compile_s": 24.1008}
    line = bench.round_progress(
        "miniimagenet-5w1s", 2, 3, ours, {"loop": {"it_per_s": 0.2816}, "l2l": {"it_per_s": 0.28}}
    )
    assert line == "miniimagenet-5w1s round 2/3: maml_jax 0.308 it/s (compile 24.1 s); peers: loop 0.282, l2l 0.28 it/s"
    assert bench.round_progress("sinusoid", 1, 1, ours, {}).endswith("(compile 24.1 s); no peer ran")
    assert bench.round_progress("sinusoid", 1, 1, ours, None).endswith("(compile 24.1 s)")


def test_compare_peers_without_the_venv_shows_ours_only(tmp_path, capsys):
    argv = ["--workload", "sinusoid", "--iters", "1", "--warmup", "0", "--tasks", "2", "--compare-peers", "--json"]
    assert bench.main(argv + ["--peers-python", str(tmp_path / "none"), "--peak-size", "128"]) == 0
    captured = capsys.readouterr()
    assert "peers not found" in captured.err and "peers" not in json.loads(captured.out)


def test_fixed_tasks_chunk_trains_on_the_given_batch():
    """``fixed_tasks``: the fused chunk repeats the train step on the batch passed in (what the
    PyTorch peers time), so it equals stepping that batch by hand; the default chunk samples new
    tasks each step and does not."""
    chunk, state, tasks, make_step = bench.build_chunk("sinusoid", "vmap", 3, num_tasks=2, fixed_tasks=True)
    step = make_step("vmap")  # donates its state argument, as the chunks do: step copies
    by_hand = jax.tree.map(jnp.copy, state)
    for _ in range(3):
        by_hand, _ = step(by_hand, tasks)
    by_hand = jax.device_get(by_hand.meta_params)
    fixed, metrics = chunk(jax.tree.map(jnp.copy, state), tasks)
    assert metrics["query_loss"].shape == (3,)
    chex.assert_trees_all_close(jax.device_get(fixed.meta_params), by_hand, rtol=1e-5, atol=1e-6)
    sampling, _, _, _ = bench.build_chunk("sinusoid", "vmap", 3, num_tasks=2)
    sampled, _ = sampling(jax.tree.map(jnp.copy, state), None)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), jax.device_get(sampled.meta_params), by_hand)
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_measure_reports_fixed_tasks(step_clock):
    r = bench.measure("sinusoid", iters=4, warmup=0, num_tasks=2, steps_per_call=2, windows=2, fixed_tasks=True)
    assert step_clock.calls == [2, 2]
    assert r["fixed_tasks"] is True and r["iters"] == 4 and r["it_per_s"] == 1 / SECONDS_PER_STEP
    assert r["inner_unroll"] is False


def test_median_call_ms_warms_up_once_then_takes_the_median_of_the_timed_calls(monkeypatch):
    clock = iter([0.0, 0.004, 1.0, 1.001, 2.0, 2.010])  # timed calls of 4, 1 and 10 ms
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(clock))
    calls = []

    def fn(x):
        calls.append(x)
        return jnp.asarray(x)

    assert bench.median_call_ms(fn, 3, calls=3) == pytest.approx(4.0)
    assert calls == [3] * 4  # the warm-up call is not timed
