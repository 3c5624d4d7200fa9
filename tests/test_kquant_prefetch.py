"""The K-quant kernels' software prefetch (kernels.set_prefetch, kernels.c prefetch_part): a speed setting only.
At decode sizes (T <= 4, where it runs) the products are bit-identical with it off, at the default distance and
at odd distances (one that lands inside the same super-block, one far past the end of the weights), and they
equal the exact integer emulation of llama.cpp's arithmetic with it on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pocketlm.quant import kernels

from kernel_helpers import K_TYPES, emulate, random_bytes  # the shared harness: tests/kernel_helpers.py

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: "
                                                                f"{kernels.unavailable_reason()}")


@pytest.fixture
def restore_prefetch():
    old = kernels.get_prefetch()
    yield
    kernels.set_prefetch(old)


def test_prefetch_setting_round_trips_and_clamps(restore_prefetch):
    assert kernels.get_prefetch() == 4096  # the default distance (kernels.c PL_PF_DIST)
    kernels.set_prefetch(0)
    assert kernels.get_prefetch() == 0
    kernels.set_prefetch(-5)
    assert kernels.get_prefetch() == 0
    kernels.set_prefetch(8192)
    assert kernels.get_prefetch() == 8192


@pytest.mark.parametrize("type_name", K_TYPES)
@pytest.mark.parametrize("T", [1, 3])
def test_prefetch_never_changes_decode_products(type_name, T, restore_prefetch):
    rows, cols = 48, 768  # 3 tiles of 3 super-blocks: prefetches run into the next tile and past the end
    raw = random_bytes(type_name, rows, cols, seed=11 + T)
    packed = kernels.pack(raw, type_name, rows, cols)
    x = torch.randn(T, cols, generator=torch.Generator().manual_seed(T)) * 2
    want = emulate(raw, type_name, rows, cols, x.numpy())
    outs = {}
    for dist in (0, 4096, 64, 1 << 20):
        kernels.set_prefetch(dist)
        outs[dist] = kernels.gemm(packed, type_name, rows, x)
    for dist, y in outs.items():
        assert torch.equal(y, outs[0]), f"{type_name} T={T}: prefetch distance {dist} changed the products"
    np.testing.assert_allclose(outs[4096].double().numpy(), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
