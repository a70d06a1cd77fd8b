"""W4A16 format and Triton kernels (run under the Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1)."""
import pytest
import torch

from minicpm4_core.kernels.w4a16 import (W4A16Config, _lock_buffer, default_config, dequantize_w4, interpreter_active,
                                         pack_int4, random_w4, unpack_int4, w4a16_matmul, w4a16_matmul_naive)


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def ref64(x, qw, s, qz, G):
    return x.double() @ dequantize_w4(qw, s, qz, G, torch.float64)


def test_interpreter_is_on():
    assert interpreter_active(), "tests must run the kernels in the Triton interpreter (see tests/conftest.py)"


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_pack_unpack_round_trip(dim):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (24, 40, 16), generator=g)
    p = pack_int4(q, dim)
    assert p.dtype == torch.int32 and p.shape[dim] == q.shape[dim] // 8 and p.is_contiguous()
    assert torch.equal(unpack_int4(p, dim), q.to(torch.uint8))


def test_pack_layout_and_sign():
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]).T          # (8, 1): one word, code j in bits 4j..4j+3
    w = pack_int4(q, 0)
    assert w.shape == (1, 1) and int(w) == 0xF7654321 - 2**32   # top code >= 8 -> a negative int32


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([0, 1, 2, 3, 4, 5, 6, 16]))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(12, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        pack_int4(torch.zeros(8))
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(2, dtype=torch.int64))


