import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # tests/conversations.py and other helpers


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Tokenized data goes to a folder of this session, not the user's ~/.cache (subprocesses inherit it)."""
    import os

    from finetune.data_cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("data-cache")
    os.environ[CACHE_ENV] = str(folder)
    return folder


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """One seeded tiny Mixtral on disk for the whole session (2 layers, 4 experts, hidden 64)."""
    from finetune.tiny import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "base", seed=0)


@pytest.fixture(scope="session")
def encoder():
    from finetune.chat_format import ChatEncoder, bundled_sentencepiece_path

    return ChatEncoder(bundled_sentencepiece_path())


@pytest.fixture(scope="session")
def pretrained_tiny_dir(tmp_path_factory) -> Path:
    """A tiny Mixtral briefly pretrained on the bundled text, so fine-tuning has signal to work with."""
    from finetune.tiny import make_tiny_mixtral

    return make_tiny_mixtral(tmp_path_factory.mktemp("tiny") / "pretrained", seed=0, pretrain_steps=150)


def tiny_overrides(model_dir, output_dir, **train):
    """Overrides that make recipes/tiny/sft.yaml a quick test run."""
    items = [f"model={model_dir}", f"output_dir={output_dir}", "resume=never", "launch=null"]
    defaults = {"max_steps": 4, "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no"}
    items += [f"train.{k}={v}" for k, v in {**defaults, **train}.items()]
    return items
