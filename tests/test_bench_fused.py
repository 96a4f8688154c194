"""bench: fused steps per call (it_per_s stays meta-steps/s) and the peers comparison table,
with a stand-in peers script (the real one needs torch)."""

import json
import sys
import textwrap

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


def test_fused_steps_count_meta_steps():
    r = bench.measure("sinusoid", iters=6, warmup=0, num_tasks=2, steps_per_call=3, windows=2)
    assert r["steps_per_call"] == 3 and r["iters"] == 6 and r["it_per_s"] > 0
    assert r["flops_per_step"] > 0


@pytest.mark.parametrize("as_json", [False, True])
def test_compare_peers_table_and_json(tmp_path, capsys, as_json):
    script = tmp_path / "peers.py"
    script.write_text(FAKE_PEERS)
    argv = ["--workload", "sinusoid", "--iters", "2", "--warmup", "0", "--tasks", "2", "--compare-peers"]
    argv += ["--peers-python", sys.executable, "--peers-script", str(script), "--peers", "torchfunc,loop,higher"]
    argv += ["--peak-size", "128"] + (["--json"] if as_json else [])
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    if as_json:
        (r,) = [json.loads(line) for line in out.splitlines()]
        assert set(r["peers"]) == {"torchfunc", "loop"}
        assert r["steps_per_call"] == 2  # the default (100 for sinusoid) is capped at --iters
        assert r["ratios"]["loop"] == pytest.approx(r["it_per_s"] / 4.0)
        assert r["matmul_peak_gflops"] > 0 and 0 < r["peak_fraction"] == pytest.approx(
            r["flops_per_step"] * r["it_per_s"] / (r["matmul_peak_gflops"] * 1e9)
        )
    else:
        header, _, row = out.strip().splitlines()[-3:]
        assert "ours/torchfunc" in header and "ours/higher" in header
        cells = [c.strip() for c in row.strip("|").split("|")]
        ours = float(cells[1])  # printed rounded, so the ratio is checked to that precision
        assert cells[0] == "sinusoid" and cells[2] == "1" and cells[8] == "-"  # sinusoid pinned to 1 CPU
        peer, ratio = cells[6].split(" ", 1)
        assert peer == "2" and ratio.startswith("(") and ratio.endswith("x)")
        assert float(ratio[1:-2]) == pytest.approx(ours / 2, rel=0.01, abs=0.1)


def test_compare_peers_without_the_venv_shows_ours_only(tmp_path, capsys):
    argv = ["--workload", "sinusoid", "--iters", "1", "--warmup", "0", "--tasks", "2", "--compare-peers", "--json"]
    assert bench.main(argv + ["--peers-python", str(tmp_path / "none"), "--peak-size", "128"]) == 0
    captured = capsys.readouterr()
    assert "peers not found" in captured.err and "peers" not in json.loads(captured.out)
