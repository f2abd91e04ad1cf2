"""benchmarks/cost_curve.py and the memory measurement it shares with benchmarks/method_speed.py, on CPU.

(The study has its own tests in test_study.py; the speed benchmarks' figures are measured, not tested.)
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cost_curve  # noqa: E402
import method_speed  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the CPU measurement needs Linux's /proc")
def test_peak_memory_sees_an_allocation_made_and_freed_after_the_reset():
    """Catches reading the current resident set instead of the peak (a freed tensor leaves nothing), and the
    peak not being reset (an earlier, larger allocation would be reported)."""
    mb = 2 ** 20
    big = torch.ones(512 * mb // 4)  # 512 MB touched before the reset: must not count
    del big
    start = method_speed.reset_peak_memory(CPU)
    x = torch.ones(192 * mb // 4)    # 192 MB, touched page by page
    del x
    grown = (method_speed.peak_memory(CPU) - start) / mb
    assert 180 < grown < 260, grown


def test_points_vary_one_axis_at_a_time_from_the_base():
    got = cost_curve.points([32, 4, 64], sizes=[64, 96], patches=[8, 2, 4], batches=[64, 128])
    assert got == [(32, 4, 64), (64, 4, 64), (96, 4, 64), (32, 8, 64), (32, 2, 64), (32, 4, 128)]


def test_one_point_runs_the_method_and_measures_it(tmp_path):
    """Catches the child process not running the step (no figures) or a memory reading of nothing."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cost_curve.py"), "--one", "byol", "32", "8", "8",
                        "--arch", "vit_mini", "--steps", "1", "--warmup", "1", "--workers", "0",
                        "--data-dir", str(ROOT / "tests" / "data_sample")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    point = json.loads(r.stdout.strip().splitlines()[-1])
    assert (point["method"], point["size"], point["patch"], point["batch"]) == ("byol", 32, 8, 8)
    assert point["img_s"] > 0 and point["step_mb"] > 1  # BYOL's 4096-wide heads alone hold MBs of AdamW state
