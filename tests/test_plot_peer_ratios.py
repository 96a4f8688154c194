"""experiments/plot_peer_ratios.py: ours over the fastest peer's median from the bench's JSON
lines (fixed-batch lines and lines without peers skipped), and the chart from the committed runs."""

import json

from experiment_scripts import load

from maml_jax.bench import fastest_peer

plot_peer_ratios = load("plot_peer_ratios")


def test_fastest_peer_is_the_highest_median_rate_and_none_without_peers():
    result = {"peers": {"loop": {"it_per_s": 0.5}, "l2l": {"it_per_s": 0.8}, "higher": {"error": "x"}}}
    assert fastest_peer(result) == ("l2l", 0.8)
    assert fastest_peer({"workload": "sinusoid", "it_per_s": 3.0}) is None
    assert fastest_peer({"peers": {"loop": {"error": "failed"}}}) is None


def test_peer_ratios_skip_fixed_batch_lines_and_lines_without_peers(tmp_path):
    lines = [
        {"workload": "omniglot-5w1s", "it_per_s": 2.0, "peers": {"loop": {"it_per_s": 1.0}, "l2l": {"it_per_s": 1.6}}},
        {"workload": "sinusoid", "it_per_s": 900.0, "fixed_tasks": True, "peers": {"torchfunc": {"it_per_s": 90.0}}},
        {"workload": "omniglot-20w1s", "it_per_s": 1.0},
        {"matmul_peak_gflops": 145.0},
    ]
    path = tmp_path / "run.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    assert plot_peer_ratios.peer_ratios(path) == {"omniglot-5w1s": (2.0 / 1.6, "l2l")}


def test_main_plots_every_workload_of_each_committed_run(tmp_path, capsys):
    out = tmp_path / "ratios.png"
    plot_peer_ratios.main(["--out", str(out)])
    assert out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    for label, name in plot_peer_ratios.RUNS:
        ratios = plot_peer_ratios.peer_ratios(plot_peer_ratios.RESULTS / name)
        assert set(ratios) == set(plot_peer_ratios.GOALS), name
        assert label in printed
