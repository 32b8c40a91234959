"""bench/gpu_check.py without a GPU (issue 22 item 9): its result lines are parsed and its table rendered from a fake
result, its 6 GB budget is the card's memory less the reserve, and on a machine without an NVIDIA GPU it stops at
once, before importing torch, with a message and a non-zero status."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench import gpu_check
from tests.pack import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.py"

FAKE_RESULTS = [
    {"configuration": "bf16", "comfyui": "0.33.0", "dynamic_vram": True, "tasks": [
        {"task": "load + warm-up", "seconds": 31.25, "vram_gib": 9.84, "rss_gib": 12.06},
        {"task": "t2i", "seconds": 5.123, "vram_gib": 10.21, "rss_gib": 4.3},
        {"task": "edit", "seconds": 11.9, "vram_gib": 10.02, "rss_gib": 4.4},
        {"task": "understand", "seconds": 8.0, "vram_gib": 8.1, "rss_gib": 4.2, "tokens": 512},
    ]},
    {"configuration": "fp8_e4m3fn", "comfyui": "0.33.0", "dynamic_vram": False, "tasks": [
        {"task": "load + warm-up", "seconds": 40.0, "vram_gib": 6.5, "rss_gib": 9.0},
        {"task": "t2i", "error": "OutOfMemoryError: CUDA out of memory"},
        {"task": "understand", "seconds": 4.0, "vram_gib": 5.0, "rss_gib": 4.0, "tokens": 100},
        {"task": "edit", "skipped": "3 s of the time budget left"},
    ]},
    {"configuration": "bf16 + TorchCompileModel", "error": "RuntimeError: Cannot create non-dynamic delegate"},
    {"configuration": "bf16, file slices off", "skipped": "20 s of the time budget left, it needs about 45 s"},
]


def noisy_stdout(result: dict) -> str:
    return "\n".join(["Total VRAM 81079 MB", gpu_check.result_line({"configuration": "stale"}), "100%| 50/50",
                      gpu_check.result_line(result), "Prompt executed in 5.12 seconds"])


def test_the_result_line_is_found_among_the_logs():
    result = FAKE_RESULTS[0]
    assert gpu_check.parse_result(noisy_stdout(result)) == result
    assert gpu_check.parse_result("Traceback (most recent call last):\n  ...\nKilled\n") is None
    assert gpu_check.parse_result("") is None


def rows_by_task(table: str, configuration: str) -> dict[str, str]:
    """The table's rows of one configuration (first column), by task (second column)."""
    rows = [line for line in table.splitlines()[2:] if line.startswith(configuration + "  ")]
    return {line[len(configuration):].strip().split("  ")[0]: line for line in rows}


def test_the_table_has_a_row_per_task_with_figures_and_the_official_ones_beside():
    table = gpu_check.render_table(FAKE_RESULTS, "Ovis-U1 GPU check: fake")
    lines = table.splitlines()
    assert lines[0] == "Ovis-U1 GPU check: fake"
    assert lines[1].split()[:4] == ["configuration", "task", "seconds", "tokens/s"]
    bf16 = rows_by_task(table, "bf16")
    assert set(bf16) == {"load + warm-up", "t2i", "edit", f"understand ({gpu_check.NEW_TOKENS})"}
    t2i = bf16["t2i"]
    assert "5.12" in t2i and "10.2 GiB" in t2i and "4.3 GiB" in t2i and t2i.endswith("8.41 s / 10.5 GB")
    assert bf16["edit"].endswith("18.89 s / 10.1 GB")
    understand = bf16[f"understand ({gpu_check.NEW_TOKENS})"]
    assert "64.0" in understand and understand.endswith("3.57 s / 8.2 GB")  # 512 tokens in 8 s
    assert "GB" not in bf16["load + warm-up"].split("GiB")[-1]  # no official figure for loading
    # the columns line up: every figure row has its seconds under the header's "seconds"
    header = lines[1]
    end = header.index("seconds") + len("seconds")
    assert all(row[end - 1] != " " for row in bf16.values())


def test_errors_skips_and_missing_dynamic_vram_are_said_in_the_table():
    table = gpu_check.render_table(FAKE_RESULTS, "t")
    fp8 = [line for line in table.splitlines() if line.startswith("fp8_e4m3fn")]
    assert all("[Dynamic VRAM off]" in line for line in fp8) and len(fp8) == 4
    assert any("t2i" in line and "error: OutOfMemoryError: CUDA out of memory" in line for line in fp8)
    assert any("edit" in line and "skipped: 3 s of the time budget left" in line for line in fp8)
    assert any("understand" in line and "25.0 (100 tok)" in line for line in fp8)  # stopped early: the count shown
    compiled = [line for line in table.splitlines() if line.startswith("bf16 + TorchCompileModel")]
    assert len(compiled) == 1 and "error: RuntimeError: Cannot create non-dynamic delegate" in compiled[0]
    slices = [line for line in table.splitlines() if line.startswith("bf16, file slices off")]
    assert len(slices) == 1 and "skipped: 20 s of the time budget left" in slices[0]
    task_column = table.splitlines()[1].index("task")  # the longest configuration name sets it, message rows too
    assert all(line[task_column - 2:task_column] == "  " and line[task_column] != " "
               for line in table.splitlines()[2:])


def test_the_budget_rows_leave_6_gb_of_the_card_and_slices_off_rows_set_no_flag():
    rows = gpu_check.configurations(79.19)
    budget = [c for c in rows if "budget" in c.name]
    assert budget and all(c.flags == ("--reserve-vram", "73.19") for c in budget)
    assert gpu_check.reserve_for_budget(4.0) == "0.00"
    slices_off = {c.name for c in rows if not c.file_slices}
    assert slices_off == {"bf16, file slices off", "bf16, 6 GB budget, file slices off"}
    assert [c.weight_dtype for c in rows if "--fast" in c.flags] == ["fp8_e4m3fn"]
    # every row fits in the budget after the first run's 30 s of checkpoint writing, and the budget in 8 minutes
    assert sum(c.estimate_s for c in rows) + 30 <= gpu_check.TIME_BUDGET_S <= 8 * 60 - 15
    assert {t for c in rows for t in c.tasks} == {"t2i", "edit", "understand"}


def without_nvidia_smi() -> dict:
    """This environment with PATH reduced to the Python's folder: no nvidia-smi, as on a machine without a GPU."""
    return {**os.environ, "PATH": os.path.dirname(sys.executable)}


def test_without_a_gpu_it_stops_at_once_with_a_message():
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(SCRIPT), "--comfyui", str(ROOT)], capture_output=True, text=True,
                         env=without_nvidia_smi(), timeout=60)
    assert out.returncode == gpu_check.NO_GPU_STATUS != 0
    assert "no NVIDIA GPU" in out.stderr and "nvidia-smi" in out.stderr
    assert out.stdout == ""
    assert time.perf_counter() - started < 30


def test_the_gpu_check_comes_before_any_heavy_import():
    code = ("import sys; sys.path.insert(0, %r); import gpu_check; status = gpu_check.main(['--comfyui', '.']); "
            "heavy = sorted({'torch', 'comfy', 'safetensors', 'transformers'} & set(sys.modules)); "
            "print(status, heavy)" % str(ROOT / "bench"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=without_nvidia_smi(),
                         timeout=60)
    assert out.stdout.strip() == f"{gpu_check.NO_GPU_STATUS} []", out.stderr
