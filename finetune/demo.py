"""The whole Mixtral-Instruct pipeline on a laptop CPU in minutes: tiny base -> SFT -> DPO -> merged
export -> evaluation of base, SFT and DPO -> report.

    python -m finetune.demo [--out runs/demo]          (or: finetune demo)

Every stage runs the same recipes and modules a GPU user runs, with the `recipes/tiny/` values:
`finetune.tiny` (a seeded tiny Mixtral, pretrained briefly on the bundled text), `finetune.sft` on
recipes/tiny/sft.yaml (LoRA on attention, experts and router, load-balancing loss), `finetune.dpo` on
recipes/tiny/dpo.yaml from the SFT adapter, `finetune.export` (merge + verification), and
`finetune.evaluate` on eval/bundled.yaml (held-out data the training never sees), with the base as the
preference reference for all three models, per language and task family too (with the routing of base
and SFT per language). Writes DIR/report.md with its plots and DIR/summary.json, and ends with the command
that opens `finetune chat` on the merged DPO model;
exits 1 if the merged export does not reproduce base + adapter or a model did not improve on the one
before it (SFT on the base: held-out loss and the instruction rules its replies follow; DPO on SFT:
preference accuracy, measured reference-free as how often the preferred reply is the more likely one, which compares all three models
on the same footing; the reward accuracy against the base is reported beside it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from finetune.cli import invoked_as
from finetune.evaluation.plots import log_series, loss_curves, router_heatmaps
from finetune.evaluation.report import (
    comparison_rows,
    group_rows,
    group_sections,
    markdown_table,
    text_table,
)
from finetune.evaluation.run import evaluate
from finetune.evaluation.suite import load_suite

SUITE = "eval/bundled.yaml"
MODELS = ("base", "SFT", "DPO")


def stage(number: int, name: str, what: str) -> None:
    print(f"\n[{number}/6] {name}: {what}", flush=True)


def training_figures(folder: Path) -> dict:
    """Mean logged training tokens/s and the log history of a finished SFT or DPO run."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    rates = [entry["tokens_per_second"] for entry in history if "tokens_per_second" in entry]
    return {"history": history, "tokens_per_second": sum(rates) / len(rates) if rates else None}


