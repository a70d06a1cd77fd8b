"""Test set-up shared by every test file.

Triton kernels run under the interpreter on CPU: TRITON_INTERPRET must be set before anything imports triton.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    "One intra-op thread for a module of tiny-shape tests: as fast, and immune to oversubscription on 2 shared cores."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torch_kernels(monkeypatch):
    """The packed linears' torch references instead of the Triton interpreter (~40x faster; the kernels themselves are
    checked against these references in test_w4a16 / test_ternary_kernel, and through `quant_linear` in test_engine)."""
    import minicpm4_core.kernels.w4a16 as W, minicpm4_core.kernels.ternary as TK
    for mod in (W, TK): monkeypatch.setattr(mod, 'resolve_backend', lambda *a, **k: 'torch')
