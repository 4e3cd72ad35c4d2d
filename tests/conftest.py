"""Shared test hygiene: a test that initialises torch.distributed in the pytest process (a one-rank
DeepSpeed engine, a gloo gather) must not leave its default process group to the next test, which
may fork workers or expect an uninitialised state."""
import pytest
import torch.distributed as dist


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
