"""Suite-wide guards: a test must not leave process-wide state behind that changes what later tests see."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """Autograd on before and after every test: a leaked `torch.set_grad_enabled(False)` (e.g. from a verb run
    in-process) would make every later training test fail far from its cause."""
    torch.set_grad_enabled(True)
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd disabled in the main thread"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): the serving
    tests' reference paths are tiny, and torch's pool would only spin; the count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
