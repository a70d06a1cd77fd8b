"""InfLLM v2 reference (minicpm4_core.infllmv2) vs brute-force per-query loops written independently here.

The loops below follow PAPER.md section 2 / DESIGN.md literally, one query, head and block at a time, with no
shared code from the module under test."""
import math

import pytest
import torch

from minicpm4_core import infllmv2 as iv


pytestmark = pytest.mark.usefixtures('one_thread')     # tests/conftest.py

# ---------------------------------------------------------------------------------------------- brute force


def bf_compress(k, p, s):
    B, N, Hkv, D = k.shape
    out = []
    j = 0
    while j * s + p <= N:
        out.append(k[:, j * s:j * s + p].double().mean(1))
        j += 1
    return torch.stack(out, 1) if out else k.new_zeros(B, 0, Hkv, D).double()


def bf_block_scores(q, k, p, s, m, init_blocks, local_blocks, lse_coarse=None, selection='minicpm4'):
    """One query, one kv group at a time. Kernel j visible to position t iff j*s+p-1 <= t. lse_coarse=(pc, sc)
    replaces each head's normaliser with the logsumexp over the visible coarse kernels (exact LSE before any
    coarse kernel is visible). Fixed rules as PAPER.md section 2 item 5 states them for each release."""
    B, T, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    nb = math.ceil(N / m)
    kc = bf_compress(k, p, s)
    kcc = bf_compress(k, *lse_coarse) if lse_coarse else None
    out = torch.zeros(B, T, Hkv, nb, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            t = N - T + i
            vis = [j for j in range(kc.shape[1]) if j * s + p - 1 <= t]
            for g in range(Hkv):
                ksum = {j: 0.0 for j in vis}
                for h in range(g * G, (g + 1) * G):
                    logit = {j: float(q[b, i, h].double() @ kc[b, j, g]) / math.sqrt(D) for j in vis}
                    if not vis:
                        continue
                    lse = math.log(sum(math.exp(x) for x in logit.values()))
                    if lse_coarse:
                        pc, sc = lse_coarse
                        visc = [c for c in range(kcc.shape[1]) if c * sc + pc - 1 <= t]
                        if visc:
                            lse = math.log(sum(math.exp(float(q[b, i, h].double() @ kcc[b, c, g]) / math.sqrt(D))
                                               for c in visc))
                    for j in vis:
                        ksum[j] += math.exp(min(logit[j] - lse, 50.0))
                qblk = t // m
                for blk in range(nb):
                    in_window = (qblk - local_blocks < blk <= qblk if selection == 'minicpm4'
                                 else qblk - local_blocks <= blk <= qblk)
                    if blk > qblk:
                        out[b, i, g, blk] = -math.inf
                    elif blk < init_blocks:
                        out[b, i, g, blk] = math.inf
                    elif in_window:
                        out[b, i, g, blk] = -math.inf if selection == 'minicpm4' else math.inf
                    else:
                        lo, hi = blk * m, (blk + 1) * m  # token interval of the block
                        inter = [ksum[j] for j in vis if j * s < hi and j * s + p > lo]
                        out[b, i, g, blk] = max(inter) if inter else 0.0
    return out


def bf_select(scores, topk):
    B, T, Hkv, nb = scores.shape
    out = torch.full((B, T, Hkv, topk), -1, dtype=torch.int32)
    for b in range(B):
        for i in range(T):
            for g in range(Hkv):
                row = scores[b, i, g].tolist()
                cand = sorted((blk for blk in range(nb) if row[blk] > -math.inf), key=lambda x: (-row[x], x))
                chosen = sorted(cand[:topk])
                out[b, i, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


# ---------------------------------------------------------------------------------------------- the official code
# A transcription of the released block selection, written from reading OpenBMB/infllmv2_cuda_impl and the MiniCPM4
# remote code (not copied; loops and float64, nothing shared with the module under test). Two versions:
#   'minicpm4'   the June-2025 release: kernels up to commit bc581dc (csrc/max_pooling_1d.cuh with a separate -inf
#                window rule; flash_blockmask.h fwdIterator with block_window_size), hub compressed_attention with
#                `topk_idx[topk_idx >= q_idx] = -1`;
#   'minicpm4.1' from commit 1706a4a "max pooling, fa no sliding window" (2025-08-25): one +inf rule, no attention
#                window, compressed_attention with `topk_idx[topk_idx > q_idx] = -1`.
# The pooling is hard-coded for kernel_size = 2 * kernel_stride (padding 1), so these tests use p = 2s.


def official_stage1(q, kc, N, s):
    """infllmv2_attn_stage1 -> score (B, Hkv, T, Nc): per query row and head a softmax over the compressed keys,
    masked columns give probability 0, the heads of one kv group summed (mha_varlen_fwd_stage1 runs the group's
    heads as the rows of one m-block). Causal rule of mask.h apply_mask_stage1: column j is kept iff
    j < (t - stride + 1) / stride (C division), which is j*s + 2s - 1 <= t for p = 2s. compressed_attention calls
    it with causal = (number of queries > 1): the one-query decoding step sees every compressed key. Rows are
    absolute positions t = N - T + i (the official prefill has T = N)."""
    B, T, H, D = q.shape
    Nc, Hkv = kc.shape[1], kc.shape[2]
    G = H // Hkv
    score = torch.zeros(B, Hkv, T, Nc, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            t = N - T + i
            vis = list(range(Nc)) if T == 1 else [j for j in range(Nc) if j < int((t - s + 1) / s)]
            if not vis:
                continue
            for g in range(Hkv):
                for h in range(g * G, (g + 1) * G):
                    logit = torch.stack([q[b, i, h].double() @ kc[b, j, g] for j in vis]) / math.sqrt(D)
                    score[b, g, i, vis] += torch.softmax(logit, 0)
    return score


def official_max_pooling(score, N, T, m, s, init_blocks, local_blocks, variant):
    """max_pooling_1d(score, cache_len=N-T, local_blocks, init_blocks, block_size=m, stride=s): the python wrapper
    sets kernel_size = m/s + 1, stride = m/s, padding = 1, out_len = ceil((q_len + cache_len) / m); the CUDA kernel
    (max_pooling_1d_kernel) per output block k, with off_bq = (row + cache_len) / m."""
    B, Hkv, _, Nc = score.shape
    ksz, stride, pad = m // s + 1, m // s, 1
    out_len = -(-N // m)
    out = torch.empty(B, Hkv, T, out_len, dtype=torch.float64)
    for b in range(B):
        for g in range(Hkv):
            for i in range(T):
                off_bq = (i + N - T) // m
                for k in range(out_len):
                    if variant == 'minicpm4':        # bc581dc: +inf first, then the -inf window
                        inf = k < init_blocks
                        neg = off_bq >= k and off_bq < k + local_blocks
                    else:                            # 1706a4a: one +inf rule, window one block wider
                        inf = k < init_blocks or (off_bq >= k and off_bq <= k + local_blocks)
                        neg = False
                    if inf:
                        out[b, g, i, k] = math.inf
                    elif neg:
                        out[b, g, i, k] = -math.inf
                    else:
                        start, end = max(k * stride - pad, 0), min(k * stride - pad + ksz, Nc)
                        out[b, g, i, k] = max(score[b, g, i, start:end].tolist()) if end > start else -math.inf
    return out


def official_selection(q, k, p, s, m, init_blocks, local_blocks, topk, variant):
    """compressed_attention (hub modeling_minicpm.py) + the attention kernel's block visits. Returns
    (block_score (B, T, Hkv, nb) float64, topk_idx (B, T, Hkv, min(topk, nb)), attended bool (B, T, Hkv, nb))."""
    assert p == 2 * s and m % s == 0, 'the released pooling is written for kernel_size = 2 * kernel_stride'
    B, T, H, D = q.shape
    N = k.shape[1]
    kc = bf_compress(k, p, s)                                   # CompressK: mean of each complete chunk
    block_score = official_max_pooling(official_stage1(q, kc, N, s), N, T, m, s, init_blocks, local_blocks, variant)
    nb = block_score.shape[-1]
    topk_idx = block_score.topk(min(topk, nb), dim=-1).indices.sort(-1).values   # torch.topk: ties unspecified
    q_idx = (torch.arange(N - T, N) // m)[None, None, :, None]
    if variant == 'minicpm4':
        topk_idx[topk_idx >= q_idx] = -1
    else:
        topk_idx[topk_idx > q_idx] = -1
    Hkv = k.shape[2]
    attended = torch.zeros(B, Hkv, T, nb, dtype=torch.bool)
    for b in range(B):
        for g in range(Hkv):
            for i in range(T):
                qb = (N - T + i) // m
                for x in topk_idx[b, g, i].tolist():            # topk_to_uint64: -1 entries set no bit
                    if 0 <= x <= qb:                            # causal: no key block past the query's
                        attended[b, g, i, x] = True
                if variant == 'minicpm4':                       # fwdIterator: [k_window_left, k_window_right]
                    for x in range(max(qb - local_blocks + 1, 0), qb + 1):
                        attended[b, g, i, x] = True
    tr = lambda x: x.permute(0, 2, 1, 3)                         # noqa: E731  (B, Hkv, T, .) -> (B, T, Hkv, .)
    return tr(block_score), tr(topk_idx), tr(attended)


def as_mask(idx, nb):
    "block lists (..., K) with -1 padding -> bool (..., nb)."
    out = torch.zeros(*idx.shape[:-1], nb + 1, dtype=torch.bool)
    out.scatter_(-1, torch.where(idx >= 0, idx.long(), nb), True)
    return out[..., :nb]


def bf_sparse(q, k, v, idx, m):
    B, T, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            t = N - T + i
            for h in range(H):
                g = h // G
                toks = [x for blk in idx[b, i, g].tolist() if blk >= 0
                        for x in range(blk * m, min(N, (blk + 1) * m)) if x <= t]
                if not toks:
                    continue
                kk, vv = k[b, toks, g].double(), v[b, toks, g].double()
                w = torch.softmax(kk @ q[b, i, h].double() / math.sqrt(D), 0)
                out[b, i, h] = w @ vv
    return out


def bf_dense(q, k, v):
    B, T, H, D = q.shape
    N, Hkv = k.shape[1], k.shape[2]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for i in range(T):
            t = N - T + i
            for h in range(H):
                g = h // (H // Hkv)
                w = torch.softmax(k[b, :t + 1, g].double() @ q[b, i, h].double() / math.sqrt(D), 0)
                out[b, i, h] = w @ v[b, :t + 1, g].double()
    return out


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def finite_close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    assert torch.equal(torch.isposinf(a), torch.isposinf(b))
    assert torch.equal(torch.isneginf(a), torch.isneginf(b))
    f = torch.isfinite(b)
    assert torch.allclose(a[f], b[f], rtol=tol, atol=tol), float((a[f] - b[f]).abs().max())


# (B, T, N, H, Hkv, D, p, s, m, init, local): GQA ratios 1/2/4/16, N not a multiple of m, T < N, p not a multiple of s
SHAPES = [
    (2, 37, 37, 2, 2, 8, 8, 4, 16, 1, 1),
    (1, 20, 75, 4, 2, 16, 8, 4, 16, 1, 2),
    (2, 30, 90, 8, 2, 8, 12, 4, 8, 2, 1),
    (1, 25, 61, 16, 1, 8, 8, 8, 16, 0, 1),
    (1, 1, 53, 4, 1, 8, 6, 2, 8, 1, 0),
    (1, 12, 12, 4, 2, 8, 8, 4, 16, 1, 1),   # shorter than one block
    (1, 9, 70, 2, 1, 8, 16, 8, 8, 1, 1),    # kernel longer than a block
]


def rand_qk(B, T, N, H, Hkv, D, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g) * 2
    k = torch.randn(B, N, Hkv, D, generator=g)
    v = torch.randn(B, N, Hkv, D, generator=g)
    return q, k, v


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize('N,p,s', [(45, 8, 4), (7, 8, 4), (8, 8, 4), (64, 32, 16), (50, 12, 5), (33, 4, 4)])
def test_compress_keys(N, p, s):
    k = torch.randn(2, N, 3, 5)
    got = iv.compress_keys(k, p, s)
    want = bf_compress(k, p, s)
    assert got.shape == want.shape and got.dtype == k.dtype
    assert got.shape[1] == (0 if N < p else (N - p) // s + 1)
    if want.numel():
        assert rel(got, want) < 1e-6


def test_compress_keys_dtype_and_grad():
    k = torch.randn(1, 40, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    kc = iv.compress_keys(k, 8, 4)
    assert kc.dtype == torch.bfloat16
    kc.float().sum().backward()
    assert k.grad is not None and k.grad.abs().sum() > 0


def test_intersection_rule():
    # general rule from p, s, m vs a literal interval-overlap test
    for p, s, m in [(32, 16, 64), (8, 4, 16), (12, 4, 8), (16, 8, 8), (6, 2, 8), (5, 5, 10)]:
        for b in range(6):
            want = [j for j in range(200) if j * s < (b + 1) * m and j * s + p > b * m]
            assert list(iv.kernels_of_block(b, p, s, m)) == want, (p, s, m, b)
    assert list(iv.kernels_of_block(5, 32, 16, 64)) == [19, 20, 21, 22, 23]  # 4b-1 .. 4b+3


@pytest.mark.parametrize('selection', iv.SELECTIONS)
@pytest.mark.parametrize('shape', SHAPES)
def test_block_scores(shape, selection):
    B, T, N, H, Hkv, D, p, s, m, init, local = shape
    q, k, _ = rand_qk(B, T, N, H, Hkv, D, seed=sum(shape))
    got = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local,
                          selection=selection, chunk_size=7)
    assert got.dtype == torch.float32 and got.shape == (B, T, Hkv, math.ceil(N / m))
    finite_close(got, bf_block_scores(q, k, p, s, m, init, local, selection=selection))
    # chunking over queries does not change anything (up to float rounding of the batched matmul)
    finite_close(got, iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init,
                                      local_blocks=local, selection=selection), tol=1e-6)


@pytest.mark.parametrize('shape', SHAPES[1:4])
def test_block_scores_lse_approx(shape):
    B, T, N, H, Hkv, D, p, s, m, init, local = shape
    q, k, _ = rand_qk(B, T, N, H, Hkv, D, seed=1 + sum(shape))
    pc, sc = 2 * p, 2 * s
    got = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local,
                          lse_approx=True, lse_kernel_size=pc, lse_kernel_stride=sc, chunk_size=5)
    finite_close(got, bf_block_scores(q, k, p, s, m, init, local, lse_coarse=(pc, sc)), tol=1e-4)


def test_block_scores_bf16_inputs():
    q, k, _ = rand_qk(1, 16, 40, 4, 2, 8, seed=3)
    a = iv.block_scores(q.bfloat16(), k.bfloat16(), kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1,
                        local_blocks=1)
    b = bf_block_scores(q.bfloat16().float(), k.bfloat16().float(), 8, 4, 8, 1, 1)
    assert a.dtype == torch.float32
    finite_close(a, b, tol=1e-3)


@pytest.mark.parametrize('topk', [1, 3, 4, 9])
def test_select_blocks(topk):
    g = torch.Generator().manual_seed(topk)
    sc = torch.rand(2, 11, 3, 7, generator=g)
    sc[sc < 0.2] = float('-inf')
    sc[0, 0, 0] = float('-inf')                     # a row with nothing visible
    sc[1, 2, 1, :4] = 0.5                           # ties -> lower block id first
    got = iv.select_blocks(sc, topk)
    assert got.dtype == torch.int32 and got.shape == (2, 11, 3, topk)
    assert torch.equal(got, bf_select(sc, topk))
    assert (got[0, 0, 0] == -1).all()


@pytest.mark.parametrize('selection', iv.SELECTIONS)
@pytest.mark.parametrize('shape', SHAPES)
def test_select_on_block_scores(shape, selection):
    B, T, N, H, Hkv, D, p, s, m, init, local = shape
    q, k, _ = rand_qk(B, T, N, H, Hkv, D, seed=2 + sum(shape))
    sc = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local,
                         selection=selection)
    topk = init + local + 2
    got = iv.select_blocks(sc, topk)
    assert torch.equal(got, bf_select(sc, topk))
    lists = iv.attention_blocks(got, N, m, local, selection)
    # sinks and the window always attended, never a future block; 'minicpm4' attends topk + window blocks at most
    for b in range(B):
        for i in range(T):
            t = N - T + i
            for g in range(Hkv):
                row = [x for x in lists[b, i, g].tolist() if x >= 0]
                assert all(x <= t // m for x in row) and len(set(row)) == len(row)
                lo = t // m - local + (1 if selection == 'minicpm4' else 0)
                for x in range(t // m + 1):
                    if x < init or x >= lo:
                        assert x in row
                chosen = [x for x in got[b, i, g].tolist() if x >= 0]
                if selection == 'minicpm4':
                    assert all(x < lo or x < init for x in chosen)        # the top-k never holds a window block


@pytest.mark.parametrize('method', ['gather', 'mask'])
@pytest.mark.parametrize('shape', SHAPES)
def test_sparse_attention_ref(shape, method):
    B, T, N, H, Hkv, D, p, s, m, init, local = shape
    q, k, v = rand_qk(B, T, N, H, Hkv, D, seed=3 + sum(shape))
    sc = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local)
    idx = iv.select_blocks(sc, init + local + 1)
    got = iv.sparse_attention_ref(q, k, v, idx, m, chunk_size=6, method=method)
    assert got.shape == q.shape
    assert rel(got, bf_sparse(q, k, v, idx, m)) < 1e-5


@pytest.mark.parametrize('method', ['gather', 'mask'])
def test_sparse_attention_arbitrary_idx(method):
    # any unique block lists (including ones that skip the query's own block, or select only future blocks) follow
    # the definition; a row with no attendable token gives zeros
    q, k, v = rand_qk(2, 15, 50, 4, 2, 8, seed=11)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(2 * 15 * 2)]).view(2, 15, 2, 3)
    idx[0, :, 0, 2] = -1
    idx[1, 0, 1] = torch.tensor([6, 5, -1])                 # only future blocks for query 0 -> nothing to attend
    got = iv.sparse_attention_ref(q, k, v, idx, 8, method=method)
    assert (got[1, 0, 2:] == 0).all()
    assert rel(got, bf_sparse(q, k, v, idx, 8)) < 1e-5
    assert torch.isfinite(got).all()


@pytest.mark.parametrize('shape', SHAPES)
def test_full_topk_is_dense(shape):
    B, T, N, H, Hkv, D, p, s, m, init, local = shape
    q, k, v = rand_qk(B, T, N, H, Hkv, D, seed=4 + sum(shape))
    sc = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local)
    nb = math.ceil(N / m)
    dense = bf_dense(q, k, v)
    for sel in iv.SELECTIONS:
        sc = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init,
                             local_blocks=max(local, 1), selection=sel)
        idx = iv.attention_blocks(iv.select_blocks(sc, nb + 2), N, m, max(local, 1), sel)
        assert rel(iv.sparse_attention_ref(q, k, v, idx, m), dense) < 1e-5
    assert rel(iv.dense_attention_ref(q, k, v), dense) < 1e-5


