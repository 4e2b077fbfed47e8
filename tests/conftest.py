import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenized data goes to a folder of this session, not the user's ~/.cache (subprocesses inherit it)."""
    import os

    from finetune.data.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("data-cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One seeded tiny Mixtral on disk for the whole session (2 layers, 4 experts, hidden 64)."""
    from finetune.model.tiny import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def tiny_v3_model_dir(tmp_path_factory) -> Path:
    """The same tiny Mixtral with Mixtral 8x22B's v3 tokenizer (vocabulary 32768, function calling)."""
    from finetune.model.tiny import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "v3", seed=0, chat_format="v3")


@pytest.fixture(scope="session")
def four_rows(tmp_path_factory):
    """Training data whose size is the global batch: every step sees all of it, on 1 or 2 processes."""
    path = tmp_path_factory.mktemp("data") / "four.jsonl"
    lines = (ROOT / "data" / "chat" / "train.jsonl").read_text().splitlines()
    path.write_text("\n".join(lines[:4]) + "\n")
    return path


@pytest.fixture(scope="session")
def encoder():
    from finetune.data.chat_format import ChatEncoder, bundled_sentencepiece_path

    return ChatEncoder(bundled_sentencepiece_path())


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory) -> Path:
    """A tiny Mixtral briefly pretrained on the bundled text, so fine-tuning has signal to work with."""
    from finetune.model.tiny import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "pretrained", seed=0, pretrain_steps=150)


@pytest.fixture
def cuda_present(monkeypatch):
    """CUDA's presence faked (torch.cuda.is_available / is_bf16_supported), the one thing this machine cannot
    provide; everything downstream is the real code."""
    import peft  # noqa: F401  imported for real first: bitsandbytes loads its CUDA backend when CUDA is present
    import torch
    import trl  # noqa: F401

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


def pytest_collection_modifyitems(config, items):
    """The `gpu` tier is the only one that touches CUDA, and it skips where there is none: each test says why
    it needs one, none has to remember the skip. (The other tiers run on the CPU on any machine: the tiny
    recipes and `helpers.tiny_overrides` set `device: cpu`, tests/test_device.py.)"""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu tier: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
