"""Shared fixtures: tiny random checkpoints in the official layout, the real tokenizer."""

from pathlib import Path

import pytest

from langchain_baichuan2.testing import make_tiny_checkpoint

SHARED = Path(__file__).resolve().parents[2] / "shared" / "baichuan2"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The team's folder of official Baichuan2 files (skips where absent)."""
    if not SHARED.is_dir():
        pytest.skip(f"official Baichuan2 files not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def real_tokenizer_model(shared_dir: Path) -> Path:
    """The real 125,696-piece tokenizer.model (skips where absent)."""
    path = shared_dir / "tokenizer.model"
    if not path.is_file():
        pytest.skip(f"real tokenizer.model not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_7b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 7B-shaped (RoPE) checkpoint, sharded .bin like the official release."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny7b"), "7b", weights="bin", num_shards=2
    )


@pytest.fixture(scope="session")
def tiny_13b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 13B-shaped (ALiBi) checkpoint with 5 heads (not a power of two)."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny13b"),
        "13b",
        hidden_size=320,  # bitsandbytes CPU 4-bit: out % 32 == 0, in % 64 == 0
        num_attention_heads=5,
        weights="safetensors",
    )


@pytest.fixture(scope="session", params=["7b", "13b"])
def tiny_checkpoint(request: pytest.FixtureRequest) -> Path:
    """Each tiny checkpoint variant in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")