@pytest.mark.parametrize('method', ['gather', 'mask'])
def test_gradients_match_dense_full_topk(method):
    q, k, v = rand_qk(2, 24, 40, 8, 2, 8, seed=21)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    idx = iv.attention_blocks(iv.select_blocks(iv.block_scores(q, k, kernel_size=8, kernel_stride=4, block_size=8,
                                                               init_blocks=1, local_blocks=1), 5), 40, 8, 1)
    w = torch.randn(2, 24, 8, 8)
    (iv.sparse_attention_ref(q, k, v, idx, 8, chunk_size=5, method=method) * w).sum().backward()  # chunked + checkpointed
    gs = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    (iv.dense_attention_ref(q, k, v) * w).sum().backward()
    for a, x in zip(gs, (q, k, v)):
        assert rel(a, x.grad) < 1e-5


@pytest.mark.parametrize('method', ['gather', 'mask'])
def test_gradients_reach_qkv_sparse(method):
    q, k, v = rand_qk(1, 40, 40, 4, 1, 8, seed=22)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    idx = iv.select_blocks(iv.block_scores(q, k, kernel_size=4, kernel_stride=4, block_size=4, init_blocks=1,
                                           local_blocks=1), 3)
    assert (idx >= 0).sum(-1).min() >= 1 and (idx[:, -1] >= 0).all()
    (iv.sparse_attention_ref(q64, k64, v64, idx, 4, chunk_size=16, method=method) ** 2).sum().backward()
    for x in (q64, k64, v64):
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # keys of blocks never selected by anyone get no gradient; some do
    used = torch.zeros(10, dtype=torch.bool)
    used[idx[idx >= 0].long()] = True
    gk = k64.grad[0, :, 0].abs().sum(-1).view(10, 4).sum(-1)
    assert (gk[~used] == 0).all() and (gk[used] > 0).all()
    # finite-difference check of the float64 reference on a small case
    qs, ks, vs = (torch.randn(1, 12, 4, 4, dtype=torch.float64).requires_grad_(),
                  *(torch.randn(1, 12, 2, 4, dtype=torch.float64).requires_grad_() for _ in range(2)))
    idx_s = iv.select_blocks(iv.block_scores(qs.detach(), ks.detach(), kernel_size=4, kernel_stride=2, block_size=4,
                                             init_blocks=0, local_blocks=1), 2)
    assert torch.autograd.gradcheck(lambda a, b, c: iv.sparse_attention_ref(a, b, c, idx_s, 4, chunk_size=5,
                                                                             method=method),
                                    (qs, ks, vs), fast_mode=True)


