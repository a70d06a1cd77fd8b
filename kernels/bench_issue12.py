#!/usr/bin/env python
"""Issue 12's table in one run: every row of the issue with its baseline measured in the same process, the goal,
met or missed and by how much; JSON + a plot.

Rows (8B attention shapes: B 1, 32 query / 2 kv heads, d 128, bf16, blocks of 64, 64 top-k + 32-block window):
  prefill @N, per-token lists (stage 1 exact + bucketed top-k + band forward: what the model runs) vs dense cuDNN SDPA;
  the same with block-shared lists (one random list per 64-query block, as the kernel benchmark times); the sparse
  forward alone; our forward vs FlexAttention on the same lists (per-token and block-shared) at each N; the backward
  on per-token lists vs dense cuDNN backward at the largest N; decode at N (K1's kernels: `decode_step` in a CUDA
  graph and eager vs SDPA's default (cuDNN) decode; `decode_select` vs `sparse_decode`); the 8B-shape model forward
  with vs without `sparse_config` (`bench_sparse_model.build_model`: random bf16 weights, a few layers, extrapolated
  to 32); 8B-shape cached decoding (`kernels/bench_static_sparse.py` as a subprocess: StaticSparseDecoder vs the
  static dense stack, both CUDA graphs, and the model's eager loop).
Sources of the lists: (a) random q/k; (b) a trained model's: SmolLM2-135M's stage-1 lists on Austen
(`kernels/trained_lists.py`, computed on the CPU and carried as int16 files) at 32K, placed on the 8B shape (its first 2
of 3 kv heads); at the SmolLM2 shape itself (9 / 3 heads, d 64) stage 1 runs on its captured q/k at 8K and the band on
its lists at 8K and 32K, random q/k at the same shape as the control. (c) optionally the synthetic structured q/k of
`bench_sparse_model.structured_qk` (NOT a model's) at 128K.
Also the model-level check (task 3): the model forward + backward with `sparse_config` on the device through the band
path vs the general path, float32 (tight) and bf16 (loose).

    PYTHONPATH=. python kernels/bench_issue12.py --out DIR [--budget 320] [--trained runs/issue12_carry]
    PYTHONPATH=. python kernels/bench_issue12.py --out DIR --short        # round 1: 32K rows + the 128K prefill
    PYTHONPATH=. python kernels/bench_issue12.py --out /tmp/x --smoke     # CPU interpreter dry run (tiny shapes)

Writes DIR/issue12.json (rows + raw measurements) and DIR/issue12.png; prints the table last.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sparse_model as bsm  # noqa: E402  (this folder: structured_qk, flex_per_token, build_model, band_check)

from minicpm4_core import infllmv2 as iv  # noqa: E402
from minicpm4_core.bench import cuda_graph_time, env_stamp, event_time, kernel_times, roofline_ceilings  # noqa: E402
from minicpm4_core.io import atomic_write_json  # noqa: E402
from minicpm4_core.kernels import sparse as sk  # noqa: E402
from minicpm4_core.kernels import sparse_prefill as sp  # noqa: E402

H, HKV, D, M, TOPK, INIT, LOCAL = 32, 2, 128, 64, 64, 1, 32
G = H // HKV
GEO = dict(kernel_size=32, kernel_stride=16, block_size=M, init_blocks=INIT, local_blocks=LOCAL, selection='minicpm4')
CUDA = torch.cuda.is_available()
RES, OUT, T0, BUDGET = {}, None, time.time(), 1e9


def save():
    if OUT: atomic_write_json(os.path.join(OUT, 'issue12.json'), json.loads(json.dumps(RES, default=str)), indent=1)


def sync():
    if CUDA: torch.cuda.synchronize()


def left():
    return BUDGET - (time.time() - T0)


def timeit(fn, budget_ms=300.0, reps=5):
    "Median ms (CUDA events; one wall-clock call on the CPU smoke run)."
    return event_time(fn, budget_ms=budget_ms, min_reps=2 if CUDA else 1, max_reps=reps if CUDA else 1, warmup=1)


def attempt(name, fn, store, need=0.0):
    """Run fn, store its value (or the error, or 'SKIPPED' when fewer than `need` seconds of the budget are left),
    save, print one line: one failing row never costs the others."""
    t0 = time.time()
    if left() < need:
        store[name] = f'SKIPPED (budget: {left():.0f} s left, row needs ~{need:.0f})'
        print(f'  {name}: {store[name]}', flush=True)
        save()
        return None
    try:
        v = fn()
        store[name] = v
        s = f'{v:.3f}' if isinstance(v, float) else str(v)[:240]
        print(f'  {name}: {s}   ({time.time() - t0:.1f} s)', flush=True)
    except Exception as ex:
        store[name] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
        print(f'  {name}: ERROR {ex!r:.300}', flush=True)
        traceback.print_exc(limit=3)
    save()
    if CUDA: torch.cuda.empty_cache()
    return store.get(name)


def num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float('nan')


# ------------------------------------------------------------------------------------------------ list sources
def block_shared_lists(N, dev, seed):
    """One random 'minicpm4' list per 64-query block and kv head (block 0, 63 random blocks older than the window,
    the 32-block window), shared by the block's queries: (1, N, Hkv, 96) and the per-block (nb, Hkv, 96)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    nb, K = N // M, TOPK + LOCAL
    qb = torch.arange(nb, device=dev)[:, None]
    b = torch.arange(nb, device=dev)[None]
    out = []
    for _ in range(HKV):
        r = torch.where((b >= INIT) & (b <= qb - LOCAL), torch.rand(nb, nb, device=dev, generator=g), -1.0)
        v, ch = r.topk(min(TOPK - INIT, nb), -1)
        ch = torch.where(v >= 0, ch, -1)
        loc = qb - torch.arange(LOCAL, device=dev)[None]
        lst = torch.cat([torch.zeros(nb, INIT, dtype=torch.long, device=dev), torch.where(loc >= INIT, loc, -1), ch], -1)
        lst = torch.where(lst < 0, nb, lst).sort(-1).values[:, :K]
        out.append(torch.where(lst == nb, -1, lst))
    per_block = torch.stack(out, 1).int()
    return per_block.repeat_interleave(M, 0)[None].contiguous(), per_block