def test_dequantize_formula():
    K, N, G = 64, 16, 32
    qw, s, qz = random_w4(K, N, G, seed=3)
    q, z = unpack_int4(qw, 0).float(), unpack_int4(qz, 1).float()
    W = dequantize_w4(qw, s, qz, G)
    k, n = 37, 11
    assert torch.isclose(W[k, n], (q[k, n] - z[k // G, n]) * s[k // G, n].float())


CASES = [  # (M, K, N, G, config)
    (1, 256, 72, 128, None),                                   # default gemv, ragged N
    (1, 256, 72, 128, W4A16Config('gemv', 1, 32, 32, 3)),      # split that does not divide the K steps
    (1, 384, 64, 128, W4A16Config('gemv', 1, 64, 128, 8)),     # split clipped to K // block_k
    (1, 128, 64, -1, W4A16Config('gemv', 1, 32, 128, 1)),      # one group per column
    (1, 256, 64, 64, W4A16Config('gemm', 16, 32, 64, 2)),      # gemm at M = 1
    (3, 256, 64, 128, None),                                   # default small-M gemm
    (16, 384, 128, 128, W4A16Config('gemm', 16, 64, 128, 4)),  # split-K gemm, one empty split
    (33, 128, 64, 64, W4A16Config('gemm', 64, 32, 32, 1)),     # large-M path (weights scaled before the dot)
]


@pytest.mark.parametrize("M,K,N,G,cfg", CASES)
def test_kernel_matches_reference_bf16(M, K, N, G, cfg):
    qw, s, qz = random_w4(K, N, G, seed=M + K + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
    y = torch.full((M, N), float('nan'), dtype=torch.bfloat16)             # poisoned: every element must be written
    w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg, out=y)
    assert torch.isfinite(y).all()
    assert rel(y, ref64(x, qw, s, qz, G)) <= 1e-2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_other_dtypes(dtype, tol):
    K, N = 256, 64
    qw, s, qz = random_w4(K, N, 128, seed=7)
    for M, cfg in [(1, None), (5, None)]:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        y = w4a16_matmul(x, qw, s, qz, 128, config=cfg)
        assert y.dtype == dtype and rel(y, ref64(x, qw, s, qz, 128)) <= tol


def test_split_k_counters_reset_and_repeatable():
    K, N = 512, 64
    qw, s, qz = random_w4(K, N, 128, seed=9)
    x = torch.randn(1, K).to(torch.bfloat16)
    cfg = W4A16Config('gemv', 1, 32, 64, 4)
    y1 = w4a16_matmul(x, qw, s, qz, 128, config=cfg)
    y2 = w4a16_matmul(x, qw, s, qz, 128, config=cfg)
    assert torch.equal(y1, y2)
    assert int(_lock_buffer(x.device, 0).abs().sum()) == 0, "the last program of each tile must reset its counter"


def test_batched_input_and_torch_backend():
    K, N = 128, 32
    qw, s, qz = random_w4(K, N, 64, seed=11)
    x = torch.randn(2, 3, K)
    y = w4a16_matmul(x, qw, s, qz, 64)
    assert y.shape == (2, 3, N)
    assert rel(y, w4a16_matmul(x, qw, s, qz, 64, backend='torch')) <= 1e-5
    assert torch.allclose(w4a16_matmul_naive(x, qw, s, qz, 64), w4a16_matmul(x, qw, s, qz, 64, backend='torch'))


def test_default_config_shapes():
    for M, N, K in [(1, 4096, 4096), (1, 16384, 4096), (1, 4096, 16384), (4, 4096, 4096), (16, 64, 128),
                    (2048, 4096, 4096)]:
        c = default_config(M, N, K, 128)
        assert 128 % c.block_k == 0 and c.split_k >= 1
        assert (c.kernel in ('gemv', 'gemvtc', 'gemvs', 'gemvu')) == (M == 1) or (c.kernel == 'gemvs' and M <= 4)
    from minicpm4_core.kernels.w4a16 import DECODE_KERNEL, GEMVS_MIN_N
    assert DECODE_KERNEL in ('gemv', 'gemvtc', 'gemvs', 'gemvu')
    assert default_config(1, 4096, 16384, 128).kernel == ('gemvs' if DECODE_KERNEL == 'gemvtc' and 0 < GEMVS_MIN_N <= 4096
                                                          else DECODE_KERNEL)
    if DECODE_KERNEL == 'gemvu':
        assert default_config(1, 4096, 4096, 32).kernel == 'gemvu'         # any group that is a multiple of 8
        return
    assert default_config(1, 16384, 4096, 128).kernel == ('gemvs' if 0 < GEMVS_MIN_N <= 16384 else DECODE_KERNEL)
    assert default_config(1, 4096, 4096, 32).kernel == 'gemv'              # groups too small for gemvtc's 64-row tiles


def test_bad_arguments_rejected():
    K, N = 128, 32
    qw, s, qz = random_w4(K, N, 64)
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match="K=100"):
        w4a16_matmul(torch.randn(2, 100), qw, s, qz, 64)
    with pytest.raises(TypeError, match="qweight"):
        w4a16_matmul(x, qw.long(), s, qz, 64)
    with pytest.raises(TypeError, match="x must be"):
        w4a16_matmul(x.long(), qw, s, qz, 64)
    with pytest.raises(ValueError, match="group_size=48"):
        w4a16_matmul(x, qw, s, qz, 48)
    with pytest.raises(ValueError, match="scales"):
        w4a16_matmul(x, qw, s[:1], qz, 64)
    with pytest.raises(ValueError, match="qzeros"):
        w4a16_matmul(x, qw, s, qz[:, :2], 64)
    with pytest.raises(ValueError, match="backend"):
        w4a16_matmul(x, qw, s, qz, 64, backend='cuda')
    with pytest.raises(ValueError, match="M=1 only"):
        w4a16_matmul(x, qw, s, qz, 64, config=W4A16Config('gemv', 1, 32, 64))
    with pytest.raises(ValueError, match="block_k"):
        w4a16_matmul(x, qw, s, qz, 64, config=W4A16Config('gemm', 16, 32, 128))
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul(x, qw, s, qz, 64, out=torch.empty(2, N + 8))
    with pytest.raises(ValueError, match="kernel"):
        W4A16Config('gemvv')
    with pytest.raises(ValueError, match="power of two"):
        W4A16Config('gemm', 16, 48)


# ---- gemv16 (fp16-lane magic numbers), dequantize + cuBLAS prefill (issue 13, session 3) ----

GEMV16 = [  # (K, N, G, config)
    (256, 72, 128, W4A16Config('gemv16', 1, 32, 128, 1)),     # ragged N (72 = 2 x 32 + 8)
    (512, 64, 64, W4A16Config('gemv16', 1, 64, 64, 4)),       # split-K with the semaphore epilogue
    (256, 64, 32, W4A16Config('gemv16', 1, 16, 32, 3)),       # a split that does not divide the K steps
    (128, 64, -1, W4A16Config('gemv16', 1, 32, 64, 1)),       # one group per column, two steps per group
]


@pytest.mark.parametrize("K,N,G,cfg", GEMV16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv16_matches_reference(K, N, G, cfg, dtype):
    "Every code position (both halves, low and high nibbles, all 16 values) reaches the right row: vs float64."
    qw, s, qz = random_w4(K, N, G, seed=K + N + cfg.split_k)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(K)).to(dtype)
    y = torch.full((1, N), float('nan'), dtype=dtype)
    w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg, out=y)
    assert torch.isfinite(y).all()
    assert rel(y, ref64(x, qw, s, qz, G)) <= (1e-2 if dtype == torch.bfloat16 else 1e-5)
    # one hot activations read single rows: row k of the weight, exactly (fp32)
    for k in (0, 3, 4, 7, K - 1):
        e = torch.zeros(1, K); e[0, k] = 1.0
        torch.testing.assert_close(w4a16_matmul(e, qw, s, qz, G, backend='triton', config=cfg)[0],
                                   dequantize_w4(qw, s, qz, G)[k], rtol=1e-6, atol=1e-6)


def test_dequant_kernel_is_exact_and_dispatched_from_threshold():
    from minicpm4_core.kernels.w4a16 import DEQUANT_MIN_M, w4a16_dequantize
    K, N, G = 256, 72, 64
    qw, s, qz = random_w4(K, N, G, seed=21)
    W = w4a16_dequantize(qw, s, qz, G, torch.float32, backend='triton')
    assert torch.equal(W, dequantize_w4(qw, s, qz, G))                     # (q - z) * s in float32: bit-exact
    # bf16: one rounding of that exact value (the interpreter truncates where the GPU rounds: within one ulp)
    torch.testing.assert_close(w4a16_dequantize(qw, s, qz, G, torch.bfloat16, backend='triton').float(), W,
                               rtol=2 ** -7, atol=0)
    assert default_config(DEQUANT_MIN_M, N, K, G).kernel == 'dequant'
    assert default_config(DEQUANT_MIN_M - 1, N, K, G).kernel == 'gemm'
    assert default_config(40, N, K, G, dequant_min_m=32).kernel == 'dequant'
    x = torch.randn(40, K, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = torch.full((40, N), float('nan'), dtype=torch.bfloat16)
    w4a16_matmul(x, qw, s, qz, G, backend='triton', dequant_min_m=32, out=y)
    assert rel(y, ref64(x, qw, s, qz, G)) <= 1e-2
    assert rel(y, w4a16_matmul(x, qw, s, qz, G, backend='triton', dequant_min_m=64)) <= 1e-2   # the gemm kernel
    with pytest.raises(ValueError, match="M=1 only"):
        w4a16_matmul(x, qw, s, qz, G, config=W4A16Config('gemv16', 1, 32, 64))
    with pytest.raises(ValueError, match="no split_k"):
        W4A16Config('dequant', 1, 64, 64, 2)


# ---- gemvtc: the tensor-core GEMV (issue 13, session 2026-12-04d) ----

GEMVTC = [  # (K, N, G, config): every path of the kernel
    (256, 72, 128, W4A16Config('gemvtc', 1, 64, 128, 1)),     # ragged N (masked loads), one group per tile
    (512, 200, 64, W4A16Config('gemvtc', 1, 64, 64, 3)),      # groups of 64, a split that does not divide 8 steps
    (384, 128, 128, W4A16Config('gemvtc', 1, 128, 128, 8)),   # split clipped to K // block_k = 3, even N
    (256, 64, 128, W4A16Config('gemvtc', 1, 64, 64, 2)),      # two tiles per group
    (128, 64, -1, W4A16Config('gemvtc', 1, 64, 128, 1)),      # one group per column
]


@pytest.mark.parametrize("K,N,G,cfg", GEMVTC)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_gemvtc_matches_reference(K, N, G, cfg, dtype, tol):
    "bf16 (128 + q magic) and fp16 (1024 + q) operands, the zero point folded out of the loop: vs float64."
    qw, s, qz = random_w4(K, N, G, seed=K + N + cfg.split_k + 100)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(K + 1)).to(dtype)
    y = torch.full((1, N), float('nan'), dtype=dtype)
    w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg, out=y)
    assert torch.isfinite(y).all()
    assert rel(y, ref64(x, qw, s, qz, G)) <= tol


