"""Evaluation: the rule checkers, suite validation, router figures, and finetune.evaluate on a real SFT
output against its base; the load-balancing loss lowers held-out router imbalance."""

import json
import sys
from pathlib import Path

import pytest
import torch

from finetune.data.rows import DataError
from finetune.evaluate import main as evaluate_main
from finetune.evaluation.rules import check_rule, exact_match
from finetune.evaluation.scoring import heldout_loss
from finetune.evaluation.suite import SuiteError, instruction_rows, load_suite
from helpers import CONVERSATION, OTHER, batch_of, independent_stats, log_history, tiny_overrides

# (rule, a reply that follows it, a reply that does not)
RULES = [
    ({"rule": "case", "value": "upper"}, "PLANET", "Planet"),
    ({"rule": "case", "value": "upper"}, "ÉTÉ 42", "42"),  # no letters at all cannot be upper case
    ({"rule": "case", "value": "lower"}, "erbram", "erbRam"),
    ({"rule": "max_words", "value": 1}, "  95 ", "95 apples"),
    ({"rule": "min_words", "value": 3}, "one two three", "one two"),
    ({"rule": "keywords", "value": ["Paris"]}, "It is paris.", "It is Parisian."),
    ({"rule": "keywords", "value": ["red", "blue"]}, "blue and red", "blue only"),
    ({"rule": "forbidden", "value": ["sorry"]}, "Here it is.", "Sorry, no."),
    ({"rule": "format", "value": "integer"}, "-5", "5.0"),
    ({"rule": "format", "value": "comma_list"}, "f, o, r", "f o r"),
    ({"rule": "format", "value": "comma_list"}, "a, b", "a,b"),
    ({"rule": "format", "value": "single_line"}, "one line", "two\nlines"),
    ({"rule": "starts_with", "value": "Answer:"}, "Answer: 4", "The answer: 4"),
    ({"rule": "ends_with", "value": "."}, "Cairo.", "Cairo"),
]


@pytest.mark.parametrize("rule,good,bad", RULES, ids=[f"{r['rule']}-{i}" for i, (r, _, _) in enumerate(RULES)])
def test_each_rule_passes_good_and_fails_bad_replies(rule, good, bad):
    assert check_rule(good, rule) is True
    assert check_rule(bad, rule) is False


def test_exact_match_ignores_surrounding_space_only():
    assert exact_match(" Paris. ", "Paris.")
    assert not exact_match("paris.", "Paris.")
    assert not exact_match("Paris", "Paris.")


def test_unknown_rule_is_an_error_not_a_fail():
    with pytest.raises(ValueError, match="unknown rule 'shout'"):
        check_rule("x", {"rule": "shout"})


def test_bundled_answers_follow_their_own_rules(repo_root):
    rows = [json.loads(line) for line in (repo_root / "eval" / "instructions.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and {r["lang"] for r in rows} == {"en", "fr", "de", "es", "it"}
    assert len({(r["lang"], r["task"]) for r in rows}) == 5 * 5  # every task family in every language
    for row in rows:
        assert all(check_rule(row["answer"], rule) for rule in row["rules"]), row
    # ... and a wrong answer of each task breaks at least one rule or the exact match.
    assert not check_rule("Planet", rows[0]["rules"][0])


def test_bundled_data_is_what_make_data_writes_and_holds_out_its_prompts(repo_root, tmp_path):
    sys.path.insert(0, str(repo_root / "data"))
    try:
        import make_data
    finally:
        sys.path.remove(str(repo_root / "data"))
    make_data.generate(out=tmp_path / "data", eval_dir=tmp_path / "eval")
    for written in [*(tmp_path / "data").rglob("*.jsonl"), *(tmp_path / "eval").rglob("*.jsonl")]:
        bundled = repo_root / written.relative_to(tmp_path)
        assert written.read_bytes() == bundled.read_bytes(), f"{bundled} differs from data/make_data.py's output"

    def rows(path):
        return [json.loads(line) for line in (repo_root / path).read_text().splitlines()]

    def prompts(path, key):
        return {make_data.prompt_key(row[key]) for row in rows(path)}

    held_out = prompts("data/chat/eval.jsonl", "messages") | prompts("data/preferences/eval.jsonl", "prompt")
    trained = prompts("data/chat/train.jsonl", "messages") | prompts("data/preferences/train.jsonl", "prompt")
    assert held_out and not held_out & trained
    for path in ("data/chat/train.jsonl", "data/preferences/train.jsonl", "data/preferences/eval.jsonl"):
        assert len({(r["lang"], r["task"]) for r in rows(path)}) == 25, path
    german = [r for r in rows("data/chat/train.jsonl") if r["lang"] == "de"]
    assert any("„" in m["content"] and "“" in m["content"] for r in german for m in r["messages"])
    assert make_data.of_country({"country_it": "il Portogallo"}, "it") == "del Portogallo"
    assert make_data.of_country({"country_fr": "les Pays-Bas"}, "fr") == "des Pays-Bas"


def test_suite_errors_name_the_key_or_row(tmp_path):
    with pytest.raises(SuiteError, match="unknown key 'batch'"):
        _suite(tmp_path, "chat: data/chat/eval.jsonl\nbatch: 4")
    with pytest.raises(SuiteError, match="chat: nowhere.jsonl does not exist"):
        _suite(tmp_path, "chat: nowhere.jsonl")
    with pytest.raises(SuiteError, match="nothing to evaluate"):
        _suite(tmp_path, "batch_size: 4")
    rows = tmp_path / "rules.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "x",
                                "rules": [{"rule": "case", "value": "title"}]}) + "\n")
    suite = _suite(tmp_path, f"instructions: {rows}")
    with pytest.raises(DataError, match=r"rules.jsonl:1: rules: case rule needs value"):
        instruction_rows(str(rows), suite)


