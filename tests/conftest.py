"""Shared fixtures (tiny tokenizers) and test hygiene: a test that initialises torch.distributed in the pytest process (a one-rank
DeepSpeed engine, a gloo gather) must not leave its process group, nor DeepSpeed's cached copies of
it, to the next test, which may fork workers, start its own world or expect none."""
import sys

import pytest
import torch.distributed as dist

from helpers.model_kit import tokenizer_dirs


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:  # DeepSpeed caches a clone of the world group across engines
        groups._WORLD_GROUP = None
        groups._DATA_PARALLEL_GROUP = None
        groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Tiny tokenizers trained on helpers.model_kit's captions, once per test module."""
    return tokenizer_dirs(tmp_path_factory)


def pytest_collection_modifyitems(config, items):
    """``needs_root`` tests are skipped, saying why, when not run as root."""
    import os

    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (slurmd starts jobs as their user)")
    for item in items:
        if "needs_root" in item.keywords:
            item.add_marker(skip)