def test_gemvtc_one_hot_rows_and_repeat():
    "A one-hot x reads one weight row: every code position (plane i of half h of word r) lands on its own row."
    K, N, G = 256, 64, 128
    qw, s, qz = random_w4(K, N, G, seed=31)
    cfg = W4A16Config('gemvtc', 1, 64, 128, 2)
    W = dequantize_w4(qw, s, qz, G)
    for k in (0, 1, 3, 4, 7, 8, 13, 130, K - 1):
        e = torch.zeros(1, K, dtype=torch.bfloat16); e[0, k] = 1.0
        y = w4a16_matmul(e, qw, s, qz, G, backend='triton', config=cfg)[0].float()
        torch.testing.assert_close(y, W[k], rtol=2 ** -7, atol=1e-6)          # one bf16 rounding of (q - z) * s
    x = torch.randn(1, K).to(torch.bfloat16)
    assert torch.equal(w4a16_matmul(x, qw, s, qz, G, config=cfg), w4a16_matmul(x, qw, s, qz, G, config=cfg))
    assert int(_lock_buffer(x.device, 0).abs().sum()) == 0


def test_gemvtc_float32_falls_back_and_bad_configs():
    K, N, G = 256, 64, 128
    qw, s, qz = random_w4(K, N, G, seed=41)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(4))
    y = w4a16_matmul(x, qw, s, qz, G, config=W4A16Config('gemvtc', 1, 64, 128, 2))   # float32 x: kernel 1
    assert y.dtype == torch.float32 and rel(y, ref64(x, qw, s, qz, G)) <= 1e-5
    with pytest.raises(ValueError, match="block_k >= 64"):
        W4A16Config('gemvtc', 1, 64, 32)
    with pytest.raises(ValueError, match="16 \\* num_warps"):
        W4A16Config('gemvtc', 1, 64, 128, 1, 8)
    with pytest.raises(ValueError, match="M=1 only"):
        w4a16_matmul(torch.randn(2, K), qw, s, qz, G, config=W4A16Config('gemvtc', 1, 64, 128))


