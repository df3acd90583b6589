"""``loading.sources``: offline variables, hub caches, and failing fast without network."""

import shutil
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from pytest_socket import disable_socket, enable_socket

from langchain_baichuan2.loading import DownloadError, load_model_and_tokenizer, sources
from langchain_baichuan2.testing import make_tiny_checkpoint

MODEL_ID = "baichuan-inc/Baichuan2-7B-Chat"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "7b")


@pytest.fixture
def caches(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Empty Hugging Face and ModelScope caches, with no offline variable set."""
    hf, ms = tmp_path / "hf", tmp_path / "ms"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(ms))
    # The ModelScope SDK reads MODELSCOPE_CACHE once, into its default config.
    monkeypatch.setattr("modelscope_hub.config._default_config", None)
    for variable in sources.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return hf, ms


@pytest.fixture
def no_network():
    """Every socket use raises, as on a machine without network."""
    disable_socket()
    yield
    enable_socket()


def no_download(monkeypatch) -> None:
    """Fail the test on any probe or download (a cache hit must need neither)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(sources, "_reachable", refuse)
    monkeypatch.setattr(sources, "_fetch", refuse)


def put_in_hf_cache(tiny: Path, hf: Path) -> Path:
    repo = hf / ("models--" + MODEL_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REVISION)
    return Path(shutil.copytree(tiny, repo / "snapshots" / REVISION))


def put_in_modelscope_cache(tiny: Path, ms: Path) -> Path:
    snapshot = ms / "models" / MODEL_ID.replace("/", "--") / "snapshots" / "master"
    return Path(shutil.copytree(tiny, snapshot))


def leftovers(ms: Path) -> list[Path]:
    return sorted((ms / "models").glob("baichuan-inc*")) if (ms / "models").is_dir() else []


@pytest.mark.parametrize("variable", sources.OFFLINE_VARIABLES)
def test_offline_a_model_in_the_hf_cache_loads_with_no_network_attempt(
    variable, tiny, caches, monkeypatch, no_network
):
    hf, ms = caches
    snapshot = put_in_hf_cache(tiny, hf)
    monkeypatch.setenv(variable, "1")
    no_download(monkeypatch)
    start = time.monotonic()
    assert sources.resolve_model_path(MODEL_ID) == snapshot
    assert time.monotonic() - start < 5
    assert load_model_and_tokenizer(MODEL_ID).path == snapshot
    assert leftovers(ms) == []


def test_offline_a_model_in_the_modelscope_cache_loads_with_no_network_attempt(
    tiny, caches, monkeypatch, no_network
):
    _, ms = caches
    snapshot = put_in_modelscope_cache(tiny, ms)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_download(monkeypatch)
    assert sources.resolve_model_path(MODEL_ID) == snapshot


def test_offline_without_a_cached_copy_fails_at_once_saying_what_to_do(
    caches, monkeypatch, no_network
):
    _, ms = caches
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    no_download(monkeypatch)
    with pytest.raises(DownloadError) as error:
        sources.resolve_model_path(MODEL_ID)
    first = str(error.value).splitlines()[0]
    assert "TRANSFORMERS_OFFLINE is set" in first
    assert leftovers(ms) == []


def test_without_network_a_model_id_fails_within_seconds_with_one_clear_line(caches, no_network):
    _, ms = caches
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        load_model_and_tokenizer(MODEL_ID)
    assert time.monotonic() - start < 10
    first = str(error.value).splitlines()[0]
    assert f"Could not download {MODEL_ID!r}" in first
    assert "ModelScope or the Hugging Face Hub" in first  # the sources tried
    assert "model='/path/to/Baichuan2-7B-Chat'" in first  # how to pass a local folder
    assert all(variable in first for variable in sources.OFFLINE_VARIABLES)
    assert "no network" in first
    assert leftovers(ms) == []


def test_without_network_a_cached_copy_is_used(tiny, caches, no_network):
    hf, _ = caches
    snapshot = put_in_hf_cache(tiny, hf)
    assert sources.resolve_model_path(MODEL_ID, source="auto") == snapshot


def test_a_failed_modelscope_download_leaves_no_empty_folders(caches, monkeypatch, no_network):
    _, ms = caches
    # The hub seems reachable, then its download fails: the SDK has made its folders.
    monkeypatch.setattr(sources, "_reachable", lambda endpoints: dict.fromkeys(endpoints, True))
    with pytest.raises(DownloadError, match="ModelScope: .*socket"):
        sources.resolve_model_path(MODEL_ID, source="modelscope")
    assert leftovers(ms) == []
    assert not ms.exists()


def test_the_probe_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            closed_port = closed.getsockname()[1]
            start = time.monotonic()
            reachable = sources._reachable(
                {"open": f"http://127.0.0.1:{port}", "closed": f"http://127.0.0.1:{closed_port}"},
                timeout=2,
            )
    assert reachable == {"open": True, "closed": False}
    assert time.monotonic() - start < 3
