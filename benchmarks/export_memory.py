"""Peak memory of the streaming export vs PEFT's merge_and_unload + save_pretrained, same checkpoint.

    python benchmarks/export_memory.py [--hidden 512] [--layers 4] [--experts 8]

Builds a Mixtral of a few hundred MB in >= 8 shards and a non-zero LoRA adapter on attention, experts and
router, then runs each merge in a fresh process and reads its peak resident memory. A third process that
only imports the same libraries gives the baseline, so the ratios compare what each method itself holds.
Targets (issue #6): export <= 0.3 x PEFT's, and <= 1.5 x (largest shard + one layer's experts).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1024**2
IMPORTS = "import torch, transformers, peft, safetensors, finetune.export"
RUNNERS = {
    "baseline": IMPORTS,
    "export": IMPORTS + "; finetune.export.export([{adapter!r}], {out!r}, progress=False)",
    "peft": IMPORTS + "; from peft import PeftModel; from transformers import AutoModelForCausalLM; "
    "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r}).merge_and_unload(); "
    "m.save_pretrained({out!r}, max_shard_size='50MB')",
}


def peak_rss_mib(code: str) -> float:
    wrapper = f"import resource\n{code}\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def build(work: Path, hidden: int, layers: int, experts: int):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.config import load_recipe
    from finetune.model import lora_config
    from finetune.tiny import make_tiny_mixtral

    base = make_tiny_mixtral(work / "base", seed=0, max_shard_size="50MB", layers=layers, experts=experts,
                             hidden=hidden, intermediate=3 * hidden, heads=8, kv_heads=2)
    recipe = load_recipe("recipes/tiny/sft.yaml", [f"model={base}", "lora.init_lora_weights=false"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config(recipe))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01)
    model.save_pretrained(work / "adapter")
    return base, work / "adapter"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, adapter = build(work, args.hidden, args.layers, args.experts)
        shards = sorted(base.glob("model-*.safetensors"))
        size = sum(s.stat().st_size for s in shards) / MIB
        largest = max(s.stat().st_size for s in shards) / MIB
        config = json.loads((base / "config.json").read_text())
        layer_experts = 3 * config["num_local_experts"] * config["hidden_size"] * config["intermediate_size"] * 4 / MIB
        fmt = {"base": str(base), "adapter": str(adapter)}
        baseline = peak_rss_mib(RUNNERS["baseline"])
        ours = peak_rss_mib(RUNNERS["export"].format(out=str(work / "ours"), **fmt))
        theirs = peak_rss_mib(RUNNERS["peft"].format(out=str(work / "peft"), **fmt))
    bound = largest + layer_experts
    print(f"checkpoint: {size:.0f} MiB in {len(shards)} shards (largest {largest:.0f} MiB); "
          f"one layer's experts {layer_experts:.0f} MiB")
    print(f"peak RSS (MiB)          total   over baseline ({baseline:.0f} MiB of imports)")
    print(f"  streaming export   {ours:9.0f}   {ours - baseline:9.0f}")
    print(f"  PEFT merge + save  {theirs:9.0f}   {theirs - baseline:9.0f}")
    ratio = (ours - baseline) / (theirs - baseline)
    print(f"export / PEFT (over baseline): {ratio:.2f}   (target <= 0.30)")
    print(f"export / (largest shard + one layer's experts): {(ours - baseline) / bound:.2f}   (target <= 1.50)")


if __name__ == "__main__":
    main()
