"""Triton InfLLM v2 kernels (minicpm4_core.kernels) vs the reference (minicpm4_core.infllmv2) and an independent
dense-mask brute force written here. Runs the kernels in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); shapes are tiny so the file stays well under a minute on two CPU cores."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from minicpm4_core import infllmv2 as iv  # noqa: E402
from minicpm4_core.kernels import sparse as sk  # noqa: E402
from minicpm4_core.kernels.sparse import _cand_select, _row_select  # noqa: E402

pytestmark = pytest.mark.skipif(not sk.interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- brute force


def bf_attention(q, k, v, idx, m):
    """Dense-mask brute force in float64: token mask from the block lists, causal, GQA by head repetition."""
    B, T, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    nb = -(-N // m)
    sel = torch.zeros(B, T, Hkv, nb + 1, dtype=torch.bool)
    ii = idx.long().clone()
    ii[(ii < 0) | (ii >= nb)] = nb
    sel.scatter_(-1, ii, True)
    tok = sel[..., :nb].repeat_interleave(m, -1)[..., :N]                      # (B, T, Hkv, N)
    causal = torch.arange(N)[None, :] <= torch.arange(N - T, N)[:, None]
    mask = (tok & causal[None, :, None, :]).repeat_interleave(G, 2)           # (B, T, H, N)
    kr, vr = k.double().repeat_interleave(G, 2), v.double().repeat_interleave(G, 2)
    s = torch.einsum('bthd,bnhd->bthn', q.double(), kr) * D ** -0.5
    s = s.masked_fill(~mask, float('-inf'))
    mx = s.amax(-1, keepdim=True).clamp_min(-1e300)
    p = torch.exp(s - mx).masked_fill(~mask, 0)
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.einsum('bthn,bnhd->bthd', p, vr)


def rand_lists(B, T, Hkv, N, m, K, shared=1, pad=True, gen=None):
    """Sorted unique block lists. `shared` consecutive positions share one list (the tile fast path); with pad,
    some rows are shorter (-1 padded); lists may include blocks in the future of a query (masked causally)."""
    nb = -(-N // m)
    out = torch.full((B, T, Hkv, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for t0 in range(0, T, shared):
                kk = K if not pad else int(torch.randint(0, K + 1, (1,), generator=gen))
                sel = torch.randperm(nb, generator=gen)[:kk].sort().values
                out[b, t0:t0 + shared, h, :len(sel)] = sel.int()
    return out


def run_grads(q, k, v, idx, m, **kw):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    o = sk.sparse_attention(q, k, v, idx, m, **kw)
    do = torch.randn_like(o)
    g = torch.autograd.grad(o, (q, k, v), do)
    return o, g, do


# ---------------------------------------------------------------------------------------------- tile plan


@pytest.mark.parametrize("BM,K,shared", [(4, 3, 1), (8, 5, 2), (2, 1, 1)])
def test_plan_matches_torch(BM, K, shared):
    g = torch.Generator().manual_seed(BM * 10 + K)
    idx = rand_lists(2, 19, 2, 200, 16, K, shared=shared, gen=g)
    idx[0, 3, 1, 0] = 99                                     # out-of-range id: ignored like -1
    a = sk._plan(idx, BM, 13)
    b = sk._plan_torch(idx, BM, 13)
    assert torch.equal(a[0], b[0])
    for r in range(a[0].numel()):
        n = int(a[0][r])
        assert torch.equal(a[1][r, :n], b[1][r, :n]) and torch.equal(a[2][r, :n], b[2][r, :n])
        assert (a[1][r, :n].diff() > 0).all()                 # sorted, unique


# ---------------------------------------------------------------------------------------------- attention


CASES = [  # B, T, N, H, Hkv, D, m, K, tile_tokens, shared
    (2, 21, 45, 8, 2, 16, 16, 3, 4, 1),     # G=4, ragged, per-token lists
    (1, 17, 17, 3, 3, 16, 16, 2, None, 1),  # G=1 (MHA), T == N
    (2, 9, 40, 6, 2, 24, 16, 3, 2, 1),      # G=3 padded to 4, head_dim 24 (not a power of two)
    (1, 12, 70, 16, 1, 16, 16, 4, 1, 1),    # G=16, one position per tile
    (1, 16, 64, 32, 2, 16, 16, 4, 1, 8),    # G=16 (MiniCPM4-8B ratio), shared lists -> unmasked fast path
    (1, 20, 50, 5, 1, 16, 32, 2, 4, 4),     # G=5, block 32
]


@pytest.mark.parametrize("B,T,N,H,Hkv,D,m,K,tt,shared", CASES)
def test_forward_and_grads_fp32(B, T, N, H, Hkv, D, m, K, tt, shared):
    g = torch.Generator().manual_seed(T * 100 + N)
    q, k, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, N, Hkv, D, generator=g), \
        torch.randn(B, N, Hkv, D, generator=g)
    idx = rand_lists(B, T, Hkv, N, m, K, shared=shared, gen=g)
    o, (dq, dk, dv), do = run_grads(q, k, v, idx, m, tile_tokens=tt)
    # shared reference (float64) and its gradients
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    oref = iv.sparse_attention_ref(qd, kd, vd, idx, m)
    gref = torch.autograd.grad(oref, (qd, kd, vd), do.double())
    assert rel(o, oref) <= 1e-3
    for a, b in zip((dq, dk, dv), gref):
        assert torch.isfinite(a).all() and rel(a, b) <= 1e-3
    assert rel(o, bf_attention(q, k, v, idx, m)) <= 1e-3    # independent brute force


def test_chunked_reverse_lists_and_pairs():
    """dk/dv lists cut into chunks of one tile (atomic-add path) and two blocks per step give the same gradients."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 24, 8, 16, generator=g), torch.randn(1, 48, 2, 16, generator=g), \
        torch.randn(1, 48, 2, 16, generator=g)
    idx = rand_lists(1, 24, 2, 48, 16, 3, shared=4, pad=False, gen=g)
    o1, g1, do = run_grads(q, k, v, idx, 16, tile_tokens=4)
    cfg = dict(chunk=1, fwd=dict(PAIR=2), dq=dict(PAIR=2))
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    o2 = sk.sparse_attention(q2, k2, v2, idx, 16, tile_tokens=4, config=cfg)
    g2 = torch.autograd.grad(o2, (q2, k2, v2), do)
    assert rel(o2, o1) < 1e-5 and all(rel(a, b) < 1e-5 for a, b in zip(g2, g1))


