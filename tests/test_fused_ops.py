"""minicpm4_core.kernels.fused: each fused kernel (Triton, under the interpreter on CPU) equals the unfused torch ops it
replaces, on fresh random inputs, in float32 and bfloat16; bad arguments are refused."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.nn.functional as F

from minicpm4_core.kernels import fused as FU
from minicpm4_core.kernels._common import interpreter_active

pytestmark = [pytest.mark.usefixtures('one_thread'),
              pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import")]
DTYPES = [torch.float32, torch.bfloat16]


def close(a, b, dt):
    "Relative to the largest reference value: fp32 ~exact; bf16 within a few roundings (the kernels round once)."
    tol = 2e-6 if dt == torch.float32 else 2e-2
    err = (a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1)
    assert err < tol, (float(err), tol)


def rnd(*shape, dt, g):
    return torch.randn(*shape, generator=g).to(dt)


@pytest.mark.parametrize('dt', DTYPES)
def test_add_rms_norm(dt):
    g = torch.Generator().manual_seed(1)
    x, d, w = rnd(3, 80, dt=dt, g=g), rnd(3, 80, dt=dt, g=g), rnd(80, dt=dt, g=g)
    x0 = x.clone()
    xo, h = FU.add_rms_norm(x, d, w, 1e-5, 0.37, backend='triton')
    ref = x.float() + 0.37 * d.float()                                   # independent: written out in fp32
    close(xo, ref, dt)
    r = ref.to(dt).float()                                               # the norm sees the residual as stored
    close(h, r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float(), dt)
    assert torch.equal(x, x0)                                            # the input residual is not modified
    xo2, h2 = FU.add_rms_norm(x, None, w, 1e-5, backend='triton')
    assert xo2 is x
    close(h2, F.rms_norm(x.float(), (80,), w.float(), 1e-5), dt)
    t = FU.add_rms_norm(x, d, w, 1e-5, 0.37, backend='torch')            # the fallback agrees with the kernel
    close(t[1], h, dt)


def rope_ref(x, cos, sin_signed):
    "Standard RoPE with rotate_half = cat(-x2, x1); sin_signed is the stack's table (first half negated)."
    D = x.shape[-1]
    sin = torch.cat([-sin_signed[..., :D // 2], sin_signed[..., D // 2:]], -1)
    return x * cos + torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1) * sin


@pytest.mark.parametrize('dt', DTYPES)
@pytest.mark.parametrize('Hq,Hkv,D', [(4, 2, 16), (3, 1, 24)])
def test_rope_kv_write(dt, Hq, Hkv, D):
    g = torch.Generator().manual_seed(2)
    T, P, S = 3, 30, 12
    qkv = rnd(T, (Hq + 2 * Hkv) * D, dt=dt, g=g)
    cos, sin = rnd(P, D, dt=dt, g=g), rnd(P, D, dt=dt, g=g)
    pos, slots = torch.tensor([4, 17, 29]), torch.tensor([6, 0, 11])
    kv = rnd(S, 2 * Hkv, D, dt=dt, g=g)
    before = kv.clone()
    q = FU.rope_kv_write(qkv, cos, sin, pos, kv, slots, Hq, Hkv, backend='triton')
    x = qkv.float().view(T, Hq + 2 * Hkv, D)
    c, s = cos.float()[pos, None], sin.float()[pos, None]
    close(q, rope_ref(x[:, :Hq], c, s), dt)
    close(kv[slots, :Hkv], rope_ref(x[:, Hq:Hq + Hkv], c, s), dt)
    assert torch.equal(kv[slots, Hkv:], qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D))     # values copied exactly
    other = torch.ones(S, dtype=torch.bool); other[slots] = False
    assert torch.equal(kv[other], before[other])                                       # no other slot touched
    kv3 = before.clone()                                                  # an expanded position, strided slots
    q3 = FU.rope_kv_write(qkv, cos, sin, torch.tensor(17).expand(T), kv3, torch.arange(2 * T)[::2], Hq, Hkv,
                          backend='triton')
    close(q3, rope_ref(x[:, :Hq], cos.float()[17], sin.float()[17]), dt)
    close(kv3[0:2 * T:2, :Hkv], rope_ref(x[:, Hq:Hq + Hkv], cos.float()[17], sin.float()[17]), dt)
    kv2 = before.clone()
    q2 = FU.rope_kv_write(qkv, cos, sin, pos, kv2, slots, Hq, Hkv, backend='torch')
    close(q2, q, dt); close(kv2, kv, dt)


@pytest.mark.parametrize('dt', DTYPES)
def test_silu_mul(dt):
    g = torch.Generator().manual_seed(3)
    gu = rnd(2, 2 * 300, dt=dt, g=g)                                      # I = 300: not a power of two
    a, b = gu.float()[:, :300], gu.float()[:, 300:]
    close(FU.silu_mul(gu, backend='triton'), a * torch.sigmoid(a) * b, dt)


@pytest.mark.parametrize('dt', DTYPES)
def test_gemv_variants(dt):
    g = torch.Generator().manual_seed(4)
    N, K = 37, 80
    x, w, nw, res = rnd(1, K, dt=dt, g=g), rnd(N, K, dt=dt, g=g), rnd(K, dt=dt, g=g), rnd(1, N, dt=dt, g=g)
    gu = rnd(1, 2 * K, dt=dt, g=g)
    xf, wf = x.float(), w.float()
    hn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()).to(dt).float()
    a = (gu.float()[:, :K] * torch.sigmoid(gu.float()[:, :K]) * gu.float()[:, K:]).to(dt).float()
    tol = 2e-6 if dt == torch.float32 else 3e-2
    for cfg in [(4, 32, 4), (16, 128, 2)]:                                # K not a multiple of BLOCK_K; N of BLOCK_N
        close(FU.gemv(x, w, backend='triton', config=cfg), xf @ wf.T, dt)
        y = FU.gemv(x, w, norm_w=nw, eps=1e-5, res=res, r=0.3, backend='triton', config=cfg)
        ref = res.float() + 0.3 * hn @ wf.T
        assert (y.float() - ref).abs().max() / ref.abs().max() < tol
        y = FU.gemv(gu, w, silu=True, res=res, r=0.3, backend='triton', config=cfg)
        ref = res.float() + 0.3 * a @ wf.T
        assert (y.float() - ref).abs().max() / ref.abs().max() < tol
    close(FU.gemv(gu, w, silu=True, backend='torch'), a @ wf.T, dt)


def test_gemv_config_and_prologue_rule():
    "The measured tile by default, overrides honoured; the prologue is fused for the 0.5B layers, not the 8B ones."
    assert FU.gemv_config(4096, 16384) == (2, 1024, 4) and FU.gemv_config(7, 40) == (2, 64, 4)
    FU.GEMV_CONFIGS[(7, 40)] = (4, 32, 8)
    try: assert FU.gemv_config(7, 40) == (4, 32, 8)
    finally: del FU.GEMV_CONFIGS[(7, 40)]
    w = lambda N, K: torch.empty(N, K, dtype=torch.bfloat16)
    assert FU.prologue_fits(w(1280, 1024)) and FU.prologue_fits(w(8192, 1024)) and FU.prologue_fits(w(1024, 4096), True)
    assert not FU.prologue_fits(w(4608, 4096)) and not FU.prologue_fits(w(4096, 16384), True)


def test_bad_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match='backend must be one of'): FU.silu_mul(torch.randn(1, 4), backend='cuda')
    with pytest.raises(ValueError, match=r'add_rms_norm: need x \(T, N\)'): FU.add_rms_norm(x, None, torch.randn(7), 1e-6)
    with pytest.raises(ValueError, match='silu_mul: need gu'): FU.silu_mul(torch.randn(2, 5))
    with pytest.raises(ValueError, match='rope_kv_write: need'):
        FU.rope_kv_write(torch.randn(1, 64), torch.randn(4, 16), torch.randn(4, 16), torch.tensor([0]),
                         torch.zeros(4, 4, 16), torch.tensor([0]), 4, 2)           # qkv needs (4 + 4) * 16 columns
    with pytest.raises(ValueError, match='gemv: need'): FU.gemv(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match='gemv: need'): FU.gemv(torch.randn(1, 16), torch.randn(3, 8), silu=True,
                                                                norm_w=torch.randn(8))


@pytest.mark.slow
def test_compile_backend_matches_torch():
    g = torch.Generator().manual_seed(5)
    gu = torch.randn(2, 64, generator=g)
    torch.testing.assert_close(FU.silu_mul(gu, backend='compile'), FU.silu_mul(gu, backend='torch'))


def test_skinny_linear_matches_linear():
    "`skinny_linear` (moved here from frspec) == x @ w.T on fresh random inputs, every row count and tile; bad shapes raise."
    torch.manual_seed(0)
    for M, N, K, bn, bk in ((1, 40, 256, 16, 256), (5, 48, 512, 32, 128), (33, 100, 256, 16, 256), (49, 64, 512, 64, 128),
                            (64, 24, 256, 16, 256)):
        x, w = torch.randn(M, K), torch.randn(N, K)
        torch.testing.assert_close(FU.skinny_linear(x, w, bn, bk), x @ w.T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match='skinny_linear'): FU.skinny_linear(torch.randn(65, 256), torch.randn(8, 256))
    with pytest.raises(ValueError, match='skinny_linear'): FU.skinny_linear(torch.randn(4, 200), torch.randn(8, 200))
