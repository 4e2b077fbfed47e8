"""finetune.chat: one-shot replies equal finetune.evaluate's greedy generations (model and adapter), a
multi-turn session read from stdin feeds the model the encoder's ids for the whole conversation, EOS ends a
reply, and a conversation longer than the model's context is refused with the sizes."""

import io
import json
import shutil

import pytest
import torch
from torch import nn

from finetune.chat import ContextFull
from finetune.chat import main as chat_main
from finetune.evaluate import main as evaluate_main


class PrefillIds:
    """Records, for every forward of any Mixtral in this process, the token ids its embedding reads (a global
    torch hook: the chat command loads its own model)."""

    def __init__(self, vocab_size: int):
        self.calls: list[list[int]] = []
        self.vocab_size = vocab_size

    def __enter__(self):
        def hook(module, args):
            if isinstance(module, nn.Embedding) and module.num_embeddings == self.vocab_size:
                self.calls.append(args[0][0].tolist())

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()

    @property
    def prefills(self) -> list[list[int]]:
        """The prompt of each generate() call (its first forward reads more than one token)."""
        return [ids for ids in self.calls if len(ids) > 1]


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with non-zero weights (so it changes the replies), recording its base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = tmp_path_factory.mktemp("chat") / "adapter"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_one_shot_reply_equals_evaluate_greedy_generation(kind, tiny_model_dir, adapter_dir, tmp_path, capsys):
    path = str(tiny_model_dir if kind == "model" else adapter_dir)
    rows = [json.loads(line) for line in open("eval/instructions.jsonl", encoding="utf-8")]
    rows = [r for r in rows if r["messages"][0]["role"] == "user" and len(r["messages"]) == 1][:3]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "suite.yaml").write_text(f"name: chat\ninstructions: {tmp_path / 'prompts.jsonl'}\n"
                                         "max_new_tokens: 24\nbatch_size: 3\n")
    assert evaluate_main([path, "--suite", str(tmp_path / "suite.yaml"), "--out", str(tmp_path / "eval")]) == 0
    generations = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    capsys.readouterr()
    for record in generations:
        assert chat_main([path, "--prompt", record["prompt"], "--max-new-tokens", "24"]) == 0
        assert capsys.readouterr().out == record["reply"] + "\n"
    assert len({r["reply"] for r in generations}) > 1  # the replies depend on the prompt


def chain_model(source, folder, encoder, prompt_end: int, chain: list[int]) -> None:
    """A copy of a tiny Mixtral whose next token depends only on the current one (attention and experts add
    nothing), wired so that `prompt_end` -> chain[0] -> chain[1] -> ... with large margins."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    links = list(zip([prompt_end] + chain, chain))
    dims = {token: i for i, token in enumerate(dict.fromkeys(current for current, _ in links))}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for token, dim in dims.items():  # each token of the chain is its own direction ...
            embed[token] = 0.0
            embed[token, dim] = 1.0
        for _, following in links:
            head[following] = 0.0
        for current, following in links:  # ... which the head reads as "the next token is `following`"
            head[following, dims[current]] = 100.0
    model.save_pretrained(folder)


PROMPT = "Say hello."
REPLY = "Hello world"


@pytest.fixture(scope="module")
def hello_dir(tiny_model_dir, encoder, tmp_path_factory):
    """A tiny Mixtral that answers every prompt "Hello world", then EOS."""
    folder = tmp_path_factory.mktemp("chat") / "hello"
    prompt_end = encoder.encode_prompt([{"role": "user", "content": PROMPT}])[-1]  # every prompt ends [/INST]
    chain_model(tiny_model_dir, folder, encoder, prompt_end, encoder.text_ids(REPLY) + [encoder.eos_id])
    return folder


def test_eos_ends_the_reply(hello_dir, tiny_model_dir, encoder, tmp_path, capsys):
    with PrefillIds(encoder.vocab_size) as seen:
        assert chat_main([str(hello_dir), "--prompt", PROMPT, "--max-new-tokens", "50"]) == 0
    out = capsys.readouterr()
    assert out.out == REPLY + "\n" and "cut" not in out.err
    assert len(seen.calls) == len(encoder.text_ids(REPLY)) + 1  # one forward per token up to EOS, then no more
    # A chain that loops back instead of reaching EOS runs on to the token limit, and says so.
    words = encoder.text_ids(REPLY)
    prompt_end = encoder.encode_prompt([{"role": "user", "content": PROMPT}])[-1]
    chain_model(tiny_model_dir, tmp_path / "no-eos", encoder, prompt_end, words + words[:1])
    assert chat_main([str(tmp_path / "no-eos"), "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    assert "reply cut at 5 tokens" in capsys.readouterr().err


def test_multi_turn_stdin_session_sends_the_whole_conversation(hello_dir, encoder, monkeypatch, capsys):
    system = "Reply briefly and exactly."
    turns = ["What is 12 + 30?", "Écris « pomme » en majuscules.", "Wie viel ist 3 × 4?"]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{turns[0]}\n{turns[1]}\n/reset\n{turns[2]}\n/exit\nnever read\n"))
    with PrefillIds(encoder.vocab_size) as seen:
        assert chat_main([str(hello_dir), "--system", system]) == 0
    out = capsys.readouterr()
    assert out.out == f"{REPLY}\n" * 3 and "(new conversation)" in out.err
    first = [{"role": "system", "content": system}, {"role": "user", "content": turns[0]}]
    second = first + [{"role": "assistant", "content": REPLY}, {"role": "user", "content": turns[1]}]
    after_reset = [{"role": "system", "content": system}, {"role": "user", "content": turns[2]}]
    assert seen.prefills == [encoder.encode_prompt(first), encoder.encode_prompt(second),
                             encoder.encode_prompt(after_reset)]


def test_context_limit_is_refused_or_caps_the_reply(tiny_model_dir, encoder, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "short"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    long_prompt = "word " * 60
    with pytest.raises(ContextFull, match=r"does not fit: the conversation with it is \d+ tokens and the model reads "
                                        r"at most 40"):
        chat_main([str(folder), "--prompt", long_prompt])
    prompt = "What is 12 + 30?"
    room = 40 - len(encoder.encode_prompt([{"role": "user", "content": prompt}]))
    assert chat_main([str(folder), "--prompt", prompt, "--max-new-tokens", "100"]) == 0
    err = capsys.readouterr().err
    assert f"only {room} tokens of the model's 40-token context are left" in err
    assert f"reply cut at {room} tokens, before the model ended it; the context is full" in err
    # In a session the refusal is a notice, and the session goes on.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{long_prompt}\n{prompt}\n"))
    assert chat_main([str(folder), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert "does not fit" in out.err and len(out.out.splitlines()) == 1


def test_bad_options_fail_before_loading(tmp_path):
    from finetune.cli import run_guarded

    assert run_guarded(chat_main, [str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert run_guarded(chat_main, [str(tmp_path), "--temperature", "-1"]) == 2
    assert run_guarded(chat_main, [str(tmp_path), "--max-new-tokens", "0"]) == 2