def run_stage(timings: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    timings[name] = {"seconds": time.perf_counter() - start}
    return result


def checks(results: dict, export_diff: float, tolerance: float) -> list[tuple[str, bool]]:
    base, sft, dpo = (results[m] for m in MODELS)
    return [
        (f"SFT beats the base on held-out loss ({sft['heldout']['loss']:.3f} < {base['heldout']['loss']:.3f})",
         sft["heldout"]["loss"] < base["heldout"]["loss"]),
        # Rules followed, not exact match: at this size exact answers are 0-4 of 200 prompts, and whether SFT
        # gets 0 or 2 of them varies between CPUs; the rules (format, case, length, keywords) move 0.2 -> 0.8.
        (f"SFT beats the base on its generated replies: instruction rules followed "
         f"({sft['generation']['rule_pass_rate']:.3f} > {base['generation']['rule_pass_rate']:.3f}), exact match "
         f"not lower ({sft['generation']['exact_match']:.3f} >= {base['generation']['exact_match']:.3f})",
         sft["generation"]["rule_pass_rate"] > base["generation"]["rule_pass_rate"]
         and sft["generation"]["exact_match"] >= base["generation"]["exact_match"]),
        (f"DPO beats SFT on preference accuracy: the preferred reply is the more likely one "
         f"({dpo['preferences']['logp_accuracy']:.3f} > {sft['preferences']['logp_accuracy']:.3f})",
         dpo["preferences"]["logp_accuracy"] > sft["preferences"]["logp_accuracy"]),
        (f"merged export reproduces base + DPO adapter (max |logit difference| {export_diff:.1e} <= {tolerance:g})",
         export_diff <= tolerance),
    ]


def write_report(out: Path, results: dict, timings: dict, passed: list, sft: dict, dpo: dict, total: float) -> Path:
    loss_curves([("train loss", log_series(sft["history"], "loss")),
                 ("held-out loss", log_series(sft["history"], "eval_loss"))], out / "sft_loss.png", "SFT")
    loss_curves([("train DPO loss", log_series(dpo["history"], "dpo_loss")),
                 ("held-out DPO loss", log_series(dpo["history"], "eval_dpo_loss")),
                 ("held-out preference accuracy", log_series(dpo["history"], "eval_rewards/accuracies"))],
                out / "dpo_loss.png", "DPO", ylabel="loss / accuracy")
    router_heatmaps([(f"{m}\nMaxVio {results[m]['heldout']['router']['maxvio_mean']:.2f}",
                      results[m]["heldout"]["router"]["share"]) for m in MODELS], out / "router_load.png")
    columns = [(m, results[m]) for m in MODELS]
    stage_rows = [[name, f"{t['seconds']:.1f}", f"{t['tokens_per_second']:,.0f}" if t.get("tokens_per_second") else "",
                   t.get("output", "")] for name, t in timings.items()]
    lines = [
        "# Mixtral-Instruct pipeline on a tiny Mixtral", "",
        f"Tiny base -> SFT -> DPO -> merged export -> evaluation, in {total / 60:.1f} minutes. Held-out data only: "
        f"suite `{SUITE}` (the training never sees these prompts); preference rewards are against the base.", "",
        "## Did each step help?", "",
        *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in passed], "",
        "## Evaluation", "",
        markdown_table(["figure", *MODELS], comparison_rows(columns)), "",
        # Per language and task family: the three models' figures, and the routing of base and SFT (what
        # fine-tuning did to which experts each language's tokens go to).
        *group_sections(out, columns, routing_columns=columns[:2]),
        "## Training", "",
        "![SFT loss](sft_loss.png) ![DPO loss](dpo_loss.png)", "",
        "## Router load on held-out conversations", "",
        "Share of routed tokens per layer (rows) and expert (columns); balanced is 1/experts (red mark).", "",
        "![router load](router_load.png)", "",
        "## Stages", "",
        markdown_table(["stage", "seconds", "training tokens/s", "output"], stage_rows), "",
        "Per-model details (every figure, per-task exact match, all generations) are under `eval/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


DEMO_MARKER = ".finetune-demo"


def claim_demo_folder(out: Path) -> None:
    """Make `out` the demo's folder: new, empty, or written by an earlier demo (marked), which is replaced.
    Any other folder is refused: the demo never deletes what it did not write. Not staged and renamed like
    finetune.export: the adapters it writes record the base's path, which a rename would break."""
    from finetune.files.output_folder import OutputError, check_output, listing

    check_output(out, {"repository's bundled data": Path(SUITE).resolve().parent.parent / "data"}, overwrite=True)
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file():
            raise OutputError(f"--out {out}: the folder exists, is not empty ({listing(out)}) and was not written by "
                              "the demo; choose another --out (the demo only replaces its own earlier runs)")
        print(f"replacing the earlier demo run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by python -m finetune.demo; a later demo run may replace this folder\n")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=invoked_as("demo"), description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo",
                        help="everything goes here; an earlier demo's folder is replaced, any other non-empty one refused")
    parser.add_argument("--pretrain-steps", type=int, default=500, help="tiny base pretraining steps")
    parser.add_argument("--hidden", type=int, default=128, help="tiny base width (intermediate = 2 x hidden)")
    parser.add_argument("--sft-steps", type=int, default=300, help="0: recipes/tiny/sft.yaml's max_steps")
    parser.add_argument("--dpo-steps", type=int, default=None, help="default: recipes/tiny/dpo.yaml's")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N rows of each file")
    return parser.parse_args(argv)


def make_base(args, base: Path, timings: dict) -> None:
    from finetune.model.tiny import PRETRAIN_BATCH, PRETRAIN_LENGTH, make_tiny_mixtral

    # Wider than finetune.tiny's default (64): at 64 the base cannot hold the bundled facts well enough for
    # exact answers after SFT (1 in 200 held-out prompts after 450 steps; 10 in 200 at 128).
    stage(1, "base", f"seeded tiny Mixtral (hidden {args.hidden}), pretrained {args.pretrain_steps} steps on the "
                     "bundled text")
    run_stage(timings, "base", lambda: make_tiny_mixtral(base, seed=0, pretrain_steps=args.pretrain_steps,
                                                         hidden=args.hidden, intermediate=2 * args.hidden))
    pretrain_tokens = args.pretrain_steps * PRETRAIN_BATCH * PRETRAIN_LENGTH
    timings["base"].update(tokens_per_second=pretrain_tokens / timings["base"]["seconds"], output=str(base))


def train_stage(timings: dict, name: str, command, argv: list[str], out: Path) -> tuple[int, dict]:
    """Run a training command as a user would; (its exit code, its figures when it succeeded)."""
    code = run_stage(timings, name, lambda: command(argv))
    if code:
        return code, {}
    figures = training_figures(out)
    timings[name].update(tokens_per_second=figures["tokens_per_second"], output=str(out))
    return 0, figures