def load_trained(path, N, dev, heads=None):
    "Trained lists (1, N, Hkv, K) int32 from a trained_lists.py file, the first `heads` kv heads; None if absent."
    if not path or not os.path.exists(path): return None
    d = torch.load(path)
    L = d['lists'].to(torch.int32)
    if L.shape[0] != N: raise ValueError(f'{path}: lists for {L.shape[0]} tokens, not {N}')
    if heads is not None: L = L[:, :heads]
    return L[None].contiguous().to(dev)


def flex_block_shared(q, k, v, per_block, idx, N, dev):
    "FlexAttention on block-shared lists (diagonal block partial + causal mask_mod, the rest full) -> dict."
    from torch.nn.attention.flex_attention import BlockMask
    nb, K = N // M, per_block.shape[-1]
    qb = torch.arange(nb, device=dev)[:, None, None]
    lst = per_block.long()
    is_full = (lst >= 0) & (lst < qb)
    nfull = is_full.sum(-1)
    full_idx = torch.where(is_full, lst, nb).sort(-1).values
    full_idx = torch.cat([torch.where(full_idx == nb, 0, full_idx),
                          torch.zeros(nb, HKV, max(0, nb - K), dtype=torch.long, device=dev)], -1)
    part_idx = torch.zeros(nb, HKV, nb, dtype=torch.long, device=dev)
    part_idx[..., 0] = torch.arange(nb, device=dev)[:, None]
    npart = torch.ones(nb, HKV, dtype=torch.long, device=dev)

    def heads(x): return x.movedim(0, 1).repeat_interleave(G, 0)[None].int().contiguous()

    def causal(b, h, q_idx, kv_idx): return q_idx >= kv_idx
    bm = BlockMask.from_kv_blocks(heads(npart), heads(part_idx), heads(nfull), heads(full_idx), BLOCK_SIZE=(M, M),
                                  mask_mod=causal)
    return flex_time(q, k, v, bm, idx)


_FX = {}


def flex_time(q, k, v, bm, idx):
    "ms of compiled flex_attention on BlockMask bm (+ rel. difference to our general kernel on the lists idx)."
    from torch.nn.attention.flex_attention import flex_attention
    fx = _FX.setdefault('fx', torch.compile(flex_attention, dynamic=False))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    ko = {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_stages': 2, 'num_warps': 4}
    with torch.no_grad():
        t0 = time.time()
        of = fx(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=ko).transpose(1, 2)
        sync()
        first_s = time.time() - t0
        ref = sk.sparse_attention(q, k, v, idx, M)
        rel = float((of.float() - ref.float()).norm() / ref.float().norm())
        del of, ref
        ms = timeit(lambda: fx(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=ko), 300, reps=3)
    return dict(ms=ms, rel_vs_ours=rel, compile_and_first_call_s=first_s)


# ------------------------------------------------------------------------------------------------ attention rows
def dense_rows(A, q, k, v, do=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def dense():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    with torch.no_grad():
        attempt('dense_cudnn_fwd_ms', lambda: timeit(dense), A)
    if do is not None:
        def bwd():
            qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kt, vt))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
            return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), do.transpose(1, 2), retain_graph=True), 500, 4)
        attempt('dense_cudnn_bwd_ms', bwd, A, need=10)


