"""Ternary 2-bit format and kernels (minicpm4_core.kernels.ternary): packing, reference, Triton kernels under the
interpreter (conftest sets TRITON_INTERPRET=1) against the float32 reference."""
import math
import warnings

import pytest
import torch

from minicpm4_core.kernels.ternary import (TernaryConfig, dequantize_ternary, interpreter_active, kernel_scales,
                                           pack_ternary, packed_cols, pick_config, ternary_bytes, ternary_dequantize,
                                           ternary_matmul, ternary_matmul_ref, unpack_ternary)


def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("N,K,align", [(1, 1, 1), (3, 5, 1), (7, 37, 1), (4, 128, 1), (2, 255, 1), (5, 100, 32),
                                        (3, 130, 64)])
def test_pack_unpack_round_trip(N, K, align):
    g = torch.Generator().manual_seed(N * 1000 + K)
    q = torch.randint(-1, 2, (N, K), generator=g)
    p = pack_ternary(q, align)
    assert p.dtype == torch.uint8 and p.shape == (N, packed_cols(K, align))
    assert p.shape[1] % align == 0 and p.shape[1] >= math.ceil(K / 4)
    assert torch.equal(unpack_ternary(p, K), q.to(torch.int8))
    # padding columns hold code 1 (weight 0)
    assert (unpack_ternary(p, 4 * p.shape[1])[:, K:] == 0).all()


