"""Fixtures shared across test files: tiny Hugging Face models and their GGUF conversions,
built once per test session (no network: random weights from a config)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(kind) -> directory of a tiny random HF checkpoint (built once per session)."""
    from tests.tiny_models import build_tiny_model

    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"hf-{kind}"), seed=0)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory):
    """tiny_gguf(kind, outtype, expert_type=None) -> path of the converted GGUF (cached)."""
    from convert.to_gguf import convert

    built: dict[tuple, Path] = {}

    def get(kind: str, outtype: str, expert_type: str | None = None) -> Path:
        key = (kind, outtype, expert_type)
        if key not in built:
            out = tmp_path_factory.mktemp(f"gguf-{kind}") / f"{kind}-{outtype}-{expert_type or 'same'}.gguf"
            built[key] = convert(tiny_hf(kind), out, outtype=outtype, expert_type=expert_type, progress=False)
        return built[key]

    return get


@pytest.fixture
def one_torch_thread():
    """The test machines are small and shared: keep torch to one thread for a test
    (modules that want it for every test: pytestmark = pytest.mark.usefixtures("one_torch_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
