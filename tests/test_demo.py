"""The embedded default end to end: base -> SFT -> DPO -> export -> evaluation -> report, with the
orderings the demo exists to show (smaller settings than `finetune demo`)."""

import json

import pytest

from finetune.demo import main as demo_main


@pytest.mark.slow
def test_demo_shows_each_step_helped(tmp_path, capsys):
    out = tmp_path / "demo"
    code = demo_main(["--out", str(out), "--pretrain-steps", "400", "--sft-steps", "250", "--dpo-steps", "60"])
    last_line = capsys.readouterr().out.rstrip().splitlines()[-1]
    summary = json.loads((out / "summary.json").read_text())
    base, sft, dpo = (summary["results"][m] for m in ("base", "SFT", "DPO"))
    print({m: (r["heldout"]["loss"], r["generation"]["exact_match"], r["preferences"]["logp_accuracy"])
           for m, r in summary["results"].items()})
    assert sft["heldout"]["loss"] < base["heldout"]["loss"]
    assert sft["generation"]["rule_pass_rate"] > base["generation"]["rule_pass_rate"] + 0.2
    assert sft["generation"]["exact_match"] >= base["generation"]["exact_match"]
    assert dpo["preferences"]["logp_accuracy"] > sft["preferences"]["logp_accuracy"]
    assert summary["export_max_logit_difference"] <= 1e-3
    assert code == 0 and all(check["passed"] for check in summary["checks"])
    report = (out / "report.md").read_text()
    for name in ("sft_loss.png", "dpo_loss.png", "router_load.png"):
        assert name in report and (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| held-out loss |" in report and "| exact match |" in report
    assert (out / "merged" / "config.json").is_file() and (out / "eval" / "dpo" / "generations.jsonl").is_file()
    # Per language: the three models' figures, and base vs SFT routing heatmaps (one panel per language).
    for lang in ("en", "fr", "de", "es", "it"):
        for model in ("base", "SFT", "DPO"):
            loss = summary["results"][model]["heldout"]["by_group"]["lang"][lang]["loss"]
            assert f"| {lang} | {model} | {loss:.4f} |" in report
    assert (out / "router_by_lang.png").read_bytes()[:4] == b"\x89PNG" and "router_by_lang.png" in report
    gap = summary["results"]["SFT"]["heldout"]["routing_by_group"]["lang"]["gap"]
    assert f"SFT {gap:.3f}" in report
    assert last_line == f"talk to the DPO model: python -m finetune.chat {out / 'merged'}"