def test_backward_with_its_own_tile():
    g = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(1, 19, 8, 16, generator=g), torch.randn(1, 40, 2, 16, generator=g), \
        torch.randn(1, 40, 2, 16, generator=g)
    idx = rand_lists(1, 19, 2, 40, 16, 3, gen=g)
    o1, g1, do = run_grads(q, k, v, idx, 16, tile_tokens=4)
    q2, k2, v2 = (x.clone().requires_grad_() for x in (q, k, v))
    o2 = sk.sparse_attention(q2, k2, v2, idx, 16, config=dict(tile_tokens=4, bwd_tile_tokens=2))
    g2 = torch.autograd.grad(o2, (q2, k2, v2), do)
    assert rel(o2, o1) < 1e-6 and all(rel(a, b) < 1e-5 for a, b in zip(g2, g1))


def test_empty_rows_are_zero():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 8, 4, 16, generator=g), torch.randn(1, 32, 2, 16, generator=g), \
        torch.randn(1, 32, 2, 16, generator=g)
    idx = torch.full((1, 8, 2, 2), -1, dtype=torch.int32)
    idx[0, 4:, 0, 0] = 1                                     # half the rows see block 1 of head 0, the rest nothing
    o, grads, _ = run_grads(q, k, v, idx, 16)
    assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in grads)
    assert o[0, :4].abs().max() == 0 and o[0, :, 2:].abs().max() == 0
    assert rel(o, iv.sparse_attention_ref(q, k, v, idx, 16)) < 1e-5


def test_bf16_interpreter():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, h, 16, generator=g).bfloat16() for n, h in ((16, 8), (40, 2), (40, 2)))
    idx = rand_lists(1, 16, 2, 40, 16, 2, gen=g)
    o, grads, do = run_grads(q, k, v, idx, 16, tile_tokens=2)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    oref = iv.sparse_attention_ref(qd, kd, vd, idx, 16)
    gref = torch.autograd.grad(oref, (qd, kd, vd), do.double())
    assert o.dtype == torch.bfloat16 and rel(o, oref) <= 1e-2
    assert all(rel(a, b) <= 1e-2 for a, b in zip(grads, gref))


@pytest.mark.parametrize('selection', iv.SELECTIONS)
def test_select_pipeline_feeds_attention(selection):
    """Stage 1 + top-k + window + attention end to end (lists with -1 padding for early queries)."""
    g = torch.Generator().manual_seed(6)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=1, selection=selection)
    q, k, v = torch.randn(1, 80, 8, 16, generator=g), torch.randn(1, 90, 2, 16, generator=g), \
        torch.randn(1, 90, 2, 16, generator=g)
    idx = sk.prefill_select(q, k, 3, **geo, tile_tokens=4)
    ref_idx = iv.attention_blocks(iv.select_blocks(iv.block_scores(q, k, **geo), 3), 90, 16, 1, selection)
    assert torch.equal(idx, ref_idx) and idx.shape[-1] == (4 if selection == 'minicpm4' else 3)
    assert (idx == -1).any()
    o = sk.sparse_attention(q, k, v, idx, 16)
    assert rel(o, iv.sparse_attention_ref(q, k, v, ref_idx, 16)) < 1e-5


def test_bad_inputs_and_torch_backend():
    q, k = torch.randn(1, 4, 4, 16), torch.randn(1, 8, 2, 16)
    idx = torch.zeros(1, 4, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match='backend'):
        sk.sparse_attention(q, k, k, idx, 16, backend='cuda')
    with pytest.raises(ValueError, match='block_idx'):
        sk.sparse_attention(q, k, k, idx.float(), 16)
    with pytest.raises(ValueError, match='block_size'):
        sk.sparse_attention(q, k, k, idx, 24)
    o = sk.sparse_attention(q, k, k, idx, 16, backend='torch')
    assert rel(o, sk.sparse_attention(q, k, k, idx, 16)) < 1e-5


# ---------------------------------------------------------------------------------------------- stage 1


S1_CASES = [  # B, T, N, H, Hkv, D, p, s, m, init, local, approx, selection
    (2, 37, 53, 8, 2, 16, 8, 4, 16, 1, 2, False, 'minicpm4'),
    (2, 37, 100, 8, 2, 16, 8, 4, 16, 1, 2, False, 'minicpm4.1'),
    (1, 30, 150, 6, 2, 16, 8, 4, 16, 1, 0, False, 'minicpm4'),     # G=3, no local window, several chunks
    (1, 30, 150, 6, 2, 16, 8, 4, 16, 1, 0, False, 'minicpm4.1'),
    (1, 20, 150, 16, 1, 16, 8, 4, 16, 2, 1, True, 'minicpm4'),     # G=16, LSE approximation (coarse 32/16)
    (2, 25, 90, 4, 4, 16, 12, 4, 16, 0, 1, True, 'minicpm4.1'),    # G=1, p not a multiple of s (left = 2)
]


@pytest.mark.parametrize("B,T,N,H,Hkv,D,p,s,m,init,local,approx,selection", S1_CASES)
def test_block_scores(B, T, N, H, Hkv, D, p, s, m, init, local, approx, selection):
    g = torch.Generator().manual_seed(N + T)
    q, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, N, Hkv, D, generator=g)
    geo = dict(kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local,
               selection=selection)
    a = sk.fused_block_scores(q, k, **geo, lse_approx=approx, config=dict(s1=dict(NBC=4)))
    b = iv.block_scores(q, k, **geo, lse_approx=approx)
    fa = torch.isfinite(a)
    assert torch.equal(fa, torch.isfinite(b)) and torch.equal(a[~fa], b[~fa])
    assert rel(a[fa], b[fa]) <= 1e-4
    ia, ib = sk.topk_blocks(a, 4), iv.select_blocks(b, 4, check=False)
    assert torch.equal(ia, ib)
    assert torch.isposinf(b).any() and (selection == 'minicpm4.1' or local == 0 or torch.isneginf(b).any())


def test_topk_kernel_ties_and_padding():
    g = torch.Generator().manual_seed(7)
    s = torch.randint(0, 5, (3, 7, 2, 37), generator=g).float() / 4 - 0.3      # many exact ties, negatives too
    s[0, 0, 0, :30] = float('-inf')                                              # fewer visible than topk
    s[1, 2, 1, [3, 9]] = float('inf')
    s[2, 5, 0, :] = float('-inf')                                                # nothing visible
    for k in (1, 6, 40):
        assert torch.equal(sk.topk_blocks(s, k), iv.select_blocks(s, k, check=False))


# ---------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("H,Hkv,lens,per,selection", [(8, 2, (90, 37), 2, 'minicpm4'), (3, 3, (50,), 3, 'minicpm4'),
                                                       (16, 1, (64, 17, 80), 1, 'minicpm4.1'),
                                                       (8, 2, (90, 37), 2, 'minicpm4.1')])
