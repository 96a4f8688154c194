"""experiments/profile_step.py: the op-kind grouping, each event's own time, a real traced sinusoid
step and its argument checks."""

import json

import pytest
from experiment_scripts import load

profile_step = load("profile_step")


def test_op_kinds_fall_into_the_documented_groups():
    cases = {
        "ynn_fusion": "matmul",
        "dot": "matmul",
        "dot_general": "matmul",
        "stack": "patches",
        "slice_bitcast_fusion": "patches",
        "wrapped_pad": "patches",
        "transpose_copy_fusion": "layout",
        "dynamic-slice_bitcast_fusion": "layout",
        "bitcast_dynamic-update-slice_fusion": "layout",
        "while": "control",
        "broadcast_add_fusion": "elementwise",
        "bitcast_select_fusion": "elementwise",
        "all-reduce": "collective",
        "Rendezvous": "collective",
        "Wait: pending_threads=1/2": "collective",
    }
    assert {kind: profile_step.op_group(kind) for kind in cases} == cases


def test_traced_sinusoid_step_times_ops_by_kind_without_runtime_events_and_finds_matmuls(capsys):
    assert profile_step.main(["--workload", "sinusoid", "--steps", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    times = out["s_per_step"]
    assert out["workload"] == "sinusoid" and all(t >= 0 for t in times.values())
    matmul = sum(t for k, t in times.items() if profile_step.op_group(k) == "matmul")
    assert 0 < matmul < sum(times.values())
    assert not any(k.startswith(profile_step.RUNTIME_EVENTS) for k in times)


def test_table_lists_the_top_kinds_and_group_totals():
    text = profile_step.table({"ynn_fusion": 0.03, "stack": 0.01}, top=1)
    assert "| ynn_fusion | matmul | 30.0 | 75.0% |" in text and "| stack |" not in text
    assert "| patches | 10.0 | 25.0% |" in text and "| all ops (summed over threads) | 40.0 | 100% |" in text


def test_instruction_info_reads_shape_and_op_name_from_hlo_text():
    hlo = """
  %ynn_fusion.52 = f32[3675,576]{1,0} fusion(%a), kind=kCustom, metadata={op_name="jit(chunk)/conv_1/dot_general" id=4}
  ROOT %tuple.3 = (f32[2]{0}, s32[]) tuple(%x, %y)
  %dot.7 = f32[9,64]{1,0} dot(%p, %q), lhs_contracting_dims={0}
  %fusion.9 = ((f32[4]{0}, s32[]), f32[]) fusion(%a, %b), kind=kLoop, metadata={op_name="jit(chunk)/scan"}
"""
    info = profile_step.instruction_info(hlo)
    assert info["ynn_fusion.52"] == ("f32[3675,576]{1,0}", "jit(chunk)/conv_1/dot_general")
    assert info["dot.7"] == ("f32[9,64]{1,0}", "")
    assert info["tuple.3"] == ("(f32[2]{0}, s32[])", "")  # tuple shapes kept whole, not '?'
    assert info["fusion.9"] == ("((f32[4]{0}, s32[]), f32[])", "jit(chunk)/scan")
    text = profile_step.instruction_table({"ynn_fusion.52": 0.003, "dot.7": 0.001}, info, top=1)
    assert "| ynn_fusion.52 | 3.00 | 75.0% | `f32[3675,576]{1,0}` | jit(chunk)/conv_1/dot_general |" in text
    assert "dot.7" not in text


def test_traced_sinusoid_step_by_instruction_names_instructions_of_the_compiled_step(capsys):
    assert profile_step.main(["--workload", "sinusoid", "--steps", "1", "--json", "--by-instruction"]) == 0
    rows = json.loads(capsys.readouterr().out)["instructions"]
    assert rows and all(r["s_per_step"] >= 0 for r in rows.values())
    named = [k for k, r in rows.items() if r["shape"] != "?"]
    assert len(named) >= len(rows) / 2  # most traced events are instructions of the compiled chunk
    assert any("." in k for k in named)  # suffixes kept: single instructions, not kinds


def test_self_times_subtract_nested_events_once_and_keep_siblings_and_partial_overlaps_whole():
    events = [
        (0, 100, "while.1"),  # a loop whose body ops ran on this thread
        (10, 30, "dot.2"),
        (40, 90, "call.3"),  # nested in the loop, with one op nested in it
        (50, 60, "add.4"),
        (95, 120, "copy.5"),  # starts inside the loop, ends after it: not nested
        (130, 140, "dot.6"),
    ]
    own = dict(profile_step.self_times(events))
    assert own == {"while.1": 100 - 20 - 50, "dot.2": 20, "call.3": 50 - 10, "add.4": 10, "copy.5": 25, "dot.6": 10}
    assert profile_step.self_times([]) == []


def test_cpu_devices_must_split_the_tasks_and_exist(capsys):
    with pytest.raises(SystemExit):
        profile_step.main(["--workload", "sinusoid", "--cpu-devices", "0"])
    assert "--cpu-devices must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # checked before JAX is asked for devices
        profile_step.main(["--workload", "sinusoid", "--cpu-devices", "2"])
    assert "sinusoid: 25 tasks do not split evenly over 2 CPU devices" in capsys.readouterr().err
