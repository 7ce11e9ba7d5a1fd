import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHARED_TOKENIZER, TINY, make_model_folder, train_sentencepiece  # noqa: E402


@pytest.fixture(scope="session")
def spm_path(tmp_path_factory) -> Path:
    """A tiny SentencePiece tokenizer trained for the tests (Llama's special ids, byte fallback)."""
    return train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="session")
def llama2_tokenizer() -> Path:
    if not SHARED_TOKENIZER.is_file():
        pytest.skip("Meta's Llama 2 tokenizer is not in ../shared/fixtures (only present beside a developer checkout)")
    return SHARED_TOKENIZER


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, spm_path):
    """(folder, weights): a 1-shard tiny GQA checkpoint with its tokenizer."""
    return make_model_folder(tmp_path_factory.mktemp("tiny1"), spm_path, TINY, n_shards=1)


@pytest.fixture(scope="session")
def tiny_ckpt2(tmp_path_factory, spm_path, tiny_ckpt):
    """The same weights as tiny_ckpt, written in 2 shards."""
    return make_model_folder(tmp_path_factory.mktemp("tiny2"), spm_path, TINY, n_shards=2)


@pytest.fixture
def ops():
    """torch.ops.llama_cli, our CPU kernels (llama_cli/native.py); skipped on platforms they are not for."""
    import torch

    from llama_cli import native

    why = native._cpu_ok()
    if why is not None:  # not x86-64 Linux with AVX2; CI's machine is
        pytest.skip(f"our CPU kernels are {why}")
    assert native.ready(), native._state.get("why")  # where they are for, they must build
    return torch.ops.llama_cli


@pytest.fixture
def keep_threads():
    """torch's thread count put back after a test that sets it (--threads, Llama.build(threads=) set it for the
    whole process)."""
    import torch

    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)
