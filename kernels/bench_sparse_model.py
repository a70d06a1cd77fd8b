#!/usr/bin/env python
"""Issue 12 at the model level: MiniCPM4 (8B shapes) forward with vs without InfLLM v2, and the attention-only
prefill at 128K on per-token lists, baselines in the same process.

Model rows: `MiniCPM4ForCausalLM` with the MiniCPM4-8B shapes (hidden 4096, 32/2 heads, d 128, MLP 16384, vocab
73,448) and random bf16 weights, but only `--layers` decoder layers (memory and time): forward at each length with
`sparse_config=None` (dense, SDPA) and with the released sparse_config (InfLLM v2 as the model runs it: band kernel and
bucketed top-k; also with `SPARSE_BAND=False`, with `PREFILL_TOPK='plain'` and with `lse_approx=True`). A float32
2-layer model checks on the device that the default path (band + bucketed top-k) gives the general path's hidden
states and gradients. One extra forward per setting, with CUDA events around the
attention backend and its parts (compression, stage 1, top-k + window, sparse forward), gives the attention time per
layer split. The LM head (+ final norm) is timed alone so the per-layer time can be extrapolated to 32 layers:
est_32 = 32 x (forward - head) / layers + head.

Attention rows (`--attn-len`, default 32K and 128K): per-token lists (each query its own stage-1 top-k, what the model
computes) from (a) random bf16 q/k and (b) structured q/k (`structured_qk`: a latent drifting on three time scales,
shared by q and k, plus a few 'global' blocks every query likes; NOT a trained model's q/k, none were available):
dense cuDNN / flash SDPA forward, our general kernel (`sparse_attention`, tile 'auto'), the band kernel
(`sparse_attention_band`), FlexAttention on the same per-token lists (BlockMask = union per 64-query block, mask_mod
= each token's own list), stage 1 exact / LSE-approximate / coarse (nbs/11c), its kernels split by the profiler, the
top-k (`select_lists`) vs the bucketed one (`sparse_prefill.select_lists_bucketed`, same lists: checked), and the
whole prefill (stage 1 + top-k + forward) in three variants.

    PYTHONPATH=. python kernels/bench_sparse_model.py --out DIR           # H200: ~2-3 min
    PYTHONPATH=. python kernels/bench_sparse_model.py --smoke --out /tmp/x  # CPU interpreter dry run (tiny shapes)

--chunked SHAPE:CTX:LAYERS[:sparse|dense|causal|all] ... (session 7, issue 13: what bounds the engine's sparse chunked prefill): for each spec
(e.g. minicpm4_8b:131072:4, minicpm4_0_5b:32768:24) the engine's two chunked prefills of one random prompt, as the
edge benchmark runs them (`edge_bench.run_prefill`): 'sparse' = `Engine.eager_prefill` (the model's layers, InfLLM v2
over a KV cache), 'dense' = `Engine.static_prefill` (the static stack), 'causal' = the same with
`static_decode.PREFILL_ATTN = 'causal'` (a lower-right causal bias, no mask in memory: session 8; its last logits are
compared with 'dense''s); 'both' (default) = sparse + dense, 'all' = the three; wall seconds of a first (compiling) and a
second run, then the kernels of a third by GPU time (`bench.kernel_times`), grouped (linears, dense attention, stage 1,
top-k, sparse attention, copies/elementwise, other) and the GPU-busy share of the wall time (host-bound when low).
Writes DIR/chunked_prefill.json, prints a table last.

    PYTHONPATH=. python kernels/bench_sparse_model.py --chunked minicpm4_8b:131072:4 --chunk 2048 --out DIR

Writes DIR/bench_sparse_model.json and DIR/bench_sparse_model.png, prints one line per result and a summary.
"""
import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from minicpm4_core import infllmv2 as iv
from minicpm4_core.bench import env_stamp, event_time, roofline_ceilings
from minicpm4_core.io import atomic_write_json
from minicpm4_core.kernels import sparse as sk
from minicpm4_core.kernels import sparse_prefill as sp

H, HKV, D, M, TOPK, INIT, LOCAL = 32, 2, 128, 64, 64, 1, 32
G = H // HKV
GEO = dict(kernel_size=32, kernel_stride=16, block_size=M, init_blocks=INIT, local_blocks=LOCAL, selection='minicpm4')
RES = {}
OUT = None
CUDA = torch.cuda.is_available()


def save():
    if OUT:
        atomic_write_json(os.path.join(OUT, 'chunked_prefill.json' if RES.get('file') == 'chunked_prefill'
                                       else 'bench_sparse_model.json'), json.loads(json.dumps(RES, default=str)),
                          indent=1)


def sync():
    if CUDA: torch.cuda.synchronize()


def timeit(fn, budget=300.0, reps=5):
    "Median ms (CUDA events; one wall-clock call on the CPU smoke run)."
    return event_time(fn, budget_ms=budget, min_reps=2 if CUDA else 1, max_reps=reps if CUDA else 1, warmup=1)


def attempt(name, fn, store):
    "Run fn, store its value (or the error) under name, save, print one line; never lose the run to one failure."
    t0 = time.time()
    try:
        v = fn()
        store[name] = v
        s = f'{v:.3f}' if isinstance(v, float) else str(v)[:200]
        print(f'  {name}: {s}   ({time.time() - t0:.1f} s)', flush=True)
    except Exception as ex:
        store[name] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
        print(f'  {name}: ERROR {ex!r:.300}', flush=True)
        traceback.print_exc(limit=3)
    save()
    return store.get(name)


def num(x):
    return x if isinstance(x, float) else float('nan')


# ------------------------------------------------------------------------------------------- timing the parts
class Parts:
    """Patch module functions with CUDA-event (CPU: wall-clock) timers; `totals()` -> ms per part over the calls."""
    def __init__(self):
        self.ev, self.undo = {}, []

    def wrap(self, mod, name, part):
        real = getattr(mod, name)

        def timed(*a, **k):
            if CUDA:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); r = real(*a, **k); e.record()
                self.ev.setdefault(part, []).append((s, e))
            else:
                t0 = time.perf_counter(); r = real(*a, **k)
                self.ev.setdefault(part, []).append(time.perf_counter() - t0)
            return r
        setattr(mod, name, timed)
        self.undo.append((mod, name, real))

    def totals(self):
        sync()
        return {p: (sum(s.elapsed_time(e) for s, e in xs) if CUDA else 1e3 * sum(xs)) for p, xs in self.ev.items()}

    def __enter__(self): return self

    def __exit__(self, *exc):
        for mod, name, real in reversed(self.undo): setattr(mod, name, real)


