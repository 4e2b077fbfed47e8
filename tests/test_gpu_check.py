"""benchmarks/gpu_check.sh, the one command for a lent GPU, run end to end on the CPU with small shapes
(`DEVICE=cpu SMALL=1`), so it never rots between the days a GPU is lent."""

import os
import subprocess

import pytest

from helpers import ROOT

STAGES = ["env", "gpu_tests", "expert_lora", "nf4", "syncs", "sft_dpo", "zero3", "moe_lora", "throughput"]


@pytest.mark.slow
def test_gpu_check_runs_every_stage_on_the_cpu(tmp_path):
    environment = {**os.environ, "DEVICE": "cpu", "SMALL": "1", "OUT": str(tmp_path), "PY": os.sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=1500)
    summary = (tmp_path / "summary.txt").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    lines = dict(line.split(None, 1) for line in summary.splitlines())
    assert list(lines) == STAGES
    assert all(rest.startswith("ok ") for rest in lines.values()), summary
    assert "private APIs: 0 problem(s)" in lines["env"]
    assert "routed = PEFT at H256" in lines["expert_lora"] and "NF4 = dequantized" in lines["nf4"]
    assert "0.0 in finetune/" in lines["syncs"] and "ln 2 within 2e-3" in lines["sft_dpo"]
    assert "3 steps trained" in lines["zero3"] and "ours / frozen time" in lines["moe_lora"]
    assert "tokens/s, MFU" in lines["throughput"]
    assert {f"{stage}.log" for stage in STAGES} <= {p.name for p in tmp_path.iterdir()}


def test_an_unknown_stage_is_refused(tmp_path):
    environment = {**os.environ, "DEVICE": "cpu", "STAGES": "env trian", "OUT": str(tmp_path), "PY": os.sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=environment, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "error: unknown stage 'trian' in STAGES" in proc.stderr