@pytest.mark.parametrize('selection', iv.SELECTIONS)
@pytest.mark.parametrize('use_lse', [False, True])
def test_decode_equals_prefill(use_lse, selection):
    B, N, H, Hkv, D, p, s, m, init, local, topk = 2, 70, 8, 2, 8, 8, 4, 8, 1, 1, 4
    q, k, v = rand_qk(B, N, N, H, Hkv, D, seed=31)
    geo = dict(kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=local, selection=selection)
    lse = dict(lse_approx=True, lse_kernel_size=16, lse_kernel_stride=8) if use_lse else {}
    pre = iv.block_scores(q, k, **geo, **lse)
    pre_idx = iv.attention_blocks(iv.select_blocks(pre, topk), N, m, local, selection)
    pre_out = iv.sparse_attention_ref(q, k, v, pre_idx, m)
    cache = iv.CompressedKeyCache(p, s)
    coarse = iv.CompressedKeyCache(16, 8) if use_lse else None
    # a prefill chunk of 23 tokens, then one token at a time
    steps = [(0, 23)] + [(t, t + 1) for t in range(23, N)]
    for a, b in steps:
        cache.append(k[:, a:b])
        if coarse is not None:
            coarse.append(k[:, a:b])
        assert torch.equal(cache.kc, iv.compress_keys(k[:, :b], p, s))
        sc = iv.block_scores_from_compressed(q[:, a:b], cache.kc, b, **geo,
                                             kc_coarse=coarse.kc if coarse is not None else None,
                                             lse_kernel_size=16, lse_kernel_stride=8)
        nb = math.ceil(b / m)                      # blocks that exist after b keys; later ones are future anyway
        assert sc.shape[-1] == nb and torch.isneginf(pre[:, a:b, :, nb:]).all()
        finite_close(sc, pre[:, a:b, :, :nb], tol=1e-6)
        idx = iv.attention_blocks(iv.select_blocks(sc, topk), b, m, local, selection)
        assert torch.equal(idx, pre_idx[:, a:b])
        out = iv.sparse_attention_ref(q[:, a:b], k[:, :b], v[:, :b], idx, m)
        assert rel(out, pre_out[:, a:b]) < 1e-5


