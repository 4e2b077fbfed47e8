"""Function calling around training: which format a recipe gets, the tool-call rule, v3 replies decoded with
their control tokens, suites and `finetune chat --tools`."""

import json
from collections import Counter

import pytest

from finetune.data.chat_format import bundled_sentencepiece_path
from finetune.data.chat_format_v3 import ChatEncoderV3
from finetune.evaluation.rules import check_rule, first_tool_call, validate_rules
from finetune.model.tiny import DEFAULT_PRETRAIN_STEPS
from helpers import load_tiny_recipe, refused_here

TOOLS_SFT = "recipes/tiny/sft_tools.yaml"
CALL = {"name": "calculator", "arguments": {"a": 9, "op": "-", "b": 33}}


@pytest.fixture(scope="module")
def v3():
    return ChatEncoderV3(bundled_sentencepiece_path("v3"))


def test_tiny_v3_model_speaks_v3(tiny_v3_model_dir, tmp_path):
    from finetune.data.encoders import encoder_for

    config = json.loads((tiny_v3_model_dir / "config.json").read_text())
    assert config["vocab_size"] == 32768
    encoder = encoder_for(load_tiny_recipe(tmp_path, tiny_v3_model_dir))  # chat_format: auto
    assert encoder.format == "v3" and encoder.vocab_size == 32768
    saved = json.loads((tiny_v3_model_dir / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 65536
    assert "[AVAILABLE_TOOLS]" in (tiny_v3_model_dir / "chat_template.jinja").read_text()


def test_check_says_which_format_the_recipe_trains_and_shows_the_trained_call(tiny_v3_model_dir, tmp_path, capsys):
    from helpers import run_here

    out = run_here(capsys, ["check", TOOLS_SFT, f"model={tiny_v3_model_dir}", f"output_dir={tmp_path / 'out'}",
                            "data.train=[{path: data/tools/eval.jsonl}]", "data.eval=[]", "data.eval_fraction=0"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "format     Mixtral-Instruct v3 (Mixtral 8x22B)" in out.stdout
    assert "[/INST]⟦[TOOL_CALLS] [{\"name\": " in out.stdout  # the call is trained, from its control token on


def test_recipe_format_refusals_name_the_key_and_the_fix(tiny_model_dir, tmp_path):
    from finetune.data.encoders import encoder_for
    from finetune.recipe.schema import RecipeError

    with pytest.raises(RecipeError, match=r"chat_format: .* is not a v3 tokenizer .* set chat_format to auto or v1"):
        encoder_for(load_tiny_recipe(tmp_path, tiny_model_dir, "chat_format=v3"))
    # A v3-vocabulary model with a v1 tokenizer: every id would mean another word to it.
    folder = tmp_path / "v3-model-v1-tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"vocab_size": 32768}))
    with pytest.raises(RecipeError, match=r"Mixtral 8x22B's vocabulary \(32768\) but tokenizer .* \(v1\)"):
        encoder_for(load_tiny_recipe(tmp_path, folder, f"tokenizer={bundled_sentencepiece_path()}"))


@pytest.mark.parametrize("reply, expected", [
    ('[TOOL_CALLS][{"name": "calculator", "arguments": {"a": 9, "op": "-", "b": 33}, "id": "x1y2z3abc"}]', True),
    ('[TOOL_CALLS] [{"name": "calculator", "arguments": {"b": 33, "op": "-", "a": 9}}]', True),  # key order free
    ('[TOOL_CALLS][{"name": "calculator", "arguments": {"a": 9, "op": "+", "b": 33}}]', False),
    ('[TOOL_CALLS][{"name": "capital_of", "arguments": {"a": 9, "op": "-", "b": 33}}]', False),
    ('[{"name": "calculator", "arguments": {"a": 9, "op": "-", "b": 33}}]', False),  # no [TOOL_CALLS]: text
    ('[TOOL_CALLS][{"name": "calculator", "arguments": {"a": 9, "op": "-", "b": 3', False),  # cut short
    ("-24", False),
])
def test_tool_call_rule(reply, expected):
    assert check_rule(reply, {"rule": "tool_call", "value": CALL}) is expected


def test_tool_call_figures_separate_form_function_and_arguments():
    from finetune.evaluation.run import tool_call_figures

    rule = {"rule": "tool_call", "value": CALL}
    rows = [{"rules": [rule]}] * 4 + [{"rules": [{"rule": "max_words", "value": 1}]}]
    replies = ['[TOOL_CALLS][{"name": "calculator", "arguments": {"a": 9, "op": "-", "b": 33}}]',  # right
               '[TOOL_CALLS][{"name": "calculator", "arguments": {"a": 9, "op": "+", "b": 33}}]',  # wrong arguments
               '[TOOL_CALLS][{"name": "capital_of", "arguments": {}}]',  # wrong function
               '[TOOL_CALLS][{"name": "calculator", "arguments": {"a": 9',  # not JSON
               "-24"]  # a row without the rule: not counted
    assert tool_call_figures(rows, replies) == {"tool_call_well_formed": 0.75, "tool_call_right_function": 0.5,
                                                "tool_call_accuracy": 0.25}
    assert tool_call_figures(rows[4:], replies[4:]) == {}


def test_tool_call_rule_value_is_checked_when_the_suite_loads():
    assert "tool_call rule needs value" in validate_rules([{"rule": "tool_call", "value": "calculator"}], "rules")
    assert validate_rules([{"rule": "tool_call", "value": CALL}], "rules") is None


def test_v3_decode_writes_the_call_marker_that_the_rule_reads(v3):
    ids = v3.reply_ids([{**CALL, "id": "abc123def"}])[:-1]  # generated ids before EOS
    assert v3.sp.decode(ids).startswith("[{")  # SentencePiece alone drops the control token
    text = v3.decode(ids)
    assert text.startswith("[TOOL_CALLS][{") and first_tool_call(text) == (CALL["name"], CALL["arguments"])
    assert v3.decode(v3.text_ids("Paris.")) == "Paris."


def test_tool_suite_rows_load_and_v1_models_are_refused(tiny_model_dir, tmp_path, capsys):
    from finetune.evaluation.suite import instruction_rows, load_suite

    suite = load_suite("eval/tools.yaml")
    rows = instruction_rows(suite.instructions, suite)
    assert len(rows) == 200 and all(r["prompt"].tools and r["rules"][0]["rule"] == "tool_call" for r in rows)
    refused_here(capsys, ["evaluate", tiny_model_dir, "--suite", "eval/tools.yaml", "--out", tmp_path / "e",
                          "limit=2"], "speaks the v1 chat format", code=2)


@pytest.mark.parametrize("content, names", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ('[{"type": "function", "function": {"description": "x"}}]', "tools[0] has no function name"),
    ("[]", "no tools in the list"),
])
def test_chat_tools_file_refusals(tiny_v3_model_dir, tmp_path, capsys, content, names):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    refused_here(capsys, ["chat", tiny_v3_model_dir, "--tools", path, "--prompt", "hi"], f"--tools {path}: {names}")


def test_chat_tools_need_a_v3_model(tiny_model_dir, tmp_path, capsys):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps([{"type": "function", "function": {"name": "f", "parameters": {}}}]))
    refused_here(capsys, ["chat", tiny_model_dir, "--tools", path, "--prompt", "hi"], "function calling needs a v3 model")


@pytest.mark.slow
def test_tiny_v3_pipeline_learns_to_call_tools(tmp_path_factory):
    """SFT then DPO on the bundled function-calling rows with a tiny v3 model: DPO starts at ln 2 on tool pairs,
    the export of the DPO adapter verifies, and SFT calls the tools right more often than the base does."""
    import math

    from finetune.dpo import build as build_dpo
    from finetune.dpo import main as dpo_main
    from finetune.evaluate import main as evaluate_main
    from finetune.export import main as export_main
    from finetune.model.tiny import make_tiny_mixtral
    from finetune.recipe.loading import load_recipe
    from finetune.sft import main as sft_main
    from helpers import tiny_overrides

    root = tmp_path_factory.mktemp("tools")
    base = make_tiny_mixtral(root / "base", seed=0, chat_format="v3", pretrain_steps=PIPELINE["pretrain"])
    sft, dpo = root / "sft", root / "dpo"
    common = ["data.max_length=512", "moe.aux_loss_coef=0"]
    assert sft_main(["recipes/tiny/sft_tools.yaml", *tiny_overrides(base, sft, max_steps=PIPELINE["sft"],
                                                                     learning_rate=3e-3), *common]) == 0
    dpo_args = [*tiny_overrides(base, dpo, max_steps=PIPELINE["dpo"], learning_rate=5e-4), *common,
                f"dpo.sft_adapter={sft}"]
    trainer, _ = build_dpo(load_recipe("recipes/tiny/dpo_tools.yaml", dpo_args, expect_kind="dpo"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch_no_grad():
        loss = trainer.compute_loss(trainer.model.eval(), dict(batch))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-5)  # the policy is the reference at step 0
    del trainer
    assert dpo_main(["recipes/tiny/dpo_tools.yaml", *dpo_args]) == 0
    assert export_main([str(dpo), "--out", str(root / "merged")]) == 0  # verifies the logits by default
    assert json.loads((root / "merged" / "config.json").read_text())["vocab_size"] == 32768
    out = root / "eval"
    assert evaluate_main([str(sft), "--suite", "eval/tools.yaml", "--out", str(out), "--baseline", str(base),
                          f"limit={PIPELINE['eval_rows']}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, baseline = metrics["model"]["generation"], metrics["baseline"]["generation"]
    # The base, which never saw [INST], makes no call. After SFT most replies are well-formed calls, and to the
    # function the question wants more often than calling the commonest one every time would manage: the model
    # reads the question. Exact arguments need numbers and words copied from it, which this 64-wide model does
    # not learn in the test's steps (it writes the same arguments whatever it is asked): that figure may only
    # not fall.
    rows = [json.loads(line) for line in (repo_root() / "eval/tool_calls.jsonl").read_text().splitlines()]
    wanted = Counter(row["rules"][0]["value"]["name"] for row in rows[: PIPELINE["eval_rows"]])
    one_function_for_all = wanted.most_common(1)[0][1] / PIPELINE["eval_rows"]
    assert model["tool_call_well_formed"] >= 0.5 > baseline["tool_call_well_formed"], (model, baseline)
    assert model["tool_call_right_function"] > max(0.5, one_function_for_all), (model, one_function_for_all)
    assert model["tool_call_right_function"] > baseline["tool_call_right_function"], (model, baseline)
    assert model["tool_call_accuracy"] >= baseline["tool_call_accuracy"]
    # finetune chat --tools gives the reply evaluate generated for the same question, and goes on from a result.
    alone = {row["messages"][0]["content"] for row in rows if len(row["messages"]) == 1}  # no system, no history
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    generated = next(r for r in records if r["model"] == "model" and first_tool_call(r["reply"]) is not None
                     and r["prompt"] in alone)
    tools = root / "tools.json"
    tools.write_text(json.dumps(rows[0]["tools"]))
    chat_session_follows_a_call(sft, tools, generated)


PIPELINE = {"pretrain": DEFAULT_PRETRAIN_STEPS["v3"], "sft": 100, "dpo": 5, "eval_rows": 30}  # the shipped base


def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def chat_session_follows_a_call(adapter, tools_file, generated):
    """A one-shot reply equal to evaluate's generation (a tool call), then a piped session: the question,
    the call shown, the result read as the next line, and the model's next turn generated from it."""
    import io

    from finetune.chat import ChatSession, interactive, read_tools
    from finetune.evaluation.loading import load_for_eval

    session = ChatSession(load_for_eval(str(adapter)), max_new_tokens=64, tools=read_tools(str(tools_file)))
    out, notices = io.StringIO(), io.StringIO()
    assert session.reply(generated["prompt"], out, notices) == generated["reply"]
    assert "(tool call: " in notices.getvalue() and len(session.pending) == 1
    session.reset()
    out, notices = io.StringIO(), io.StringIO()
    interactive(session, io.StringIO(generated["prompt"] + "\n" + '{"result": 7}' + "\n"), out, notices)
    roles = [m["role"] for m in session.turns]
    assert roles == ["user", "assistant", "tool", "assistant"] and session.pending == []
    assert session.turns[2] == {"role": "tool", "content": {"result": 7}, "call_id": session.turns[1]["tool_calls"][0]["id"]}
    assert out.getvalue().count("\n") == 2  # two replies, each ended by a newline


def torch_no_grad():
    import torch

    return torch.no_grad()
