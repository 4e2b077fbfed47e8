"""Kill a real training process at any moment; the same command then continues the same run."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.errors import EXIT_INTERRUPTED
from finetune.sft import main as sft_main
from finetune.train.checkpoints import checkpoint_problem
from helpers import log_history, tiny_overrides

pytestmark = pytest.mark.slow
RECIPE = "recipes/tiny/sft.yaml"
FAULTS = Path(__file__).parent / "faults"


def run_overrides(model_dir, out, **train):
    return [o for o in tiny_overrides(model_dir, out, learning_rate=0.01, **train) if o != "resume=never"]


def losses(out: Path) -> list[tuple[int, float]]:
    history = log_history(out)
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def assert_same_run(got: Path, expected: Path) -> None:
    assert [s for s, _ in losses(got)] == [s for s, _ in losses(expected)]
    for (_, a), (_, b) in zip(losses(got), losses(expected)):
        assert a == pytest.approx(b, rel=1e-5)
    a, b = load_file(got / "adapter_model.safetensors"), load_file(expected / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)


def test_kill_while_saving_a_checkpoint_resumes_from_the_last_complete_one(tiny_model_dir, tmp_path, repo_root, capsys):
    common = dict(max_steps=6, save_strategy="steps", save_steps=2)
    straight = tmp_path / "straight"
    assert sft_main([RECIPE, *run_overrides(tiny_model_dir, straight, **common)]) == 0

    killed = tmp_path / "killed"
    overrides = run_overrides(tiny_model_dir, killed, **common)
    # SIGKILL in the middle of writing checkpoint-4's optimizer state: its weights are there, the rest is not.
    env = {**os.environ, "PYTHONPATH": str(FAULTS), "FAULT_KILL_DURING_SAVE": "checkpoint-4/optimizer.pt"}
    proc = subprocess.run([sys.executable, "-m", "finetune.sft", RECIPE, *overrides], cwd=repo_root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert checkpoint_problem(killed / "checkpoint-4") == "no trainer_state.json"
    assert checkpoint_problem(killed / "checkpoint-2") is None

    capsys.readouterr()
    assert sft_main([RECIPE, *overrides]) == 0
    out = capsys.readouterr().out
    assert f"skipping incomplete checkpoint {killed / 'checkpoint-4'} (no trainer_state.json)" in out
    assert f"resuming from {killed / 'checkpoint-2'}" in out
    assert_same_run(killed, straight)


def test_truncated_files_make_a_checkpoint_incomplete(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert sft_main([RECIPE, *run_overrides(tiny_model_dir, out, max_steps=2, save_strategy="steps", save_steps=2)]) == 0
    checkpoint = out / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    for name, problem in [("adapter_model.safetensors", "adapter_model.safetensors is truncated"),
                          ("scheduler.pt", "scheduler.pt is truncated (no zip directory)"),
                          ("rng_state.pth", "rng_state.pth is truncated (no zip directory)")]:
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) - 100])
        assert checkpoint_problem(checkpoint) == problem
        (checkpoint / name).write_bytes(data)
    (checkpoint / "optimizer.pt").unlink()
    assert checkpoint_problem(checkpoint) == "no optimizer.pt"
    assert checkpoint_problem(checkpoint, needs_optimizer=False) is None  # train.save_only_model


def test_sigterm_saves_a_checkpoint_exits_distinctly_and_the_rerun_matches(tiny_model_dir, tmp_path, repo_root,
                                                                           capsys):
    common = dict(max_steps=12)  # save_strategy stays "no": the SIGTERM checkpoint is the only one
    straight = tmp_path / "straight"
    assert sft_main([RECIPE, *run_overrides(tiny_model_dir, straight, **common)]) == 0

    stopped = tmp_path / "stopped"
    command = [sys.executable, "-m", "finetune.sft", RECIPE, *run_overrides(tiny_model_dir, stopped, **common)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(command, cwd=repo_root, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in proc.stdout:
            if "'loss'" in line:  # the first step's log line: training is under way
                proc.send_signal(signal.SIGTERM)
                break
        proc.stdout.read()
        code = proc.wait(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert "SIGTERM received" in err and "run the same command again to continue" in err
    saved = sorted(stopped.glob("checkpoint-*"))
    assert len(saved) == 1 and checkpoint_problem(saved[0]) is None
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < 12
    assert not (stopped / "adapter_model.safetensors").exists()  # no final adapter from an unfinished run

    capsys.readouterr()
    assert sft_main([RECIPE, *run_overrides(tiny_model_dir, stopped, **common)]) == 0
    assert f"resuming from {saved[0]}" in capsys.readouterr().out  # continued, not started over
    assert_same_run(stopped, straight)