def test_lse_approx_selection_overlap_random():
    # sanity: the approximation is a per-head reweighting, so with one head per group selection is unchanged
    q, k, _ = rand_qk(1, 64, 128, 2, 2, 8, seed=41)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1)
    a = iv.select_blocks(iv.block_scores(q, k, **geo), 5)
    b = iv.select_blocks(iv.block_scores(q, k, **geo, lse_approx=True), 5)
    assert torch.equal(a, b)


def test_sparse_settings():
    from minicpm4_core.config import SPARSE_CONFIG_DEFAULT
    st = iv.SparseSettings.from_dict(dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64,
                                          window_size=2048, topk=64, use_nope=False, dense_len=8192))
    assert st.local_blocks == 32 and st.geometry()['local_blocks'] == 32
    assert st.selection == 'minicpm4' and st.attended_blocks == 96                 # 64 + the 32-block window
    assert iv.SparseSettings.from_dict(dict(SPARSE_CONFIG_DEFAULT)).selection == 'minicpm4'
    st41 = iv.SparseSettings.from_dict(dict(selection='minicpm4.1'))
    assert st41.attended_blocks == 64 and st41.geometry()['selection'] == 'minicpm4.1'
    assert iv.SparseSettings.from_dict(dict(topk=16)).attended_blocks == 48        # fine for the release...
    with pytest.raises(ValueError, match="topk .16. is smaller than the forced blocks of selection='minicpm4.1'"):
        iv.SparseSettings.from_dict(dict(topk=16, selection='minicpm4.1'))       # ...not for 4.1 (34 forced)
    iv.SparseSettings.from_dict(dict(topk=34, selection='minicpm4.1'))
    with pytest.raises(ValueError, match='selection must be one of'):
        iv.SparseSettings.from_dict(dict(selection='minicpm4.2'))
    with pytest.raises(ValueError, match='window_size >= block_size'):
        iv.SparseSettings.from_dict(dict(window_size=0))
    with pytest.raises(ValueError, match='smaller than init_blocks'):
        iv.SparseSettings.from_dict(dict(topk=1, init_blocks=2))
    with pytest.raises(ValueError, match='unknown'):
        iv.SparseSettings.from_dict(dict(kernel=3))
    with pytest.raises(ValueError, match='multiple of kernel_stride'):
        iv.SparseSettings.from_dict(dict(block_size=72))


