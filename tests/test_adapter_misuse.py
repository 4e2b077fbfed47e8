"""Adapters used where they must not be: merged twice, merged onto another base, with a config that is not
theirs, started from on another base, talked to on a base of another shape; and chat fed what a terminal or a
pipe can feed it. Each is refused by name, or handled, never a traceback or a silently wrong model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from finetune.dpo import main as dpo_main
from finetune.model.tiny import make_tiny_mixtral
from finetune.sft import main as sft_main
from helpers import ROOT, refused_here, tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    sft, dpo = root / "sft", root / "dpo"
    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(tiny_model_dir, sft, max_steps=2)]) == 0
    assert dpo_main(["recipes/tiny/dpo.yaml", *tiny_overrides(tiny_model_dir, dpo, max_steps=2),
                     f"dpo.sft_adapter={sft}"]) == 0
    other_base = make_tiny_mixtral(root / "other-base", seed=1)  # same shape, other weights
    narrow_base = make_tiny_mixtral(root / "narrow-base", seed=0, hidden=32, intermediate=64)
    on_other = root / "on-other-base"
    shutil.copytree(sft, on_other)
    edit_config(on_other, base_model_name_or_path=str(other_base))
    wrong_rank = root / "wrong-rank"
    shutil.copytree(sft, wrong_rank)
    edit_config(wrong_rank, r=4)
    return {"root": root, "sft": sft, "dpo": dpo, "other_base": other_base, "narrow_base": narrow_base,
            "on_other": on_other, "wrong_rank": wrong_rank}


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("order", ["SFT DPO", "DPO SFT"])
def test_export_refuses_the_sft_adapter_beside_the_dpo_adapter_that_contains_it(adapters, tmp_path, capsys, order):
    listed = [str(adapters[name.lower()]) for name in order.split()]
    refused_here(capsys, ["export", *listed, "--out", str(tmp_path / "merged")],
                 f"{adapters['dpo']} is a DPO adapter trained from the SFT adapter {adapters['sft']}, which it "
                 f"already contains; merging both would add the SFT delta twice. Export {adapters['dpo']} alone")
    assert not (tmp_path / "merged").exists()


def test_export_refuses_an_adapter_recorded_on_another_base(adapters, tmp_path, capsys):
    refused_here(capsys, ["export", str(adapters["sft"]), str(adapters["on_other"]), "--out", str(tmp_path / "m")],
                 f"{adapters['on_other']} was trained on the base {adapters['other_base']}, not on")


def test_export_refuses_a_config_whose_rank_is_not_its_tensors(adapters, tmp_path, capsys):
    refused_here(capsys, ["export", str(adapters["wrong_rank"]), "--no-verify", "--out", str(tmp_path / "m")],
                 "adapter_config.json says r=4, but")


def test_dpo_refuses_an_sft_adapter_from_another_base(adapters, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    refused_here(capsys, ["dpo", "recipes/tiny/dpo.yaml", *tiny_overrides(adapters["other_base"], tmp_path / "o"),
                          f"dpo.sft_adapter={adapters['sft']}"],
                 f"dpo.sft_adapter={adapters['sft']} was trained on")
    assert not (tmp_path / "o").exists()


def test_chat_refuses_a_base_of_another_shape(adapters, capsys):
    refused_here(capsys, ["chat", str(adapters["sft"]), "--base", str(adapters["narrow_base"]), "--prompt", "hi"],
                 f"the adapter {adapters['sft']} does not fit the base {adapters['narrow_base']} (size mismatch")


def chat(adapter, **popen):
    # Standard input decoded strictly, as under a desktop's UTF-8 locale (this machine's C.UTF-8 is lenient).
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "finetune.chat", str(adapter), "--max-new-tokens", "4"],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, **popen)


def test_chat_skips_a_line_that_is_not_utf8_and_answers_the_next(adapters):
    proc = chat(adapters["sft"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, err = proc.communicate(b"caf\xe9 au lait\nWhat is 2 + 3?\n", timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in err, err[-3000:]
    assert b"(that line is not valid UTF-8 text; it is left out)" in err and len(out.splitlines()) == 1


def test_chat_into_a_closed_pipe_and_ctrl_c_on_piped_input_end_quietly(adapters):
    closed = chat(adapters["sft"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    closed.stdout.close()  # the reader went away, as with `| head -c 0`
    _, err = closed.communicate(b"What is 2 + 3?\n", timeout=300)
    assert closed.returncode == 141 and b"Traceback" not in err, err[-3000:]
    waiting = chat(adapters["sft"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    seen = b""
    deadline = time.monotonic() + 300
    while b"chatting with" not in seen:  # loaded, and waiting for a line that never comes
        assert waiting.poll() is None and time.monotonic() < deadline, seen[-2000:]
        seen += waiting.stderr.read1(4096)
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and b"Traceback" not in seen + err, (seen + err)[-3000:]