def test_decode(H, Hkv, lens, per, selection):
    g = torch.Generator().manual_seed(sum(lens))
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=1, selection=selection)
    B, Nmax, D = len(lens), max(lens) + 5, 16
    kc, vc = torch.randn(B, Nmax, Hkv, D, generator=g), torch.randn(B, Nmax, Hkv, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    seq = torch.tensor(lens, dtype=torch.int32)
    cache = iv.CompressedKeyCache(8, 4)
    cache.append(kc)                                            # kernels past a short sequence are ignored
    sc = sk.decode_block_scores(q, cache.kc, seq, **geo, num_blocks=-(-Nmax // 16))
    idx = sk.decode_select(q, cache.kc, seq, 3, **geo, num_blocks=-(-Nmax // 16))
    assert idx.shape == (B, Hkv, 4 if selection == 'minicpm4' else 3)
    o = sk.sparse_decode(q[:, None], kc, vc, idx[:, None], seq, 16, config=dict(dec=dict(PER=per)))
    assert o.shape == (B, 1, H, D)
    for b, L in enumerate(lens):
        ref = iv.block_scores(q[b:b + 1, None], kc[b:b + 1, :L], **geo)[0, 0]
        nb = ref.shape[-1]
        f = torch.isfinite(ref)
        assert torch.equal(torch.isfinite(sc[b, :, :nb]), f) and torch.isneginf(sc[b, :, nb:]).all()
        assert torch.equal(sc[b, :, :nb][~f], ref[~f]) and (not f.any() or rel(sc[b, :, :nb][f], ref[f]) < 1e-4)
        ridx = iv.attention_blocks(iv.select_blocks(ref[None, None], 3, check=False), L, 16, 1, selection)[0, 0]
        assert torch.equal(idx[b], ridx)
        oref = iv.sparse_attention_ref(q[b:b + 1, None], kc[b:b + 1, :L], vc[b:b + 1, :L], idx[b:b + 1, None], 16)
        assert rel(o[b], oref[0]) < 1e-4


# ---------------------------------------------------------------------------------------------- the model path

def test_model_path_uses_kernels_and_matches_reference(monkeypatch):
    """MiniCPM4ForCausalLM with sparse_config: logits, parameter gradients and cached greedy decoding are the same
    whether InfLLM v2 runs on the Triton kernels (what CUDA tensors get) or on the torch reference."""
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=48)
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(num_hidden_layers=1, sparse_config=sc))
    ids = torch.randint(3, 512, (2, 100))
    calls = []
    real = sk.sparse_attention
    monkeypatch.setattr(sk, 'sparse_attention', lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(impl):
        monkeypatch.setattr(iv, 'SPARSE_IMPL', impl)
        model.zero_grad()
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            gen = model.generate([ids[0, :70].tolist()], 6, stop_ids=[])
        return logits.detach(), grads, gen

    lr, gr, genr = run('torch')
    assert not calls
    lt, gt, gent = run('triton')
    assert calls                                                    # the kernels really ran
    assert rel(lt, lr) <= 1e-4
    assert len(gt) == len(gr) and all(rel(a, b) <= 1e-3 for a, b in zip(gt, gr))
    assert gent == genr


@pytest.mark.parametrize("bad, words", [("dup", "repeats a block id"), ("high", "only have"), ("low", "only have")])
def test_bad_block_ids_one_rule_both_paths(bad, words):
    "Duplicate and out-of-range block ids are refused by the reference and the kernel alike, naming block_idx."
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 6, 4, 16, generator=g), torch.randn(1, 40, 2, 16, generator=g),
               torch.randn(1, 40, 2, 16, generator=g))
    idx = torch.tensor([0, 1, -1], dtype=torch.int32).expand(1, 6, 2, 3).clone()   # 40 keys: blocks 0..2 of 16
    idx[0, 2, 1] = {"dup": torch.tensor([1, 1, -1]), "high": torch.tensor([0, 3, -1]),
                    "low": torch.tensor([-2, 0, 1])}[bad].to(torch.int32)
    for fn in (iv.sparse_attention_ref, sk.sparse_attention):
        with pytest.raises(ValueError, match=words) as e:
            fn(q, k, v, idx, 16)
        assert "block_idx" in str(e.value)
    good = torch.tensor([[0, 1, -1], [1, -1, -1], [-1, -1, -1]], dtype=torch.int32)[torch.arange(6) % 3]
    good = good[None, :, None].expand(1, 6, 2, 3).contiguous()                     # -1 may repeat
    assert torch.allclose(sk.sparse_attention(q, k, v, good, 16), iv.sparse_attention_ref(q, k, v, good, 16),
                          atol=1e-5)


# ---------------------------------------------------------------------------------------------- fused top-k + window


@pytest.mark.parametrize("N,m,w,topk", [(300, 16, 3, 4), (70, 16, 8, 2), (1000, 16, 2, 6), (40, 16, 5, 3)])
def test_select_lists_fuses_the_window(N, m, w, topk):
    "select_lists (one kernel) == attention_blocks(select_blocks(.)): sinks, -inf, ties, windows reaching below 0."
    g = torch.Generator().manual_seed(N + w)
    B, T, Hkv, nb = 2, 9, 2, -(-N // m)
    sc = torch.randint(0, 6, (B, T, Hkv, nb), generator=g).float() / 3 - 0.5     # exact ties
    sc[..., 0] = float('inf')
    sc[torch.rand(sc.shape, generator=g) < 0.3] = float('-inf')
    for n_keys in (N, torch.tensor([N, N - 5])):
        ref = iv.attention_blocks(iv.select_blocks(sc, topk, check=False), n_keys, m, w)
        assert torch.equal(sk.select_lists(sc, topk, n_keys, m, w), ref)
    assert torch.equal(sk.select_lists(sc, topk, N, m, w, 'minicpm4.1'), iv.select_blocks(sc, topk, check=False))


def test_decode_several_queries_per_cache_row():
    "T new tokens of each sequence as T decode rows of one cache row (queries_per_row=T) == the prefill reference."
    g = torch.Generator().manual_seed(3)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    B, T, H, Hkv, D, N = 2, 3, 8, 2, 16, 150
    k, v = torch.randn(B, N, Hkv, D, generator=g), torch.randn(B, N, Hkv, D, generator=g)
    q = torch.randn(B, T, H, D, generator=g)
    seq = (N - T + 1 + torch.arange(T)).repeat(B)
    idx = sk.decode_select(q.reshape(B * T, H, D), iv.compress_keys(k, 8, 4), seq, 3, **geo, num_blocks=-(-N // 16),
                           queries_per_row=T)
    ref_idx = iv.attention_blocks(iv.select_blocks(iv.block_scores(q, k, **geo), 3, check=False), N, 16, 2)
    assert torch.equal(idx.view(B, T, Hkv, -1), ref_idx)
    o = sk.sparse_decode(q.reshape(B * T, H, D), k, v, idx, seq, 16, queries_per_row=T)
    assert rel(o.view(B, T, H, D), iv.sparse_attention_ref(q, k, v, ref_idx, 16)) < 1e-4
    o2, idx2 = sk.decode_step(q.reshape(B * T, H, D), q.reshape(B * T, H, D), k, v, iv.compress_keys(k, 8, 4),
                              seq.int(), 3, **geo, num_blocks=-(-N // 16), queries_per_row=T)
    assert torch.equal(idx2, idx) and rel(o2, o) < 1e-6        # the combine in another order (COMBINE='last')
    with pytest.raises(ValueError, match="queries_per_row"):
        sk.sparse_decode(q.reshape(B * T, H, D), k, v, idx, seq, 16, queries_per_row=2)


def test_model_cached_decoding_takes_the_decode_kernels(monkeypatch):
    "Cached steps of 1 and 3 tokens go through decode_step (== decode_select + sparse_decode) and match the reference."
    from minicpm4_core import infllmv2
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=48)
    torch.manual_seed(1)
    model = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(num_hidden_layers=2, sparse_config=sc)).eval()
    ids = torch.randint(3, 512, (2, 124))                            # 8 blocks > the 6 attended: sparse
    calls = []
    real = sk.decode_step
    monkeypatch.setattr(sk, 'decode_step', lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(impl):
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', 'torch')     # the prefill (tested above) on the reference
        cache = model.new_cache(2, 130)
        with torch.no_grad():
            model(ids[:, :120], cache=cache)
            monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', impl)
            return [model(ids[:, 120:121], cache=cache)[:, -1], model(ids[:, 121:124], cache=cache)]

    ref = run('torch')
    assert not calls
    got = run('triton')
    assert len(calls) == 4                                            # 2 layers x 2 cached steps
    for a, b in zip(got, ref): assert rel(a, b) <= 1e-4


def test_auto_tile_follows_the_union(monkeypatch):
    "tile_tokens='auto': unrelated per-token lists re-tile to 2 tokens, lists shared by a block keep 8 (G = 16)."
    monkeypatch.setattr(sk, 'AUTO_MIN_T', 64)                      # the rule at a size the interpreter plans fast
    g = torch.Generator().manual_seed(5)
    T, N, H, Hkv, D, m, K = 64, 512, 16, 1, 16, 16, 4
    q, k = torch.randn(1, T, H, D, generator=g), torch.randn(1, N, Hkv, D, generator=g)
    unrelated = torch.rand(1, T, Hkv, N // m, generator=g).topk(K, -1).indices.sort(-1).values.int()
    shared = unrelated[:, ::m].repeat_interleave(m, 1)
    assert sk._Meta(q, k, unrelated, m, None, 'auto').BM == 2
    assert sk._Meta(q, k, shared, m, None, 'auto').BM == 8 == sk._Meta(q, k, unrelated, m, None, None).BM
    with pytest.raises(ValueError, match="tile_tokens"):
        sk._Meta(q, k, shared, m, None, 3)


# ---------------------------------------------------------------------------------------------- band variant


def band_lists(B, T, Hkv, N, m, K, gen):
    """Per-token lists as the model makes them: each query its own random ids (-1 padded, some ids inside or past
    its window), with neighbouring queries sharing a few ids (repeats across tokens)."""
    nb = -(-N // m)
    out = torch.full((B, T, Hkv, K), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            prev = None
            for t in range(T):
                kk = int(torch.randint(0, K + 1, (1,), generator=gen))
                sel = torch.randperm(nb, generator=gen)[:kk]
                if prev is not None and kk:                       # repeat part of the previous token's list
                    sel = torch.unique(torch.cat([prev[:1], sel]))[:kk]
                out[b, t, h, :len(sel)] = sel.int()
                prev = sel
    return out


@pytest.mark.parametrize("B,T,N,H,Hkv,m,W,K,tt,bt,dtype", [
    (1, 40, 40, 4, 2, 16, 2, 3, None, None, torch.float32),     # window cut at block 0, default tiles
    (2, 37, 90, 8, 2, 16, 3, 4, 2, 4, torch.float32),           # queries at the end: tiles straddle blocks
    (1, 33, 70, 4, 1, 16, 1, 3, 1, 16, torch.bfloat16),         # window of one block, G=4, bf16
])
def test_band_matches_reference(B, T, N, H, Hkv, m, W, K, tt, bt, dtype):
    g = torch.Generator().manual_seed(T * 7 + N)
    D = 16
    q, k, v = (torch.randn(*s, generator=g).to(dtype) for s in ((B, T, H, D), (B, N, Hkv, D), (B, N, Hkv, D)))
    idx = band_lists(B, T, Hkv, N, m, K, g)
    qb = (torch.arange(N - T, N) // m).view(1, T, 1, 1)
    inwin = (idx >= qb - W + 1) & (idx <= qb)
    assert bool(inwin.any()) and bool((idx == -1).any())          # the overlap case and padding do occur
    full = iv.attention_blocks(idx, N, m, W)                      # list U window, the variant's definition
    cfg = {'band': {'tokens': bt}} if bt else None
    qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
    o = sk.sparse_attention_band(qs, ks, vs, idx, m, local_blocks=W, tile_tokens=tt, config=cfg)
    do = torch.randn(o.shape, generator=g).to(dtype)
    ga = torch.autograd.grad(o, (qs, ks, vs), do)
    ref = bf_attention(q, k, v, full, m)                          # independent float64 brute force
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(o, ref) < tol
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    gr = torch.autograd.grad(iv.sparse_attention_ref(qr, kr, vr, full, m), (qr, kr, vr), do.double())
    for a, b in zip(ga, gr):
        assert rel(a, b) < (1e-5 if dtype == torch.float32 else 3e-2)
    # a listed window block counts once: same output whether or not the lists already hold the window
    o2 = sk.sparse_attention_band(q, k, v, full, m, local_blocks=W, tile_tokens=tt, config=cfg)
    assert rel(o2, o.detach()) < tol


def test_band_bad_args():
    q, k = torch.randn(1, 8, 2, 16), torch.randn(1, 8, 1, 16)
    idx = torch.zeros(1, 8, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="local_blocks"):
        sk.sparse_attention_band(q, k, k, idx, 16, local_blocks=0)
    with pytest.raises(ValueError, match="tokens"):
        sk.sparse_attention_band(q, k, k, idx, 16, local_blocks=1, config={'band': {'tokens': 3}})


# ---------------------------------------------------------------------------------------------- dense decoding


def bf_dense_decode(q, k, v, lens, qper=1):
    "float64 softmax attention of row b's query over the first lens[b] keys of cache row b // qper (GQA by repetition)."
    G = q.shape[1] // k.shape[2]
    out = []
    for bb, L in enumerate(lens):
        kk, vv = (x[bb // qper, :L].double().repeat_interleave(G, 1) for x in (k, v))
        p = torch.einsum('hd,nhd->hn', q[bb].double(), kk).mul(q.shape[-1] ** -0.5).softmax(-1)
        out.append(torch.einsum('hn,nhd->hd', p, vv))
    return torch.stack(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
@pytest.mark.parametrize("lens,block,nsplit", [((1, 150), 16, 3), ((97, 33), 64, None), ((64, 129), 32, 16)])
def test_dense_decode(dtype, tol, lens, block, nsplit):
    "dense_decode on strided (Nmax, 2 Hkv, D) views, rows of different lengths, Nmax > every length, vs float64."
    g = torch.Generator().manual_seed(sum(lens) + block)
    B, Nmax, H, Hkv, D = len(lens), 160, 8, 2, 32
    buf = torch.randn(B, Nmax, 2 * Hkv, D, generator=g).to(dtype)      # the static stack's layout
    k, v = buf[:, :, :Hkv], buf[:, :, Hkv:]
    q = torch.randn(B, H, D, generator=g).to(dtype)
    seq = torch.tensor(lens, dtype=torch.int32)
    o = sk.dense_decode(q, k, v, seq, config=dict(dense=dict(BLOCK=block, NSPLIT=nsplit)))
    assert o.shape == q.shape and o.dtype == dtype
    assert rel(o, bf_dense_decode(q, k, v, lens)) < tol
    o4 = sk.dense_decode(q[:, None], k, v, seq, backend='torch')       # the CPU definition, (B, 1, H, D) accepted
    assert o4.shape == (B, 1, H, D) and rel(o4[:, 0], bf_dense_decode(q, k, v, lens)) < tol


def test_dense_decode_one_grid_any_length_and_queries_per_row():
    """One call shape (fixed Nmax, fixed split) serves every length written into cache_seqlens (what a CUDA graph
    replays); lengths past Nmax are clamped, 0 gives zeros; queries_per_row rows share a cache row."""
    g = torch.Generator().manual_seed(11)
    Nmax, H, Hkv, D = 96, 4, 1, 16
    k, v = torch.randn(1, Nmax, Hkv, D, generator=g), torch.randn(1, Nmax, Hkv, D, generator=g)
    q = torch.randn(1, H, D, generator=g)
    seq = torch.empty(1, dtype=torch.int32)
    cfg = dict(dense=dict(BLOCK=16, NSPLIT=4))
    for L in (5, 16, 17, 80, 96):
        seq.fill_(L)
        assert rel(sk.dense_decode(q, k, v, seq, config=cfg), bf_dense_decode(q, k, v, [L])) < 1e-5
    seq.fill_(500)
    assert rel(sk.dense_decode(q, k, v, seq, config=cfg), bf_dense_decode(q, k, v, [Nmax])) < 1e-5
    seq.fill_(0)
    assert torch.equal(sk.dense_decode(q, k, v, seq, config=cfg), torch.zeros_like(q))
    T = 3
    qt = torch.randn(T, H, D, generator=g)
    lens = [Nmax - T + 1 + t for t in range(T)]
    o = sk.dense_decode(qt, k, v, torch.tensor(lens, dtype=torch.int32), config=cfg, queries_per_row=T)
    assert rel(o, bf_dense_decode(qt, k, v, lens, qper=T)) < 1e-5


def test_dense_decode_bad_inputs():
    k = torch.randn(2, 32, 2, 16)
    q, seq = torch.randn(2, 4, 16), torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens"):
        sk.dense_decode(q, k, k, [3, 4])
    with pytest.raises(ValueError, match="v_cache"):
        sk.dense_decode(q, k, k[:, :16], seq)
    with pytest.raises(ValueError, match="H % Hkv"):
        sk.dense_decode(torch.randn(2, 3, 16), k, k, seq)
    with pytest.raises(ValueError, match="BLOCK"):
        sk.dense_decode(q, k, k, seq, config=dict(dense=dict(BLOCK=24)))


@pytest.mark.parametrize("dig,nbc", [(1, 16), (2, 256), (4, 32)])
def test_decode_step_radix_topk_and_ties(dig, nbc):
    """decode_step's fused pooling + radix top-k (DIG bits per step, pooling in chunks of NBC blocks) gives the
    reference's lists, also when every block ties (row 1: one key repeated, so all kernel logits are equal)."""
    g = torch.Generator().manual_seed(dig * 100 + nbc)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    B, Nmax, H, Hkv, D, topk = 2, 400, 8, 2, 16, 5
    k, v = torch.randn(B, Nmax, Hkv, D, generator=g), torch.randn(B, Nmax, Hkv, D, generator=g)
    k[1] = torch.randn(1, Hkv, D, generator=g)                 # all of row 1's keys equal: exact score ties
    q = torch.randn(B, H, D, generator=g)
    lens = (400, 233)
    seq = torch.tensor(lens, dtype=torch.int32)
    o, idx = sk.decode_step(q, q, k, v, iv.compress_keys(k, 8, 4), seq, topk, **geo, num_blocks=-(-Nmax // 16),
                            config=dict(dec=dict(TOPK_DIG=dig, NBC_POOL=nbc)))
    for b, L in enumerate(lens):
        sc = iv.block_scores(q[b:b + 1, None], k[b:b + 1, :L], **geo)
        ridx = iv.attention_blocks(iv.select_blocks(sc, topk, check=False), L, 16, 2)[0, 0]
        assert torch.equal(idx[b], ridx)
        oref = iv.sparse_attention_ref(q[b:b + 1, None], k[b:b + 1, :L], v[b:b + 1, :L], ridx[None, None], 16)
        assert rel(o[b], oref[0, 0]) < 1e-5
    with pytest.raises(ValueError, match="TOPK_DIG"):
        sk.decode_step(q, q, k, v, iv.compress_keys(k, 8, 4), seq, topk, **geo, num_blocks=-(-Nmax // 16),
                       config=dict(dec=dict(TOPK_DIG=3)))


def test_decode_step_growing_cache_one_plan():
    """The model's cached decoding: views k[:, :N] of one preallocated cache with N growing (and shrinking) between
    calls share one plan (scratch grown as needed), and every step equals decode_select + sparse_decode."""
    g = torch.Generator().manual_seed(5)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    Nalloc, H, Hkv, D = 300, 8, 2, 16
    kbuf, vbuf = torch.randn(1, Nalloc, Hkv, D, generator=g), torch.randn(1, Nalloc, Hkv, D, generator=g)
    sk._DEC_PLANS.clear()
    for N in (40, 41, 97, 260, 64):
        k, v = kbuf[:, :N], vbuf[:, :N]
        kc = iv.compress_keys(k, 8, 4)
        q = torch.randn(1, H, D, generator=g)
        seq = torch.tensor([N], dtype=torch.int32)
        o, idx = sk.decode_step(q, q, k, v, kc, seq, 3, **geo, num_blocks=-(-N // 16))
        ref_idx = sk.decode_select(q, kc, seq, 3, **geo, num_blocks=-(-N // 16))
        assert torch.equal(idx, ref_idx)
        assert rel(o, sk.sparse_decode(q, k, v, ref_idx, seq, 16)) < 1e-6
        assert len(sk._DEC_PLANS) == 1
    for N in (50, 200, 51):                                    # contiguous copies: the batch stride changes too
        k, v, q = kbuf[:, :N].contiguous(), vbuf[:, :N].contiguous(), torch.randn(1, H, D, generator=g)
        o = sk.dense_decode(q, k, v, torch.tensor([N - 3]))
        assert rel(o, sk.dense_decode(q, k, v, torch.tensor([N - 3]), backend='torch')) < 1e-5
    assert len(sk._DEC_PLANS) == 2                             # decode_step's family and dense_decode's


def test_decode_step_unfused_fallback_same_lists():
    "config dec.FUSED=False (the path taken if the fused kernel cannot compile): pooling kernel + top-k kernel."
    g = torch.Generator().manual_seed(8)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    B, N, H, Hkv, D = 2, 200, 8, 2, 16
    k, v = torch.randn(B, N, Hkv, D, generator=g), torch.randn(B, N, Hkv, D, generator=g)
    q = torch.randn(B, H, D, generator=g)
    seq = torch.tensor([200, 77], dtype=torch.int32)
    kc = iv.compress_keys(k, 8, 4)
    a = sk.decode_step(q, q, k, v, kc, seq, 3, **geo, num_blocks=13)
    b = sk.decode_step(q, q, k, v, kc, seq, 3, **geo, num_blocks=13, config=dict(dec=dict(FUSED=False)))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert torch.equal(a[1], sk.decode_select(q, kc, seq, 3, **geo, num_blocks=13))


@pytest.mark.parametrize("fused,nbc,T,selection,combine", [
    ('par', None, 1, 'minicpm4', 'kernel'), ('par', 16, 3, 'minicpm4', 'last'), ('par', 32, 2, 'minicpm4.1', 'last'),
    ('par', 16, 2, 'minicpm4', 'kernel'), (True, None, 2, 'minicpm4', 'last'), (False, None, 3, 'minicpm4', 'kernel'),
    ('cand', None, 1, 'minicpm4', 'kernel'), ('cand', 16, 3, 'minicpm4.1', 'split'), ('par', None, 2, 'minicpm4', 'split'),
    ('cand8', 16, 2, 'minicpm4', 'kernel'), ('cand8', None, 1, 'minicpm4.1', 'kernel')])
def test_decode_step_selection_paths_match_reference(fused, nbc, T, selection, combine):
    """Every selection path of decode_step ('par': pooling over several programs per row, the top-k in the row's
    last program; 'cand': the same, ranking bounded candidates ('cand8': 8 groups give the bound, 16 candidate slots,
    chunks of 4: the tie row overflows into the radix fallback; the logits tile loaded before the LSE,
    POOL_PRELOAD); True: one program; False: two
    kernels), with the combine in the attention's last program, in its own kernel or split over columns in one pass
    ('split'), == the reference's lists and attention: B = 2 sequences of different lengths (not multiples of the
    block), T = 1..3 new tokens per sequence, a row of exact ties (all keys equal), called twice on one plan (the
    per-row counters must start from zero again)."""
    g = torch.Generator().manual_seed(11 + T)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, selection=selection)
    B, Nmax, H, Hkv, D, topk = 2, 420, 8, 2, 16, 4
    k, v = torch.randn(B, Nmax, Hkv, D, generator=g), torch.randn(B, Nmax, Hkv, D, generator=g)
    k[1] = torch.randn(1, Hkv, D, generator=g)                 # row 1: equal keys, so every block score ties
    lens = (413, 150)
    kc = iv.compress_keys(k, 8, 4)
    cfg = dict(dec=dict(FUSED=fused, NBC_PAR=nbc, COMBINE=combine, PER=2))   # PER 2: several splits per row
    if fused == 'cand8':
        cfg['dec'].update(FUSED='cand', CAND_GROUPS=8, CAND_CAP=16, CAND_CJ=4, POOL_PRELOAD=True)
    for call in range(2):
        q = torch.randn(B * T, H, D, generator=g)
        seq = torch.tensor([L - T + 1 + t for L in lens for t in range(T)], dtype=torch.int32)
        o, idx = sk.decode_step(q, q, k, v, kc, seq, topk, **geo, num_blocks=-(-Nmax // 16), queries_per_row=T,
                                config=cfg)
        for b, L in enumerate(lens):
            qb = q[b * T:(b + 1) * T][None]                    # (1, T, H, D): the last T positions of L keys
            sc = iv.block_scores(qb, k[b:b + 1, :L], **geo)
            ridx = iv.select_blocks(sc, topk, check=False)
            if selection == 'minicpm4':
                ridx = iv.attention_blocks(ridx, L, 16, 2)
            assert torch.equal(idx[b * T:(b + 1) * T], ridx[0].int()), (call, b)
            oref = iv.sparse_attention_ref(qb, k[b:b + 1, :L], v[b:b + 1, :L], ridx, 16)
            assert rel(o[b * T:(b + 1) * T], oref[0]) < 1e-5
    with pytest.raises(ValueError, match="FUSED"):
        sk.decode_step(q, q, k, v, kc, seq, topk, **geo, num_blocks=27, queries_per_row=T,
                       config=dict(dec=dict(FUSED='yes')))
    with pytest.raises(ValueError, match="NBC_PAR"):
        sk.decode_step(q, q, k, v, kc, seq, topk, **geo, num_blocks=27, queries_per_row=T,
                       config=dict(dec=dict(NBC_PAR=24)))
    with pytest.raises(ValueError, match="COMBINE"):
        sk.decode_step(q, q, k, v, kc, seq, topk, **geo, num_blocks=27, queries_per_row=T,
                       config=dict(dec=dict(COMBINE='first')))
    with pytest.raises(ValueError, match="COMBINE_DC"):
        sk.decode_step(q, q, k, v, kc, seq, topk, **geo, num_blocks=27, queries_per_row=T,
                       config=dict(dec=dict(COMBINE='split', COMBINE_DC=24)))


@pytest.mark.parametrize("programs,T,fused", [(0.02, 2, 'par'), (1, 1, 'par'), (0.02, 1, 'cand'), (1, 2, 'pre')])
def test_decode_step_persistent_same_as_three_launches(programs, T, fused):
    """PERSISTENT: the step's three phases as items of one kernel (strided over PROGRAMS x SMs programs; 0.02 x 132 =
    2 programs walk many items each) == the three-launch step bit for bit, and the reference's lists. (The
    interpreter runs the phases as three launches; the grid barriers themselves run only on a GPU.)"""
    g = torch.Generator().manual_seed(21 + T)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    B, Nmax, H, Hkv, D, topk = 2, 300, 8, 2, 16, 3
    k, v = torch.randn(B, Nmax, Hkv, D, generator=g), torch.randn(B, Nmax, Hkv, D, generator=g)
    lens = (290, 101)
    kc = iv.compress_keys(k, 8, 4)
    q = torch.randn(B * T, H, D, generator=g)
    seq = torch.tensor([L - T + 1 + t for L in lens for t in range(T)], dtype=torch.int32)
    kw = dict(**geo, num_blocks=-(-Nmax // 16), queries_per_row=T)
    pre = fused == 'pre'                                       # 'cand' with the logits tile loaded first
    fused = 'cand' if pre else fused
    o, idx = sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(PER=2, NBC_PAR=16, FUSED=fused,
                                                                                   POOL_PRELOAD=pre)))
    op, idxp = sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(PER=2, NBC_PAR=16, FUSED=fused,
                                                                                     POOL_PRELOAD=pre, PERSISTENT=True,
                                                                                     PROGRAMS=programs)))
    assert torch.equal(idxp, idx) and torch.equal(op, o)
    for b, L in enumerate(lens):
        ridx = iv.attention_blocks(iv.select_blocks(iv.block_scores(q[b * T:(b + 1) * T][None], k[b:b + 1, :L], **geo),
                                                    topk, check=False), L, 16, 2)[0]
        assert torch.equal(idxp[b * T:(b + 1) * T], ridx.int())
    with pytest.raises(ValueError, match="PERSISTENT"):
        sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(PERSISTENT=True, FUSED=True)))


def test_decode_step_falls_back_when_a_new_kernel_fails(monkeypatch):
    "If the parallel pooling or the attention + combine kernel cannot compile, decode_step warns and takes the others."
    class Broken:
        def __getitem__(self, grid): raise RuntimeError("no compile")
    g = torch.Generator().manual_seed(31)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    k, v = torch.randn(1, 150, 2, 16, generator=g), torch.randn(1, 150, 2, 16, generator=g)
    q, seq, kc = torch.randn(1, 8, 16, generator=g), torch.tensor([143], dtype=torch.int32), iv.compress_keys(k, 8, 4)
    o, idx = sk.decode_step(q, q, k, v, kc, seq, 3, **geo, num_blocks=10)
    monkeypatch.setattr(sk, '_dec_pool_sel_kernel', Broken())
    monkeypatch.setattr(sk, '_dec_attn_last_kernel', Broken())
    monkeypatch.setattr(sk, '_DEC_PLANS', {})
    monkeypatch.setattr(sk, '_warn_once', lambda key, msg: warned.append(key))
    warned = []
    o2, idx2 = sk.decode_step(q, q, k, v, kc, seq, 3, **geo, num_blocks=10)
    o3, idx3 = sk.decode_step(q, q, k, v, kc, seq, 3, **geo, num_blocks=10, config=dict(dec=dict(COMBINE='last')))
    assert warned == ['dec_par', 'dec_par', 'dec_last'] and torch.equal(idx2, idx) and torch.equal(o2, o)
    assert torch.equal(idx3, idx) and torch.equal(o3, o)


def test_direct_launch_calls_the_launcher_like_tritons_runner():
    """The eager fast path (first launch through Triton, later ones straight to the compiled kernel's launcher with the
    raw stream) passes what Triton's own runner passes: grid, stream, function, packed metadata, no launch metadata,
    no hooks, then the arguments and the constexprs in signature order; without a stream it calls the runner."""
    calls = []

    class Handle:
        function, packed_metadata = 'fn', 'meta'
        def run(self, *a): calls.append(('run',) + a)
        def __getitem__(self, grid): return lambda *a: calls.append(('runner', grid) + a)

    class Kernel:
        arg_names = ['X', 'n', 'BLOCK']
        def __getitem__(self, grid): return lambda *a, **kw: calls.append(('first', grid, a, kw)) or Handle()

    L = sk._Launches()
    L.fast = True
    for st in (None, 77, 77):
        L.launch(('k',), Kernel(), (3, 2, 1), ('x', 5), dict(BLOCK=64), 4, None, st)
    assert calls[0] == ('first', (3, 2, 1), ('x', 5), dict(BLOCK=64, num_warps=4))
    assert calls[1] == ('run', 3, 2, 1, 77, 'fn', 'meta', None, None, None, 'x', 5, 64)
    assert calls[2] == calls[1] and len(calls) == 3
    L.launch(('k',), Kernel(), (3, 2, 1), ('y', 6), dict(BLOCK=64), 4)
    assert calls[3] == ('runner', (3, 2, 1), 'y', 6, 64)


# ---------------------------------------------------------------------------------------------- bounded candidates


@triton.jit
def _select_rows_kernel(X, OUT, CS, NBS, QB, KTOP, LOCAL, NBP: tl.constexpr, KP: tl.constexpr, WP: tl.constexpr,
                        WIN: tl.constexpr, DIG: tl.constexpr, V: tl.constexpr, CAP: tl.constexpr, GN: tl.constexpr,
                        CJ: tl.constexpr):
    "Row r of X (NBP scores, NBS[r] of them real): `_cand_select` (CAP > 0) or `_row_select` into OUT[r]."
    r = tl.program_id(0)
    nb = tl.load(NBS + r)
    qb1 = tl.load(QB + r)
    c = tl.arange(0, NBP)
    cm = c < nb
    x = tl.load(X + r * NBP + c, mask=cm, other=float('-inf'))
    ob = OUT + r * (KTOP + LOCAL * WIN)
    if CAP > 0:
        _cand_select(x, c, cm, ob, CS + r * CAP, qb1, nb, KTOP, LOCAL, NBP, KP, WP, WIN, DIG, V, CAP, GN, CJ)
    else:
        _row_select(x, c, cm, ob, qb1, nb, KTOP, LOCAL, NBP, KP, WP, WIN, DIG, V)


def _select_rows_ref(x, nbs, qbs, ktop, local, win):
    """The definition, in torch: top min(ktop, nb) blocks by (float order of the score, then the lower id), -inf and
    NaN dropped afterwards, then with win the window [qb - local + 1, qb] (ids >= its start dropped, the window
    appended), ascending ids, -1 padded."""
    out = []
    for r in range(x.shape[0]):
        nb, qb = int(nbs[r]), int(qbs[r])
        bits = x[r, :nb].view(torch.int32).long()
        key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        order = sorted(range(nb), key=lambda i: (-int(key[i]), i))[:min(ktop, nb)]
        ids = sorted(i for i in order if bool(x[r, i] > float('-inf')) and (not win or i < qb - local + 1))
        if win: ids += [w for w in range(qb - local + 1, qb + 1) if w >= 0]
        out.append(ids + [-1] * (ktop + local * win - len(ids)))
    return torch.tensor(out, dtype=torch.int32)


@pytest.mark.parametrize("gn,cap,cj,ktop,win", [(16, 64, 16, 5, True), (4, 16, 4, 3, False), (64, 64, 8, 20, True),
                                                (1, 16, 16, 1, False), (8, 32, 32, 12, False)])
def test_cand_select_equals_the_definition(gn, cap, cj, ktop, win):
    """`_cand_select` (bound from gn group maxima, cap candidate slots, chunks of cj) == the definition == the radix
    `_row_select`, on fresh random rows of 64 slots: continuous scores, few distinct values (ties, often more than cap
    candidates: the fallback), -inf and +inf (sinks), a NaN, short rows (fewer blocks than ktop, 1 block), a flat
    row; window starts below 0 and inside the row."""
    g = torch.Generator().manual_seed(gn * 1000 + cap + ktop)
    NBP, R, local = 64, 12, 3
    x = torch.rand(R, NBP, generator=g)
    x[1] = torch.randint(0, 4, (NBP,), generator=g).float() / 4            # 4 values: many ties
    x[2] = torch.randint(0, 20, (NBP,), generator=g).float()
    x[3, torch.randperm(NBP, generator=g)[:20]] = float('-inf')
    x[4, :2] = float('inf')
    x[5, 7] = float('nan')
    x[6] = 0.5                                                               # flat: every score ties
    x[7] = -torch.rand(NBP, generator=g)                                     # negative scores (signed keys)
    nbs = torch.randint(1, NBP + 1, (R,), generator=g).int()
    nbs[:8] = torch.tensor([64, 64, 50, 64, 33, 64, 64, 40]).int()
    nbs[8], nbs[9] = 1, ktop - 1 if ktop > 1 else 2                           # fewer blocks than ktop
    qbs = torch.stack([torch.randint(0, int(n), (1,), generator=g)[0] for n in nbs]).int()
    qbs[0], qbs[1] = 1, nbs[1] - 1                                           # window below 0 / at the end
    ref = _select_rows_ref(x, nbs, qbs, ktop, local, win)
    K = ktop + local * win
    for c_ in (cap, 0):
        out = torch.full((R, K), -7, dtype=torch.int32)
        cs = torch.zeros(R * max(c_, 1), dtype=torch.int64)
        _select_rows_kernel[(R,)](x, out, cs, nbs, qbs, ktop, local, NBP=NBP, KP=sk._np2(max(K, 16)), WP=16, WIN=win,
                                  DIG=2, V=4, CAP=c_, GN=gn, CJ=cj)
        assert torch.equal(out, ref), (c_, (out != ref).any(1))


def test_fp32_settings_replace_the_defaults_unless_set():
    """float32 inputs take DEFAULT_CONFIG['fp32'] (the forward's PAIR 1: 2 x 128-key fp32 K/V stages need 264,192 B of
    shared memory at d 128, over the H200's 232,448); bf16 keeps the defaults; a config that sets the key wins."""
    f32, bf = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    assert sk._cfg(None, 'fwd', f32)['PAIR'] == 1 and sk._cfg(None, 'dq', f32)['PAIR'] == 1
    assert sk._cfg(None, 'fwd', bf)['PAIR'] == sk.DEFAULT_CONFIG['fwd']['PAIR'] == 2
    assert sk._cfg(dict(fwd=dict(PAIR=2)), 'fwd', f32)['PAIR'] == 2
    assert sk._cfg(dict(fwd=dict(num_warps=4)), 'fwd', f32) == dict(sk.DEFAULT_CONFIG['fwd'], PAIR=1, num_warps=4)


def test_decode_step_cand_short_contexts_and_batch():
    """FUSED='cand' on B = 4 sequences of one padded cache: fewer blocks than topk (17 and 40 keys), lengths that are
    not multiples of the block, a long row (groups of 2 blocks give the bound: CAND_GROUPS 16 at 32 slots), and a
    sequence of one block; lists == the reference's, output == the radix path's bit for bit."""
    g = torch.Generator().manual_seed(41)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    B, Nmax, H, Hkv, D, topk = 4, 500, 8, 2, 16, 6
    k, v = torch.randn(B, Nmax, Hkv, D, generator=g), torch.randn(B, Nmax, Hkv, D, generator=g)
    lens = (17, 40, 497, 9)
    kc = iv.compress_keys(k, 8, 4)
    q = torch.randn(B, H, D, generator=g)
    seq = torch.tensor(lens, dtype=torch.int32)
    kw = dict(**geo, num_blocks=-(-Nmax // 16))
    o, idx = sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(FUSED='cand', CAND_GROUPS=16)))
    o2, idx2 = sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(FUSED='par')))
    assert torch.equal(idx, idx2) and torch.equal(o, o2)
    for b, L in enumerate(lens):
        sc = iv.block_scores(q[b:b + 1, None], k[b:b + 1, :L], **geo)
        ridx = iv.attention_blocks(iv.select_blocks(sc, topk, check=False), L, 16, 2)[0, 0]
        assert torch.equal(idx[b], ridx.int()), b
    with pytest.raises(ValueError, match="CAND_CAP"):
        sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(FUSED='cand', CAND_CAP=24)))


@pytest.mark.parametrize("sp,dc", [(2, 16), (8, 32)])
def test_decode_step_split_combine_online_chunks(sp, dc):
    """COMBINE='split' (one pass, online rescaling over chunks of COMBINE_SP splits, COMBINE_DC columns a program) ==
    the two-pass combine kernel up to rounding: several chunks (sp 2: 4 chunks of 8 splits), empty splits (-1 list
    entries of a 40-key sequence: max -inf, sum 0), and a head dim of 32 split over 2 programs (dc 16)."""
    g = torch.Generator().manual_seed(50 + sp)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2)
    B, Nmax, H, Hkv, D, topk = 2, 300, 8, 2, 32, 6
    k, v = torch.randn(B, Nmax, Hkv, D, generator=g), torch.randn(B, Nmax, Hkv, D, generator=g)
    kc, q = iv.compress_keys(k, 8, 4), torch.randn(B, H, D, generator=g)
    seq = torch.tensor([297, 40], dtype=torch.int32)
    kw = dict(**geo, num_blocks=-(-Nmax // 16))
    o, idx = sk.decode_step(q, q, k, v, kc, seq, topk, **kw, config=dict(dec=dict(PER=1)))
    o2, idx2 = sk.decode_step(q, q, k, v, kc, seq, topk, **kw,
                              config=dict(dec=dict(PER=1, COMBINE='split', COMBINE_SP=sp, COMBINE_DC=dc)))
    assert torch.equal(idx, idx2) and (idx[1] < 0).any()          # the short row has empty splits
    assert rel(o2, o) < 1e-6
    assert rel(o2, sk.sparse_decode(q, k, v, idx, seq, 16, backend='torch')) < 1e-5