def test_bad_arguments():
    q, k, v = rand_qk(1, 8, 20, 4, 2, 8, seed=0)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match='multiple of kernel_stride'):
        iv.block_scores(q, k, **{**geo, 'block_size': 10})
    with pytest.raises(ValueError, match='kernel_size .* must be >= kernel_stride'):
        iv.block_scores(q, k, **{**geo, 'kernel_size': 2})
    with pytest.raises(ValueError, match='kernel_size .* must be >= kernel_stride'):
        iv.compress_keys(k, 2, 4)
    with pytest.raises(ValueError, match='multiple of the kv heads'):
        iv.block_scores(torch.randn(1, 8, 3, 8), k, **geo)
    with pytest.raises(ValueError, match='T <= N'):
        iv.block_scores(torch.randn(1, 30, 4, 8), k, **geo)
    with pytest.raises(ValueError, match='transpose'):
        iv.block_scores(q.transpose(1, 2), k.transpose(1, 2), **geo)   # (B, H, T, D) by mistake: 4 'positions' vs 2
    with pytest.raises(ValueError, match='4-D'):
        iv.block_scores(q[0], k, **geo)
    with pytest.raises(ValueError, match='floating'):
        iv.compress_keys(k.long(), 8, 4)
    with pytest.raises(ValueError, match='init_blocks'):
        iv.block_scores(q, k, **{**geo, 'init_blocks': -1})
    with pytest.raises(ValueError, match='selection must be one of'):
        iv.block_scores(q, k, **geo, selection='4.1')
    sc = iv.block_scores(q, k, **geo, selection='minicpm4.1')
    with pytest.raises(ValueError, match='smaller than the number of forced'):
        iv.select_blocks(sc, 1)
    idx = iv.select_blocks(sc, 3)
    with pytest.raises(ValueError, match='integer tensor'):
        iv.sparse_attention_ref(q, k, v, idx.float(), 8)
    with pytest.raises(ValueError, match='block_idx must have shape'):
        iv.sparse_attention_ref(q, k, v, idx[:, :4], 8)
    with pytest.raises(ValueError, match='v must match k'):
        iv.sparse_attention_ref(q, k, v[:, :10], idx, 8)
    with pytest.raises(ValueError, match='only have'):
        iv.sparse_attention_ref(q, k, v, idx + 10, 8)
    with pytest.raises(ValueError, match='head_dim'):
        iv.sparse_attention_ref(q, k[..., :4], v[..., :4], idx, 8)


# ---------------------------------------------------------------------------------------------- vs the official code

# (B, T, N, H, Hkv, D, s, m, init, w, extra): p = 2s; topk = init + extra ('minicpm4') or init + w + 1 + extra
# ('minicpm4.1'). GQA 2/4/16, T < N, N not a multiple of m, window longer than the context, init 0/1/2, decoding.
OFFICIAL = [
    (1, 60, 60, 4, 2, 8, 4, 16, 1, 2, 2),
    (2, 50, 130, 8, 2, 8, 4, 16, 0, 1, 3),
    (1, 40, 150, 16, 1, 8, 4, 8, 2, 3, 4),
    (1, 30, 70, 2, 2, 8, 4, 16, 1, 8, 1),       # window (8 blocks = 128 tokens) longer than the context
    (2, 1, 230, 8, 2, 8, 4, 16, 1, 2, 3),       # one decoding step: stage 1 runs non-causally
    (1, 64, 100, 4, 1, 8, 8, 16, 2, 1, 2),      # s = 8: pooling window 3
    (1, 40, 90, 4, 2, 8, 4, 16, 1, 0, 2),       # no window: 'minicpm4' drops the query's own block (ids >= q_idx)
]