def test_pack_layout_is_planar():
    # row of 8 columns -> K4 = 2 bytes; byte j holds columns j, j+2, j+4, j+6 in bits 0-1, 2-3, 4-5, 6-7
    q = torch.tensor([[-1, 0, 1, 1, 0, -1, 1, 0]])
    p = pack_ternary(q)
    codes = (q + 1)[0].tolist()
    b0 = codes[0] | codes[2] << 2 | codes[4] << 4 | codes[6] << 6
    b1 = codes[1] | codes[3] << 2 | codes[5] << 4 | codes[7] << 6
    assert p.tolist() == [[b0, b1]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\{-1, 0, 1\}"):
        pack_ternary(torch.tensor([[0, 2]]))
    with pytest.raises(TypeError, match="integer"):
        pack_ternary(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        pack_ternary(torch.zeros(2, 2, 2, dtype=torch.int8))
    with pytest.raises(ValueError, match="in_features"):
        unpack_ternary(pack_ternary(torch.zeros(2, 8, dtype=torch.int8)), 9)


def test_dequantize_by_hand():
    q = torch.tensor([[1, -1, 0, 1, 1, 0], [0, 0, -1, 1, -1, 1]])
    p = pack_ternary(q, 2)
    s_row = torch.tensor([[0.5], [2.0]])
    assert torch.equal(dequantize_ternary(p, s_row, 6), torch.tensor([[.5, -.5, 0, .5, .5, 0], [0, 0, -2., 2, -2, 2]]))
    s_g = torch.tensor([[1.0, 3.0], [0.25, 4.0]])  # groups of 4 columns: [0..3], [4..5]
    assert torch.equal(dequantize_ternary(p, s_g, 6, group_size=4),
                       torch.tensor([[1., -1, 0, 1, 3, 0], [0, 0, -.25, .25, -4, 4]]))


def _problem(M, N, K, G, dtype=torch.float32, per_tensor=False, lead=()):
    g = torch.Generator().manual_seed(M * 7919 + N * 31 + K + G)
    q = torch.randint(-1, 2, (N, K), generator=g)
    qw = pack_ternary(q, G or 1)
    if G: s = torch.rand(N, math.ceil(K / G), generator=g) + 0.5
    else: s = torch.rand(1 if per_tensor else N, 1, generator=g) + 0.5
    x = torch.randn(*lead, M, K, generator=g).to(dtype)
    return x, qw, s


def test_interpreter_is_on():
    assert interpreter_active(), "tests expect TRITON_INTERPRET=1 (tests/conftest.py)"


CASES = [  # M, N, K, group, config
    (1, 33, 100, 0, TernaryConfig('mv', 16, 16, 16)),
    (3, 64, 128, 0, TernaryConfig('mv', 16, 32, 32, split_k=2, n_acc=4)),
    (17, 40, 96, 0, TernaryConfig('mv', 16, 16, 16, split_k=3)),
    (5, 48, 512, 64, TernaryConfig('mv', 16, 16, 32, split_k=3)),
    (1, 33, 100, 0, TernaryConfig('mma', 16, 16, 16, n_acc=4)),
    (17, 40, 96, 0, TernaryConfig('mma', 16, 16, 16, split_k=3)),
    (5, 48, 512, 64, TernaryConfig('mma', 16, 16, 32, split_k=3)),
    (20, 40, 260, 32, TernaryConfig('mma', 16, 16, 16)),
    (40, 24, 128, 32, TernaryConfig('mma', 64, 16, 16)),          # large-tile group path (scaled weights)
    (2, 40, 256, 32, TernaryConfig('fma', 1, 16, 16)),
    (1, 24, 90, 0, TernaryConfig('fma', 1, 8, 16, split_k=2)),
    (9, 24, 90, 0, TernaryConfig('dequant', 1, 16, 16)),
    (9, 40, 256, 32, TernaryConfig('dequant', 1, 16, 16)),
    (4, 32, 64, 0, None),                                          # pick_config
    (1100, 16, 64, 0, None),                                       # pick_config -> dequant
]


@pytest.mark.parametrize("M,N,K,G,cfg", CASES)
def test_kernels_match_reference_fp32(M, N, K, G, cfg):
    x, qw, s = _problem(M, N, K, G)
    ref = ternary_matmul_ref(x, qw, s, K, G)
    y = ternary_matmul(x, qw, s, K, G, backend='triton', config=cfg)
    assert y.shape == (M, N) and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert rel(y, ref) < 1e-5


@pytest.mark.parametrize("M,N,K,G,cfg", [(3, 48, 500, 0, TernaryConfig('mv', 16, 16, 32)),
                                         (3, 48, 500, 0, TernaryConfig('mma', 16, 16, 32, n_acc=4)),
                                         (17, 64, 256, 32, TernaryConfig('mma', 32, 32, 16, split_k=2)),
                                         (17, 64, 256, 32, TernaryConfig('mv', 16, 32, 16)),
                                         (2, 32, 128, 0, TernaryConfig('fma', 1, 16, 32)),
                                         (20, 32, 100, 0, TernaryConfig('dequant', 1, 16, 16))])
def test_kernels_match_reference_bf16(M, N, K, G, cfg):
    x, qw, s = _problem(M, N, K, G, torch.bfloat16)
    ref = ternary_matmul_ref(x.float(), qw, s, K, G)
    y = ternary_matmul(x, qw, s, K, G, backend='triton', config=cfg)
    assert y.dtype == torch.bfloat16
    assert rel(y, ref) < 1e-2


def test_per_tensor_scale_and_leading_dims():
    x, qw, s = _problem(3, 32, 64, 0, per_tensor=True, lead=(2,))
    y = ternary_matmul(x, qw, s, 64, backend='triton', config=TernaryConfig('mma', 16, 16, 16))
    assert y.shape == (2, 3, 32)
    assert rel(y, ternary_matmul_ref(x, qw, s, 64)) < 1e-5


def test_fresh_inputs_each_call_and_torch_backend():
    x, qw, s = _problem(2, 16, 64, 0)
    cfg = TernaryConfig('mma', 16, 16, 16)
    y1 = ternary_matmul(x, qw, s, 64, backend='triton', config=cfg)
    y2 = ternary_matmul(-2 * x, qw, s, 64, backend='triton', config=cfg)
    assert rel(y2, -2 * y1) < 1e-6
    assert torch.equal(ternary_matmul(x, qw, s, 64, backend='torch'), ternary_matmul_ref(x, qw, s, 64))


def test_kernel_scales_padding():
    s = torch.rand(3, 4)
    ks = kernel_scales(s, 3, 64, 32)  # 4*64/32 = 8 group slots
    assert ks.shape == (3, 8) and torch.equal(ks[:, :4], s) and (ks[:, 4:] == 0).all()
    assert kernel_scales(torch.rand(3, 1), 3, 64, 0).shape == (3, 1)


def test_dispatcher_errors_and_fallbacks():
    x, qw, s = _problem(2, 16, 64, 0)
    with pytest.raises(ValueError, match="backend"):
        ternary_matmul(x, qw, s, 64, backend='cuda')
    with pytest.raises(ValueError, match="in_features"):
        ternary_matmul(x[:, :60], qw, s, 60 - 10)
    with pytest.raises(ValueError, match="scale"):
        ternary_matmul(x, qw, torch.rand(16, 2), 64)
    with pytest.raises(TypeError, match="uint8"):
        ternary_matmul(x, qw.to(torch.int32), s, 64)
    with pytest.raises(ValueError, match="kernel"):
        TernaryConfig('cublas')
    # group size the kernels cannot index -> torch reference, said once
    x, qw, s = _problem(2, 16, 60, 20)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        y = ternary_matmul(x, qw, s, 60, 20, backend='triton')
    assert any('group_size=20' in str(m.message) for m in w)
    assert rel(y, ternary_matmul_ref(x, qw, s, 60, 20)) < 1e-6


def test_pick_config_and_bytes():
    dec = pick_config(1, 4096, 4096, 0, 132)
    assert dec.kernel in ('mv', 'mvtc', 'mvs', 'mma') and dec.block_m == (1 if dec.kernel == 'mvs' else 16)
    assert dec.split_k >= 1
    from minicpm4_core.kernels.ternary import DECODE_KERNEL
    assert dec.kernel == DECODE_KERNEL and pick_config(4, 4096, 4096, 0, 132).kernel == 'mv'   # mvtc: M = 1 only
    assert -(-4096 // dec.block_n) * dec.split_k >= 132 // 2  # the grid covers the GPU
    assert pick_config(1, 4096, 1024, 128).block_k <= 128   # tiles never straddle a group
    assert pick_config(2048, 4096, 1024).kernel == 'dequant'
    assert pick_config(100, 4096, 1024).kernel == 'mma'
    b = ternary_bytes(1, 4096, 16384)
    assert 7.9 < b['bf16'] / b['ternary'] < 8.0


@pytest.mark.parametrize("N,K,G", [(7, 37, 0), (16, 100, 32), (5, 128, 64)])
def test_dequantize_kernel_matches_reference(N, K, G):
    _, qw, s = _problem(1, N, K, G)
    w = ternary_dequantize(qw, s, K, G, torch.float32, TernaryConfig('dequant', 1, 8, 16))
    assert torch.equal(w, dequantize_ternary(qw, s, K, G))


def test_config_validation():
    with pytest.raises(ValueError, match="n_acc"):
        TernaryConfig('mma', 64, 64, 64, n_acc=4)
    with pytest.raises(ValueError, match="power of two"):
        TernaryConfig('mv', 16, 48, 64)
    with pytest.raises(ValueError, match=">= 16"):
        TernaryConfig('mv', 1, 64, 64)


def test_one_backend_vocabulary():
    "ternary, w4a16 and sparse share BACKENDS; the old spellings (None, 'ref') still work, with a DeprecationWarning."
    from minicpm4_core.attention import BACKENDS
    from minicpm4_core.kernels import sparse, ternary, w4a16
    assert ternary.BACKENDS == w4a16.BACKENDS == sparse.BACKENDS == BACKENDS == ('auto', 'triton', 'torch')
    x, qw, s = _problem(2, 16, 64, 0)
    with pytest.warns(DeprecationWarning, match="backend=None is deprecated"):
        y = ternary_matmul(x, qw, s, 64, backend=None, config=TernaryConfig('mma', 16, 16, 16))
    assert rel(y, ternary_matmul_ref(x, qw, s, 64)) < 1e-5
    with pytest.warns(DeprecationWarning, match="backend='ref' is deprecated"):
        assert torch.equal(ternary_matmul(x, qw, s, 64, backend='ref'), ternary_matmul_ref(x, qw, s, 64))
    from minicpm4_core import infllmv2
    from minicpm4_core.attention import check_backend
    with pytest.warns(DeprecationWarning, match="SPARSE_IMPL='ref'"):
        assert check_backend('ref', 'SPARSE_IMPL') == 'torch'
    old = infllmv2.SPARSE_IMPL
    try:
        infllmv2.SPARSE_IMPL = 'gpu'
        with pytest.raises(ValueError, match="SPARSE_IMPL must be one of"):
            infllmv2._kernels(x)
    finally:
        infllmv2.SPARSE_IMPL = old


# ---- mvtc: paired unpacking, x not staged (issue 13, session 2026-12-04d) ----

def _problem_aligned(N, K, G, dtype, align=4, per_tensor=False, seed=0):
    "Like _problem, packed with rows of a multiple of 4 bytes (mvtc reads the bytes as int32 words)."
    g = torch.Generator().manual_seed(seed + N * 31 + K + G)
    q = torch.randint(-1, 2, (N, K), generator=g)
    qw = pack_ternary(q, max(align, G or 1))
    s = (torch.rand(N, math.ceil(K / G), generator=g) if G else torch.rand(1 if per_tensor else N, 1, generator=g)) + 0.5
    return torch.randn(1, K, generator=g).to(dtype), qw, s


MVTC = [  # N, K, group, config
    (72, 512, 0, TernaryConfig('mvtc', 16, 64, 64)),             # ragged N (masked words)
    (96, 1000, 0, TernaryConfig('mvtc', 16, 32, 64, split_k=3)), # K < 4 * K4 (padded codes), uneven split
    (128, 1024, 0, TernaryConfig('mvtc', 16, 64, 128, split_k=2)),   # even tiles, split-K reduction
    (64, 1024, 64, TernaryConfig('mvtc', 16, 64, 64, split_k=2)),    # group scales, one group per tile
    (48, 1024, 128, TernaryConfig('mvtc', 16, 16, 32)),          # groups spanning several tiles
]


@pytest.mark.parametrize("N,K,G,cfg", MVTC)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_mvtc_matches_reference(N, K, G, cfg, dtype, tol):
    "bf16 magics (128, 32, 8, 2) and fp16 magics (1024, 256, 64, 16), one per plane, vs the float32 reference."
    x, qw, s = _problem_aligned(N, K, G, dtype)
    assert qw.shape[1] % 4 == 0
    y = ternary_matmul(x, qw, s, K, G, backend='triton', config=cfg)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, ternary_matmul_ref(x.float(), qw, s, K, G)) < tol


def test_mvtc_one_hot_columns_and_repeat():
    "A one-hot x reads one weight column: every plane and byte position lands on its own column."
    N, K = 64, 512
    _, qw, s = _problem_aligned(N, K, 0, torch.bfloat16, per_tensor=True, seed=5)
    cfg = TernaryConfig('mvtc', 16, 64, 64, split_k=2)
    W = dequantize_ternary(qw, s, K)
    for k in (0, 1, 2, 3, 5, 127, 128, 129, 256, 383, 384, K - 1):
        e = torch.zeros(1, K, dtype=torch.bfloat16); e[0, k] = 1.0
        y = ternary_matmul(e, qw, s, K, backend='triton', config=cfg)[0].float()
        torch.testing.assert_close(y, W[:, k], rtol=2 ** -7, atol=1e-6)
    x = torch.randn(1, K).to(torch.bfloat16)
    assert torch.equal(ternary_matmul(x, qw, s, K, config=cfg), ternary_matmul(x, qw, s, K, config=cfg))


def test_mvtc_fallbacks_and_errors():
    # float32 x and rows that are not whole int32 words take the 'mv' kernel (same result as the reference)
    x, qw, s = _problem_aligned(40, 256, 0, torch.float32)
    y = ternary_matmul(x, qw, s, 256, backend='triton', config=TernaryConfig('mvtc', 16, 32, 64))
    assert rel(y, ternary_matmul_ref(x, qw, s, 256)) < 1e-5
    x, qw, s = _problem(1, 24, 100, 0, torch.bfloat16)          # K4 = 25 bytes: not a multiple of 4
    assert qw.shape[1] % 4
    y = ternary_matmul(x, qw, s, 100, backend='triton', config=TernaryConfig('mvtc', 16, 16, 32))
    assert rel(y, ternary_matmul_ref(x.float(), qw, s, 100)) < 1e-2
    x, qw, s = _problem(3, 32, 256, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="M=1 only"):
        ternary_matmul(x, qw, s, 256, backend='triton', config=TernaryConfig('mvtc', 16, 32, 64))


# ---- mvs: the streaming CUDA-core GEMV (version 4, issue 13, session 2026-12-04 s6) ----

MVS = [  # N, K, config, per_tensor
    (72, 512, TernaryConfig('mvs', 1, 64, 32), False),              # ragged N (masked rows)
    (96, 1000, TernaryConfig('mvs', 1, 32, 16, split_k=3), False),  # K < 4 * K4 (padded codes), uneven split
    (128, 1024, TernaryConfig('mvs', 1, 128, 32, split_k=2), True), # even tiles, split-K reduction, per-tensor scale
    (40, 768, TernaryConfig("mvs", 1, 64, 64, split_k=5, num_warps=2), False),   # split clipped to the 3 steps, 2 warps
    (256, 256, TernaryConfig('mvs', 1, 512, 32, split_k=8), False),  # more splits than steps (clipped), rows > N
    (64, 2048, TernaryConfig('mvs', 1, 64, 16, split_k=12), False),  # 12 splits: the epilogue's 8-wide loop twice
]


@pytest.mark.parametrize("N,K,cfg,per_tensor", MVS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 1e-4)])
def test_mvs_matches_reference(N, K, cfg, per_tensor, dtype, tol):
    "bf16 pairs with scaled activations (bf16 x read 4 per int64, other dtypes by scalar loads) vs the reference."
    x, qw, s = _problem_aligned(N, K, 0, dtype, per_tensor=per_tensor, seed=7)
    x = x * 3
    y = ternary_matmul(x, qw, s, K, backend='triton', config=cfg)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, ternary_matmul_ref(x.double().float(), qw, s, K)) < tol


