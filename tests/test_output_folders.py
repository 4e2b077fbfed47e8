"""No command writes into its own inputs, replaces a folder it did not write, or leaves half an output."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import run_guarded
from finetune.export import main as export_cli_main
from finetune.recipe.schema import RecipeError
from finetune.sft import main as sft_main
from helpers import tiny_overrides

FAULTS = Path(__file__).parent / "faults"


def export_main(argv):
    """`python -m finetune.export ARGV` in this process: the exit code as the command line gives it."""
    return run_guarded(export_cli_main, argv)


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from finetune.model.tiny import make_tiny_mixtral

    root = tmp_path_factory.mktemp("inputs")
    base = make_tiny_mixtral(root / "base", seed=5, max_shard_size="200KB", layers=3)
    adapter = root / "adapter"
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(base, adapter, max_steps=2, learning_rate=0.05)]) == 0
    return base, adapter


@pytest.mark.parametrize("where", ["base", "adapter", "inside base", "inside adapter", "holding both"])
def test_export_into_an_input_is_refused_before_writing(base_and_adapter, where, capsys):
    base, adapter = base_and_adapter
    before = {"base": digest(base), "adapter": digest(adapter)}
    out = {"base": base, "adapter": adapter, "inside base": base / "merged", "inside adapter": adapter / "merged",
           "holding both": base.parent}[where]
    assert export_main([str(adapter), "--base", str(base), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and "never writes into its own inputs" in err
    assert {"base": digest(base), "adapter": digest(adapter)} == before
    assert not (base / "merged").exists() and not (adapter / "merged").exists()
    assert not list(base.parent.glob(".*.partial"))


def test_export_refuses_a_non_empty_out_unless_overwrite(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_main([str(adapter), "--out", str(out), "--no-verify"]) == 2
    assert "exists and is not empty (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    assert export_main([str(adapter), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no partial or replaced folder left


def test_failed_verification_leaves_no_out_and_keeps_the_old_one(base_and_adapter, tmp_path, capsys):
    base, adapter = base_and_adapter
    out = tmp_path / "merged"
    # bf16 weights cannot reproduce the fp32 reference to 1e-6: the verification fails.
    assert export_main([str(adapter), "--out", str(out), "--dtype", "bf16", "--tolerance", "1e-6"]) == 1
    assert "nothing was written to" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "previous.txt").write_text("previous export")
    assert export_main([str(adapter), "--out", str(out), "--dtype", "bf16", "--tolerance", "1e-6", "--overwrite"]) == 1
    assert digest(out) == {"previous.txt": hashlib.sha256(b"previous export").hexdigest()}


def test_export_killed_after_its_first_shard_leaves_no_out(base_and_adapter, tmp_path, repo_root):
    base, adapter = base_and_adapter
    before = digest(base), digest(adapter)
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(FAULTS), "FAULT_KILL_AFTER_SAVES": "1"}
    command = [sys.executable, "-m", "finetune.export", str(adapter), "--out", str(out)]
    proc = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    partial = tmp_path / ".merged.partial"
    assert len(list(partial.glob("*.safetensors"))) == 1  # it really died after one shard
    assert (digest(base), digest(adapter)) == before
    # The next run clears what the killed one left and completes.
    env.pop("FAULT_KILL_AFTER_SAVES")
    proc = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left unfinished by an earlier run" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert len(list(out.glob("*.safetensors"))) == len(list(base.glob("*.safetensors")))


def test_tiny_refuses_a_non_empty_folder(tmp_path, capsys):
    from finetune.cli import run_guarded
    from finetune.tiny import main as tiny_main

    (tmp_path / "keep.txt").write_text("x")
    assert run_guarded(tiny_main, [str(tmp_path), "--pretrain-steps", "0"]) == 2
    assert "exists and is not empty (keep.txt)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_evaluate_out_inside_the_model_is_refused_before_loading(base_and_adapter, capsys):
    from finetune.cli import run_guarded
    from finetune.evaluate import main as evaluate_main

    base, adapter = base_and_adapter
    before = digest(adapter)
    code = run_guarded(evaluate_main, [str(adapter), "--suite", "eval/bundled.yaml", "--out", str(adapter / "eval")])
    assert code == 2
    assert "lies inside the model" in capsys.readouterr().err
    assert digest(adapter) == before


def test_demo_replaces_only_its_own_folder(tmp_path):
    from finetune.demo import DEMO_MARKER, claim_demo_folder
    from finetune.files.output_folder import OutputError

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="was not written by the demo"):
        claim_demo_folder(foreign)
    assert digest(foreign) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}
    earlier = tmp_path / "demo"
    claim_demo_folder(earlier)
    (earlier / "report.md").write_text("old report")
    claim_demo_folder(earlier)
    assert [p.name for p in earlier.iterdir()] == [DEMO_MARKER]


@pytest.mark.parametrize("where", ["the model", "inside the model", "a folder with a model", "another recipe's run"])
def test_training_output_dir_holding_other_things_is_refused(base_and_adapter, tmp_path, where):
    base, adapter = base_and_adapter
    foreign = tmp_path / "copy"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    output_dir = {"the model": base, "inside the model": base / "sft", "a folder with a model": foreign,
                  "another recipe's run": adapter}[where]
    before = digest(output_dir) if output_dir.exists() else None
    message = {"the model": ": it is the model", "inside the model": ": it lies inside the model",
               "a folder with a model": r" is not empty \(config.json\) and holds no run",
               "another recipe's run": r" holds a different run \(changed: train.learning_rate\)"}[where]
    overrides = tiny_overrides(base, output_dir, max_steps=3)
    with pytest.raises(RecipeError, match=f"output_dir={output_dir}{message}"):
        sft_main(["recipes/tiny/sft.yaml", *overrides])
    assert (digest(output_dir) if output_dir.exists() else None) == before