@pytest.mark.parametrize("M", [2, 5, 8])
def test_small_m_default_matches_reference(M):
    "Decode batches of 2..8 rows (the engine's batch > 1) on the default kernel, bf16 and fp16."
    K, N, G = 256, 136, 64
    qw, s, qz = random_w4(K, N, G, seed=50 + M)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
        y = w4a16_matmul(x, qw, s, qz, G, backend='triton')
        assert torch.isfinite(y).all() and rel(y, ref64(x, qw, s, qz, G)) <= 1e-2


# ---- gemvs: the streaming CUDA-core GEMV (kernel 5, issue 13, session 2026-12-04 s6) ----

GEMVS = [  # (K, N, G, config): every path of the kernel
    (256, 72, 128, W4A16Config('gemvs', 1, 128, 32, 1, 1, 2)),     # ragged N (masked loads), four steps per group
    (512, 200, 64, W4A16Config('gemvs', 1, 256, 32, 3, 2, 3)),     # groups of 64, a split that does not divide 8 steps
    (384, 128, 128, W4A16Config('gemvs', 1, 128, 32, 16, 1, 1)),   # split clipped to K // block_k = 12, even N
    (256, 1024, 32, W4A16Config('gemvs', 1, 512, 32, 2, 4, 2)),    # groups of 32, 4 warps
    (128, 64, -1, W4A16Config('gemvs', 1, 128, 32, 1, 1, 3)),      # one group per column; depth 3
    (192, 136, 64, W4A16Config('gemvs', 1, 128, 8, 5, 1, 2)),      # one word row per step
    (512, 136, 128, W4A16Config('gemvs', 1, 128, 16, 12, 1, 2)),   # 12 splits: the epilogue's 8-wide loop twice
]


@pytest.mark.parametrize("K,N,G,cfg", GEMVS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 2e-5)])
def test_gemvs_matches_reference(K, N, G, cfg, dtype, tol):
    "bf16-pair unpack with the stray low half cancelled through x: vs float64, bf16/fp16/float32 activations."
    qw, s, qz = random_w4(K, N, G, seed=K + N + cfg.split_k + 200)
    x = (torch.randn(1, K, generator=torch.Generator().manual_seed(K + 3)) * 3).to(dtype)
    y = torch.full((1, N), float('nan'), dtype=dtype)
    w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg, out=y)
    assert torch.isfinite(y).all()
    assert rel(y, ref64(x, qw, s, qz, G)) <= tol


def test_gemvs_one_hot_rows_extreme_codes_and_repeat():
    "One-hot x reads one weight row (each code position, both halves of each pair); all-0 and all-15 codes."
    K, N, G = 256, 128, 128
    qw, s, qz = random_w4(K, N, G, seed=61)
    qw[0] = 0                                  # codes 0 everywhere in word row 0 (rows 0..7)
    qw[1] = -1                                 # codes 15 everywhere in word row 1 (rows 8..15)
    cfg = W4A16Config('gemvs', 1, 128, 32, 2, 1, 2)
    W = dequantize_w4(qw, s, qz, G)
    for k in (0, 1, 3, 4, 7, 8, 11, 12, 15, 130, K - 1):
        e = torch.zeros(1, K, dtype=torch.float32); e[0, k] = 1.0
        y = w4a16_matmul(e, qw, s, qz, G, backend='triton', config=cfg)[0]
        torch.testing.assert_close(y, W[k], rtol=1e-5, atol=1e-6)
    x = torch.randn(1, K).to(torch.bfloat16)
    assert torch.equal(w4a16_matmul(x, qw, s, qz, G, config=cfg), w4a16_matmul(x, qw, s, qz, G, config=cfg))
    assert int(_lock_buffer(x.device, 0).abs().sum()) == 0


