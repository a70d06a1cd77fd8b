"""dense_decode splits the LIVE length (session 7, issue 13): the split count comes from Nmax, each split's range and
the combine's set of splits from cache_seqlens read on the device. Triton interpreter (conftest sets
TRITON_INTERPRET=1), tiny shapes, fresh random inputs each test, against a float64 definition written here."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minicpm4_core.kernels import sparse as sk  # noqa: E402

pytestmark = pytest.mark.skipif(not sk.interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def definition(q, k, v, lens, qper=1):
    "float64 softmax(q k[:L]^T / sqrt(D)) v[:L] for query b against cache row b // qper; zeros where L = 0."
    G = q.shape[1] // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for bb, L in enumerate(lens):
        L = min(L, k.shape[1])
        if L <= 0: continue
        kk, vv = (x[bb // qper, :L].double().repeat_interleave(G, 1) for x in (k, v))
        p = torch.einsum('hd,nhd->hn', q[bb].double(), kk).mul(q.shape[-1] ** -0.5).softmax(-1)
        out[bb] = torch.einsum('hn,nhd->hd', p, vv)
    return out


def poison(cfg_key=None):
    "Fill every dense_decode plan's scratch with NaN: a split past L that stored nothing must not be read."
    for P in sk._DEC_PLANS.values():
        if isinstance(P, sk._DenseDecPlan):
            for b in P.bufs.values():
                if b.is_floating_point(): b.fill_(float("nan"))


def live_splits(L, block, nsplit, minb=1):
    nb = -(-max(L, 0) // block)
    per = max(-(-nb // nsplit), minb)
    return -(-nb // per), per


@pytest.mark.parametrize("H,Hkv,minb", [(8, 2, 1), (4, 4, 1), (6, 1, 2)])
def test_live_split_lengths_within_one_nmax(H, Hkv, minb):
    """One Nmax, one split count, lengths short / long / below one block / = Nmax / 0: each == the definition,
    with the scratch poisoned between calls (only the splits holding keys are read), GQA groups 4 / 1 / 6."""
    g = torch.Generator().manual_seed(1000 + 10 * H + Hkv + minb)
    B, Nmax, D, block, nsplit = 2, 200, 16, 16, 6           # 13 blocks, 6 splits: several blocks a split, some empty
    buf = torch.randn(B, Nmax, 2 * Hkv, D, generator=g)   # the static stack's (L, 2 Hkv, D) layout: strided halves
    k, v = buf[:, :, :Hkv], buf[:, :, Hkv:]
    cfg = dict(dense=dict(BLOCK=block, NSPLIT=nsplit, MIN_BLOCKS=minb))
    seen = set()
    for lens in ((3, 200), (16, 17), (200, 0), (40, 129), (0, 0), (1, 33)):
        q = torch.randn(B, H, D, generator=g)
        poison()
        o = sk.dense_decode(q, k, v, torch.tensor(lens, dtype=torch.int32), config=cfg)
        assert o.shape == q.shape and bool(torch.isfinite(o).all()), lens
        assert rel(o, definition(q, k, v, lens)) < 1e-5 if any(lens) else torch.equal(o, torch.zeros_like(q))
        for L in lens:
            if L == 0: assert torch.equal(o[lens.index(0)], torch.zeros_like(o[0]))
        seen |= {live_splits(L, block, nsplit, minb)[0] for L in lens}
    assert {0, 1} <= seen and len(seen) >= 3                  # no split, one split, several (the cases cover them)


def test_live_equals_the_old_path_and_large_nmax_equals_small():
    """The same cache prefix in a 4x larger buffer (more splits launched, most empty) gives the same output as a buffer
    sized to the length, and LIVE=False (every split stores, two-pass combine over all of them) agrees too."""
    g = torch.Generator().manual_seed(7)
    H, Hkv, D, L = 8, 2, 32, 150
    big = torch.randn(1, 4 * 160, 2 * Hkv, D, generator=g)
    small = big[:, :160].clone()
    q = torch.randn(1, H, D, generator=g)
    seq = torch.tensor([L], dtype=torch.int32)
    ref = definition(q, big[..., :Hkv, :], big[..., Hkv:, :], [L])
    outs = {}
    for name, buf in (('big', big), ('small', small)):
        for live in (True, False):
            cfg = dict(dense=dict(BLOCK=16, WAVES=4, LIVE=live))
            poison()
            outs[name, live] = sk.dense_decode(q, buf[..., :Hkv, :], buf[..., Hkv:, :], seq, config=cfg)
            assert rel(outs[name, live], ref) < 1e-5, (name, live)
    assert rel(outs['big', True], outs['small', True]) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
def test_live_queries_per_row_and_dtypes(dtype, tol):
    "queries_per_row = 3 (the last 3 tokens of one row, lengths N-2..N) and batch 2, fp32 and bf16, combine chunks."
    g = torch.Generator().manual_seed(21)
    B, T, Nmax, H, Hkv, D = 2, 3, 130, 4, 2, 16
    k = torch.randn(B, Nmax, Hkv, D, generator=g).to(dtype)
    v = torch.randn(B, Nmax, Hkv, D, generator=g).to(dtype)
    q = torch.randn(B * T, H, D, generator=g).to(dtype)
    lens = [64 - 2, 64 - 1, 64, 128, 129, 130]
    cfg = dict(dense=dict(BLOCK=16, NSPLIT=9, COMBINE_SP=2, COMBINE_DC=8))   # 2 splits a chunk, 2 column programs
    poison()
    o = sk.dense_decode(q, k, v, torch.tensor(lens, dtype=torch.int32), config=cfg, queries_per_row=T)
    assert o.dtype == dtype and rel(o, definition(q, k, v, lens, qper=T)) < tol


def test_live_config_errors():
    k = torch.randn(1, 32, 1, 16)
    q, seq = torch.randn(1, 2, 16), torch.tensor([5], dtype=torch.int32)
    with pytest.raises(ValueError, match="MIN_BLOCKS"):
        sk.dense_decode(q, k, k, seq, config=dict(dense=dict(MIN_BLOCKS=0)))
