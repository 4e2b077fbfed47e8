"""What several test modules share, in one place: tiny-run overrides and trainers, the training log a run
wrote, the commands run as a user runs them, small batches, independent router statistics, and seeded random
conversations. (The loopback Hub server the push tests talk to is tests/hub_server.py.)"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
FINETUNE = Path(sys.executable).parent / "finetune"  # the console script, next to this interpreter
SFT_RECIPE = "recipes/tiny/sft.yaml"


# ---------------------------------------------------------------------------------------------
# Tiny runs


def tiny_overrides(model_dir, output_dir, **train):
    """Overrides that make recipes/tiny/sft.yaml (or a GPU recipe) a quick test run on the CPU."""
    items = [f"model={model_dir}", f"output_dir={output_dir}", "resume=never", "launch=null", "device=cpu",
             "attn_implementation=sdpa"]
    defaults = {"max_steps": 4, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no"}
    items += [f"train.{k}={v}" for k, v in {**defaults, **train}.items()]
    return items


def load_tiny_recipe(tmp_path, model, *overrides, path=SFT_RECIPE):
    """A recipe (SFT's tiny one unless `path`) on `model`, parsed as the commands parse it, nothing built."""
    from finetune.recipe.loading import load_recipe

    return load_recipe(path, [f"model={model}", f"output_dir={tmp_path / 'out'}", "resume=never", *overrides])


def make_trainer(model_dir, out, *extra, **train):
    """(recipe, trainer, encoder) of the tiny SFT recipe, built as `finetune sft` builds it, not trained."""
    from finetune.recipe.loading import load_recipe
    from finetune.sft import build

    recipe = load_recipe(SFT_RECIPE, tiny_overrides(model_dir, out, **train) + list(extra), expect_kind="sft")
    trainer, encoder = build(recipe)
    return recipe, trainer, encoder


def overrides_for(model_dir, out, data, *extra, **train):
    """`tiny_overrides` with `data` as the only training file and a constant learning rate (3 steps)."""
    base = {"max_steps": 3, "learning_rate": 0.01, "warmup_steps": 0, "lr_scheduler_type": "constant"}
    items = tiny_overrides(model_dir, out, **{**base, **train})
    return items + [f"data.train=[{{path: {data}}}]", "data.eval=[]", "data.eval_fraction=0", *extra]


def launch(kind, recipe, overrides, config="recipes/accelerate/cpu_zero3.yaml", timeout=600):
    """One pass on the 2 CPU processes of an accelerate `config`, through tests/zero3_driver.py (which also
    writes what each rank holds); a hang (e.g. mismatched collectives) fails at the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = ["accelerate", "launch", "--config_file", config, "tests/zero3_driver.py", kind, recipe,
               *map(str, overrides)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def assert_same_as_one_process(launched, model_dir, data, common, single):
    """The 2-process run (micro-batch 2) trained what one process with micro-batch 4 trains."""
    import pytest
    from safetensors.torch import load_file

    from finetune.sft import main as sft_main

    assert sft_main([SFT_RECIPE, *overrides_for(model_dir, single, data, *common, per_device_train_batch_size=4)]) == 0
    a, b = load_file(launched / "adapter_model.safetensors"), load_file(single / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=key)
    losses = lambda out: [h["loss"] for h in log_history(out) if "loss" in h]  # noqa: E731
    assert losses(launched) == pytest.approx(losses(single), rel=1e-4)


def log_history(folder) -> list[dict]:
    """The log lines a finished run wrote (`trainer_state.json`'s `log_history`)."""
    return json.loads((Path(folder) / "trainer_state.json").read_text())["log_history"]


def logged(folder, key: str) -> list[float]:
    """Every logged value of `key`, in order (e.g. "loss", "dpo_loss", "eval_loss")."""
    return [line[key] for line in log_history(folder) if key in line]


# ---------------------------------------------------------------------------------------------
# Commands as a user runs them


def run_command(args: list[str], cwd=ROOT, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`finetune X ...` (args[0] == "finetune": the console script) or `python -m MODULE ...` (args[0] the
    module), offline, in a new process; its output captured."""
    command = [str(FINETUNE), *args[1:]] if args[0] == "finetune" else [sys.executable, "-m", *map(str, args)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)


def run_here(capsys, argv: list[str]) -> SimpleNamespace:
    """`finetune ARGV` in this process, as the console script runs it (errors caught to one line), run from
    the repository root: its exit code, stdout and stderr, in the shape of `run_command`'s result. A process
    start costs seconds of imports; the refusals it runs are the same code."""
    from finetune.cli import main

    capsys.readouterr()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        code = main([str(arg) for arg in argv])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_refused(proc: subprocess.CompletedProcess, names: str, code: int = 2) -> str:
    """The command ended with exactly one `error:` line containing `names`, exit `code`, no traceback."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    assert proc.returncode == code, output[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert names in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Batches and router statistics computed without the toolkit

CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
OTHER = [{"role": "user", "content": "Reverse the word 'stone'."}, {"role": "assistant", "content": "enots"}]


def batch_of(encoder, *conversations, pad_to=None):
    samples = [encoder.encode(c) for c in conversations]
    length = pad_to or max(len(s.input_ids) for s in samples)
    ids = torch.tensor([s.input_ids + [0] * (length - len(s.input_ids)) for s in samples])
    labels = torch.tensor([s.labels + [-100] * (length - len(s.labels)) for s in samples])
    mask = torch.tensor([[1] * len(s.input_ids) + [0] * (length - len(s.input_ids)) for s in samples])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


CONVERSATION = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]
OTHER = [{"role": "user", "content": "Reverse the word 'stone'."}, {"role": "assistant", "content": "enots"}]


def independent_stats(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    real = batch["attention_mask"].reshape(-1).bool()
    rows = []
    for layer in out.router_logits:
        chosen = layer[real].topk(2, dim=-1).indices.reshape(-1)
        rows.append(torch.bincount(chosen, minlength=layer.shape[-1]).double())
    counts = torch.stack(rows)
    mean = counts.mean(-1)
    return counts / counts.sum(-1, keepdim=True), counts.std(-1, unbiased=False) / mean, counts.max(-1).values / mean - 1


# ---------------------------------------------------------------------------------------------
# Seeded random conversations (tokenizer parity)

PLAIN_WORDS = (
    "the model answers what is two plus three café naïve über straße Mixtral expert routing "
    "bonjour comment ça va très bien merci 日本語 テキスト 中文 한국어 Ελληνικά русский 🤖 🚀 ✓ "
    "def return x = 1 print(x) {\"key\": [1, 2]} 3.14159 -42 1e-5 100% #tag @user a/b\\c"
).split()
# Text that must stay plain: spellings of special tokens and the instruction markers.
LOOKALIKES = ["</s>", "<s>", "[INST]", "[/INST]", "<unk>", "<<SYS>>", "<0x0A>", "▁"]
SPACES = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\n    ", "\t", " \n", "\u00a0", "\r\n"]


def random_text(rng: random.Random, lookalikes: bool) -> str:
    parts = []
    for _ in range(rng.randint(1, 14)):
        if lookalikes and rng.random() < 0.15:
            parts.append(rng.choice(LOOKALIKES))
        else:
            parts.append(rng.choice(PLAIN_WORDS))
        parts.append(rng.choice(SPACES) if lookalikes else rng.choice(SPACES[:2] + ["\n", "\n    "]))
    text = "".join(parts)
    if lookalikes and rng.random() < 0.3:
        text = rng.choice(SPACES) + text  # leading whitespace
    else:
        text = text.strip() or "x"
    return text


def random_conversation(rng: random.Random, lookalikes: bool = False, end_with_assistant: bool = True) -> list[dict]:
    messages = []
    if rng.random() < 0.4:
        messages.append({"role": "system", "content": random_text(rng, lookalikes)})
    turns = rng.randint(1, 4)
    for t in range(turns):
        messages.append({"role": "user", "content": random_text(rng, lookalikes)})
        if t < turns - 1 or end_with_assistant:
            messages.append({"role": "assistant", "content": random_text(rng, lookalikes)})
    return messages


V3_LOOKALIKES = LOOKALIKES + ["[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/TOOL_RESULTS]", "[control_12]",
                               "[REFERENCE_DOC_3]", '{"name": "x"}', "[IMG]"]
TOOL_NAMES = ["get_weather", "convertir_devise", "buche_zug", "traducir", "cerca_libro", "sum"]


def random_tool(rng: random.Random, name: str) -> dict:
    properties = {f"arg{k}": {"type": rng.choice(["string", "number"]), "description": random_text(rng, False)}
                  for k in range(rng.randint(0, 3))}
    function = {"name": name, "description": random_text(rng, False),
                "parameters": {"type": "object", "properties": properties, "required": sorted(properties)[:1]}}
    if rng.random() < 0.2:
        del function["description"]
    return {"type": "function", "function": function}


def random_arguments(rng: random.Random, lookalikes: bool) -> str:
    """JSON text with the spacing a dataset might have: v3 re-dumps it with its own."""
    value = {f"arg{k}": rng.choice([random_text(rng, lookalikes), rng.randint(-5, 500), 2.5, True, None, ["a", 1]])
             for k in range(rng.randint(0, 3))}
    return json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 2]))