def ours_selection(q, k, p, s, m, init, w, topk, variant):
    sc = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=init, local_blocks=w,
                         selection=variant)
    return sc, iv.attention_blocks(iv.select_blocks(sc, topk), k.shape[1], m, w, variant)


def check_vs_official(q, k, p, s, m, init, w, topk, variant, min_clear=0.5):
    """Our lists vs the transcription, tie-robust: the very same blocks on every row whose topk-th slot is not a tie
    (the official torch.topk may break a tie either way); on the other rows every block that differs carries the
    tied score itself."""
    N, T = k.shape[1], q.shape[1]
    sc, lists = ours_selection(q, k, p, s, m, init, w, topk, variant)
    off_sc, _, off_att = official_selection(q, k, p, s, m, init, w, topk, variant)
    nb = off_sc.shape[-1]
    qb = (torch.arange(N - T, N) // m)[None, :, None, None]
    future = torch.arange(nb)[None, None, None, :] > qb
    # block scores: identical where the official code defines them; future blocks are -inf in ours (dropped there)
    finite_close(sc.masked_fill(future, 0.0), off_sc.float().masked_fill(future, 0.0), tol=1e-5)
    assert torch.isneginf(sc[future.expand_as(sc)]).all()
    ours = as_mask(lists, nb)
    assert torch.equal(ours.sum(-1), (lists >= 0).sum(-1))                # unique ids
    assert ((lists[..., 1:] > lists[..., :-1]) | (lists[..., 1:] < 0)).all()   # ascending, -1 at the end
    n_clear = 0
    for b in range(q.shape[0]):
        for i in range(T):
            for g in range(k.shape[2]):
                row = off_sc[b, i, g].masked_fill(future[0, i, 0], -math.inf)   # a future pick is dropped anyway
                v = row.sort(descending=True).values
                kk = min(topk, nb)
                clear = kk >= nb or v[kk] == -math.inf or v[kk - 1] - v[kk] > 1e-5 * max(1.0, abs(float(v[kk])))
                if clear:
                    n_clear += 1
                    assert torch.equal(ours[b, i, g], off_att[b, i, g]), (b, i, g)
                else:
                    diff = ours[b, i, g] ^ off_att[b, i, g]
                    tied = (row - v[kk - 1]).abs() <= 1e-5 * max(1.0, abs(float(v[kk - 1])))
                    assert (tied | ~diff).all(), (b, i, g, row, lists[b, i, g], off_att[b, i, g])
    assert n_clear >= min_clear * q.shape[0] * T * k.shape[2], n_clear
    return lists, off_att


@pytest.mark.parametrize('variant', iv.SELECTIONS)
@pytest.mark.parametrize('shape', OFFICIAL)
def test_selection_matches_official(shape, variant):
    B, T, N, H, Hkv, D, s, m, init, w, extra = shape
    p = 2 * s
    topk = init + extra + (w + 1 if variant == 'minicpm4.1' else 0)
    q, k, v = rand_qk(B, T, N, H, Hkv, D, seed=7 + sum(shape))
    lists, off_att = check_vs_official(q, k, p, s, m, init, w, topk, variant)
    assert lists.shape[-1] == topk + (w if variant == 'minicpm4' else 0)
    # attention on our lists = attention on the official blocks, wherever the two agree (all rows without a tie)
    nb = off_att.shape[-1]
    off_lists = torch.where(off_att, torch.arange(nb), -1)
    same = (as_mask(lists, nb) == off_att).all(-1)                        # (B, T, Hkv)
    got = iv.sparse_attention_ref(q, k, v, lists, m)
    want = bf_sparse(q, k, v, off_lists, m)
    G = H // Hkv
    rows = same.repeat_interleave(G, -1)                                  # (B, T, H)
    assert rows.float().mean() > 0.5 and rel(got[rows], want[rows]) < 1e-5


@pytest.mark.parametrize('variant', iv.SELECTIONS)
def test_selection_shipped_geometry(variant):
    """The shipped 32/16/64 kernels and blocks with a shortened window: the decoding step of a 2000-token context."""
    q, k, _ = rand_qk(1, 1, 2000, 16, 1, 16, seed=99)
    init, w = 1, 4
    topk = 8 if variant == 'minicpm4' else 8 + w + 1
    lists, _ = check_vs_official(q, k, 32, 16, 64, init, w, topk, variant, min_clear=0.0)
    assert (lists >= 0).sum() == (topk + w if variant == 'minicpm4' else topk)


def test_tie_rule_lower_block_wins():
    """Neighbouring blocks share a boundary kernel; make it the best kernel of both so they tie exactly. We keep the
    lower block; the official torch.topk may keep either, and the tie-robust comparison accepts both."""
    D, s, m = 8, 4, 16                                                     # p = 8: block b pools kernels 4b-1 .. 4b+3
    g = torch.Generator().manual_seed(3)
    N = 160
    k = torch.randn(1, N, 1, D, generator=g) * 0.1
    q = torch.zeros(1, 1, 1, D)
    q[0, 0, 0, 0] = 4.0
    k[0, 60:68, 0, 0] = 3.0                                                # kernel 15 = keys 60..67: blocks 3 and 4
    init, w = 1, 1
    sc, lists = ours_selection(q, k, 8, s, m, init, w, 2, 'minicpm4')
    assert sc[0, 0, 0, 3] == sc[0, 0, 0, 4] and sc[0, 0, 0, 3] == sc[0, 0, 0, 1:8].max()  # the tie, at the top
    assert lists[0, 0, 0].tolist() == [0, 3, 9]                           # sink, the lower of the tied pair, window
    check_vs_official(q, k, 8, s, m, init, w, 2, 'minicpm4', min_clear=0.0)
    # both selections and the plain select_blocks follow the same rule
    assert iv.select_blocks(torch.tensor([[[[1.0, 2.0, 2.0, 0.5]]]]), 2).tolist() == [[[[1, 2]]]]
    assert iv.select_blocks(torch.tensor([[[[1.0, 2.0, 2.0, 0.5]]]]), 1).tolist() == [[[[1]]]]


def test_attention_blocks():
    idx = torch.tensor([[[[0, 3, 5, -1]], [[1, 2, -1, -1]]]], dtype=torch.int32)   # queries at t = 94, 95 of 96
    got = iv.attention_blocks(idx, 96, 16, 2)
    assert got.shape == (1, 2, 1, 6) and got.dtype == torch.int32
    assert got[0, 0, 0].tolist() == [0, 3, 4, 5, -1, -1] and got[0, 1, 0].tolist() == [1, 2, 4, 5, -1, -1]
    assert torch.equal(iv.attention_blocks(idx, 96, 16, 2, 'minicpm4.1'), idx)
    early = iv.attention_blocks(torch.tensor([[[[0, -1]]]]), 20, 16, 3)      # t = 19: window [-1, 1] -> [0, 1]
    assert early[0, 0, 0].tolist() == [0, 1, -1, -1, -1]
    no_window = iv.attention_blocks(torch.tensor([[[[0, 1]]]]), 20, 16, 0)   # w = 0: own block (1) dropped
    assert no_window[0, 0, 0].tolist() == [0, -1]
    per_row = iv.attention_blocks(torch.tensor([[[[0]]], [[[0]]]]), torch.tensor([96, 40]), 16, 1)
    assert per_row[:, 0, 0].tolist() == [[0, 5], [0, 2]]
    with pytest.raises(ValueError, match='selection must be one of'):
        iv.attention_blocks(idx, 96, 16, 2, 'minicpm5')


# ---------------------------------------------------------------------------------------------- model integration

SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3, dense_len=64)