def _suite(tmp_path, line):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\n{line}\n")
    return load_suite(path)


def test_heldout_router_figures_match_router_logits_and_ignore_padding(tiny_model_dir, encoder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    # Skew layer 0's router towards expert 3 along the mean hidden state it sees.
    seen = []
    handle = model.model.layers[0].mlp.gate.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=batch_of(encoder, CONVERSATION, OTHER)["input_ids"])
    handle.remove()
    direction = seen[0].reshape(-1, seen[0].shape[-1]).mean(0)
    with torch.no_grad():
        model.model.layers[0].mlp.gate.weight[3] = direction / direction.norm() * 50
    samples = [{"input_ids": s.input_ids, "labels": s.labels} for s in (encoder.encode(CONVERSATION), encoder.encode(OTHER))]
    one_batch = heldout_loss(model, samples, batch_size=2, progress=False)["router"]  # right-padded together
    separately = heldout_loss(model, samples, batch_size=1, progress=False)["router"]  # no padding at all
    share, cv, maxvio = independent_stats(model, batch_of(encoder, CONVERSATION, OTHER))
    torch.testing.assert_close(torch.tensor(one_batch["share"], dtype=torch.float64), share)
    torch.testing.assert_close(torch.tensor(one_batch["cv"], dtype=torch.float64), cv)
    torch.testing.assert_close(torch.tensor(one_batch["maxvio"], dtype=torch.float64), maxvio)
    assert one_batch["maxvio"][0] > 0.5 and max(range(4), key=lambda e: one_batch["share"][0][e]) == 3
    for key in ("share", "cv", "maxvio", "entropy"):
        torch.testing.assert_close(torch.tensor(one_batch[key]), torch.tensor(separately[key]))


# ---------------------------------------------------------------------------------------------
# Real runs


def sft_run(model_dir, out, aux: float, steps: int):
    from finetune.sft import main as sft_main

    overrides = tiny_overrides(model_dir, out, max_steps=steps, logging_steps=steps, eval_strategy="steps",
                               eval_steps=steps, learning_rate=0.003, per_device_train_batch_size=8)
    assert sft_main(["recipes/tiny/sft.yaml", *overrides, f"moe.aux_loss_coef={aux}",
                     "data.eval=[{path: data/chat/eval.jsonl, weight: 0.25}]"]) == 0
    return log_history(Path(out))