def random_tool_row(rng: random.Random, lookalikes: bool = False, end_with_assistant: bool = True) -> dict:
    """A function-calling row in OpenAI's shape, with 9-character call ids (v3's own form): tools, an optional
    system message, turns of user, then text or calls and their results (several per turn, any order)."""
    tools = [random_tool(rng, name) for name in rng.sample(TOOL_NAMES, rng.randint(1, 3))]
    messages = [{"role": "system", "content": random_text(rng, lookalikes)}] if rng.random() < 0.4 else []
    turns = rng.randint(1, 3)
    for t in range(turns):
        messages.append({"role": "user", "content": random_text(rng, lookalikes)})
        last = t == turns - 1
        for _ in range(rng.choice([0, 1, 1, 2])):  # rounds of calls and results
            calls = [{"id": "".join(rng.choice("abcdefXYZ0123456789") for _ in range(9)), "type": "function",
                      "function": {"name": rng.choice(tools)["function"]["name"],
                                   "arguments": random_arguments(rng, lookalikes)}}
                     for _ in range(rng.randint(1, 3))]
            messages.append({"role": "assistant", "tool_calls": calls})
            if last and not end_with_assistant and rng.random() < 0.3:
                return {"tools": tools, "messages": messages[:-1]}  # a prompt ending with a user turn
            for call in rng.sample(calls, len(calls)):
                content = rng.choice([random_text(rng, lookalikes), json.dumps({"ok": rng.randint(0, 9)}), "42"])
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": content})
        if not last or end_with_assistant:
            messages.append({"role": "assistant", "content": random_text(rng, lookalikes)})
    if end_with_assistant and rng.random() < 0.3:  # end on a call: what the model learns to emit
        messages.append({"role": "user", "content": random_text(rng, lookalikes)})
        messages.append({"role": "assistant", "tool_calls": [{"id": "abc123XYZ", "type": "function", "function": {
            "name": tools[0]["function"]["name"], "arguments": random_arguments(rng, lookalikes)}}]})
    return {"tools": tools, "messages": messages}


def refused_here(capsys, argv: list[str], names: str, code: int = 2) -> str:
    """`finetune ARGV` run in this process ended with exactly one `error:` line containing `names`, exit `code`
    and no traceback (any other exception would fail the test with its traceback)."""
    return assert_refused(run_here(capsys, argv), names, code)


def nonzero_adapter(base, out):
    """A non-zero SFT adapter on attention, experts and router of `base` (3 steps at a high learning rate)."""
    from finetune.sft import main as sft_main

    assert sft_main(["recipes/tiny/sft.yaml", *tiny_overrides(base, out, max_steps=3, learning_rate=0.05)]) == 0
    return out
