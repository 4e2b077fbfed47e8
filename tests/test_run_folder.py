"""One run per output_dir, and a finished run is never trained again by accident: the same command after
it changes nothing, two processes never share a folder, and a stop signal during the final save leaves a
complete run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.dpo import main as dpo_main
from finetune.errors import EXIT_BAD_INPUT
from finetune.files.output_folder import RUN_LOCK_FILE
from finetune.recipe.loading import load_recipe
from finetune.sft import main as sft_main
from finetune.train.run_folder import COMPLETE_FILE, claim_run_folder, release_run_folder
from helpers import ROOT, assert_refused, log_history, run_command, tiny_overrides

pytestmark = pytest.mark.slow  # whole tiny runs, several as separate processes

SFT, DPO = "recipes/tiny/sft.yaml", "recipes/tiny/dpo.yaml"
FAULTS = Path(__file__).parent / "faults"


def finished_files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ("adapter_model.safetensors", "trainer_state.json",
                                                            "recipe.yaml", "README.md", COMPLETE_FILE)}


def test_rerunning_finished_sft_and_dpo_changes_nothing_and_longer_continues(tiny_model_dir, tmp_path, capsys):
    sft = tiny_overrides(tiny_model_dir, tmp_path / "sft", max_steps=2, save_strategy="steps", save_steps=2)
    sft = [o for o in sft if o != "resume=never"]  # the README's advice: run the same command again
    assert sft_main([SFT, *sft]) == 0
    dpo = tiny_overrides(tiny_model_dir, tmp_path / "dpo", max_steps=2, save_strategy="steps", save_steps=2)
    dpo = [o for o in dpo if o != "resume=never"] + [f"dpo.sft_adapter={tmp_path / 'sft'}"]
    assert dpo_main([DPO, *dpo]) == 0
    capsys.readouterr()
    for main, recipe, overrides, out in ((sft_main, SFT, sft, tmp_path / "sft"), (dpo_main, DPO, dpo, tmp_path / "dpo")):
        before = finished_files(out)
        assert main([recipe, *overrides]) == 0
        said = capsys.readouterr().out
        assert f"{out}: this run is already complete (2 steps); nothing was changed" in said, said
        assert "resuming" not in said and finished_files(out) == before
    # Training further: a larger max_steps continues from the last checkpoint, to the new length.
    assert sft_main([SFT, *sft, "train.max_steps=3"]) == 0
    said = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'sft' / 'checkpoint-2'}" in said
    assert log_history(tmp_path / "sft")[-1]["step"] == 3 and (tmp_path / "sft" / COMPLETE_FILE).is_file()


def test_a_finished_run_without_checkpoints_cannot_be_trained_longer(tiny_model_dir, tmp_path):
    overrides = [o for o in tiny_overrides(tiny_model_dir, tmp_path / "sft", max_steps=1) if o != "resume=never"]
    assert sft_main([SFT, *overrides]) == 0
    assert_refused(run_command(["finetune.sft", SFT, *overrides, "train.max_steps=2"], ROOT),
                   "holds a finished run of 1 steps and no checkpoint to continue it from")


def test_two_runs_never_share_an_output_dir_and_a_killed_runs_lock_blocks_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "shared"
    overrides = [o for o in tiny_overrides(tiny_model_dir, out, max_steps=400) if o != "resume=never"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([sys.executable, "-m", "finetune.sft", SFT, *overrides], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / RUN_LOCK_FILE).is_file() and (out / RUN_LOCK_FILE).read_text() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the folder"
            time.sleep(0.2)
        second = run_command(["finetune.sft", SFT, *overrides], ROOT)  # the same job, submitted twice
        assert first.poll() is None, "the first run must still be training while the second is refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert_refused(second, f"output_dir={out} is in use by another run (process {first.pid})", code=EXIT_BAD_INPUT)
    # The killed run's lock file is still there, and blocks nothing: the next run takes the folder.
    assert (out / RUN_LOCK_FILE).is_file()
    recipe = load_recipe(SFT, overrides)
    claim_run_folder(recipe)
    assert (out / RUN_LOCK_FILE).read_text() == str(os.getpid())
    release_run_folder(recipe)


def test_sigterm_during_the_final_save_leaves_a_complete_run(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    overrides = [o for o in tiny_overrides(tiny_model_dir, out, max_steps=2) if o != "resume=never"]
    env = {"PYTHONPATH": str(FAULTS), "FAULT_SIGTERM_DURING_SAVE": f"{out.name}/adapter_model.safetensors"}
    proc = run_command(["finetune.sft", SFT, *overrides], ROOT, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SIGTERM arrived during the final save, which completed first: the run is complete" in proc.stderr
    again = run_command(["finetune.sft", SFT, *overrides], ROOT)
    assert again.returncode == 0 and "this run is already complete (2 steps)" in again.stdout, again.stderr[-2000:]


def test_restart_deletes_the_earlier_run_and_trains_from_the_start(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    overrides = [o for o in tiny_overrides(tiny_model_dir, out, max_steps=2, save_strategy="steps", save_steps=1)
                 if o != "resume=never"]
    assert sft_main([SFT, *overrides]) == 0
    capsys.readouterr()
    assert sft_main([SFT, *overrides, "resume=restart"]) == 0
    said = capsys.readouterr().out
    assert f"resume=restart: deleted {out / 'checkpoint-1'}" in said and "resuming" not in said
    steps = [line["step"] for line in log_history(out) if "loss" in line]
    assert steps == [1, 2] and (out / COMPLETE_FILE).is_file()  # a new run from step 1, not a continuation