def test_gemvs_bad_configs():
    K, N, G = 256, 128, 128
    qw, s, qz = random_w4(K, N, G, seed=71)
    with pytest.raises(ValueError, match="128 \\* num_warps"):
        W4A16Config('gemvs', 1, 128, 32, 1, 2)
    with pytest.raises(ValueError, match="num_stages"):
        W4A16Config('gemvs', 1, 128, 32, 1, 1, 4)
    with pytest.raises(ValueError, match="block_k <= 32"):
        W4A16Config('gemvs', 1, 128, 64, 1, 1, 2)
    with pytest.raises(ValueError, match="M <= 4"):
        w4a16_matmul(torch.randn(5, K), qw, s, qz, G, config=W4A16Config('gemvs', 1, 128, 32, 1, 1, 2))
    qw, s, qz = random_w4(K, N, 16, seed=72)
    with pytest.raises(ValueError, match="must divide group_size"):
        w4a16_matmul(torch.randn(1, K), qw, s, qz, 16, config=W4A16Config('gemvs', 1, 128, 32, 1, 1, 2))


@pytest.mark.parametrize("M,cfg", [(2, W4A16Config('gemvs', 1, 128, 32, 2, 1, 2)), (3, W4A16Config('gemvs', 1, 256, 16, 3, 2, 1)),
                                   (4, W4A16Config('gemvs', 1, 128, 32, 1, 1, 3))])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 2e-5)])
def test_gemvs_small_batches(M, cfg, dtype, tol):
    "Batched decode (M <= 4): one accumulator per row, the unpack shared; ragged N, strided rows of x."
    K, N, G = 256, 200, 64
    qw, s, qz = random_w4(K, N, G, seed=80 + M)
    xb = torch.randn(M, K + 8, generator=torch.Generator().manual_seed(M)).to(dtype)
    x = xb[:, :K]                                        # rows of stride K + 8 (unit stride along K)
    y = w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg)
    ref = ref64(x, qw, s, qz, G)
    assert torch.isfinite(y).all() and y.shape == (M, N)
    for m in range(M):                                   # each row on its own (a mixed-up row would pass a norm test)
        assert rel(y[m], ref[m]) <= tol


