"""``bench/export_latency.py --quick`` runs and reports every row.

A smoke run (a tiny DSP-pruned ResNet-8): the ONNX rows of the pruned and of
the dense network at one and all onnxruntime threads stand beside the
TorchScript and JAX rows, and the results files carry the command. The
timings themselves are the benchmark's business, not a test's.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = ("dense nchw", "dense channels_last", "original format", "fast.pt",
        "JAX dense jit", "JAX compact jit", "JAX convert.compact jit",
        "ONNX dense 1 thread", "ONNX 1 thread", "ONNX dense all threads",
        "ONNX all threads")


def test_quick_run_reports_onnx_rows(tmp_path):
  proc = subprocess.run(
      [sys.executable, "bench/export_latency.py", "--quick", "--out",
       str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
      check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for row in ROWS:
    assert f"| dsp_r8 | {row} |" in proc.stdout, row
  assert "ONNX / dense ONNX, 1 thread" in proc.stdout
  data = json.loads((tmp_path / "export_latency.json").read_text())
  assert data["command"].endswith("--quick --out " + str(tmp_path))
  assert {r["build"] for r in data["ms"]} == set(ROWS)
  assert [r["batch"] for r in data["ratios"]] == [1, 2]
  assert all(d["batch 1"] > 0 and d["batch 2"] > 0 for d in data["ms"])
  assert "load average" in (tmp_path / "export_latency.md").read_text()
