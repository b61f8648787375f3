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

# Browser tests (pytest-playwright) use the system Chromium, never a downloaded one. Without it they
# skip, except in CI (CI is set), where a missing browser must fail loudly rather than pass silently.
import shutil
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    "Launch the system Chromium, headless, with nothing that phones home"
    if CHROMIUM is None:
        if os.environ.get("CI"): pytest.fail("chromium is missing, so the browser tests cannot run (apt-get install chromium)")
        pytest.skip("needs chromium (apt-get install chromium)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", "--no-first-run"]}