@pytest.mark.parametrize("M,K,N,G", [(1, 512, 200, 128), (1, 256, 4096, 64), (3, 256, 136, 32), (4, 1024, 64, -1)])
def test_gemvs_default_configs(monkeypatch, M, K, N, G):
    "With kernel 5 as the decode/batch default, default_config's choices are valid and correct (any N, K, group)."
    import minicpm4_core.kernels.w4a16 as w4
    monkeypatch.setattr(w4, 'DECODE_KERNEL', 'gemvs')
    monkeypatch.setattr(w4, 'BATCH_KERNEL', 'gemvs')
    w4.default_config.cache_clear()
    try:
        c = w4.default_config(M, N, K, G)
        assert c.kernel == 'gemvs' and (K if G == -1 else G) % c.block_k == 0 and 1 <= c.split_k <= w4.GEMVS_MAX_SPLIT
        assert c.block_n >= 128 * c.num_warps and (c.block_n // 2 < N or c.num_warps == 1)
        for n_ in (16384, 4096):    # 8B shapes: enough programs for the GPU
            big = w4.default_config(M, n_, 4096, 128, None)
            assert -(-n_ // big.block_n) * big.split_k >= 132
        qw, s, qz = random_w4(K, N, G, seed=90 + M)
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16)
        y = w4a16_matmul(x, qw, s, qz, G, backend='triton')
        assert rel(y, ref64(x, qw, s, qz, G)) <= 1e-2
    finally:
        w4.default_config.cache_clear()


def test_gemvs_activation_views():
    "bf16 x read as int64 when 8-byte aligned, by scalar loads otherwise: a (1, K) view with a row stride, both offsets."
    K, N, G = 256, 128, 128
    qw, s, qz = random_w4(K, N, G, seed=95)
    big = torch.randn(3, K + 4, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    cfg = W4A16Config('gemvs', 1, 128, 32, 2, 1, 2)
    for x in (big[1:2, 4:], big[1:2, 2:2 + K]):          # data_ptr % 8 == 0 (int64 path), == 4 (scalar path)
        y = w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg)
        assert rel(y, ref64(x, qw, s, qz, G)) <= 1e-2


def test_gemvs_default_failure_falls_back_once(monkeypatch):
    "If kernel 5 fails as a default (a compiler of another version), the call still answers, says so once, and the"
    "defaults avoid it from then on; an explicit gemvs config raises."
    import minicpm4_core.kernels.w4a16 as w4
    def boom(*a, **k): raise RuntimeError("simulated compile failure")
    monkeypatch.setattr(w4, '_gemvs_launch', boom)
    monkeypatch.setattr(w4, '_GEMVS_FAILED', [])
    monkeypatch.setattr(w4, 'DECODE_KERNEL', 'gemvtc')   # kernel 5 is then the default from GEMVS_MIN_N columns
    w4.default_config.cache_clear()
    try:
        K, N, G = 256, 8192, 128                      # N >= GEMVS_MIN_N: kernel 5 is the default
        qw, s, qz = random_w4(K, N, G, seed=99)
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
        assert w4.default_config(1, N, K, G).kernel == 'gemvs'
        with pytest.warns(UserWarning, match="kernel 5"):
            y = w4.w4a16_matmul(x, qw, s, qz, G, backend='triton')
        assert rel(y, ref64(x, qw, s, qz, G)) <= 1e-2
        assert w4.default_config(1, N, K, G).kernel != 'gemvs' and w4._GEMVS_FAILED
        with pytest.raises(RuntimeError, match="simulated"):
            w4.w4a16_matmul(x, qw, s, qz, G, backend='triton', config=W4A16Config('gemvs', 1, 256, 32, 2, 1, 2))
    finally:
        w4.default_config.cache_clear()


# ---- gemvu: the GEMV without a loop (kernel 6, issue 13, session 2026-12-04 s7) ----

GEMVU = [  # (K, N, G, config): every path of the kernel
    (256, 72, 128, W4A16Config('gemvu', 1, 128, 32, 1, 1, 2)),     # ragged N (masked), 2 chunks of one group each
    (512, 200, 64, W4A16Config('gemvu', 1, 256, 64, 1, 2, 1)),     # groups of 64, one chunk = one group, 2 warps
    (384, 128, 128, W4A16Config('gemvu', 1, 512, 128, 1, 2, 2)),   # 3 chunks: 2 per program does not tile -> 1
    (128, 64, -1, W4A16Config('gemvu', 1, 64, 32, 1, 1, 2)),       # one group per column
    (64, 256, 32, W4A16Config('gemvu', 1, 256, 32, 1, 1, 2)),      # one K program: no atomics, y stored directly
]


@pytest.mark.parametrize("K,N,G,cfg", GEMVU)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 2e-5)])
def test_gemvu_matches_reference_and_resets(K, N, G, cfg, dtype, tol):
    "Loads gated, partials added to the workspace: vs float64 on two fresh inputs; workspace and counters back at 0."
    import minicpm4_core.kernels.w4a16 as w4
    qw, s, qz = random_w4(K, N, G, seed=K + N + 300)
    for seed in (1, 2):
        x = (torch.randn(1, K, generator=torch.Generator().manual_seed(K + seed)) * 3).to(dtype)
        y = torch.full((1, N), float('nan'), dtype=dtype)
        w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg, out=y)
        assert torch.isfinite(y).all()
        assert rel(y, ref64(x, qw, s, qz, G)) <= tol
    assert float(w4._zero_workspace(x.device, 0).abs().sum()) == 0 and int(_lock_buffer(x.device, 0).abs().sum()) == 0


def test_gemvu_one_hot_rows_and_bad_configs():
    "One-hot x reads one weight row (each code position, both chunks); M > 1 and bad configs are refused."
    K, N, G = 256, 128, 128
    qw, s, qz = random_w4(K, N, G, seed=63)
    qw[1] = -1                                 # codes 15 everywhere in word row 1 (rows 8..15)
    cfg = W4A16Config('gemvu', 1, 128, 16, 1, 1, 2)
    W = dequantize_w4(qw, s, qz, G)
    for k in (0, 3, 4, 7, 8, 12, 15, 16, 31, 130, K - 1):
        for dt in (torch.float32, torch.bfloat16):
            e = torch.zeros(1, K, dtype=dt); e[0, k] = 1.0
            y = w4a16_matmul(e, qw, s, qz, G, backend='triton', config=cfg)[0].float()
            torch.testing.assert_close(y, W[k], rtol=2 ** -7 if dt == torch.bfloat16 else 1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="M=1 only"):
        w4a16_matmul(torch.randn(2, K), qw, s, qz, G, config=cfg)
    with pytest.raises(ValueError, match="split_k = 1"):
        W4A16Config('gemvu', 1, 128, 32, 2, 1, 1)
    with pytest.raises(ValueError, match="num_stages"):
        W4A16Config('gemvu', 1, 128, 32, 1, 1, 3)