def attention_split(model, ids, layers):
    "One forward with timers on the attention backend and its parts -> ms per layer per part."
    import minicpm4_core.model as mm
    with Parts() as P:
        P.wrap(mm, 'dense_attention', 'attention')
        P.wrap(iv, 'infllmv2_attention', 'attention')
        P.wrap(iv, '_compressed_keys', 'compress')
        P.wrap(sk, 'fused_block_scores', 'stage1')
        P.wrap(sp, 'block_scores_t', 'stage1')
        P.wrap(sk, 'select_lists', 'topk_window')
        P.wrap(sp, 'select_lists_bucketed', 'topk_window')
        P.wrap(sk, 'sparse_attention', 'fwd')
        P.wrap(sk, 'sparse_attention_band', 'fwd')
        with torch.no_grad():
            model(ids)
        t = P.totals()
    out = {k: v / layers for k, v in t.items()}
    if 'attention' in out:
        out['attention_other'] = out['attention'] - sum(out.get(k, 0.0) for k in ('compress', 'stage1', 'topk_window', 'fwd'))
    return out


# ------------------------------------------------------------------------------------------------ model rows
def build_model(L, layers, dev):
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    if args.smoke:
        cfg = MiniCPM4Config.tiny(num_hidden_layers=layers, max_position_embeddings=L + 64)
    else:
        cfg = MiniCPM4Config.minicpm4_8b(num_hidden_layers=layers, max_position_embeddings=max(32768, L + 1024))
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if CUDA else torch.float32)
    try:
        with torch.device(dev):
            model = MiniCPM4ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model, cfg


def model_rows(L, layers, dev):
    from minicpm4_core.config import default_sparse_config
    R = RES['model'].setdefault(str(L), dict(layers=layers))
    model, cfg = build_model(L, layers, dev)
    R['shape'] = dict(hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                      intermediate=cfg.intermediate_size, vocab=cfg.vocab_size, layers=layers)
    ids = torch.randint(3, cfg.vocab_size, (1, L), device=dev)
    sc = default_sparse_config(**SMOKE_SPARSE) if args.smoke else default_sparse_config()
    R['sparse_config'] = sc
    h = torch.randn(1, L, cfg.hidden_size, device=dev, dtype=next(model.parameters()).dtype)
    with torch.no_grad():
        attempt('head_ms', lambda: timeit(lambda: model.lm_head(model.model.norm(h) / cfg.logit_scale), 200), R)
    del h
    settings = [('dense', None, {}), ('sparse', sc, {}), ('sparse_noband', sc, dict(SPARSE_BAND=False)),
                ('sparse_plaintopk', sc, dict(PREFILL_TOPK='plain')),
                ('sparse_lseapprox', dict(sc, lse_approx=True), {})]
    for name, s, mod in settings:
        model.config.sparse_config = s
        old = {k: getattr(iv, k) for k in mod}
        for k, v in mod.items(): setattr(iv, k, v)
        try:
            with torch.no_grad():
                attempt(f'{name}_ms', lambda: timeit(lambda: model(ids), 1, reps=3), R)
            attempt(f'{name}_split_per_layer', lambda: attention_split(model, ids, layers), R)
        finally:
            for k, v in old.items(): setattr(iv, k, v)
        torch.cuda.empty_cache() if CUDA else None
    if not any('band_check' in r for r in RES['model'].values()):           # once, on the first model
        attempt('band_check', lambda: band_check(L, sc, dev), R)
    head = num(R.get('head_ms'))
    for name, *_ in settings:
        f = num(R.get(f'{name}_ms'))
        R[f'{name}_layer_ms'] = (f - head) / layers
        R[f'{name}_est32_ms'] = 32 * R[f'{name}_layer_ms'] + head
    for name, *_ in settings[1:]:
        R[f'x_{name}_measured'] = num(R.get('dense_ms')) / num(R.get(f'{name}_ms'))
        R[f'x_{name}_est32'] = R['dense_est32_ms'] / R[f'{name}_est32_ms']
        R[f'x_{name}_per_layer'] = R['dense_layer_ms'] / R[f'{name}_layer_ms']
    print(f"model {L} ({layers} layers): dense {R.get('dense_ms')} ms, sparse {R.get('sparse_ms')} ms; "
          f"x measured {R['x_sparse_measured']:.2f}, per layer {R['x_sparse_per_layer']:.2f}, "
          f"est. 32 layers {R['x_sparse_est32']:.2f}", flush=True)
    save()
    del model
    if CUDA: torch.cuda.empty_cache()


