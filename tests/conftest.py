"""Shared pytest set-up for headscope.

`TRITON_INTERPRET` must be set before any `@triton.jit` kernel is defined, i.e. before anything
imports an op module of `headscope.kernels`: it is set here, first thing, so CPU-only machines run
the Triton kernels in the interpreter. A value given on the command line wins."""
import os
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: loads SmolLM2 or runs long; deselect with -m 'not slow'")

@pytest.fixture(scope="session")
def smollm2():
    "The embedded SmolLM2-135M-Instruct (fp32, CPU, eval mode, `.tokenizer` attached), loaded once per session"
    from headscope.models import load_model
    return load_model()