def prefill_fn(q, k, v, band=True, lists=None):
    "Stage 1 (exact, compression inside) + bucketed top-k + window + band forward: the model's default prefill."
    ks, kst = GEO['kernel_size'], GEO['kernel_stride']
    N = k.shape[1]

    def run():
        s_ = sk.fused_block_scores(q, k, **GEO, kc=iv.compress_keys(k, ks, kst))
        l_ = sp.select_lists_bucketed(s_, TOPK, N, M, LOCAL)
        del s_
        l_ = l_ if lists is None else lists           # block-shared / trained lists: the forward on those
        if band: return sk.sparse_attention_band(q, k, v, l_, M, local_blocks=LOCAL)
        return sk.sparse_attention(q, k, v, l_, M)
    return run


def band_bytes(q, k, lists, N):
    """Bytes of K/V the band forward loads (from its plan; served by L2 or HBM: a kv head's K/V at 128K is 64 MB
    against a 50 MB L2, so most gathers hit L2): the selected part gathers the union of its tile's lists (32 KB of K+V
    per block and kv head), the band part reads each tile's window once; + q and o once."""
    sel, _ = sk._window_lists(lists, N, M, LOCAL)
    m_ = sk._Meta(q, k, sel, M, None, 'auto')
    blk = 2 * M * D * q.element_size()
    sel_gb = float(m_.cnt.float().sum()) * blk / 1e9
    bt = max(1, 128 // m_.GP)
    ends = torch.arange(1, -(-N // bt) + 1) * bt                  # keys up to each band tile's last position
    band_keys = float(torch.minimum(ends, torch.full_like(ends, LOCAL * M + bt)).sum())
    band_gb = band_keys * HKV * 2 * D * q.element_size() / 1e9
    q_o_gb = 2 * q.numel() * q.element_size() / 1e9
    return dict(tile_tokens=m_.BM, sel_union_per_tile=float(m_.cnt.float().mean()), selected_GB=sel_gb, band_GB=band_gb,
                q_and_o_GB=q_o_gb, total_GB=sel_gb + band_gb + q_o_gb)


def flex_on(a, N):
    "FlexAttention rows at this length? (CUDA only: it compiles per shape and mask, ~20-40 s each)"
    return CUDA and not a.no_flex and (a.flex_len is None or N in a.flex_len)


def attention_rows(N, dev, a, with_bwd):
    A = RES['attention'].setdefault(str(N), {})
    dt = torch.bfloat16 if CUDA else torch.float32
    torch.manual_seed(N + 7)
    q = torch.randn(1, N, H, D, device=dev, dtype=dt)
    k = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    do = torch.randn(1, N, H, D, device=dev, dtype=dt) if with_bwd else None
    if CUDA: dense_rows(A, q, k, v, do)
    S = A.setdefault('random', {})
    with torch.no_grad():
        lists = sk.prefill_select(q, k, TOPK, **GEO)                       # (a) per-token lists of random q/k
        S['union_tt2'] = bsm.union_blocks(q, k, lists, 2)
        sel, _ = sk._window_lists(lists, N, M, LOCAL)
        S['sel_union_tt2'] = bsm.union_blocks(q, k, sel, 2)
        del sel
        ks, kst = GEO['kernel_size'], GEO['kernel_stride']
        kc = iv.compress_keys(k, ks, kst)
        attempt('stage1_exact_ms', lambda: timeit(lambda: sk.fused_block_scores(q, k, **GEO, kc=kc)), S)
        sc = sk.fused_block_scores(q, k, **GEO, kc=kc)
        attempt('topk_bucketed_ms', lambda: timeit(lambda: sp.select_lists_bucketed(sc, TOPK, N, M, LOCAL)), S)
        del sc
        attempt('fwd_band_ms', lambda: timeit(lambda: sk.sparse_attention_band(q, k, v, lists, M, local_blocks=LOCAL)), S)
        attempt('fwd_general_ms', lambda: timeit(lambda: sk.sparse_attention(q, k, v, lists, M)), S)
        attempt('prefill_ms', lambda: timeit(prefill_fn(q, k, v)), S)
        if CUDA:     # what bounds it: the kernels of one prefill (profiler), and the bytes the band forward moves
            attempt('prefill_kernels_ms', lambda: bsm.kernel_split(prefill_fn(q, k, v)), S)
            if isinstance(attempt('fwd_band_bytes', lambda: band_bytes(q, k, lists, N), S), dict):
                S['fwd_band_loaded_GBps'] = S['fwd_band_bytes']['total_GB'] / (num(S.get('fwd_band_ms')) / 1e3)
        if flex_on(a, N):
            attempt('flex', lambda: bsm.flex_per_token(q, k, v, lists, N, dev), S, need=25)
    if with_bwd:
        def bwd():
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            o = sk.sparse_attention_band(qg, kg, vg, lists, M, local_blocks=LOCAL)
            return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), 500, 3)
        attempt('bwd_band_ms', bwd, S, need=15)

        def bwd_kernels():
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            o = sk.sparse_attention_band(qg, kg, vg, lists, M, local_blocks=LOCAL)
            return bsm.kernel_split(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True))
        if CUDA: attempt('bwd_kernels_ms', bwd_kernels, S, need=10)
    del lists
    if a.short and N > 32768:                      # round 1: the 128K per-token prefill only
        return
    # block-shared lists (the kernel benchmark's case): the forward, the prefill with them, Flex on the same lists
    B_ = A.setdefault('block_shared', {})
    idx, per_block = block_shared_lists(N, dev, seed=N)
    with torch.no_grad():
        B_['union_tt_auto'] = float(sk._Meta(q, k, idx, M, None, 'auto').cnt.float().mean())
        attempt('fwd_general_ms', lambda: timeit(lambda: sk.sparse_attention(q, k, v, idx, M)), B_)
        attempt('fwd_band_ms', lambda: timeit(lambda: sk.sparse_attention_band(q, k, v, idx, M, local_blocks=LOCAL)), B_)
        attempt('prefill_ms', lambda: timeit(prefill_fn(q, k, v, band=False, lists=idx)), B_)
        if flex_on(a, N):
            attempt('flex', lambda: flex_block_shared(q, k, v, per_block, idx, N, dev), B_, need=25)
    del idx, per_block
    # (b) trained lists on the 8B shape (32K: SmolLM2's layer lists, first 2 kv heads), random q/k/v values
    tl = load_trained(a.trained_lists.get(N), N, dev, heads=HKV) if getattr(a, 'trained_lists', None) else None
    if tl is not None:
        T_ = A.setdefault('trained', {})
        T_['source'] = a.trained_lists.get(N)
        with torch.no_grad():
            T_['union_tt2'] = bsm.union_blocks(q, k, tl, 2)
            sel, _ = sk._window_lists(tl, N, M, LOCAL)
            T_['sel_union_tt2'] = bsm.union_blocks(q, k, sel, 2)
            del sel
            attempt('fwd_band_ms', lambda: timeit(lambda: sk.sparse_attention_band(q, k, v, tl, M, local_blocks=LOCAL)),
                    T_)
            attempt('fwd_general_ms', lambda: timeit(lambda: sk.sparse_attention(q, k, v, tl, M)), T_)
            attempt('prefill_ms', lambda: timeit(prefill_fn(q, k, v, lists=tl)), T_)   # stage 1 on random q/k: same work
            if isinstance(attempt('fwd_band_bytes', lambda: band_bytes(q, k, tl, N), T_), dict):
                T_['fwd_band_loaded_GBps'] = T_['fwd_band_bytes']['total_GB'] / (num(T_.get('fwd_band_ms')) / 1e3)
            if flex_on(a, N) and not a.short:
                attempt('flex', lambda: bsm.flex_per_token(q, k, v, tl, N, dev), T_, need=25)
    del q, k, v, do
    if CUDA: torch.cuda.empty_cache()


