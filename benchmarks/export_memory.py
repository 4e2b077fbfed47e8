"""Peak memory of `python -m finetune.export` (defaults: verification on) vs PEFT's merge_and_unload +
save_pretrained, on the same checkpoints, at three model sizes; and of the GGUF export of the merged folder
(`python -m finetune.export MERGED --gguf q8_0 --out OUT`, verified).

    python benchmarks/export_memory.py [--layers 4 9 19] [--hidden 512] [--experts 8] [--shard-size 100MB]

Builds Mixtrals of about 0.4, 0.8 and 1.6 GB (fp32, hidden 512, 8 experts; the size set by the layer count,
100 MB shards) and a non-zero LoRA adapter on attention, experts and router for each, then runs each
command in a fresh process. A thread samples the process's resident memory every 2 ms; what counts is
the peak during the command minus the resident memory just before it (after the imports), so the
ratios compare what each method itself holds.
Targets: export <= 0.30 x PEFT's on the ~0.8 GB checkpoint; the export's peak grows < 15% from the smallest
to the largest model (it holds about a shard and a layer, whatever the depth), while PEFT's grows with it;
the GGUF export's grows < 15% too (one tensor, or one expert of a stack, at a time).
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 1024**2
IMPORTS = "import torch, transformers, peft, safetensors, finetune.export, finetune.gguf_file.convert"
RUNNERS = {
    # The command as a user runs it, defaults on (the layer-by-layer verification included).
    "export": "finetune.export.main([{adapter!r}, '--out', {out!r}])",
    # The GGUF of the merged folder, as a user runs it (verification on): written from the export above.
    "gguf": "finetune.export.main([{merged!r}, '--gguf', {gguf_type!r}, '--out', {out!r}])",
    "peft": "from peft import PeftModel; from transformers import AutoModelForCausalLM; "
    "m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r}).merge_and_unload(); "
    "m.save_pretrained({out!r}, max_shard_size='100MB')",
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
thread = threading.Thread(target=sample, daemon=True); thread.start()  # daemon: a failing command still exits
"""


def peak_rss(code: str, imports: str, cwd=None, timeout: float = 1200) -> tuple[float, float, str]:
    """(resident MiB after `imports`, peak MiB added while `code` runs, its stdout), in a fresh process run
    in `cwd` (which decides where `finetune` is imported from)."""
    wrapper = f"{imports}\n{SAMPLER}\n{code}\ndone.set(); thread.join()\nprint(before, max(peak[0], rss()) - before)"
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=cwd, timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"benchmark command failed:\n{code}\n{proc.stderr[-3000:]}")
    before, added = proc.stdout.strip().splitlines()[-1].split()
    return int(before) / MIB, int(added) / MIB, proc.stdout


def peak_rss_mib(code: str) -> tuple[float, float]:
    """`peak_rss` of an export-side command: (resident MiB before it, peak MiB added during it)."""
    return peak_rss(code, IMPORTS)[:2]


def build(work: Path, hidden: int, layers: int, experts: int, shard_size: str):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model.lora_targets import lora_config
    from finetune.model.tiny import make_tiny_mixtral
    from finetune.recipe.loading import load_recipe

    base = make_tiny_mixtral(work / "base", seed=0, max_shard_size=shard_size, layers=layers, experts=experts,
                             hidden=hidden, intermediate=3 * hidden, heads=8, kv_heads=2)
    recipe = load_recipe("recipes/tiny/sft.yaml", [f"model={base}", "lora.init_lora_weights=false"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config(recipe))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01)
    model.save_pretrained(work / "adapter")
    return base, work / "adapter"


def measure(work: Path, layers: int, args) -> dict:
    base, adapter = build(work, args.hidden, layers, args.experts, args.shard_size)
    shards = sorted(base.glob("model-*.safetensors"))
    fmt = {"base": str(base), "adapter": str(adapter)}
    before, ours = peak_rss_mib(RUNNERS["export"].format(out=str(work / "ours"), **fmt))
    _, gguf = peak_rss_mib(RUNNERS["gguf"].format(merged=str(work / "ours"), gguf_type=args.gguf_type,
                                                  out=str(work / "gguf")))
    _, theirs = peak_rss_mib(RUNNERS["peft"].format(out=str(work / "peft"), **fmt))
    return {"layers": layers, "size": sum(s.stat().st_size for s in shards) / MIB, "shards": len(shards),
            "largest": max(s.stat().st_size for s in shards) / MIB, "before": before, "ours": ours, "peft": theirs,
            "gguf": gguf, "gguf_size": sum(f.stat().st_size for f in (work / "gguf").glob("*.gguf")) / MIB}


def each_size(measure, args) -> list[dict]:
    """`measure(folder, layers, args)` for each of `args.layers`, each in its own temporary folder."""
    rows = []
    for layers in args.layers:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(Path(tmp), layers, args))
        print(f"{layers} layers done", file=sys.stderr, flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 9, 19])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--shard-size", default="100MB")
    parser.add_argument("--gguf-type", default="q8_0")
    args = parser.parse_args()
    rows = each_size(measure, args)
    print(f"{rows[0]['before']:.0f} MiB resident after imports; peak resident memory added by the command:")
    print(f"| layers | checkpoint (MiB) | shards (largest MiB) | export, verified (MiB) | PEFT (MiB) | export / PEFT "
          f"| GGUF {args.gguf_type}, verified (MiB) | GGUF file (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layers']} | {r['size']:.0f} | {r['shards']} ({r['largest']:.0f}) | {r['ours']:.0f} | "
              f"{r['peft']:.0f} | {r['ours'] / r['peft']:.2f} | {r['gguf']:.0f} | {r['gguf_size']:.0f} |")
    middle = rows[len(rows) // 2]
    print(f"export / PEFT at {middle['size']:.0f} MiB: {middle['ours'] / middle['peft']:.2f}   (target <= 0.30)")
    print(f"growth from {rows[0]['size']:.0f} to {rows[-1]['size']:.0f} MiB: export "
          f"{100 * (rows[-1]['ours'] / rows[0]['ours'] - 1):+.0f}% (target < +15%), "
          f"PEFT {100 * (rows[-1]['peft'] / rows[0]['peft'] - 1):+.0f}%, "
          f"GGUF {100 * (rows[-1]['gguf'] / rows[0]['gguf'] - 1):+.0f}% (target < +15%)")


if __name__ == "__main__":
    main()
