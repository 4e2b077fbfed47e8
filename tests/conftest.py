import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))  # tests/conversations.py and other helpers


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