def test_mvs_one_hot_columns_and_repeat():
    "A one-hot x reads one weight column: every plane and byte position (both pairs, both halves) on its own column."
    N, K = 64, 512
    _, qw, s = _problem_aligned(N, K, 0, torch.float32, seed=9)
    cfg = TernaryConfig('mvs', 1, 64, 32, split_k=2)
    W = dequantize_ternary(qw, s, K)
    for k in (0, 1, 2, 3, 5, 6, 127, 128, 129, 130, 131, 256, 383, 384, 386, K - 1):
        e = torch.zeros(1, K); e[0, k] = 1.0
        for dt in (torch.float32, torch.bfloat16):
            y = ternary_matmul(e.to(dt), qw, s, K, backend='triton', config=cfg)[0].float()
            torch.testing.assert_close(y, W[:, k], rtol=2 ** -7 if dt == torch.bfloat16 else 1e-5, atol=1e-6)
    x = torch.randn(1, K).to(torch.bfloat16)
    assert torch.equal(ternary_matmul(x, qw, s, K, config=cfg), ternary_matmul(x, qw, s, K, config=cfg))


def test_mvs_fallbacks_and_errors():
    # group scales and rows that are not whole int32 words take the 'mv' kernel (same result as the reference)
    x, qw, s = _problem_aligned(48, 1024, 128, torch.bfloat16)
    y = ternary_matmul(x, qw, s, 1024, 128, backend='triton', config=TernaryConfig('mvs', 1, 64, 32))
    assert rel(y, ternary_matmul_ref(x.float(), qw, s, 1024, 128)) < 1e-2
    x, qw, s = _problem(1, 24, 100, 0, torch.bfloat16)          # K4 = 25 bytes: not a multiple of 4
    y = ternary_matmul(x, qw, s, 100, backend='triton', config=TernaryConfig('mvs', 1, 64, 32))
    assert rel(y, ternary_matmul_ref(x.float(), qw, s, 100)) < 1e-2
    x, qw, s = _problem(3, 32, 256, 0, torch.bfloat16)
    with pytest.raises(ValueError, match="M=1 only"):
        ternary_matmul(x, qw, s, 256, backend='triton', config=TernaryConfig('mvs', 1, 32, 64))
    with pytest.raises(ValueError, match="block_k >= 16"):
        TernaryConfig('mvs', 1, 32, 8)