@pytest.fixture(scope="module")
def sft_adapter(pretrained_tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-eval")
    sft_run(pretrained_tiny_dir, out, aux=0.02, steps=30)
    return out


@pytest.mark.slow  # trains the tiny model 30 steps first (its fixture), then a whole evaluation
def test_evaluate_sft_against_its_base_writes_reports_and_sft_is_better(sft_adapter, pretrained_tiny_dir, tmp_path):
    out = tmp_path / "eval"
    code = evaluate_main([str(sft_adapter), "--suite", "eval/bundled.yaml", "--out", str(out),
                          "--baseline", str(pretrained_tiny_dir), "--reference", str(pretrained_tiny_dir),
                          "limit=48", "max_new_tokens=8"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, base = metrics["model"], metrics["baseline"]
    assert model["heldout"]["loss"] < base["heldout"]["loss"]
    assert metrics["difference"]["held-out loss"] == pytest.approx(model["heldout"]["loss"] - base["heldout"]["loss"])
    assert model["heldout"]["tokens"] == base["heldout"]["tokens"] > 0
    assert model["preferences"]["pairs"] == 48 and model["preferences"]["accuracy"] is not None
    assert base["preferences"]["accuracy"] is None  # the base is its own reference: no reward to speak of
    assert model["generation"]["prompts"] == 48 and 0 <= model["generation"]["rule_pass_rate"] <= 1
    assert len(model["heldout"]["router"]["share"]) == 2  # layers x experts
    report = (out / "report.md").read_text()
    assert "| held-out loss |" in report and "router_load.png" in report
    assert (out / "router_load.png").read_bytes()[:4] == b"\x89PNG"
    generations = (out / "generations.jsonl").read_text().splitlines()
    assert len(generations) == 96 and json.loads(generations[0])["model"] == "model"
    # The training run wrote its own before/after router heatmap (eval at the start and at the end).
    assert (sft_adapter / "router_load.png").read_bytes()[:4] == b"\x89PNG"


def multiple_choice_accuracy(adapter, path: str, limit: int) -> float:
    """Share of questions where the most likely choice is the labelled one: log-likelihood of " choice" after
    "What is the capital of X?\n", summed over the choice's tokens (lm-eval's `multiple_choice` and `acc`)."""
    from finetune.evaluation.loading import load_for_eval

    loaded = load_for_eval(str(adapter))
    model, tokenizer = loaded.model.merge_and_unload(), loaded.encoder.hf_tokenizer
    rows = [json.loads(line) for line in open(path, encoding="utf-8")][:limit]
    correct = 0
    for row in rows:
        context = f"What is the capital of {row['country']}?\n"
        scores = []
        for choice in row["choices"]:
            whole = tokenizer(context + " " + choice)["input_ids"]
            start = len(tokenizer(context)["input_ids"])
            with torch.no_grad():
                log_probs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            scores.append(sum(log_probs[i - 1, whole[i]].item() for i in range(start, len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return correct / len(rows)


@pytest.mark.slow  # trains the tiny model 30 steps first (its fixture), then a whole evaluation
def test_lm_eval_tasks_run_on_local_files_through_the_harness(sft_adapter, tmp_path):
    pytest.importorskip("lm_eval")
    out = tmp_path / "lm"
    assert evaluate_main([str(sft_adapter), "--suite", "eval/bundled.yaml", "--out", str(out), "chat=null",
                          "preferences=null", "instructions=null", "limit=12"]) == 0
    figures = json.loads((out / "metrics.json").read_text())["model"]["lm_eval"]["capitals_mc"]
    assert set(figures) == {"acc"}
    # The same accuracy computed here without the harness: each of the 12 questions answered by the choice whose
    # tokens (after the question and a space) the model finds most likely, as lm-eval's multiple_choice does.
    assert figures["acc"] == pytest.approx(multiple_choice_accuracy(sft_adapter, "eval/lm_eval/capitals_mc.jsonl", 12))
    assert "| lm-eval capitals_mc acc |" in (out / "report.md").read_text()


def test_evaluate_rejects_a_missing_model_with_a_clear_message(tmp_path, capsys):
    from finetune.cli import main as cli_main

    assert cli_main(["evaluate", str(tmp_path / "nothing"), "--suite", "eval/bundled.yaml", "--out",
                     str(tmp_path / "o")]) == 2
    assert f"model={tmp_path / 'nothing'}: no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything was written


@pytest.mark.slow  # pretrains a tiny model and trains it twice (about 40 s)
def test_load_balancing_loss_lowers_heldout_maxvio(pretrained_tiny_dir, tmp_path):
    """The same tiny SFT run with the aux loss off and on: the held-out router imbalance is lower with it."""
    maxvio = {}
    for aux in (0.0, 0.5):
        log = sft_run(pretrained_tiny_dir, tmp_path / f"aux{aux}", aux=aux, steps=20)
        maxvio[aux] = [e["eval_router/maxvio_mean"] for e in log if "eval_router/maxvio_mean" in e]
    print(f"held-out router MaxVio (start, end): aux off {maxvio[0.0]}, aux on {maxvio[0.5]}")
    assert maxvio[0.0][0] == pytest.approx(maxvio[0.5][0])  # same start
    assert maxvio[0.5][-1] < maxvio[0.0][-1]