def export_stage(timings: dict, dpo: Path, merged: Path, tolerance: float) -> float:
    from finetune.data.chat_format import ChatEncoder, bundled_sentencepiece_path
    from finetune.export import export

    stage(4, "export", "merge the DPO adapter into the base, shard by shard, and verify the logits")
    encoder = ChatEncoder(bundled_sentencepiece_path())
    prompts = [encoder.encode_prompt([{"role": "user", "content": text}]) for text in
               ("What is 12 + 30?", "Écris « pomme » à l'envers.", "Wie heißt die Hauptstadt von Japan?",
                "¿Cuánto es 7 × 8?", "Scrivi «mela» in maiuscolo.")]
    export_diff = run_stage(timings, "export", lambda: export([str(dpo)], merged, verify=True, prompts=prompts,
                                                              tolerance=tolerance).max_logit_difference)
    timings["export"]["output"] = str(merged)
    print(f"max |logit difference| merged vs base + adapter: {export_diff:.2e}")
    return export_diff


def evaluate_stage(timings: dict, suite, out: Path, folders: tuple[Path, Path, Path]) -> dict:
    """Base, SFT and DPO on the suite, each with the base as the preference reference; their figures."""
    stage(5, "evaluate", f"base, SFT and DPO on {SUITE} (held-out)")
    results = {}

    def evaluate_all():
        for name, path in zip(MODELS, folders):
            print(f"evaluating {name}")
            results[name], records = evaluate(str(path), suite, reference=str(folders[0]))
            folder = out / "eval" / name.lower()
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.json").write_text(json.dumps(results[name], indent=2, ensure_ascii=False) + "\n")
            with open(folder / "generations.jsonl", "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    run_stage(timings, "evaluate", evaluate_all)
    timings["evaluate"]["output"] = str(out / "eval")
    return results


def print_summary(results: dict, timings: dict, passed: list, total: float, report: Path, merged: Path) -> None:
    print("\n" + text_table(["figure", *MODELS], comparison_rows([(m, results[m]) for m in MODELS])))
    print("\n" + text_table(["stage", "seconds", "tokens/s"],
                            [[n, f"{t['seconds']:.1f}", f"{t['tokens_per_second']:,.0f}" if t.get("tokens_per_second")
                              else ""] for n, t in timings.items()]))
    print()
    for text, ok in passed:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print("\n" + text_table(*group_rows([(m, results[m]) for m in MODELS], "lang")))
    print(f"\ntotal {total / 60:.1f} min; report: {report}")
    print(f"talk to the DPO model: python -m finetune.chat {merged}")


def main(argv: list[str] | None = None) -> int:
    from finetune.dpo import main as dpo_main
    from finetune.sft import main as sft_main

    args = parse_arguments(argv)
    out = Path(args.out)
    claim_demo_folder(out)
    # lm-eval tasks stay out: the demo's figures must not depend on what else is installed.
    suite = load_suite(SUITE, ["lm_eval_tasks=[]"] + ([f"limit={args.eval_limit}"] if args.eval_limit else []))
    started = time.perf_counter()
    timings: dict = {}
    base, sft, dpo, merged = out / "base", out / "sft", out / "dpo", out / "merged"
    common = [f"model={base}", "resume=never", "launch=null", "train.report_to=none", "train.save_strategy=no"]

    make_base(args, base, timings)
    stage(2, "SFT", "recipes/tiny/sft.yaml: LoRA on attention, experts and router, load-balancing loss")
    steps = [f"train.max_steps={args.sft_steps}"] if args.sft_steps else []
    code, sft_run = train_stage(timings, "SFT", sft_main, ["recipes/tiny/sft.yaml", f"output_dir={sft}", *common,
                                                           *steps], sft)
    if code:
        return code
    stage(3, "DPO", "recipes/tiny/dpo.yaml from the SFT adapter (reference = the SFT policy)")
    steps = [f"train.max_steps={args.dpo_steps}"] if args.dpo_steps else []
    code, dpo_run = train_stage(timings, "DPO", dpo_main, ["recipes/tiny/dpo.yaml", f"output_dir={dpo}",
                                                           f"dpo.sft_adapter={sft}", *common, *steps], dpo)
    if code:
        return code
    tolerance = 1e-3
    export_diff = export_stage(timings, dpo, merged, tolerance)
    results = evaluate_stage(timings, suite, out, (base, sft, dpo))

    stage(6, "report", str(out / "report.md"))
    passed = checks(results, export_diff, tolerance)
    total = time.perf_counter() - started
    report = write_report(out, results, timings, passed, sft_run, dpo_run, total)
    summary = {"seconds": total, "stages": timings, "checks": [{"check": t, "passed": ok} for t, ok in passed],
               "results": {m: results[m] for m in MODELS}, "export_max_logit_difference": export_diff}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print_summary(results, timings, passed, total, report, merged)
    return 0 if all(ok for _, ok in passed) else 1


if __name__ == "__main__":
    from finetune.cli import run_guarded

    sys.exit(run_guarded(main))
