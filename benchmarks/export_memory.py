"""Peak memory of the streaming export vs PEFT's merge_and_unload + save_pretrained, same checkpoint.

    python benchmarks/export_memory.py [--hidden 512] [--layers 4] [--experts 8]

Builds a Mixtral of a few hundred MB in >= 8 shards and a non-zero LoRA adapter on attention, experts and
router, then runs each merge in a fresh process. A thread samples the process's resident memory every
2 ms; what counts is the peak during the merge minus the resident memory just before it (after the
imports), so the ratios compare what each method itself holds.
Targets: export <= 0.3 x PEFT's, and <= 1.5 x (largest shard + one layer's experts).
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
    "export": "finetune.export.export([{adapter!r}], {out!r}, progress=False)",
    "peft": "from peft import PeftModel; from transformers import AutoModelForCausalLM; "
    "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r}).merge_and_unload(); "
    "m.save_pretrained({out!r}, max_shard_size='50MB')",
}
SAMPLER = """
import os, threading, time
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
peak, done = [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
before = rss(); peak[0] = before
thread = threading.Thread(target=sample); thread.start()
"""


def peak_rss_mib(code: str) -> tuple[float, float]:
    """(resident MiB before the operation, peak MiB added during it), in a fresh process."""
    wrapper = f"{IMPORTS}\n{SAMPLER}\n{code}\ndone.set(); thread.join()\nprint(before, max(peak[0], rss()) - before)"
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    before, added = proc.stdout.strip().splitlines()[-1].split()
    return int(before) / MIB, int(added) / MIB


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
        before, ours = peak_rss_mib(RUNNERS["export"].format(out=str(work / "ours"), **fmt))
        _, theirs = peak_rss_mib(RUNNERS["peft"].format(out=str(work / "peft"), **fmt))
    bound = largest + layer_experts
    print(f"checkpoint: {size:.0f} MiB in {len(shards)} shards (largest {largest:.0f} MiB); "
          f"one layer's experts {layer_experts:.0f} MiB; {before:.0f} MiB resident after imports")
    print(f"peak resident memory added by the merge: streaming export {ours:.0f} MiB, "
          f"PEFT merge_and_unload + save_pretrained {theirs:.0f} MiB")
    print(f"export / PEFT: {ours / theirs:.2f}   (target <= 0.30)")
    print(f"export / (largest shard + one layer's experts): {ours / bound:.2f}   (target <= 1.50)")


if __name__ == "__main__":
    main()