@pytest.mark.parametrize("K,N,G", [(512, 200, 128), (256, 2048, 64), (256, 136, 32), (1024, 64, -1), (128, 1024, 16)])
def test_gemvu_default_configs(K, N, G):
    "Kernel 6 as the M = 1 default: valid configs for any N, K, group (512 columns), correct results."
    import minicpm4_core.kernels.w4a16 as w4
    if w4.DECODE_KERNEL != 'gemvu':
        pytest.skip("kernel 6 is not the decode default")
    c = w4.default_config(1, N, K, G)
    assert c.kernel == 'gemvu' and (K if G == -1 else G) % c.block_k == 0 and c.num_stages in (1, 2)
    assert c.block_n == 512 and c.num_stages == (2 if K % (2 * c.block_k) == 0 else 1)
    assert w4.default_config(1, 16384, 4096, 128).num_stages == 2 and w4.default_config(1, 4096, 4096, 16).num_stages == 2
    assert w4.default_config(1, 512, 96, -1).num_stages == 1            # three 32-row chunks: one per program
    qw, s, qz = random_w4(K, N, G, seed=101)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert rel(w4a16_matmul(x, qw, s, qz, G, backend='triton'), ref64(x, qw, s, qz, G)) <= 1e-2


def test_gemvu_default_failure_falls_back_once(monkeypatch):
    "If kernel 6 fails as a default, the call still answers (another kernel), says so once, and the defaults avoid it."
    import minicpm4_core.kernels.w4a16 as w4
    def boom(*a, **k): raise RuntimeError("simulated compile failure")
    monkeypatch.setattr(w4, '_gemvu_launch', boom)
    monkeypatch.setattr(w4, '_GEMVU_FAILED', [])
    monkeypatch.setattr(w4, 'DECODE_KERNEL', 'gemvu')
    w4.default_config.cache_clear()
    try:
        K, N, G = 256, 512, 128
        qw, s, qz = random_w4(K, N, G, seed=98)
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
        assert w4.default_config(1, N, K, G).kernel == 'gemvu'
        with pytest.warns(UserWarning, match="kernel 6"):
            y = w4.w4a16_matmul(x, qw, s, qz, G, backend='triton')
        assert rel(y, ref64(x, qw, s, qz, G)) <= 1e-2
        assert w4.default_config(1, N, K, G).kernel != 'gemvu' and w4._GEMVU_FAILED
        with pytest.raises(RuntimeError, match="simulated"):
            w4.w4a16_matmul(x, qw, s, qz, G, backend='triton', config=W4A16Config('gemvu', 1, 256, 32, 1, 1, 2))
    finally:
        w4.default_config.cache_clear()


# ---- gemvtu: kernel 4's tensor-core tile without the loop (kernel 7, issue 13, session 2026-12-04 s7) ----

GEMVTU = [  # (K, N, G, config)
    (256, 72, 128, W4A16Config('gemvtu', 1, 64, 128, 1, 4, 2)),    # ragged N, one program along K: y stored directly
    (512, 200, 64, W4A16Config('gemvtu', 1, 128, 64, 1, 4, 2)),    # groups of 64, 4 K programs
    (384, 128, 128, W4A16Config('gemvtu', 1, 64, 128, 1, 4, 2)),   # 3 tiles: 2 per program does not tile -> 1
    (128, 64, -1, W4A16Config('gemvtu', 1, 64, 64, 1, 4, 1)),      # one group per column
]


@pytest.mark.parametrize("K,N,G,cfg", GEMVTU)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3), (torch.float32, 2e-5)])
def test_gemvtu_matches_reference_and_resets(K, N, G, cfg, dtype, tol):
    "bf16/fp16 x on the tensor-core tile (float32 x takes kernel 6): vs float64 on two fresh inputs; buffers back at 0."
    import minicpm4_core.kernels.w4a16 as w4
    qw, s, qz = random_w4(K, N, G, seed=K + N + 400)
    for seed in (1, 2):
        x = (torch.randn(1, K, generator=torch.Generator().manual_seed(K + seed)) * 3).to(dtype)
        y = w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg)
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert rel(y, ref64(x, qw, s, qz, G)) <= tol
    assert float(w4._zero_workspace(x.device, 0).abs().sum()) == 0 and int(_lock_buffer(x.device, 0).abs().sum()) == 0


