"""Bar chart of ours / the fastest PyTorch peer per workload, one bar per machine, from the raw
lines of ``python -m maml_jax.bench --all --compare-peers --rounds 3 --json`` runs, with the
issue's goals (10x for the sinusoid, 2x for the image workloads) as dashed lines.

    python experiments/plot_peer_ratios.py --out experiments/results/bench/peer_ratios.png

Each ratio is our median it/s over the fastest peer's median (``bench.fastest_peer``), tasks
sampled in every timed step (the bench's default). ``RUNS`` names the latest complete ``--all`` run
on each of four machines; the machine descriptions are in the ``.md`` beside each file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from maml_jax.bench import WORKLOADS, fastest_peer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench"
# (label, raw lines of one --all --compare-peers --rounds 3 --json run)
RUNS = (
    ("Zen3 EPYC, no AVX-512 (2ea4805)", "zen3_rounds3_2ea4805.jsonl"),
    ("EPYC with AVX-512 (4a993ec)", "epyc512_rounds3_4a993ec.jsonl"),
    ("Intel Xeon (926c65e)", "xeon_rounds3.jsonl"),
    ("Zen1 EPYC, no AVX-512 (363b6c6)", "zen1_rounds3.jsonl"),
)
GOALS = {"sinusoid": 10.0, "omniglot-5w1s": 2.0, "omniglot-20w1s": 2.0, "miniimagenet-5w1s": 2.0}


def peer_ratios(path: Path) -> dict[str, tuple[float, str]]:
    """``{workload: (ours / fastest peer, that peer)}`` from one run's JSON lines; lines without
    peers, or timed on a fixed task batch, are skipped."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue
        result = json.loads(line)
        best = fastest_peer(result) if "workload" in result and not result.get("fixed_tasks") else None
        if best is not None:
            out[result["workload"]] = (result["it_per_s"] / best[1], best[0])
    return out


def plot(runs: list[tuple[str, dict[str, tuple[float, str]]]], out: Path) -> None:
    """Two panels (the sinusoid, the image workloads), grouped bars per machine, goal lines."""
    panels = (["sinusoid"], [w for w in WORKLOADS if w != "sinusoid"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 3]})
    width = 0.8 / len(runs)
    for ax, workloads in zip(axes, panels, strict=True):
        for i, (label, ratios) in enumerate(runs):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(workloads))]
            ys = [ratios.get(w, (float("nan"), ""))[0] for w in workloads]
            bars = ax.bar(xs, ys, width, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        for j, w in enumerate(workloads):
            ax.hlines(GOALS[w], j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel("ours / fastest PyTorch peer")
    axes[0].set_title("goal 10× (dashed)")
    axes[1].set_title("goal 2× (dashed)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=8, frameon=False)
    fig.suptitle("Meta-steps/s against the fastest peer on the same 2-CPU machine (medians of 3 alternated rounds)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS / "peer_ratios.png")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the runs' .jsonl files")
    a = ap.parse_args(argv)
    runs = [(label, peer_ratios(a.results / name)) for label, name in RUNS]
    for label, ratios in runs:
        print(label + ": " + ", ".join(f"{w} {r:.2f}x ({p})" for w, (r, p) in ratios.items()))
    plot(runs, a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