def structured_rows(N, dev, a):
    "(c) synthetic structured q/k (NOT a model's): prefill and band forward."
    A = RES['attention'].setdefault(str(N), {})
    S = A.setdefault('structured', {})
    dt = torch.bfloat16 if CUDA else torch.float32
    q, k = bsm.structured_qk(N, dev, dt, seed=N)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    with torch.no_grad():
        lists = sk.prefill_select(q, k, TOPK, **GEO)
        S['union_tt2'] = bsm.union_blocks(q, k, lists, 2)
        attempt('fwd_band_ms', lambda: timeit(lambda: sk.sparse_attention_band(q, k, v, lists, M, local_blocks=LOCAL)), S)
        attempt('prefill_ms', lambda: timeit(prefill_fn(q, k, v)), S)
    del q, k, v, lists


# ------------------------------------------------------------------------------------------------- decode rows
def decode_rows(N, dev, a):
    """Decode at a cache of N tokens with K1's kernels (16 rotating caches, cold L2): `decode_step` (selection +
    attention, the model's cached path) in a CUDA graph and eager, vs SDPA's default decode (cuDNN); `decode_select`
    alone vs `sparse_decode` alone (graph)."""
    R = RES['decode'].setdefault(str(N), {})
    dt = torch.bfloat16
    nrot = 16
    caches = [(torch.randn(1, N, HKV, D, device=dev, dtype=dt), torch.randn(1, N, HKV, D, device=dev, dtype=dt),
               torch.randn(1, H, D, device=dev, dtype=dt)) for _ in range(nrot)]
    seq = torch.tensor([N], dtype=torch.int32, device=dev)
    kcs = [iv.compress_keys(c[0], 32, 16) for c in caches]
    nbk = N // M
    with torch.no_grad():
        lists = [sk.decode_select(c[2], kc_, seq, TOPK, **GEO, num_blocks=nbk) for c, kc_ in zip(caches, kcs)]
        ds = [lambda c=c, kc_=kc_: sk.decode_step(c[2], c[2], c[0], c[1], kc_, seq, TOPK, **GEO, num_blocks=nbk)
              for c, kc_ in zip(caches, kcs)]
        se = [lambda c=c, kc_=kc_: sk.decode_select(c[2], kc_, seq, TOPK, **GEO, num_blocks=nbk)
              for c, kc_ in zip(caches, kcs)]
        at = [lambda c=c, l_=l_: sk.sparse_decode(c[2], c[0], c[1], l_, seq, M) for c, l_ in zip(caches, lists)]
        de = [lambda c=c: F.scaled_dot_product_attention(c[2][:, :, None], c[0].transpose(1, 2), c[1].transpose(1, 2),
                                                         enable_gqa=True) for c in caches]
        attempt('step_lists_equal_select', lambda: bool(torch.equal(ds[0]()[1].to(lists[0].dtype), lists[0])), R)
        for name, fns in (('step', ds), ('dense', de), ('select', se), ('attention', at)):
            attempt(f'{name}_graph_us', lambda fns=fns: 1e3 * cuda_graph_time(fns, reps=20), R)
        for name, fns in (('step', ds), ('dense', de)):
            attempt(f'{name}_eager_us', lambda fns=fns: 1e3 * timeit(lambda: [f() for f in fns], 200, 10) / nrot, R)
        attempt('step_kernels_us', lambda: kernel_times(ds), R)
        ks_ = R.get('step_kernels_us')
        if isinstance(ks_, dict):      # the step's own kernels: selection (stage-1 logits, pooling, top-k) vs attention
            R['step_select_us'] = sum(v['us'] * v['per_step'] for k_, v in ks_.items() if _is_select(k_))
            R['step_attention_us'] = sum(v['us'] * v['per_step'] for k_, v in ks_.items() if _is_attn(k_))
    del caches, kcs, lists