@pytest.mark.parametrize("N,K", [(72, 512), (300, 1024), (4096, 256)])
def test_mvs_default_configs(monkeypatch, N, K):
    "With version 4 as the decode default, pick_config's choices are valid and correct; groups keep 'mv'."
    import minicpm4_core.kernels.ternary as tk
    monkeypatch.setattr(tk, 'DECODE_KERNEL', 'mvs')
    tk.pick_config.cache_clear()
    try:
        c = tk.pick_config(1, N, K // 4, 0, 132)
        assert c.kernel == 'mvs' and c.split_k >= 1 and c.block_k >= 16
        assert tk.pick_config(1, N, K // 4, 128, 132).kernel == 'mv'       # group scales: version 2
        big = tk.pick_config(1, 16384, 1024, 0, 132)
        assert -(-16384 // big.block_n) * big.split_k >= 132
        x, qw, s = _problem_aligned(N, K, 0, torch.bfloat16, seed=3)
        y = ternary_matmul(x, qw, s, K, backend='triton')
        assert rel(y, ternary_matmul_ref(x.float(), qw, s, K)) < 1e-2
    finally:
        tk.pick_config.cache_clear()


def test_mvs_activation_views():
    "bf16 x read as int64 when 8-byte aligned, by scalar loads otherwise: a (1, K) view with a row stride, both offsets."
    K = 256
    _, qw, s = _problem_aligned(64, K, 0, torch.bfloat16, seed=11)
    big = torch.randn(3, K + 4, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    for x in (big[1:2, 4:], big[1:2, 2:2 + K]):
        y = ternary_matmul(x, qw, s, K, backend='triton', config=TernaryConfig('mvs', 1, 64, 32, split_k=2))
        assert rel(y, ternary_matmul_ref(x.float(), qw, s, K)) < 1e-2


# ---- mvu: the GEMV without a loop (version 5, issue 13, session 2026-12-04 s7) ----

MVU = [  # N, K, config, per_tensor
    (72, 512, TernaryConfig('mvu', 1, 64, 32, num_warps=2, num_stages=2), False),   # ragged N (masked rows), 2 chunks
    (128, 1024, TernaryConfig('mvu', 1, 128, 32, num_stages=1), True),             # even tiles, 8 K programs, per-tensor
    (40, 768, TernaryConfig('mvu', 1, 32, 64, num_warps=1, num_stages=2), False),  # 3 chunks: 2 per program does not tile
    (256, 128, TernaryConfig('mvu', 1, 512, 32, num_stages=1), False),             # one K program (no atomics), rows > N
]


@pytest.mark.parametrize("N,K,cfg,per_tensor", MVU)
def test_mvu_matches_reference_and_resets(N, K, cfg, per_tensor):
    "bf16 x (4 per int64): vs the float64 reference; twice on fresh inputs (the workspace and counters reset)."
    import minicpm4_core.kernels.ternary as tk
    for seed in (3, 4):
        x, qw, s = _problem_aligned(N, K, 0, torch.bfloat16, per_tensor=per_tensor, seed=seed)
        x = x * 3
        y = ternary_matmul(x, qw, s, K, backend='triton', config=cfg)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        assert rel(y, ternary_matmul_ref(x.double().float(), qw, s, K)) < 1e-2
    assert float(tk._mvu_workspace('cpu', 0).abs().sum()) == 0 and int(tk._tile_counters('cpu', 0).abs().sum()) == 0


def test_mvu_one_hot_columns():
    "A one-hot bf16 x reads one weight column: every plane and byte position, in both chunks of a program."
    N, K = 64, 512
    _, qw, s = _problem_aligned(N, K, 0, torch.float32, seed=19)
    cfg = TernaryConfig('mvu', 1, 64, 16, num_warps=1, num_stages=2)
    W = dequantize_ternary(qw, s, K)
    for k in (0, 1, 2, 3, 5, 16, 17, 127, 128, 131, 256, 300, 384, 386, K - 1):
        e = torch.zeros(1, K, dtype=torch.bfloat16); e[0, k] = 1.0
        y = ternary_matmul(e, qw, s, K, backend='triton', config=cfg)[0].float()
        torch.testing.assert_close(y, W[:, k], rtol=2 ** -7, atol=1e-6)


def test_mvu_errors():
    x, qw, s = _problem_aligned(48, 512, 0, torch.float16)
    with pytest.raises(ValueError, match="bf16 row"):          # float16 x: no int64 activation loads
        ternary_matmul(x, qw, s, 512, backend='triton', config=TernaryConfig('mvu', 1, 64, 32, num_stages=1))
    x, qw, s = _problem_aligned(48, 1024, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="no group scales"):
        ternary_matmul(x, qw, s, 1024, 128, backend='triton', config=TernaryConfig('mvu', 1, 64, 32, num_stages=2))
    with pytest.raises(ValueError, match="split_k = 1"):
        TernaryConfig('mvu', 1, 64, 32, split_k=2, num_stages=1)
    with pytest.raises(ValueError, match="num_stages"):
        TernaryConfig('mvu', 1, 64, 32)                          # the default num_stages (4) is not a chunk count


# ---- mvtu: version 3's tensor-core tile without the loop (version 6, issue 13, session 2026-12-04 s7) ----

MVTU = [  # N, K, config, per_tensor
    (72, 512, TernaryConfig('mvtu', 1, 64, 32, num_stages=2), False),     # ragged N, 2 tiles per program, 2 K programs
    (128, 1024, TernaryConfig('mvtu', 1, 64, 64, num_stages=1), True),    # even rows, 4 K programs, per-tensor scale
    (64, 768, TernaryConfig('mvtu', 1, 64, 64, num_stages=2), False),     # 3 tiles: 2 per program does not tile -> 1
    (64, 256, TernaryConfig('mvtu', 1, 64, 64, num_stages=1), False),     # one K program: y stored directly
]


@pytest.mark.parametrize("N,K,cfg,per_tensor", MVTU)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mvtu_matches_reference_and_resets(N, K, cfg, per_tensor, dtype):
    "bf16/fp16 x: vs the float64 reference, twice on fresh inputs; the workspace and counters reset."
    import minicpm4_core.kernels.ternary as tk
    for seed in (5, 6):
        x, qw, s = _problem_aligned(N, K, 0, dtype, per_tensor=per_tensor, seed=seed)
        x = x * 3
        y = ternary_matmul(x, qw, s, K, backend='triton', config=cfg)
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert rel(y, ternary_matmul_ref(x.double().float(), qw, s, K)) < 1e-2
    assert float(tk._mvu_workspace('cpu', 0).abs().sum()) == 0 and int(tk._tile_counters('cpu', 0).abs().sum()) == 0


def test_mvtu_one_hot_columns_and_errors():
    "A one-hot x reads one weight column: every plane and byte position, both tiles of a program; bad calls refused."
    N, K = 64, 512
    _, qw, s = _problem_aligned(N, K, 0, torch.float32, seed=23)
    cfg = TernaryConfig('mvtu', 1, 64, 32, num_stages=2)
    W = dequantize_ternary(qw, s, K)
    for k in (0, 1, 2, 3, 5, 31, 32, 33, 127, 128, 131, 256, 300, 384, K - 1):
        e = torch.zeros(1, K, dtype=torch.float16); e[0, k] = 1.0
        y = ternary_matmul(e, qw, s, K, backend='triton', config=cfg)[0].float()
        torch.testing.assert_close(y, W[:, k], rtol=2 ** -10, atol=1e-6)
    with pytest.raises(ValueError, match="bf16 row"):
        ternary_matmul(torch.randn(1, K), qw, s, K, backend='triton', config=cfg)      # float32 x
    with pytest.raises(ValueError, match="16 \\* num_warps"):
        TernaryConfig('mvtu', 1, 32, 32, num_stages=1)
