"""The package's shape holds: commands on top, one folder per job below them, each importing only the folders
its `__init__` names, no import circles; and the few facts kept in one place agree with what they describe."""

import ast
import re
from pathlib import Path

import pytest
import torch

from finetune.cli import COMMANDS, invoked_as
from finetune.cli import main as cli_main
from finetune.files.adapter_folder import expert_factors, stack_factors
from finetune.recipe.launch_file import read_launch_file
from finetune.train.launch import ZERO3_LEAF_CLASSES

PACKAGE = Path(__file__).resolve().parent.parent / "finetune"
TOP_LEVEL = {"errors", "private_apis"}  # shared modules every folder may use


def imports_of(path: Path) -> set[str]:
    """Every finetune module or package a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("finetune"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("finetune")}
    return found


def folders() -> dict[str, set[str]]:
    """{folder: the folders and top-level modules its __init__ says it may import}."""
    allowed = {}
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        said = re.search(r"May import:(.*?)(?:\n\n|\"\"\")", init.read_text(), re.S)
        assert said, f"{init} does not say what its folder may import"
        names = set(re.findall(r"finetune\.(\w+)", said.group(1)))
        if "everything below the commands" in said.group(1):
            names |= {f for f in (p.parent.name for p in PACKAGE.glob("*/__init__.py")) if f != init.parent.name}
        allowed[init.parent.name] = names
    return allowed


def test_each_folder_imports_only_what_its_init_says_and_never_a_command():
    allowed = folders()
    assert set(allowed) == {"recipe", "files", "data", "moe", "model", "train", "merge", "evaluation", "planning",
                            "publish", "gguf_file"}
    for folder, may in allowed.items():
        for path in (PACKAGE / folder).glob("*.py"):
            for module in imports_of(path):
                target = module.split(".")[1] if "." in module else module
                assert target not in COMMANDS and target not in ("cli", "__main__"), \
                    f"{folder}/{path.name} imports the command {module}"
                assert target in may | TOP_LEVEL | {folder}, f"{folder}/{path.name} imports {module}: not in its May import"


def test_no_import_circles():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {m for m in imports_of(path) if m != name}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := p.read_text().count("\n")) > 400}
    assert not long, long


def test_zero3_launch_files_name_the_leaf_classes_the_code_uses(repo_root, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.moe.router import moe_blocks

    zero3 = []
    for path in sorted((repo_root / "recipes" / "accelerate").glob("*.yaml")):
        section = read_launch_file(path).get("deepspeed_config") or {}
        json_file = section.get("deepspeed_config_file")
        if json_file and '"stage": 3' in (repo_root / json_file).read_text():
            zero3.append(path.name)
            assert section.get("deepspeed_moe_layer_cls_names") == ",".join(ZERO3_LEAF_CLASSES), path.name
    assert len(zero3) >= 3, zero3  # zero3, zero3_offload, multinode, cpu_zero3
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert {type(block).__name__ for block in moe_blocks(model)} <= set(ZERO3_LEAF_CLASSES)


def test_peft_expert_factor_layout_both_ways():
    """PEFT's fused-expert LoRA delta for expert e is scale * B_e @ A_e with the factors `expert_factors` gives,
    and `stack_factors` gives back PEFT's tensors exactly."""
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    block = inject_adapter_in_model(LoraConfig(r=3, lora_alpha=6, target_parameters=["experts.down_proj"],
                                               target_modules=[]), MixtralSparseMoeBlock(config))
    wrapper = block.experts
    torch.manual_seed(0)
    with torch.no_grad():
        wrapper.lora_B["default"].weight.normal_()
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    a_e, b_e = expert_factors(a, b, 4)
    assert a_e.shape == (4, 3, 24) and b_e.shape == (4, 16, 3)
    delta = wrapper.get_delta_weight("default")  # PEFT's own [E, out, in] delta of the whole stack
    torch.testing.assert_close(delta, wrapper.scaling["default"] * (b_e @ a_e))
    back_a, back_b = stack_factors(a_e, b_e)
    assert torch.equal(back_a, a) and torch.equal(back_b, b)


@pytest.mark.parametrize("argv0,shown", [
    ("/venv/bin/finetune", "finetune sft"),
    ("/repo/finetune/__main__.py", "python -m finetune sft"),
    ("/repo/finetune/sft.py", "python -m finetune.sft"),
])
def test_usage_names_the_command_as_invoked(monkeypatch, argv0, shown):
    monkeypatch.setattr("sys.argv", [argv0])
    assert invoked_as("sft") == shown


def test_unknown_command_is_named(capsys):
    assert cli_main(["trian", "recipes/tiny/sft.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'trian'") and "  sft " in err
