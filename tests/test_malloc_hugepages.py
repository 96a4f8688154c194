"""host.reexec_with_malloc_hugepages: the entry points restart once with glibc's huge-page malloc
tunable, keep the user's own tunables and opt-out, and train the same bits as without it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from run_files import metric_rows
from test_algorithm_runs import TINY_SINUSOID

from maml_jax import host

TUNABLE = host.MALLOC_HUGEPAGES_TUNABLE


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.MALLOC_HUGEPAGES_OPT_OUT)}
    return {**env, **extra}


@pytest.fixture
def capable_host(monkeypatch):
    """A Linux host with glibc 2.36 and transparent huge pages on madvise, whatever runs the tests."""
    monkeypatch.setattr(host.sys, "platform", "linux")
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host, "_transparent_hugepages_on_madvise", lambda: True)


def test_the_tunable_is_added_to_the_users_own_and_never_overrides_a_hugetlb_setting():
    assert host.with_malloc_hugepages({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": TUNABLE}
    theirs = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert host.with_malloc_hugepages(theirs)["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert theirs == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # the mapping given is not changed
    for own in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert host.with_malloc_hugepages({"GLIBC_TUNABLES": own}) == {"GLIBC_TUNABLES": own}


def test_a_restart_is_wanted_only_where_glibc_and_the_kernel_can_use_it(capable_host, monkeypatch):
    assert host.malloc_hugepages_wanted({})
    for off in ("0", "false", "off"):
        assert not host.malloc_hugepages_wanted({host.MALLOC_HUGEPAGES_OPT_OUT: off})
    assert host.malloc_hugepages_wanted({host.MALLOC_HUGEPAGES_OPT_OUT: "1"})
    assert not host.malloc_hugepages_wanted({"GLIBC_TUNABLES": TUNABLE})  # already restarted
    assert not host.malloc_hugepages_wanted({host.MALLOC_HUGEPAGES_RESTARTED: "1"})  # glibc dropped the tunable
    assert not host.malloc_hugepages_wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})  # the user's choice
    for libc in (("glibc", "2.34"), ("glibc", ""), ("", ""), ("musl", "1.2")):
        monkeypatch.setattr(host.platform, "libc_ver", lambda libc=libc: libc)
        assert not host.malloc_hugepages_wanted({}), libc
    monkeypatch.setattr(host.platform, "libc_ver", lambda: ("glibc", "2.40"))
    assert host.malloc_hugepages_wanted({})
    monkeypatch.setattr(host.sys, "platform", "darwin")
    assert not host.malloc_hugepages_wanted({})


def test_transparent_huge_pages_must_be_on_madvise(tmp_path):
    """The file's format is that of /sys/kernel/mm/transparent_hugepage/enabled; glibc's tunable
    acts only in madvise mode (always gives huge pages unasked, never refuses them)."""
    setting = tmp_path / "enabled"
    for text, on_madvise in (
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", False),
        ("always madvise [never]\n", False),
    ):
        setting.write_text(text)
        assert host._transparent_hugepages_on_madvise(str(setting)) is on_madvise, text
    assert not host._transparent_hugepages_on_madvise(str(tmp_path / "missing"))


def test_the_restart_runs_the_same_command_line_with_the_tunable(capable_host, monkeypatch):
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)  # os.execve never returns

    monkeypatch.setattr(host.os, "execve", fake_execve)
    monkeypatch.setattr(host.sys, "orig_argv", ["/usr/bin/python3", "-m", "maml_jax.bench", "--workload", "x"])
    monkeypatch.setattr(host.sys, "argv", ["/src/maml_jax/bench.py", "--workload", "x"])
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    for key in ("GLIBC_TUNABLES", host.MALLOC_HUGEPAGES_OPT_OUT):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit):
        host.reexec_with_malloc_hugepages()
    ((path, argv, env),) = calls
    assert path == sys.executable and argv == [sys.executable, "-m", "maml_jax.bench", "--workload", "x"]
    assert env["GLIBC_TUNABLES"] == TUNABLE and env["PATH"] == os.environ["PATH"]
    assert env[host.MALLOC_HUGEPAGES_RESTARTED] == "1"
    monkeypatch.setenv("GLIBC_TUNABLES", TUNABLE)  # the restarted process: nothing more to do
    host.reexec_with_malloc_hugepages()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv(host.MALLOC_HUGEPAGES_OPT_OUT, "0")
    host.reexec_with_malloc_hugepages()
    monkeypatch.delenv(host.MALLOC_HUGEPAGES_OPT_OUT)
    # command lines that would not run this program again: read from stdin, or other arguments
    # than sys.argv's (runpy, IPython's %run)
    for orig, argv in (
        (["/usr/bin/python3", "-"], ["-"]),
        (["/usr/bin/python3", "-m", "other", "--a"], ["/src/maml_jax/bench.py", "--workload", "x"]),
        ([], ["/src/maml_jax/bench.py"]),
    ):
        monkeypatch.setattr(host.sys, "orig_argv", orig)
        monkeypatch.setattr(host.sys, "argv", argv)
        host.reexec_with_malloc_hugepages()
    assert len(calls) == 1


needs_hugepage_malloc = pytest.mark.skipif(
    not host.malloc_hugepages_wanted(clean_env()), reason="no glibc >= 2.35 with huge pages here"
)
BENCH_ARGS = ["--workload", "sinusoid", "--iters", "2", "--warmup", "0", "--tasks", "2"]


def console_script() -> str:
    """The ``maml-jax`` console script (``maml_jax.cli.console_main``), installed beside the
    interpreter in a virtual environment."""
    script = Path(sys.executable).parent / "maml-jax"
    script = str(script) if script.is_file() else shutil.which("maml-jax")
    assert script, "the maml-jax console script is not installed"
    return script


@needs_hugepage_malloc
@pytest.mark.parametrize("opted_out", [False, True], ids=["default", "opted-out"])
@pytest.mark.parametrize("entry", ["python -m maml_jax.bench", "maml-jax bench"])
def test_bench_entry_points_report_the_tunable_they_ran_with(entry, opted_out):
    """``python -m maml_jax.bench`` and ``maml-jax bench`` restart with the tunable and report it
    in their JSON line, and report none when opted out. (One test per entry point and setting, so
    that pytest-xdist spreads the subprocess runs over its workers.)"""
    if entry == "maml-jax bench":
        cmd = [console_script(), "bench", *BENCH_ARGS]
    else:
        cmd = [sys.executable, "-m", "maml_jax.bench", *BENCH_ARGS]
    env = clean_env(**{host.MALLOC_HUGEPAGES_OPT_OUT: "0"}) if opted_out else clean_env()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["glibc_tunables"] == (None if opted_out else TUNABLE)


@needs_hugepage_malloc
def test_train_restarts_with_the_tunable_and_trains_the_same_bits(tmp_path):
    """``python -m maml_jax train`` records the tunable in run.json, and a run with it logs the
    same losses and evaluation as one without, to the bit. The sinusoid's buffers are small, so
    this checks that the restart runs the same program on the same settings; that an allocator
    cannot change XLA's results is not something a test of this size shows."""
    train = [sys.executable, "-m", "maml_jax", "train", "sinusoid", "--no-progress", *TINY_SINUSOID]
    runs = {}
    for name, env in (("with", clean_env()), ("without", clean_env(**{host.MALLOC_HUGEPAGES_OPT_OUT: "0"}))):
        workdir = tmp_path / name
        out = subprocess.run([*train, "--workdir", str(workdir)], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        runs[name] = workdir
    assert json.loads((runs["with"] / "run.json").read_text())["glibc_tunables"] == TUNABLE
    assert json.loads((runs["without"] / "run.json").read_text())["glibc_tunables"] is None
    rows = {name: metric_rows(w) for name, w in runs.items()}
    assert rows["with"] and [r["meta_loss"] for r in rows["with"]] == [r["meta_loss"] for r in rows["without"]]
    evals = {name: json.loads((w / "eval.json").read_text()) for name, w in runs.items()}
    assert evals["with"] == evals["without"]
