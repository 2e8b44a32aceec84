"""Fixtures shared by the test modules (helpers are in tests/helpers.py). Tests marked `gpu` need
CUDA: on a CPU machine they are reported as skipped, never silently dropped."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The built-in corpus, small (1 MB of text, a 512-token vocabulary), built once per test module."""
    from neox_sophia.data.corpus import prepare_builtin_corpus

    return prepare_builtin_corpus(tmp_path_factory.mktemp("corpus"), max_bytes=1_000_000, vocab_size=512,
                                  log=None)
