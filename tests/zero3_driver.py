"""Run under `accelerate launch`: one SFT or DPO pass, then each rank reports what it holds.

    accelerate launch --config_file recipes/accelerate/cpu_zero3.yaml tests/zero3_driver.py sft RECIPE [overrides]

Besides the pass's own outputs, writes `rank{N}.json` into output_dir: the local and full size of every
ZeRO-3 partitioned parameter, the size and sum of every expert-parallel shard, the parameters the rank holds, which experts each layer's router sent this rank's tokens to in the first
step, the ZeRO-3 leaf modules, and the peak resident memory.
"""

import json
import resource
import sys
from pathlib import Path

import torch

from finetune.recipe.loading import load_recipe
from finetune.train.checkpoints import resume_checkpoint
from finetune.train.outputs import save_outputs, write_recipe


def main():
    kind, recipe_path, *overrides = sys.argv[1:]
    recipe = load_recipe(recipe_path, overrides, expect_kind=kind)
    if kind == "sft":
        from finetune.sft import build
    else:
        from finetune.dpo import build
    resume_from = resume_checkpoint(recipe)
    trainer, encoder = build(recipe)
    experts_hit = []

    def record_routing(module, args, output):
        if not experts_hit or len(experts_hit[-1]) < trainer.router_terms.tap.num_layers:
            if not experts_hit:
                experts_hit.append([])
            logits = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():  # saves nothing for backward, so a checkpointed recompute (no record) matches
                top = logits.topk(2, dim=-1).indices.flatten()
            experts_hit[-1].append(torch.bincount(top, minlength=logits.shape[-1]).tolist())

    from finetune.moe.router import moe_blocks

    handles = [block.gate.register_forward_hook(record_routing) for block in moe_blocks(trainer.model)]
    write_recipe(recipe, trainer.is_world_process_zero())
    trainer.train(resume_from_checkpoint=resume_from)
    for handle in handles:
        handle.remove()
    save_outputs(trainer, recipe, encoder)
    rank = trainer.accelerator.process_index
    report = {
        "partitions": {
            name: [p.ds_tensor.numel(), p.ds_numel]
            for name, p in trainer.model.named_parameters()
            if hasattr(p, "ds_tensor")
        },
        "experts_hit_first_step": experts_hit[0] if experts_hit else [],
        "leaf_modules": sorted(
            {type(m).__name__ for m in trainer.model.modules() if getattr(m, "_z3_leaf", False)}
        ),
        "expert_shards": {  # expert parallelism: what each rank's experts hold (finetune/moe/expert_shards.py)
            name: [p.numel(), p.detach().double().sum().item()]
            for name, p in trainer.model.named_parameters()
            if getattr(p, "expert_shard", None) is not None
        },
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "world_size": trainer.accelerator.num_processes,
    }
    (Path(recipe.output_dir) / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