def _is_attn(name): return name.startswith('_dec') and ('attn' in name or 'combine' in name)


def _is_select(name): return name.startswith('_dec') and not _is_attn(name)




# -------------------------------------------------------------------------------------------------- model rows
def model_rows(L, layers, dev, a):
    "8B-shape model forward, dense vs sparse (the model's default sparse path), per-layer split, est. 32 layers."
    from minicpm4_core.config import default_sparse_config
    R = RES['model'].setdefault(str(L), dict(layers=layers))
    model, cfg = bsm.build_model(L, layers, dev)
    ids = torch.randint(3, cfg.vocab_size, (1, L), device=dev)
    sc = default_sparse_config(**bsm.SMOKE_SPARSE) if a.smoke else default_sparse_config()
    h = torch.randn(1, L, cfg.hidden_size, device=dev, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        attempt('head_ms', lambda: timeit(lambda: model.lm_head(model.model.norm(h) / cfg.logit_scale), 200), R)
    del h
    for name, s in (('dense', None), ('sparse', sc)):
        model.config.sparse_config = s
        with torch.no_grad():
            attempt(f'{name}_ms', lambda: timeit(lambda: model(ids), 1, reps=3), R)
        attempt(f'{name}_split_per_layer', lambda: bsm.attention_split(model, ids, layers), R)
    head = num(R.get('head_ms'))
    for name in ('dense', 'sparse'):
        R[f'{name}_layer_ms'] = (num(R.get(f'{name}_ms')) - head) / layers
        R[f'{name}_est32_ms'] = 32 * R[f'{name}_layer_ms'] + head
    R['x_measured'] = num(R.get('dense_ms')) / num(R.get('sparse_ms'))
    R['x_est32'] = R['dense_est32_ms'] / R['sparse_est32_ms']
    dn, spl = R.get('dense_split_per_layer'), R.get('sparse_split_per_layer')
    if isinstance(dn, dict) and isinstance(spl, dict):      # what bounds it: the part of a layer attention does not touch
        rest = R['sparse_layer_ms'] - spl.get('attention', float('nan'))
        R['non_attention_layer_ms'] = rest
        R['x_ceiling_free_attention'] = R['dense_layer_ms'] / rest
    del model
    save()
    if CUDA: torch.cuda.empty_cache()


def band_model_check(dev, a):
    """Task 3: the model forward + backward with sparse_config through the band path (default: band + bucketed
    top-k) vs the general path (no band, plain top-k) on this device: float32 (tight: hidden < 1e-4, grads < 1e-3)
    and bf16 (loose: hidden < 3e-2, grads < 1e-1). An 8B-shape model of --check-layers layers, dense_len + 1,000
    tokens (--check-dense-len lowers dense_len to make it cheaper: the sparse path is what is checked)."""
    from minicpm4_core.config import default_sparse_config
    kw = dict(bsm.SMOKE_SPARSE) if a.smoke else {}
    if a.check_dense_len is not None and not a.smoke: kw['dense_len'] = a.check_dense_len
    sc = default_sparse_config(**kw)
    out = {}
    for name in (['float32'] if a.smoke else a.check_dtypes):
        dt = getattr(torch, name)
        r = bsm.band_check(4096, sc, dev, dtype=dt, layers=a.check_layers)
        out[name] = r
        print(f'  band model check {name}: {r}', flush=True)
    out['ok'] = all(r.get('ok') for r in out.values() if isinstance(r, dict))
    return out


def static_decode_rows(a):
    "kernels/bench_static_sparse.py (StaticSparseDecoder vs the static dense stack, eager model) as a subprocess."
    d = os.path.join(OUT, 'static_sparse')
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bench_static_sparse.py'),
           '--out', d, '--contexts', *map(str, a.static_contexts), '--quant', 'none', '--reps', '10', '--steps', '6']
    if a.smoke: cmd = cmd[:2] + ['--out', d, '--tiny', '--quant', 'none']
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, min(left(), 100)))
    open(os.path.join(OUT, 'static_sparse.log'), 'w').write(p.stdout[-20000:] + '\n' + p.stderr[-20000:])
    if p.returncode: raise RuntimeError(f'bench_static_sparse rc {p.returncode}: {p.stderr[-400:]}')
    r = json.load(open(os.path.join(d, 'bench_static_sparse.json')))
    r['subprocess_s'] = time.time() - t0
    return r