def test_gemvtu_one_hot_rows_and_bad_configs():
    "One-hot x reads one weight row: every code position of both halves of a word, in both tiles of a program."
    K, N, G = 256, 64, 128
    qw, s, qz = random_w4(K, N, G, seed=67)
    cfg = W4A16Config('gemvtu', 1, 64, 64, 1, 4, 2)
    W = dequantize_w4(qw, s, qz, G)
    for k in (0, 3, 4, 7, 8, 15, 63, 64, 71, 130, K - 1):
        e = torch.zeros(1, K, dtype=torch.float16); e[0, k] = 1.0
        y = w4a16_matmul(e, qw, s, qz, G, backend='triton', config=cfg)[0].float()
        torch.testing.assert_close(y, W[k], rtol=2 ** -10, atol=1e-6)
    with pytest.raises(ValueError, match="M=1 only"):
        w4a16_matmul(torch.randn(2, K), qw, s, qz, G, config=cfg)
    with pytest.raises(ValueError, match="block_k >= 64"):
        W4A16Config('gemvtu', 1, 64, 32, 1, 4, 1)


# ---- rows 17-64 (an FR-Spec tree verify) on the split-K GEMM with one M tile (session 2026-12-05, opt-in) ----

@pytest.mark.parametrize("M", [17, 33, 49])
def test_verify_rows_on_one_m_tile(monkeypatch, M):
    "SKINNY_MAX_M = 64 (the default): 17-64 rows take one 32/64-row tile with split-K (the weights read once) == the reference."
    import minicpm4_core.kernels.w4a16 as w4
    K, N, G = 512, 200, 64
    monkeypatch.setattr(w4, 'SKINNY_MAX_M', 16)                          # 16: the prefill tiling, no split
    default_config.cache_clear()
    assert default_config(M, N, K, G).block_m in (64, 128) and default_config(M, N, K, G).split_k == 1
    monkeypatch.setattr(w4, 'SKINNY_MAX_M', 64)
    default_config.cache_clear()
    try:
        c = default_config(M, N, K, G)
        assert c.kernel == 'gemm' and c.block_m == (32 if M <= 32 else 64) >= M and c.block_n == 64
        qw, s, qz = random_w4(K, N, G, seed=70 + M)
        for dtype, tol in ((torch.bfloat16, 1e-2), (torch.float32, 2e-5)):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
            for cfg in (c, W4A16Config('gemm', c.block_m, 64, 64, 3)):            # the default and a forced 3-way split
                y = torch.full((M, N), float('nan'), dtype=dtype)
                w4a16_matmul(x, qw, s, qz, G, backend='triton', config=cfg, out=y)
                assert torch.isfinite(y).all() and rel(y, ref64(x, qw, s, qz, G)) <= tol, (dtype, cfg)
    finally:
        default_config.cache_clear()


# ---- column views: a q|k|v fused and shared by `static_decode.fuse_packed` (SHARE_WEIGHTS) ----

VIEW_CONFIGS = [  # (M, config): every kernel family on a column slice of a wider buffer
    (1, W4A16Config('gemv', 1, 32, 64, 2)),
    (1, W4A16Config('gemv16', 1, 32, 64, 1)),
    (1, W4A16Config('gemvtc', 1, 64, 64, 2)),
    (1, W4A16Config('gemvs', 1, 256, 32, 3, 2, 2)),
    (2, W4A16Config('gemvs', 1, 128, 32, 1, 1, 2)),
    (1, W4A16Config('gemvu', 1, 64, 32, 1, 1, 2)),
    (1, W4A16Config('gemvtu', 1, 64, 64, 1, 4, 1)),
    (3, W4A16Config('gemm', 16, 32, 64, 2)),
    (40, None),                                # the default from dequant_min_m rows: dequantize + matmul
]


@pytest.mark.parametrize("M,cfg", VIEW_CONFIGS)
def test_column_views_of_a_wider_buffer(M, cfg):
    """Packed buffers that are columns [64, 104) of a 128-column buffer (row stride 128, not 40) give exactly what
    compact copies of the same columns give, with no copy of the weight made (the kernels read the row strides)."""
    K, N, G, a, w = 256, 128, 64, 64, 40
    qw, s, qz = random_w4(K, N, G, seed=M + 77)
    views = qw[:, a:a + w], s[:, a:a + w], qz[:, a // 8:(a + w) // 8]
    assert not views[0].is_contiguous() and views[0].stride(0) == N
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M + 5)).to(torch.bfloat16)
    y_view = torch.full((M, w), float('nan'), dtype=torch.bfloat16)
    kw = dict(backend='triton', config=cfg, dequant_min_m=32)
    if cfg is None: assert default_config(M, w, K, G, dequant_min_m=32).kernel == 'dequant'
    w4a16_matmul(x, *views, G, out=y_view, **kw)
    y_copy = w4a16_matmul(x, *(t.contiguous() for t in views), G, **kw)
    assert torch.isfinite(y_view).all() and torch.equal(y_view, y_copy)
    assert rel(y_view, ref64(x, *views, G)) <= 1e-2