def tiny_model(**sc):
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    torch.manual_seed(0)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(sparse_config={**SPARSE, **sc})).eval()


def test_model_sparse_is_config_switch():
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    sparse = tiny_model()
    dense = MiniCPM4ForCausalLM(MiniCPM4Config.tiny()).eval()
    dense.load_state_dict(sparse.state_dict())                       # no extra parameters, same names
    ids = torch.randint(3, 512, (1, 150))
    short = ids[:, :60]                                             # < dense_len: identical to dense
    assert torch.allclose(sparse(short), dense(short), atol=1e-5)
    a, b = sparse(ids), dense(ids)
    assert torch.allclose(a[:, :80], b[:, :80], atol=1e-5)         # <= topk + window = 5 blocks (80 tokens): dense
    assert (a[:, 100:] - b[:, 100:]).abs().max() > 1e-3            # ...later ones are sparse
    # topk >= all blocks: exactly dense
    full = tiny_model(topk=20)
    assert torch.allclose(full(ids), b, atol=1e-5)


def test_model_training_gradients():
    m = tiny_model().train()
    ids = torch.randint(3, 512, (2, 130))
    loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    for name in ('q_proj', 'k_proj', 'v_proj'):
        g = getattr(m.model.layers[0].self_attn, name).weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize('sc', [dict(), dict(use_nope=True)])
@pytest.mark.parametrize('lse', [False, True])
def test_model_decode_padding_truncate(sc, lse):
    from minicpm4_core import infllmv2
    m = tiny_model(**sc)
    if lse:
        for layer in m.model.layers:
            layer.self_attn.backend = lambda inp: infllmv2.infllmv2_attention(inp, lse_approx=True)
    a, b = torch.randint(3, 512, (1, 110)), torch.randint(3, 512, (1, 140))
    with torch.no_grad():
        la, lb = m(a), m(b)
        ids = torch.zeros(2, 140, dtype=torch.long)
        ids[0, 30:], ids[1] = a[0], b[0]
        mask = torch.zeros(2, 140, dtype=torch.long)
        mask[0, 30:], mask[1] = 1, 1
        cache = m.new_cache(2, 150)
        outs = [m(ids[:, :70], cache=cache, attention_mask=mask[:, :70])]     # chunked prefill (dense phase) ...
        for t in range(70, 140):                                              # ... then one token at a time
            outs.append(m(ids[:, t:t + 1], cache=cache, attention_mask=mask[:, :t + 1]))
        got = torch.cat(outs, 1)
        assert torch.allclose(got[0, 30:], la[0], atol=1e-4)
        assert torch.allclose(got[1], lb[0], atol=1e-4)
        cache.truncate(125)                                                   # rejected draft tokens
        again = m(ids[:, 125:140], cache=cache, attention_mask=mask)
        assert torch.allclose(again, got[:, 125:], atol=1e-4)


def test_model_generate_sparse_matches_teacher_forcing():
    m = tiny_model()
    prompt = torch.randint(3, 512, (1, 100))
    out = m.generate(prompt, 12, stop_ids=[])[0]
    full = torch.cat([prompt, torch.tensor([out[:-1]])], 1)
    pred = m(full)[0, 99:].argmax(-1).tolist()
    assert pred == out