def smol_rows(dev, a):
    """Task 2 on the device, at the SmolLM2-135M shape (9 / 3 heads, d 64): stage 1 (exact) + bucketed top-k on its
    captured q/k at 8K (and the lists vs the CPU reference's), the band forward on its lists at 8K and 32K, dense
    cuDNN, and random q/k at the same shapes as the control."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    S = RES.setdefault('smollm2', {})
    dt = torch.bfloat16
    for N, qk_path, lists_path in ((8192, a.trained_qk, a.trained_lists_smol.get(8192)),
                                   (32768, None, a.trained_lists_smol.get(32768))):
        R = S.setdefault(str(N), {})
        lst_ref = load_trained(lists_path, N, dev)
        if qk_path and os.path.exists(qk_path):
            d_ = torch.load(qk_path)
            q, k = d_['q'].to(dev), d_['k'].to(dev)
            R['qk'] = f"{qk_path} (layer {d_['layer']})"
        else:
            q = k = None
        if q is None and lst_ref is None: continue
        Hs, Hkv_s, Ds = (q.shape[2], k.shape[2], q.shape[3]) if q is not None else (9, lst_ref.shape[2], 64)
        g = torch.Generator(device=dev).manual_seed(N)
        rq = torch.randn(1, N, Hs, Ds, device=dev, dtype=dt, generator=g)
        rk = torch.randn(1, N, Hkv_s, Ds, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, N, Hkv_s, Ds, device=dev, dtype=dt, generator=g)
        qt, kt, vt = (x.transpose(1, 2) for x in (rq, rk, v))

        def dense():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        with torch.no_grad():
            attempt('dense_cudnn_fwd_ms', lambda: timeit(dense), R)
            for src, (qq, kk) in (('trained', (q, k)), ('random', (rq, rk))):
                T_ = R.setdefault(src, {})
                if qq is not None:
                    attempt('stage1_exact_ms', lambda: timeit(lambda: sk.fused_block_scores(qq, kk, **GEO)), T_)
                    lst = sp.select_lists_bucketed(sk.fused_block_scores(qq, kk, **GEO), TOPK, N, M, LOCAL)
                    if src == 'trained' and lst_ref is not None:
                        T_['lists_rows_same_as_cpu_reference'] = float((lst == lst_ref).all(-1).float().mean())
                        T_['overlap_with_cpu_reference'] = sp.selection_overlap(lst, lst_ref)
                else:
                    lst = lst_ref
                if lst is None: continue
                T_['list_stats'] = sp.list_stats(lst.cpu(), N, M, LOCAL, distances=(1, 8, 64, 512), tiles=(1, 2, 8, 64))
                T_['union_tt_auto'] = float(sk._Meta(rq, rk, lst, M, None, 'auto').cnt.float().mean())
                attempt('fwd_band_ms', lambda: timeit(lambda: sk.sparse_attention_band(rq, rk, v, lst, M,
                                                                                        local_blocks=LOCAL)), T_)
                attempt('fwd_general_ms', lambda: timeit(lambda: sk.sparse_attention(rq, rk, v, lst, M)), T_)
                if qq is not None:
                    attempt('prefill_ms', lambda: timeit(lambda: sk.sparse_attention_band(
                        qq, kk, v, sp.select_lists_bucketed(sk.fused_block_scores(qq, kk, **GEO), TOPK, N, M, LOCAL),
                        M, local_blocks=LOCAL)), T_)
        del q, k, rq, rk, v, qt, kt, vt
        if CUDA: torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------- the table
def table():
    "The issue's rows from RES (sp.issue12_rows: ours, baseline, ratio, goal, verdict)."
    RES['table'] = sp.issue12_rows(RES)
    save()
    return RES['table']


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r['ratio'] == r['ratio']]
    fig, ax = plt.subplots(figsize=(14, 0.3 * len(rows) + 1.5))
    y = range(len(rows))[::-1]
    col = ['tab:green' if r['verdict'] == 'met' else 'tab:red' if r['verdict'] == 'missed' else 'tab:gray' for r in rows]
    ax.barh(list(y), [r['ratio'] for r in rows], color=col)
    for yy, r in zip(y, rows):
        if r['goal'] is not None: ax.plot([r['goal']] * 2, [yy - 0.4, yy + 0.4], 'k-', lw=2)
        ax.text(max(r['ratio'], 0.02) * 1.05, yy, f"{r['ratio']:.2f}x", va='center', fontsize=7)
    ax.set_yticks(list(y), [r['row'][:95] for r in rows], fontsize=7)
    ax.set_xscale('log')
    ax.axvline(1.0, color='gray', lw=0.6)
    ax.set_xlabel('baseline time / ours (>1: ours faster); black tick = goal; green met, red missed, grey no goal')
    ax.set_title(f"Issue 12 in one run: {RES.get('device', '?')}, {RES.get('date', '')}", fontsize=9)
    fig.subplots_adjust(left=0.42, right=0.97, top=1 - 0.5 / fig.get_figheight(), bottom=0.7 / fig.get_figheight())
    fig.savefig(path, dpi=110)


def main():
    global OUT, BUDGET, T0, H, HKV, D, G, M, TOPK, LOCAL
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--budget', type=float, default=320.0, help='seconds; rows that would start later are skipped')
    ap.add_argument('--attn-len', type=int, nargs='*', default=[131072, 32768])
    ap.add_argument('--bwd-len', type=int, nargs='*', default=[131072])
    ap.add_argument('--decode-len', type=int, nargs='*', default=[131072])
    ap.add_argument('--model', nargs='*', default=['32768:4', '65536:2', '131072:2'], help='L:layers pairs')
    ap.add_argument('--static-contexts', type=int, nargs='*', default=[16384, 32768, 131072])
    ap.add_argument('--structured', type=int, nargs='*', default=[131072], help='lengths of the synthetic (c) rows')
    ap.add_argument('--trained', default='runs/issue12_carry', help='folder of the carried trained_lists.py files')
    ap.add_argument('--no-flex', action='store_true')
    ap.add_argument('--flex-len', type=int, nargs='*', default=None, help='lengths with Flex rows (default: all)')
    ap.add_argument('--no-check', action='store_true', help='skip the model-level band check')
    ap.add_argument('--check-dtypes', nargs='+', default=['float32', 'bfloat16'], choices=['float32', 'bfloat16'])
    ap.add_argument('--check-layers', type=int, default=2)
    ap.add_argument('--check-dense-len', type=int, default=None, help="the check's dense_len (tokens = it + 1000)")
    ap.add_argument('--check-need', type=float, default=20.0, help='seconds of budget the check needs to start')
    ap.add_argument('--short', action='store_true', help='round 1: 32K rows, the 128K prefill, check, SmolLM2 rows')
    ap.add_argument('--smoke', action='store_true', help='CPU dry run: tiny shapes, Triton interpreter')
    a = ap.parse_args()
    OUT, BUDGET, T0 = a.out, a.budget, time.time()
    os.makedirs(OUT, exist_ok=True)
    dev = torch.device('cuda' if CUDA else 'cpu')
    bsm.args = argparse.Namespace(smoke=a.smoke, sources=['random'])
    tdir = a.trained
    a.trained_lists = {32768: os.path.join(tdir, 'lists_released_32k_layer8.pt')}
    a.trained_lists_smol = {8192: os.path.join(tdir, 'lists_released_8k_layer8.pt'),
                            32768: os.path.join(tdir, 'lists_released_32k_layer8.pt')}
    a.trained_qk = os.path.join(tdir, 'qk_8k_layer8.pt')
    if a.short:
        a.attn_len, a.bwd_len, a.decode_len, a.model, a.static_contexts, a.structured = \
            [32768, 131072], [], [], ['32768:2'], [], []
        a.flex_len = [32768]
    if a.smoke:
        H, HKV, D, M, TOPK, LOCAL = 4, 2, 32, 16, 3, 2
        G = H // HKV
        GEO.update(kernel_size=8, kernel_stride=4, block_size=M, local_blocks=LOCAL)
        for mod in (bsm,):
            mod.H, mod.HKV, mod.D, mod.M, mod.TOPK, mod.LOCAL, mod.G = H, HKV, D, M, TOPK, LOCAL, G
            mod.GEO.update(GEO)
        iv.SPARSE_IMPL, iv.SPARSE_BAND = 'triton', True
        a.attn_len, a.bwd_len, a.decode_len, a.model, a.structured = [128], [128], [], ['96:1'], [128]
        a.no_flex, a.trained_lists, a.trained_lists_smol, a.trained_qk = True, {}, {}, None
    a.model = [tuple(int(x) for x in p.split(':')) for p in a.model]
    RES.update(env_stamp(dev), started=time.strftime('%Y-%m-%d %H:%M:%S'), args=vars(a), attention={}, decode={},
               model={}, shapes=dict(H=H, Hkv=HKV, D=D, block=M, topk=TOPK, local_blocks=LOCAL, geometry=GEO),
               default_switches=dict(SPARSE_BAND=iv.SPARSE_BAND, PREFILL_TOPK=iv.PREFILL_TOPK,
                                     PREFILL_SCORES=iv.PREFILL_SCORES))
    if CUDA: attempt('ceilings', lambda: roofline_ceilings(dev, copy_bytes=1 << 30, matmul_n=8192, budget_ms=100), RES)
    def attn(N):
        print(f'== attention {N}', flush=True)
        try:
            if left() > 30: attention_rows(N, dev, a, with_bwd=N in a.bwd_len)
            else: RES['attention'][str(N)] = 'SKIPPED (budget)'
        except Exception as ex:
            RES['attention'].setdefault(str(N), {})['error'] = f'{type(ex).__name__}: {str(ex)[:300]}'
            traceback.print_exc(limit=4)
        if CUDA: torch.cuda.empty_cache()

    def decode():
        for N in (a.decode_len if CUDA else []):
            print(f'== decode {N}', flush=True)
            attempt(str(N), lambda: decode_rows(N, dev, a) or RES['decode'][str(N)], RES['decode'], need=15)

    def models():
        for L, layers in a.model:
            print(f'== model {L} tokens, {layers} layers', flush=True)
            attempt(f'model_{L}', lambda: model_rows(L, layers, dev, a) or 'done', RES, need=4 + L / 8192)

    def static():
        if a.static_contexts and (CUDA or a.smoke):
            print('== 8B cached decoding (bench_static_sparse.py)', flush=True)
            attempt('static_decode', lambda: static_decode_rows(a), RES, need=40)

    def smol():
        if CUDA:
            print('== SmolLM2 shape (trained q/k)', flush=True)
            attempt('smollm2_rows', lambda: smol_rows(dev, a) or 'done', RES, need=10)

    def structured():
        for N in a.structured:
            print(f'== structured q/k {N}', flush=True)
            attempt(f'structured_{N}', lambda: structured_rows(N, dev, a) or 'done', RES, need=8)

    def check():
        if not a.no_check: attempt('band_model_check', lambda: band_model_check(dev, a), RES, need=a.check_need)
    lens = sorted(a.attn_len, reverse=True)
    if a.short:       # round 1's order
        steps = [check] + [lambda N=N: attn(N) for N in sorted(lens)] + [decode, smol, models, static, structured]
    else:             # the goal rows first (128K attention, decode, model, cached decoding), then 32K, then extras
        steps = ([lambda N=N: attn(N) for N in lens[:1]] + [decode, models, static] +
                 [lambda N=N: attn(N) for N in lens[1:]] + [smol, structured, check])
    for step in steps: step()
    RES['seconds'] = time.time() - T0
    RES['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    rows = table()
    try:
        plot(rows, os.path.join(OUT, 'issue12.png'))
    except Exception as ex:
        print('plot failed', ex)
    save()
    print(f"\nIssue 12 table, {RES.get('device')}, {RES['seconds']:.0f} s")
    print(sp.format_issue12_rows(rows))


if __name__ == '__main__':
    main()