def band_check(L0, sc, dev, dtype=torch.float32, layers=2):
    """The model's default path (band kernel + bucketed top-k) against the general kernel with the plain top-k
    (SPARSE_BAND=False, PREFILL_TOPK='plain') on this device: an 8B-shape model of `layers` layers (random weights)
    in `dtype`, 1,000 tokens past dense_len (sparse path), relative difference of the last hidden states and of every
    parameter gradient of a random loss on them. float32: tight (hidden < 1e-4, grads < 1e-3: the two paths differ
    only in the order of the softmax sums); bfloat16: loose (hidden < 3e-2, grads < 1e-1: rounding through the
    layers). The band kernel is really called (counted) on the first path and not on the second."""
    model, cfg = build_model(L0, layers, dev)
    model.to(dtype)
    model.config.sparse_config = sc
    L = (sc['dense_len'] + 1000) if not args.smoke else 120
    ids = torch.randint(3, cfg.vocab_size, (1, L), device=dev)
    w, out, calls = None, {}, {}
    old = iv.SPARSE_BAND, iv.PREFILL_TOPK
    real_band = sk.sparse_attention_band

    def counted(*a, **k):
        calls[cur] = calls.get(cur, 0) + 1
        return real_band(*a, **k)
    sk.sparse_attention_band = counted
    try:
        for cur in (True, False):
            iv.SPARSE_BAND, iv.PREFILL_TOPK = (True, 'bucketed') if cur else (False, 'plain')
            model.zero_grad(set_to_none=True)
            h = model(ids, return_hidden=True)[1]
            w = torch.randn_like(h) if w is None else w
            (h.float() * w.float()).sum().backward()
            out[cur] = (h.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    finally:
        iv.SPARSE_BAND, iv.PREFILL_TOPK = old
        sk.sparse_attention_band = real_band
    del model
    rel = lambda a, b: float((a - b).norm() / b.norm().clamp(min=1e-30))   # noqa: E731
    (ha, ga), (hb, gb) = out[True], out[False]
    gr = {n: rel(ga[n], gb[n]) for n in gb}
    th, tg = (1e-4, 1e-3) if dtype == torch.float32 else (3e-2, 1e-1)
    res = dict(dtype=str(dtype)[6:], layers=layers, tokens=L, hidden_rel=rel(ha, hb), grad_rel_max=max(gr.values()),
               grads=len(gr), worst=max(gr, key=gr.get), band_calls=calls.get(True, 0),
               band_calls_general_path=calls.get(False, 0), tol=(th, tg),
               ok=bool(rel(ha, hb) < th and max(gr.values()) < tg and calls.get(True, 0) > 0
                       and calls.get(False, 0) == 0))
    if CUDA: torch.cuda.empty_cache()
    return res


# -------------------------------------------------------------------------------------------- attention rows
def structured_qk(N, dev, dt, seed=0, scales=(256, 4096, 65536), n_global=4, glob=4.0):
    """Synthetic q, k with structure of the kind trained models show (NOT a trained model's): a latent per kv head
    drifting on three time scales (unit-variance moving sums of normals over `scales` tokens), shared by q and k,
    so logits fall off with distance and neighbouring queries rank the blocks alike; `n_global` random blocks per
    kv head whose keys carry a direction u that every query of the group carries too (heavy hitters); each q head
    and each key add their own noise. -> q (1, N, H, D), k (1, N, Hkv, D) in dt."""
    g = torch.Generator(device=dev).manual_seed(seed)
    z = torch.zeros(1, N, HKV, D, device=dev)
    for w in scales:
        w = min(w, N)
        c = torch.randn(1, N + w, HKV, D, device=dev, generator=g).cumsum(1)
        z += (c[:, w:] - c[:, :N]) / w ** 0.5
    z /= len(scales) ** 0.5
    q = 0.8 * z.repeat_interleave(G, 2) + 0.6 * torch.randn(1, N, H, D, device=dev, generator=g)
    k = 0.8 * z + 0.6 * torch.randn(1, N, HKV, D, device=dev, generator=g)
    u = F.normalize(torch.randn(HKV, D, device=dev, generator=g), dim=-1)
    q += glob * u.repeat_interleave(G, 0)
    nb = N // M
    for h in range(HKV):
        hi = max(INIT + 1, nb - LOCAL - 1)
        for b in torch.randint(INIT, hi, (n_global,), device=dev, generator=g).tolist():
            k[0, b * M:(b + 1) * M, h] += glob * u[h]
    return q.to(dt), k.to(dt)


def union_blocks(q, k, lists, tt):
    "Mean union of the lists over the tiles of `tt` tokens (the blocks a tile of the general kernel visits)."
    m_ = sk._Meta(q, k, lists, M, None, tt)
    return float(m_.cnt.float().mean())


def flex_per_token(q, k, v, lists, N, dev):
    """FlexAttention on the same per-token lists: BlockMask of 64x64 blocks, per 64-query block the union of its
    tokens' lists (full where all 64 tokens chose a block below the diagonal, else partial), mask_mod = the token's
    own list (a (Hkv, N, nb) bitmap) and causality. Returns (ms, rel. difference to our kernel's output)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    nb = N // M
    ls = lists[0].long()                                              # (N, Hkv, K)
    t = torch.arange(N, device=dev)[:, None, None].expand_as(ls)
    h = torch.arange(HKV, device=dev)[None, :, None].expand_as(ls)
    ok = ls >= 0
    bits = torch.zeros(HKV * N * nb, dtype=torch.bool, device=dev)
    bits[((h * N + t) * nb + ls)[ok]] = True
    bits = bits.view(HKV, N, nb)
    cnt = torch.zeros(nb * HKV * nb, dtype=torch.int32, device=dev)
    cnt.index_add_(0, (((t // M) * HKV + h) * nb + ls)[ok], torch.ones(int(ok.sum()), dtype=torch.int32, device=dev))
    cnt = cnt.view(nb, HKV, nb)
    qb = torch.arange(nb, device=dev)[:, None, None]
    kb = torch.arange(nb, device=dev)[None, None, :]
    full = (cnt == M) & (kb < qb)
    part = (cnt > 0) & ~full

    def idx(sel):
        n = sel.sum(-1)
        order = torch.where(sel, kb, nb).sort(-1).values
        order = torch.where(order == nb, 0, order)
        return (n.movedim(0, 1).repeat_interleave(G, 0)[None].int().contiguous(),
                order.movedim(0, 1).repeat_interleave(G, 0)[None].int().contiguous())

    pn, pi = idx(part)
    fn_, fi = idx(full)
    del cnt, part, full

    def mask_mod(b, hh, q_idx, kv_idx):
        return (q_idx >= kv_idx) & bits[hh // G, q_idx, kv_idx // M]
    bm = BlockMask.from_kv_blocks(pn, pi, fn_, fi, BLOCK_SIZE=(M, M), mask_mod=mask_mod)
    fx = torch.compile(flex_attention, dynamic=False)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    ko = {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_stages': 2, 'num_warps': 4}
    with torch.no_grad():
        of = fx(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=ko).transpose(1, 2)
        ref = sk.sparse_attention(q, k, v, lists, M)
        rel = float((of.float() - ref.float()).norm() / ref.float().norm())
        del of, ref
        ms = timeit(lambda: fx(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=ko), 300, reps=3)
    return dict(ms=ms, rel_vs_ours=rel, union_per_qblock=float(pn.float().mean() + fn_.float().mean()))


def kernel_split(fn):
    "Device time per kernel name of one fn() call (torch.profiler), ms."
    from torch.profiler import ProfilerActivity, profile
    fn(); sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); sync()
    out = {}
    for e in prof.key_averages():
        t = getattr(e, 'device_time_total', None) or getattr(e, 'cuda_time_total', 0)
        if t: out[e.key[:60]] = round(t / 1e3, 3)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:8])


def attention_rows(N, dev, src):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    A = RES['attention'].setdefault(str(N), {})
    S = A.setdefault(src, {})
    dt = torch.bfloat16 if CUDA else torch.float32
    torch.manual_seed(N + 7)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    if src == 'random':
        q = torch.randn(1, N, H, D, device=dev, dtype=dt)
        k = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    else:
        q, k = structured_qk(N, dev, dt, seed=N)
    S['what'] = ('random bf16 normals' if src == 'random' else structured_qk.__doc__.split('->')[0].strip())
    with torch.no_grad():
        if 'dense_cudnn_fwd_ms' not in A and CUDA:
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            for name, be in (('cudnn', SDPBackend.CUDNN_ATTENTION), ('flash', SDPBackend.FLASH_ATTENTION)):
                def dense(be=be):
                    with sdpa_kernel([be]):
                        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                attempt(f'dense_{name}_fwd_ms', lambda: timeit(dense), A)
            del qt, kt, vt
        # lists: the model's default (exact normaliser) = the reference lists of this source
        lists = sk.prefill_select(q, k, TOPK, **GEO)
        ks, kst = GEO['kernel_size'], GEO['kernel_stride']
        COARSE = dict(GEO, kernel_size=4 * ks, kernel_stride=4 * kst)          # the lse_approx kernels
        kc, kc2 = iv.compress_keys(k, ks, kst), iv.compress_keys(k, 4 * ks, 4 * kst)
        attempt('stage1_exact_ms', lambda: timeit(lambda: sk.fused_block_scores(q, k, **GEO, kc=kc)), S)
        attempt('stage1_approx_ms', lambda: timeit(lambda: sk.fused_block_scores(
            q, k, **GEO, kc=kc, kc_coarse=kc2, lse_approx=True)), S)
        attempt('stage1_exact_t_ms', lambda: timeit(lambda: sp.block_scores_t(q, k, **GEO, kc=kc)), S)
        attempt('stage1_approx_t_ms', lambda: timeit(lambda: sp.block_scores_t(
            q, k, **GEO, kc=kc, kc_coarse=kc2, lse_approx=True)), S)
        if src == args.sources[0]:                                      # launch settings of the transposed pass
            for c_ in (dict(num_warps=4), dict(NBC=16), dict(num_stages=3), dict(num_warps=4, NBC=16)):
                attempt('stage1_exact_t_cfg_' + '_'.join(f'{a}{b}' for a, b in c_.items()),
                        lambda c_=c_: timeit(lambda: sp.block_scores_t(q, k, **GEO, kc=kc, config=c_)), S)
        attempt('stage1_coarse_ms', lambda: timeit(lambda: sp.coarse_block_scores(q, k, kc=kc2, **COARSE)), S)
        attempt('compress_ms', lambda: timeit(lambda: (iv.compress_keys(k, ks, kst), iv.compress_keys(k, 4 * ks, 4 * kst))), S)
        if CUDA:
            attempt('stage1_exact_kernels_ms', lambda: kernel_split(lambda: sk.fused_block_scores(q, k, **GEO, kc=kc)), S)
            attempt('stage1_approx_kernels_ms', lambda: kernel_split(lambda: sk.fused_block_scores(
                q, k, **GEO, kc=kc, kc_coarse=kc2, lse_approx=True)), S)
        sc = sk.fused_block_scores(q, k, **GEO, kc=kc)
        st_ = sp.block_scores_t(q, k, **GEO, kc=kc)
        f_ = torch.isfinite(sc)
        S['scores_t_same_inf'] = bool(torch.equal(f_, torch.isfinite(st_)) and torch.equal(sc[~f_], st_[~f_]))
        S['scores_t_max_rel'] = float((sc[f_] - st_[f_]).abs().max() / sc[f_].abs().max())
        S['lists_t_overlap'] = sp.selection_overlap(sk.select_lists(st_, TOPK, N, M, LOCAL), lists)
        S['lists_t_rows_same'] = float((sk.select_lists(st_, TOPK, N, M, LOCAL) == lists).all(-1).float().mean())
        del st_, f_
        attempt('topk_ms', lambda: timeit(lambda: sk.select_lists(sc, TOPK, N, M, LOCAL)), S)
        attempt('topk_bucketed_ms', lambda: timeit(lambda: sp.select_lists_bucketed(sc, TOPK, N, M, LOCAL)), S)
        S['topk_bucketed_same_lists'] = bool(torch.equal(sp.select_lists_bucketed(sc, TOPK, N, M, LOCAL), lists))
        del sc
        la = sk.prefill_select(q, k, TOPK, **GEO, lse_approx=True)
        lc = sp.prefill_select_fast(q, k, TOPK, mode='coarse', **GEO)
        S['overlap_approx_vs_exact'] = sp.selection_overlap(la, lists)
        S['overlap_coarse_vs_exact'] = sp.selection_overlap(lc, lists)
        for tt in (1, 2, 8):
            S[f'union_blocks_tt{tt}'] = union_blocks(q, k, lists, tt)
        sel, _ = sk._window_lists(lists, N, M, LOCAL)
        S['band_sel_union_blocks_tt2'] = union_blocks(q, k, sel, 2)
        del sel, la, lc
        print(f"  {src}: overlap approx {S['overlap_approx_vs_exact']:.3f}, coarse {S['overlap_coarse_vs_exact']:.3f}; "
              f"union tt1/2/8 {S['union_blocks_tt1']:.0f}/{S['union_blocks_tt2']:.0f}/{S['union_blocks_tt8']:.0f}; "
              f"bucketed top-k same lists: {S['topk_bucketed_same_lists']}", flush=True)
        attempt('fwd_current_ms', lambda: timeit(lambda: sk.sparse_attention(q, k, v, lists, M)), S)
        attempt('fwd_band_ms', lambda: timeit(lambda: sk.sparse_attention_band(q, k, v, lists, M, local_blocks=LOCAL)), S)
        o1, o2 = sk.sparse_attention(q, k, v, lists, M), sk.sparse_attention_band(q, k, v, lists, M, local_blocks=LOCAL)
        S['band_vs_current_maxdiff'] = float((o1.float() - o2.float()).abs().max())
        del o1, o2

        def prefill(mode, approx, bucketed, band):
            def run():
                if mode == 'transposed':
                    s_ = sp.block_scores_t(q, k, **GEO, kc=iv.compress_keys(k, ks, kst), lse_approx=approx,
                                           kc_coarse=iv.compress_keys(k, 4 * ks, 4 * kst) if approx else None)
                elif mode == 'coarse': s_ = sp.coarse_block_scores(q, k, kc=iv.compress_keys(k, 4 * ks, 4 * kst), **COARSE)
                else:                                                 # compression inside: the model's work
                    s_ = sk.fused_block_scores(q, k, **GEO, kc=iv.compress_keys(k, ks, kst), lse_approx=approx,
                                               kc_coarse=iv.compress_keys(k, 4 * ks, 4 * kst) if approx else None)
                l_ = (sp.select_lists_bucketed if bucketed else sk.select_lists)(s_, TOPK, N, M, LOCAL)
                del s_
                if band: return sk.sparse_attention_band(q, k, v, l_, M, local_blocks=LOCAL)
                return sk.sparse_attention(q, k, v, l_, M)
            return run
        attempt('prefill_model_default_ms', lambda: timeit(prefill('exact', False, False, True)), S)    # what the model runs
        attempt('prefill_before_ms', lambda: timeit(prefill('exact', False, False, False)), S)         # no band
        attempt('prefill_approx_bucketed_band_ms', lambda: timeit(prefill('exact', True, True, True)), S)
        attempt('prefill_coarse_bucketed_band_ms', lambda: timeit(prefill('coarse', False, True, True)), S)
        attempt('prefill_fast_exact_ms', lambda: timeit(prefill('transposed', False, True, True)), S)   # same lists
        attempt('prefill_fast_approx_ms', lambda: timeit(prefill('transposed', True, True, True)), S)
        # Flex compiles per shape (~20-40 s): at every length unless --flex-len says which (last session's 32K Flex
        # row was nan because this ran at the longest length only)
        if CUDA and not args.no_flex and (args.flex_len is None or N in args.flex_len):
            attempt('flex', lambda: flex_per_token(q, k, v, lists, N, dev), S)
    d = num(A.get('dense_cudnn_fwd_ms'))
    for key in ('fwd_current_ms', 'fwd_band_ms', 'prefill_model_default_ms', 'prefill_before_ms',
                'prefill_approx_bucketed_band_ms', 'prefill_coarse_bucketed_band_ms', 'prefill_fast_exact_ms',
                'prefill_fast_approx_ms'):
        S['x_dense_' + key[:-3]] = d / num(S.get(key))
    fl = S.get('flex')
    if isinstance(fl, dict):
        S['band_vs_flex'] = fl['ms'] / num(S.get('fwd_band_ms'))
    save()
    del q, k, v, lists
    if CUDA: torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------------ plot
def plot(path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(15, 4.8))
    rows = []
    for L, R in RES['model'].items():
        for name in ('dense', 'sparse_noband', 'sparse_plaintopk', 'sparse', 'sparse_lseapprox'):
            rows.append((f'{int(L) // 1024}K {name}', num(R.get(f'{name}_est32_ms'))))
    ax[0].barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color='tab:blue')
    ax[0].set_xlabel('ms, forward extrapolated to 32 layers (per-layer measured)')
    ax[0].set_title('8B-shape MiniCPM4 prefill forward (random bf16 weights)')
    rows = []
    for N, A in RES['attention'].items():
        rows.append((f'{int(N) // 1024}K dense cuDNN fwd', num(A.get('dense_cudnn_fwd_ms'))))
        for src in ('random', 'structured'):
            S = A.get(src, {})
            fl = S.get('flex') if isinstance(S.get('flex'), dict) else {}
            for lab, key in (('flex fwd', None), ('current fwd', 'fwd_current_ms'), ('band fwd', 'fwd_band_ms'),
                             ('prefill (model)', 'prefill_model_default_ms'),
                             ('prefill apx+bkt', 'prefill_approx_bucketed_band_ms'),
                             ('prefill coarse', 'prefill_coarse_bucketed_band_ms'),
                             ('prefill fast exact', 'prefill_fast_exact_ms')):
                rows.append((f'{src[:6]} {lab}', num(fl.get('ms')) if key is None else num(S.get(key))))
    ax[1].barh([r[0] for r in rows][::-1], [r[1] for r in rows][::-1], color='tab:orange')
    ax[1].set_xlabel('ms (one H200 run)')
    ax[1].set_title('attention only, per-token lists (stage 1 + top-k + fwd = prefill)')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary():
    s = {}
    for L, R in RES['model'].items():
        s[f'model_{int(L) // 1024}K'] = (f"{R['layers']} layers: dense {num(R.get('dense_ms')):.0f} vs sparse "
                                         f"{num(R.get('sparse_ms')):.0f} ms (x{R.get('x_sparse_measured', float('nan')):.2f}); "
                                         f"est. 32 layers x{R.get('x_sparse_est32', float('nan')):.2f} "
                                         f"(no band x{R.get('x_sparse_noband_est32', float('nan')):.2f}, "
                                         f"lse_approx x{R.get('x_sparse_lseapprox_est32', float('nan')):.2f}, "
                                         f"plain top-k x{R.get('x_sparse_plaintopk_est32', float('nan')):.2f})")
        sp_ = R.get('sparse_split_per_layer')
        if isinstance(sp_, dict):
            s[f'model_{int(L) // 1024}K_sparse_attention_per_layer_ms'] = {k: round(v, 2) for k, v in sp_.items()}
        dn = R.get('dense_split_per_layer')
        if isinstance(dn, dict):
            s[f'model_{int(L) // 1024}K_dense_attention_per_layer_ms'] = round(dn.get('attention', float('nan')), 2)
    for N, A in RES['attention'].items():
        for src in ('random', 'structured'):
            S = A.get(src, {})
            fl = S.get('flex') if isinstance(S.get('flex'), dict) else {}
            s[f'attn_{int(N) // 1024}K_{src}'] = (
                f"dense {num(A.get('dense_cudnn_fwd_ms')):.1f}; fwd current {num(S.get('fwd_current_ms')):.1f}, band "
                f"{num(S.get('fwd_band_ms')):.1f}, flex {num(fl.get('ms')):.1f}; stage1 exact/apx/coarse "
                f"{num(S.get('stage1_exact_ms')):.1f}/{num(S.get('stage1_approx_ms')):.1f}/{num(S.get('stage1_coarse_ms')):.1f}"
                f" (overlap apx {S.get('overlap_approx_vs_exact', float('nan')):.3f}, coarse "
                f"{S.get('overlap_coarse_vs_exact', float('nan')):.3f}); topk {num(S.get('topk_ms')):.2f} -> bucketed "
                f"{num(S.get('topk_bucketed_ms')):.2f} (same {S.get('topk_bucketed_same_lists')}); prefill model "
                f"{num(S.get('prefill_model_default_ms')):.1f} (x{S.get('x_dense_prefill_model_default', float('nan')):.2f}),"
                f" apx+bkt {num(S.get('prefill_approx_bucketed_band_ms')):.1f} "
                f"(x{S.get('x_dense_prefill_approx_bucketed_band', float('nan')):.2f}), coarse "
                f"{num(S.get('prefill_coarse_bucketed_band_ms')):.1f} (x{S.get('x_dense_prefill_coarse_bucketed_band', float('nan')):.2f})"
                f"; union tt8 {S.get('union_blocks_tt8', float('nan')):.0f}"
                f"; transposed stage1 exact/apx {num(S.get('stage1_exact_t_ms')):.1f}/{num(S.get('stage1_approx_t_ms')):.1f}"
                f" (rows same {S.get('lists_t_rows_same', float('nan')):.4f}); prefill fast exact "
                f"{num(S.get('prefill_fast_exact_ms')):.1f} (x{S.get('x_dense_prefill_fast_exact', float('nan')):.2f}),"
                f" fast apx {num(S.get('prefill_fast_approx_ms')):.1f} (x{S.get('x_dense_prefill_fast_approx', float('nan')):.2f})")
    for L, R in RES['model'].items():      # derived: the model with the structured source's attention (same length)
        A = RES['attention'].get(L, {})
        sp_, dn = R.get('sparse_split_per_layer'), R.get('dense_layer_ms')
        for src in ('structured', 'random'):
            pre = num(A.get(src, {}).get('prefill_model_default_ms'))
            if isinstance(sp_, dict) and pre == pre and isinstance(dn, float):
                layer = R['sparse_layer_ms'] - sp_.get('attention', float('nan')) + pre
                est = 32 * layer + num(R.get('head_ms'))
                R[f'derived_est32_{src}_lists_ms'] = est
                s[f'model_{int(L) // 1024}K_derived_{src}'] = (
                    f"sparse layer with the {src} q/k attention rows' prefill ({pre:.1f} ms) instead of the model's "
                    f"own: x{R['dense_est32_ms'] / est:.2f} est. 32 layers (derived, not a model run)")
    RES['summary'] = s
    save()
    for k, v in s.items(): print(f'{k}: {v}', flush=True)


def stage1_only(N, dev):
    """For a profiler (ncu): one call each of stage 1 exact, stage 1 lse_approx, the top-k + window and the
    bucketed top-k at N on random bf16 q/k (after a warm-up call of each, so compiles are out of the way)."""
    dt = torch.bfloat16 if CUDA else torch.float32
    q, k = torch.randn(1, N, H, D, device=dev, dtype=dt), torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    ks, kst = GEO['kernel_size'], GEO['kernel_stride']
    kc, kc2 = iv.compress_keys(k, ks, kst), iv.compress_keys(k, 4 * ks, 4 * kst)
    calls = [lambda: sk.fused_block_scores(q, k, **GEO, kc=kc),
             lambda: sk.fused_block_scores(q, k, **GEO, kc=kc, kc_coarse=kc2, lse_approx=True)]
    sc = calls[0]()
    calls += [lambda: sk.select_lists(sc, TOPK, N, M, LOCAL), lambda: sp.select_lists_bucketed(sc, TOPK, N, M, LOCAL),
              lambda: sp.block_scores_t(q, k, **GEO, kc=kc)]
    with torch.no_grad():
        for f in calls: f()
        sync()
        if CUDA: torch.cuda.cudart().cudaProfilerStart()
        for f in calls: f()
        sync()
        if CUDA: torch.cuda.cudart().cudaProfilerStop()
    print('stage1-only done', flush=True)


SMOKE_SPARSE = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=3, dense_len=64)


def kernel_group(name: str) -> str:
    "A kernel's part of a prefill, from its name."
    n = name.lower()
    if n.startswith('_s1') or 'score' in n or 'lse' in n: return 'stage1'
    if 'topk' in n or 'select' in n or 'bucket' in n or '_win' in n: return 'topk'
    if n.startswith('_band') or n.startswith('_sparse') or 'plan' in n: return 'sparse_attn'
    if any(k in n for k in ('flash', 'fmha', 'cudnn', 'attention', 'sdpa', 'efficient')): return 'dense_attn'
    if any(k in n for k in ('gemm', 'gemv', 'nvjet', 'cutlass', 'xmma', 'cublas', 'matmul', 'sm90')): return 'linear'
    if any(k in n for k in ('copy', 'cat', 'elementwise', 'fill', 'index', 'reduce', 'where', 'rms', 'norm', 'silu',
                            'mul', 'add', 'rope', 'vectorized')): return 'elementwise'
    return 'other'


class CompileLog:
    """Triton compiles while active (knobs.runtime.jit_cache_hook / jit_post_compile_hook, Triton >= 3.4): count and
    seconds per kernel name. Nothing is recorded where the hooks are missing."""
    def __init__(self):
        self.n, self.s, self.t0 = {}, {}, {}

    def __enter__(self):
        try:
            from triton import knobs
            self.rt = knobs.runtime
            self.old = (self.rt.jit_cache_hook, self.rt.jit_post_compile_hook)
            self.rt.jit_cache_hook, self.rt.jit_post_compile_hook = self.pre, self.post
        except Exception:
            self.rt = None
        return self

    def pre(self, *a, fn=None, key=None, **kw):
        self.t0[(getattr(fn, 'name', '?'), str(key))] = time.perf_counter()
        return None                                   # go on compiling

    def post(self, *a, fn=None, key=None, **kw):
        name = getattr(fn, 'name', '?')
        t = self.t0.pop((name, str(key)), None)
        self.n[name] = self.n.get(name, 0) + 1
        if t is not None: self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t
        return None

    def __exit__(self, *exc):
        if self.rt is not None: self.rt.jit_cache_hook, self.rt.jit_post_compile_hook = self.old

    def summary(self):
        return {k: dict(n=self.n[k], s=round(self.s.get(k, 0.0), 2)) for k in sorted(self.n, key=lambda k: -self.s.get(k, 0))}


def band_sel_sweep(dev, N, T=2048, reps=5):
    """The band forward (window band + selected blocks) of one 2048-query chunk at the end of N keys (8B attention
    shape, random per-token lists as the model's prefill gets from random weights), per forward config: ms."""
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, N, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    kc = iv.compress_keys(k, 32, 16)
    sc = sk.fused_block_scores(q, k, kc=kc, **GEO)
    idx = sp.select_lists_bucketed(sc, TOPK, N, M, LOCAL)
    out = {}
    for name, cfg in (('default', None), ('pair1', dict(fwd=dict(PAIR=1))), ('warps4', dict(fwd=dict(num_warps=4))),
                      ('stages3', dict(fwd=dict(num_stages=3))), ('pair1_warps4', dict(fwd=dict(PAIR=1, num_warps=4))),
                      ('tile1', 'tile1'), ('tile4', 'tile4')):
        kw = dict(config=cfg) if isinstance(cfg, dict) or cfg is None else dict(tile_tokens=int(cfg[4:]))
        fn = lambda kw=kw: sk.sparse_attention_band(q, k, v, idx, M, local_blocks=LOCAL, check_ids=False, **kw)
        try:
            out[name] = round(event_time(fn, budget_ms=300.0, min_reps=3, max_reps=reps, warmup=1), 3)
        except Exception as ex:
            out[name] = f'ERROR {type(ex).__name__}: {str(ex)[:120]}'
    return out


def host_profile(fn):
    """One call of fn under cProfile (the host's view: Python, torch dispatch, Triton launchers), then a device sync:
    wall s, and the top functions by own time and by cumulative time."""
    import cProfile
    import pstats
    sync()
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable(); fn(); pr.disable()
    host = time.perf_counter() - t
    sync()
    out = dict(host_s=round(host, 4), wall_s=round(time.perf_counter() - t, 4))
    st = pstats.Stats(pr)
    rows = [(f'{fn_[0].split("/")[-1]}:{fn_[1]}({fn_[2]})', v[1], round(v[2], 4), round(v[3], 4))
            for fn_, v in st.stats.items()]                       # name, calls, tottime, cumtime
    out['tottime'] = [f'{t_:8.4f} {c:7d} {n[:90]}' for n, c, t_, _ in sorted(rows, key=lambda x: -x[2])[:40]]
    out['cumtime'] = [f'{t_:8.4f} {c:7d} {n[:90]}' for n, c, _, t_ in sorted(rows, key=lambda x: -x[3])[:40]]
    return out


@torch.no_grad()
def chunked_main(a, dev):
    """The engine's sparse and dense chunked prefills per spec: wall times and kernels by GPU time (see the doc)."""
    from dataclasses import replace
    from minicpm4_core.bench import kernel_times
    from minicpm4_core.edge_bench import build_model, preset
    from minicpm4_core.engine import Engine
    from minicpm4_core.infllmv2_ref import SparseSettings
    from minicpm4_core.static_decode import StaticDecoder
    import minicpm4_core.static_decode as SD
    t0 = time.time()
    left = lambda: a.budget - (time.time() - t0)
    RES.update(env_stamp(dev), chunk=a.chunk, chunked={})
    clock = lambda: (sync(), time.perf_counter())[1]
    for spec in a.chunked:
        shape, ctx, layers, *which = spec.split(':')       # optional 4th field: sparse | dense (default both)
        ctx, layers = int(ctx), int(layers)
        which = {'both': ('sparse', 'dense'), 'all': ('sparse', 'dense', 'causal')}.get(which[0] if which else 'both',
                                                                                       tuple(which[:1]))
        if left() < 0: RES['chunked'][spec] = 'skipped (budget)'; continue
        R = RES['chunked'][spec] = dict(shape=shape, context=ctx, layers=layers)
        c = replace(preset(shape, ctx + 8, 'bfloat16'), num_hidden_layers=layers)
        m = build_model(c, dev, torch.bfloat16)
        st = SparseSettings.from_dict(c.sparse_config)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, c.vocab_size, (1, ctx), generator=g).to(dev)
        for att in which:
            if left() < 0: R[att] = 'skipped (budget)'; continue
            e = Engine(m, ctx + 8, chunk=a.chunk, sparse='auto' if att == 'sparse' else 'dense')
            if att != 'sparse': e._static = StaticDecoder(m, ctx + 8, graphs=False, dense=True)

            def run(e=e, att=att):
                cache = m.new_cache(1, ctx) if att == 'sparse' else None
                with e._mode():
                    if cache is not None: return e.eager_prefill(ids, torch.ones_like(ids), cache)
                    SD.PREFILL_ATTN = 'causal' if att == 'causal' else 'mask'
                    try: return e.static_prefill(ids[0])
                    finally: SD.PREFILL_ATTN = 'mask'
            r = R[att] = {}
            with CompileLog() as cl:
                t1 = clock(); run(); r['first_s'] = clock() - t1
            r['compiles'] = cl.summary()
            r['compile_s'] = round(sum(v['s'] for v in r['compiles'].values()), 2)
            t1 = clock(); out = run(); r['second_s'] = clock() - t1
            if att != 'sparse': R[f'{att}_logits'] = out.float()
            if att == 'causal' and 'dense_logits' in R:
                r['logits_rel_diff_vs_dense'] = float((out.float() - R['dense_logits']).norm() / R['dense_logits'].norm())
            print(f'{spec} {att}: first {r["first_s"]:.3f} s (Triton compiles {r["compile_s"]} s: '
                  f'{ {k: v["n"] for k, v in r["compiles"].items()} }), second {r["second_s"]:.3f} s', flush=True)
            if left() > 3 * r['second_s']:
                kt = kernel_times([run], n=1, ndigits=1)
                tot = {k: v['us'] * v['per_step'] for k, v in kt.items()}
                r['gpu_busy_s'] = sum(tot.values()) / 1e6
                r['gpu_busy_share'] = r['gpu_busy_s'] / r['second_s']
                grp = {}
                for k, v in tot.items(): grp[kernel_group(k)] = grp.get(kernel_group(k), 0.0) + v / 1e6
                r['groups_s'] = {k: round(v, 4) for k, v in sorted(grp.items(), key=lambda x: -x[1])}
                top = sorted(kt.items(), key=lambda x: -tot[x[0]])[:14]
                r['top_kernels'] = {k: dict(total_s=round(tot[k] / 1e6, 4), us=v['us'], per_run=v['per_step'])
                                    for k, v in top}
            if a.host_profile and left() > 3 * r['second_s']:
                r['host_profile'] = host_profile(run)
                print(f'{spec} {att}: host profile (cProfile, tottime s):', flush=True)
                for row in r['host_profile']['tottime'][:22]: print('   ', row, flush=True)
            del e
            if CUDA: torch.cuda.empty_cache()
            save()
        for k in ('dense_logits', 'causal_logits'): R.pop(k, None)
        if isinstance(R.get('sparse'), dict) and isinstance(R.get('dense'), dict):
            R['speedup_sparse_vs_dense'] = R['dense']['second_s'] / R['sparse']['second_s']
        if isinstance(R.get('causal'), dict):
            for o in ('dense', 'sparse'):
                if isinstance(R.get(o), dict): R[f'speedup_causal_vs_{o}'] = R[o]['second_s'] / R['causal']['second_s']
        del m
        if CUDA: torch.cuda.empty_cache()
        save()
    for N in a.band_sweep:
        if left() < 0: RES.setdefault('band_sweep', {})[N] = 'skipped (budget)'; continue
        RES.setdefault('band_sweep', {})[N] = band_sel_sweep(dev, N)
        print(f'band forward, one 2048-query chunk at {N} keys (ms): {RES["band_sweep"][N]}', flush=True)
        save()
    RES['seconds'] = time.time() - t0
    save()
    print('\n== chunked prefill (chunk %d): wall s (2nd run), GPU busy s, groups' % a.chunk)
    for spec, R in RES['chunked'].items():
        if not isinstance(R, dict): print(spec, R); continue
        print(f'{spec}: sparse/dense speedup {R.get("speedup_sparse_vs_dense", float("nan")):.2f}x; causal (no mask) vs '
              f'dense {R.get("speedup_causal_vs_dense", float("nan")):.2f}x, vs sparse '
              f'{R.get("speedup_causal_vs_sparse", float("nan")):.2f}x (logits rel diff '
              f'{(R.get("causal") or {}).get("logits_rel_diff_vs_dense", float("nan")) if isinstance(R.get("causal"), dict) else float("nan"):.1e})')
        for att in ('sparse', 'dense', 'causal'):
            r = R.get(att)
            if not isinstance(r, dict): print(f'  {att}: {r}'); continue
            gs = ', '.join(f'{k} {v:.3f}' for k, v in r.get('groups_s', {}).items())
            print(f'  {att:6} wall {r["second_s"]:.3f} (first {r["first_s"]:.3f}) busy {r.get("gpu_busy_s", float("nan")):.3f}'
                  f' s ({r.get("gpu_busy_share", float("nan")):.0%}): {gs}')
            for k, v in list(r.get('top_kernels', {}).items())[:8]:
                print(f'      {v["total_s"]:8.4f} s  {v["per_run"]:7.0f} x {v["us"]:9.1f} us  {k}')


def main():
    global OUT, args, H, HKV, D, G, M, TOPK, LOCAL
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', default=None, help='folder for bench_sparse_model.json/.png (default: kernels/results/...)')
    ap.add_argument('--model', nargs='*', default=['32768:4', '65536:2', '131072:2'], help='L:layers pairs (model rows)')
    ap.add_argument('--attn-len', type=int, nargs='*', default=None, help='lengths of the attention rows (default 32K 128K)')
    ap.add_argument('--sources', nargs='+', default=['random', 'structured'], choices=['random', 'structured'])
    ap.add_argument('--no-flex', action='store_true', help='skip FlexAttention (it compiles: ~30-60 s)')
    ap.add_argument('--flex-len', type=int, nargs='*', default=None, help='lengths with the Flex rows (default: all)')
    ap.add_argument('--smoke', action='store_true', help='CPU dry run: tiny shapes, Triton interpreter')
    ap.add_argument('--stage1-only', type=int, default=0, help='only run stage 1 + top-k once at this N (for ncu)')
    ap.add_argument('--chunked', nargs='*', default=None, help='SHAPE:CTX:LAYERS specs: only the chunked-prefill profile')
    ap.add_argument('--chunk', type=int, default=2048, help='prefill chunk of --chunked')
    ap.add_argument('--budget', type=float, default=120.0, help='seconds for --chunked (later specs are skipped)')
    ap.add_argument('--band-sweep', type=int, nargs='*', default=[], help='--chunked: band forward config sweep at these N')
    ap.add_argument('--host-profile', action='store_true', help='--chunked: one more run of each prefill under cProfile')
    args = ap.parse_args()
    model = [tuple(int(x) for x in p.split(':')) for p in args.model]
    dev = torch.device('cuda' if CUDA else 'cpu')
    if args.smoke:
        H, HKV, D, M, TOPK, LOCAL = 4, 2, 32, 16, 3, 2
        G = H // HKV
        GEO.update(kernel_size=8, kernel_stride=4, block_size=M, local_blocks=LOCAL)
        iv.SPARSE_IMPL, iv.SPARSE_BAND = 'triton', True
        model = [(160, 1)]
        args.attn_len = [320] if args.attn_len is None else args.attn_len
        args.no_flex = True
    if args.stage1_only: return stage1_only(args.stage1_only, dev)
    if args.chunked:
        OUT = args.out or '.'
        os.makedirs(OUT, exist_ok=True)
        RES.clear()
        RES['file'] = 'chunked_prefill'
        return chunked_main(args, dev)
    if args.attn_len is None: args.attn_len = [32768, 131072]
    if args.out is None:
        from minicpm4_core.bench import run_dir
        args.out = str(run_dir('infllmv2', dev, variant='model'))
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    RES.update(env_stamp(dev), started=time.strftime('%Y-%m-%d %H:%M:%S'), model={}, attention={},
               shapes=dict(H=H, Hkv=HKV, D=D, block=M, topk=TOPK, local_blocks=LOCAL, geometry=GEO),
               notes='model rows: random bf16 weights, few layers, est32 = 32 x per-layer + LM head; '
                     'attention rows: B=1, per-token lists from stage 1 (exact normaliser unless said)')
    t0 = time.time()
    if CUDA: attempt('ceilings', lambda: roofline_ceilings(dev, copy_bytes=1 << 30, matmul_n=8192, budget_ms=200), RES)
    for L, layers in model:
        print(f'== model {L} tokens, {layers} layers', flush=True)
        try:
            model_rows(L, layers, dev)
        except Exception as ex:
            RES['model'].setdefault(str(L), {})['error'] = f'{type(ex).__name__}: {str(ex)[:300]}'
            traceback.print_exc(limit=4)
            if CUDA: torch.cuda.empty_cache()
    for N in args.attn_len:
        for src in args.sources:
            print(f'== attention {N}, {src} q/k', flush=True)
            try:
                attention_rows(N, dev, src)
            except Exception as ex:
                RES['attention'].setdefault(str(N), {}).setdefault(src, {})['error'] = f'{type(ex).__name__}: {str(ex)[:300]}'
                traceback.print_exc(limit=4)
                if CUDA: torch.cuda.empty_cache()
    RES['seconds'] = time.time() - t0
    RES['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    summary()
    try:
        plot(os.path.join(OUT, 'bench_sparse_model.png'))
    except Exception as ex:
        print('plot failed', ex)
    print(f'done in {RES["seconds"]:.0f} s -> {OUT}', flush=True)


if __name__ == '__main__':
    main()