# ---- the loop definitions (infllmv2_ref.naive_*) are the ground truth of the memory-bounded reference ----
@pytest.mark.parametrize("sel", ["minicpm4", "minicpm4.1"])
@pytest.mark.parametrize("p, s, m, T", [(8, 4, 8, 40), (10, 4, 8, 17)])
def test_naive_block_scores_match_reference(sel, p, s, m, T):
    g = torch.Generator().manual_seed(hash((sel, p, T)) % 2**31)
    N = 61
    q, k = torch.randn(2, T, 4, 8, generator=g), torch.randn(2, N, 2, 8, generator=g)
    w = 2
    ref = iv.block_scores(q, k, kernel_size=p, kernel_stride=s, block_size=m, init_blocks=1, local_blocks=w,
                          selection=sel, chunk_size=7)
    nv = iv.naive_block_scores(q, k, p, s, m, 1, w, sel)
    assert ref.shape == nv.shape
    assert torch.equal(torch.isinf(ref), torch.isinf(nv.float())) and torch.equal(ref.sign(), nv.float().sign())
    fin = torch.isfinite(ref)
    assert fin.any() and torch.allclose(ref[fin].double(), nv[fin], atol=1e-5)
    # the top-k + window rule on the same scores
    topk = 3 if sel == "minicpm4" else 4
    a = iv.attention_blocks(iv.select_blocks(ref, topk), N, m, w, sel).long()
    b = iv.naive_attention_blocks(ref, topk, N, m, w, sel)
    assert torch.equal(a, b)


@pytest.mark.parametrize("method", ["gather", "mask"])
def test_naive_sparse_attention_matches_reference_fwd_bwd(method):
    g = torch.Generator().manual_seed(7)
    B, T, N, H, Hkv, D, m = 2, 13, 45, 4, 2, 8, 8
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, Hkv, D, generator=g, dtype=torch.float64, requires_grad=True)
    sc = iv.block_scores(q.detach(), k.detach(), kernel_size=8, kernel_stride=4, block_size=m, init_blocks=1,
                         local_blocks=1)
    idx = iv.attention_blocks(iv.select_blocks(sc, 2), N, m, 1)
    idx[0, 0, 0] = -1                                      # a row with no block at all -> zeros in both
    go = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    outs = []
    for fn in (lambda: iv.naive_sparse_attention(q, k, v, idx, m),
               lambda: iv.sparse_attention_ref(q, k, v, idx, m, method=method, chunk_size=5)):
        o = fn()
        gq, gk, gv = torch.autograd.grad((o * go).sum(), (q, k, v))
        outs.append((o.detach(), gq, gk, gv))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()
    assert outs[0][0][0, 0, :2].abs().max() == 0


# ---- issue 12: the model's prefill/training path takes the window as a dense band (SPARSE_BAND) ----
@pytest.mark.parametrize('padded', [False, True])
def test_model_band_path_matches_reference(monkeypatch, padded):
    """MiniCPM4ForCausalLM with sparse_config ('minicpm4' lists = top-k + window): logits and parameter gradients
    with the band kernel (kernels.sparse_attention_band, forced on CPU through the Triton interpreter) equal the
    torch reference's, on fresh random weights and tokens; the band kernel must really run (and the general kernel
    not), SPARSE_BAND=False must go back to the general kernel (padded case), and the faster prefill stage 1
    (PREFILL_SCORES='transposed', PREFILL_TOPK='bucketed') must give the same logits and gradients (unpadded)."""
    from minicpm4_core import infllmv2
    from minicpm4_core.kernels import _common
    if not _common.interpreter_active(): pytest.skip('needs TRITON_INTERPRET=1 before triton import')
    import minicpm4_core.kernels.sparse as sk
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=2, dense_len=48)
    torch.manual_seed(int(torch.randint(0, 10 ** 6, ())))                 # fresh each run
    model = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(num_hidden_layers=1, sparse_config=sc))
    ids = torch.randint(3, 512, (2, 76))                                 # > 4 blocks of 16: sparse
    mask = None
    if padded:
        mask = torch.ones(2, 76, dtype=torch.long); mask[0, :9] = 0
    calls = {'band': 0, 'plain': 0}
    band, plain = sk.sparse_attention_band, sk.sparse_attention
    monkeypatch.setattr(sk, 'sparse_attention_band', lambda *a, **k: calls.__setitem__('band', calls['band'] + 1) or band(*a, **k))
    monkeypatch.setattr(sk, 'sparse_attention', lambda *a, **k: calls.__setitem__('plain', calls['plain'] + 1) or plain(*a, **k))

    def run(impl, band_on):
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', impl)
        monkeypatch.setattr(infllmv2, 'SPARSE_BAND', band_on)
        model.zero_grad()
        logits = model(ids, attention_mask=mask)
        keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))   # a loss touching every logit
        (logits * w)[keep].sum().backward()
        return logits.detach()[keep], [p.grad.clone() for p in model.parameters() if p.grad is not None]

    lr, gr = run('torch', True)
    assert calls == {'band': 0, 'plain': 0}
    lb, gb = run('triton', True)
    assert calls['band'] > 0 and calls['plain'] == 0                   # the band really ran
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(lb, lr) <= 1e-4
    assert len(gb) == len(gr) > 0 and all(rel(a, b) <= 1e-3 for a, b in zip(gb, gr))
    if not padded:                     # the faster prefill stage 1 (transposed scores, bucketed top-k): same lists
        monkeypatch.setattr(infllmv2, 'PREFILL_TOPK', 'bucketed')
        monkeypatch.setattr(infllmv2, 'PREFILL_SCORES', 'transposed')
        import minicpm4_core.kernels.sparse_prefill as sp
        used = []
        for fn in ('block_scores_t', 'select_lists_bucketed'):
            real = getattr(sp, fn)
            monkeypatch.setattr(sp, fn, lambda *a, real=real, fn=fn, **k: used.append(fn) or real(*a, **k))
        lk, gk = run('triton', True)
        assert set(used) == {'block_scores_t', 'select_lists_bucketed'}
        assert rel(lk, lr) <= 1e-4 and all(rel(a, b) <= 1e-3 for a, b in zip(gk, gr))
        for name in ('PREFILL_TOPK', 'PREFILL_SCORES'):
            monkeypatch.setattr(infllmv2, name, 'top')
            with pytest.raises(ValueError, match=name):
                model(ids)
            monkeypatch.setattr(infllmv2, name, 'plain')
    else:
        run('triton', False)
        assert calls['plain'] > 0                                      # the switch turns it off
    monkeypatch.setattr(infllmv2, 'SPARSE_BAND', 'yes')
    with pytest.raises(ValueError, match='SPARSE_BAND'):
        model(ids)
