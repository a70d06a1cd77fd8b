#!/usr/bin/env python
"""Benchmark of the InfLLM v2 Triton kernels (minicpm4_core.kernels) at MiniCPM4-8B attention shapes.

B=1, 32 query heads, 2 kv heads, head_dim 128, bf16, block 64, 96 visible blocks per query: the shipped config
under the June-2025 MiniCPM4 release's selection ('minicpm4'): a top-k of 64 (1 init block + 63 chosen among the
blocks older than the window) plus the 32-block window, at 32K / 64K / 128K tokens (queries = keys = N).
Baselines timed in the same run:
dense causal SDPA (flash and cuDNN backends, GQA) forward and backward, FlexAttention with a BlockMask built from
the same block lists (BlockMask.from_kv_blocks; the diagonal block partial with a causal mask_mod, the others
full), and dense GQA decoding (SDPA) against the same cache.

Block lists: one random choice per query block of 64 tokens and kv head (what a BlockMask can express), shared
by its 64 queries. The stage-1 selection of random q/k gives unrelated per-token lists instead; the pipeline
rows 'own lists' measure that case too (the tile union is then much longer).

    python kernels/bench_sparse_attention.py [--lengths 32768 65536 131072] [--out DIR] [--smoke]
    # decode rows only: sparse step vs SDPA default (cuDNN) / flash / our dense_decode, graph and eager, + sweeps
    python kernels/bench_sparse_attention.py --variants 0 --sections decode --lengths 32768 65536 131072 --out DIR
    # window-as-band rows (per-token lists; see NOTES_sparse.md)
    python kernels/bench_sparse_attention.py --variants 0 --check-only --band 131072 --band-tiles 2 \
        --band-sources random --out DIR

Writes DIR/bench_sparse_attention.json and .png (DIR defaults to kernels/results/infllmv2/<device>-<date>/),
printing a table last. Timers, stamp and ceilings: `minicpm4_core.bench`.
"""
import argparse
import json
import os
import time
import traceback

import torch
import torch.nn.functional as F

from minicpm4_core import infllmv2 as iv
from minicpm4_core import kernels as sk
from minicpm4_core.bench import cuda_graph_time, env_stamp, event_time, kernel_times, roofline_ceilings, run_dir
from minicpm4_core.io import atomic_write_json

H, HKV, D, M, TOPK, INIT, LOCAL = 32, 2, 128, 64, 64, 1, 32
K = TOPK + LOCAL                  # blocks per attention list: the top-k plus the window ('minicpm4')
G = H // HKV
GEO = dict(kernel_size=32, kernel_stride=16, block_size=M, init_blocks=INIT, local_blocks=LOCAL, selection='minicpm4')
RES = {}
OUT = None


def save():
    if OUT:
        atomic_write_json(os.path.join(OUT, 'bench_sparse_attention.json'), json.loads(json.dumps(RES, default=str)),
                          indent=1)


def sync():
    if torch.cuda.is_available(): torch.cuda.synchronize()


def timeit(fn, budget_ms=1500.0, min_reps=3, max_reps=30, warmup=1):
    "Median ms of fn() (CUDA events; one wall-clock call on the CPU, where this script only smoke-tests)."
    if not torch.cuda.is_available(): min_reps = max_reps = 1
    return event_time(fn, budget_ms=budget_ms, min_reps=min_reps, max_reps=max_reps, warmup=warmup)


def graph_time(fns, replays=20):
    "Per-call ms of a CUDA graph that runs each fn of `fns` once (rotating inputs keeps the L2 cold); NaN off CUDA."
    return cuda_graph_time(fns, reps=replays) if torch.cuda.is_available() else float('nan')


def attempt(name, fn, store):
    try:
        v = fn()
        store[name] = v
        print(f'  {name}: {v if not isinstance(v, float) else round(v, 4)}', flush=True)
    except Exception as ex:  # record and carry on: one failing baseline must not lose the run
        store[name] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
        print(f'  {name}: ERROR {ex!r:.300}', flush=True)
        traceback.print_exc(limit=2)
    save()


def block_lists(N, dev, seed):
    """Per query block (64 tokens) and kv head, the 'minicpm4' attention list: block 0, 63 random blocks older than
    the window, the 32 window blocks [qb - 31, qb]; (1, N, Hkv, 96)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    nb = N // M
    b = torch.arange(nb, device=dev)
    qb = b[:, None]
    lists = []
    for _ in range(HKV):
        cand = (b[None] >= INIT) & (b[None] <= qb - LOCAL)
        r = torch.where(cand, torch.rand(nb, nb, device=dev, generator=g), -1.0)
        v, ch = r.topk(min(K - INIT - LOCAL, nb), -1)
        ch = torch.where(v >= 0, ch, -1)
        loc = qb - torch.arange(LOCAL, device=dev)[None]
        loc = torch.where(loc >= INIT, loc, -1)
        ini = torch.zeros(nb, INIT, dtype=torch.long, device=dev) + torch.arange(INIT, device=dev)
        lst = torch.cat([ini, loc, ch], -1)
        lst = torch.where(lst < 0, nb, lst).sort(-1).values[:, :K]
        lst = torch.nn.functional.pad(lst, (0, K - lst.shape[1]), value=nb)
        lists.append(torch.where(lst == nb, -1, lst))
    per_block = torch.stack(lists, 1).int()                          # (nb, Hkv, K)
    return per_block, per_block.repeat_interleave(M, 0)[None].contiguous()


def useful_keys(idx, N):
    "Sum over (query, kv head) of the keys a query attends to (full blocks + causal part of its own block)."
    T = idx.shape[1]
    t = torch.arange(N - T, N, device=idx.device)[None, :, None, None]
    ib = idx.long()
    full = ((ib >= 0) & (ib < t // M)).sum() * M
    diag = ((ib == t // M) * (t % M + 1)).sum()
    return int(full + diag)


def flex_blockmask(per_block, N, dev):
    from torch.nn.attention.flex_attention import BlockMask
    nb = N // M
    qb = torch.arange(nb, device=dev)[:, None, None]
    lst = per_block.long()
    is_full = (lst >= 0) & (lst < qb)
    nfull = is_full.sum(-1)                                          # (nb, Hkv)
    full_idx = torch.where(is_full, lst, nb).sort(-1).values        # full blocks first, padded with nb
    full_idx = torch.where(full_idx == nb, 0, full_idx)
    pad = torch.zeros(nb, HKV, max(0, nb - K), dtype=torch.long, device=dev)
    full_idx = torch.cat([full_idx, pad], -1)                        # width nb (needed for the transpose)
    part_idx = torch.zeros(nb, HKV, nb, dtype=torch.long, device=dev)
    part_idx[..., 0] = torch.arange(nb, device=dev)[:, None]        # the diagonal block, causal inside
    npart = torch.ones(nb, HKV, dtype=torch.long, device=dev)

    def heads(x):  # (nb, Hkv, ...) -> (1, H, nb, ...)
        return x.movedim(0, 1).repeat_interleave(G, 0)[None].int().contiguous()

    def causal(b, h, q_idx, kv_idx): return q_idx >= kv_idx
    return BlockMask.from_kv_blocks(heads(npart), heads(part_idx), heads(nfull), heads(full_idx),
                                    BLOCK_SIZE=(M, M), mask_mod=causal)


def ceilings(dev):
    "Measured copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s): the roofline of this run."
    return roofline_ceilings(dev, copy_bytes=1 << 30, matmul_n=8192, budget_ms=300)


def bench_length(N, dev, args):
    R = RES['lengths'].setdefault(str(N), {})
    dt = torch.bfloat16
    torch.manual_seed(N)
    q = torch.randn(1, N, H, D, device=dev, dtype=dt)
    k = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    do = torch.randn(1, N, H, D, device=dev, dtype=dt)
    per_block, idx = block_lists(N, dev, seed=N)
    keys = useful_keys(idx, N) * G                                   # per query head
    R['flops'] = dict(dense_fwd=4 * D * H * N * (N + 1) / 2, sparse_fwd=4 * D * keys,
                      density=keys / (H * N * (N + 1) / 2))
    R['flops']['dense_bwd'] = 2.5 * R['flops']['dense_fwd']
    R['flops']['sparse_bwd'] = 2.5 * R['flops']['sparse_fwd']
    vis = sum(iv.num_kernels(t + 1, 32, 16) for t in range(0, N, 64)) * 64     # approx. sum of visible kernels
    R['flops']['stage1_pass'] = 2 * D * H * vis
    F_ = R['flops']
    print(f'N={N}: density {F_["density"]:.4f}', flush=True)
    budget = args.budget

    # ---------------- dense SDPA baselines
    from torch.nn.attention import SDPBackend, sdpa_kernel
    on = args.sections.__contains__
    qt, kt, vt, dot_ = (x.transpose(1, 2) for x in (q, k, v, do))
    for name, be in (('flash', SDPBackend.FLASH_ATTENTION), ('cudnn', SDPBackend.CUDNN_ATTENTION)):
        if not on('dense'): break
        # GQA natively (enable_gqa); if the backend refuses it, with K/V expanded to 32 heads outside the timing
        for gqa in (True, False):
            kk_, vv_ = (kt, vt) if gqa else (kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1))

            def fwd(be=be, kk_=kk_, vv_=vv_, gqa=gqa):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(qt, kk_, vv_, is_causal=True, enable_gqa=gqa)
            attempt(f'dense_{name}_fwd_ms', lambda: timeit(fwd, budget), R)
            if isinstance(R[f'dense_{name}_fwd_ms'], float):
                R[f'dense_{name}_gqa'] = 'native' if gqa else 'expanded K/V'
                break
        else:
            continue

        def bwd_ms(be=be, kk_=kk_, vv_=vv_, gqa=gqa):
            qg, kg, vg = (x.detach().requires_grad_() for x in (qt, kk_, vv_))
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=gqa)
            return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), dot_, retain_graph=True), budget)
        attempt(f'dense_{name}_bwd_ms', bwd_ms, R)
        del kk_, vv_
    torch.cuda.empty_cache()

    # ---------------- our sparse attention on the benchmark lists
    cfg = RES.get('config')
    with torch.no_grad():
      if on('sparse'):
        attempt('sparse_fwd_ms', lambda: timeit(lambda: sk.sparse_attention(q, k, v, idx, M, config=cfg), budget), R)
        meta = sk._Meta(q, k, idx, M, None, None)
        R['union_mean_blocks'] = float(meta.cnt.float().mean())
        del meta
        attempt('plan_ms', lambda: timeit(lambda: sk._Meta(q, k, idx, M, None, None), budget), R)

    def sparse_bwd():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        o = sk.sparse_attention(qg, kg, vg, idx, M, config=cfg)
        return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), budget)
    if on('sparse'): attempt('sparse_bwd_ms', sparse_bwd, R)
    torch.cuda.empty_cache()

    # ---------------- stage 1 + top-k
    with torch.no_grad():
      if on('stage1'):
        kc = iv.compress_keys(k, 32, 16)
        kc2 = iv.compress_keys(k, 128, 64)
        attempt('compress_ms', lambda: timeit(lambda: (iv.compress_keys(k, 32, 16), iv.compress_keys(k, 128, 64)),
                                              budget), R)
        attempt('stage1_exact_ms', lambda: timeit(lambda: sk.fused_block_scores(q, k, **GEO, kc=kc, config=cfg),
                                                  budget), R)
        attempt('stage1_approx_ms', lambda: timeit(lambda: sk.fused_block_scores(q, k, **GEO, lse_approx=True, kc=kc,
                                                                                 kc_coarse=kc2, config=cfg), budget), R)
        sc = sk.fused_block_scores(q, k, **GEO, lse_approx=True, kc=kc, kc_coarse=kc2, config=cfg)
        attempt('topk_ms', lambda: timeit(lambda: sk.topk_blocks(sc, TOPK), budget), R)
        own = iv.attention_blocks(sk.topk_blocks(sc, TOPK), N, M, LOCAL)     # + the window: 96-block lists
        del sc
        torch.cuda.empty_cache()
        for mode in ('exact', 'approx'):
            ap = mode == 'approx'

            def prefill(ap=ap):   # stage 1 (incl. compression) + top-k + sparse attention on the benchmark lists
                sel = sk.prefill_select(q, k, TOPK, **GEO, lse_approx=ap, config=cfg)
                return sel, sk.sparse_attention(q, k, v, idx, M, config=cfg)
            attempt(f'prefill_{mode}_ms', lambda: timeit(prefill, budget), R)
        torch.cuda.empty_cache()
        if True:   # the lists stage 1 picks itself (random data: unrelated per-token lists)
            m2 = sk._Meta(q, k, own, M, None, None)
            R['own_lists_union_mean_blocks'] = float(m2.cnt.float().mean())
            del m2
            attempt('sparse_fwd_own_lists_ms',
                    lambda: timeit(lambda: sk.sparse_attention(q, k, v, own, M, config=cfg), budget, max_reps=5), R)
            def own_bwd():
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                with torch.enable_grad():
                    o = sk.sparse_attention(qg, kg, vg, own, M, config=cfg)
                return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), budget, max_reps=3)
            attempt('sparse_bwd_own_lists_ms', own_bwd, R)
            attempt('prefill_approx_own_lists_ms',
                    lambda: timeit(lambda: sk.sparse_attention(q, k, v, sk.prefill_select(
                        q, k, TOPK, **GEO, lse_approx=True, config=cfg), M, config=cfg), budget, max_reps=5), R)
        del own
        torch.cuda.empty_cache()

    # ---------------- FlexAttention on the same lists
    def flex_ms():
        from torch.nn.attention.flex_attention import flex_attention
        bm = flex_blockmask(per_block, N, dev)
        fx = torch.compile(flex_attention, dynamic=False)
        best = None
        for ko in ({'BLOCK_M': 64, 'BLOCK_N': 64, 'num_stages': 3, 'num_warps': 4},
                   {'BLOCK_M': 64, 'BLOCK_N': 64, 'num_stages': 2, 'num_warps': 4}):
            try:
                with torch.no_grad():
                    of = fx(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=ko)
                    if 'flex_check_rel' not in R:
                        osp = sk.sparse_attention(q, k, v, idx, M, config=cfg)
                        R['flex_check_rel'] = float((of.transpose(1, 2).float() - osp.float()).norm() /
                                                    osp.float().norm())
                    ms = timeit(lambda: fx(qt, kt, vt, block_mask=bm, enable_gqa=True, kernel_options=ko), budget)
                R.setdefault('flex_variants', {})[str(ko)] = ms
                best = ms if best is None else min(best, ms)
            except Exception as ex:
                R.setdefault('flex_variants', {})[str(ko)] = f'ERROR {ex!r:.200}'
        if best is None: raise RuntimeError(str(R.get('flex_variants')))
        return best
    if on('flex'): attempt('flex_fwd_ms', flex_ms, R)
    torch.cuda.empty_cache()

    # ---------------- decoding against a cache of N tokens (16 rotating caches: cold L2 as in a real model)
    if not on('decode'): return
    nrot = 2 if args.smoke else 16
    caches = [(torch.randn(1, N, HKV, D, device=dev, dtype=dt), torch.randn(1, N, HKV, D, device=dev, dtype=dt),
               torch.randn(1, H, D, device=dev, dtype=dt)) for _ in range(nrot)]
    seq = torch.tensor([N], dtype=torch.int32, device=dev)
    lists = [block_lists(N, dev, seed=N + 1 + i)[0][-1][None].contiguous() for i in range(nrot)]   # (1, Hkv, K)
    kcs = [iv.compress_keys(c[0], 32, 16) for c in caches]
    nbk = N // M
    R['decode_bytes'] = dict(dense=2 * N * HKV * D * 2, sparse=2 * K * M * HKV * D * 2)
    sp_fns = [lambda c=c, l=l: sk.sparse_decode(c[2], c[0], c[1], l, seq, M, config=cfg) for c, l in zip(caches, lists)]
    de_fns = [lambda c=c: F.scaled_dot_product_attention(c[2][:, :, None], c[0].transpose(1, 2), c[1].transpose(1, 2),
                                                          enable_gqa=True) for c in caches]
    se_fns = [lambda c=c, kc_=kc_: sk.decode_select(c[2], kc_, seq, TOPK, **GEO, num_blocks=nbk, config=cfg)
              for c, kc_ in zip(caches, kcs)]
    st_fns = [lambda c=c, kc_=kc_: sk.sparse_decode(c[2], c[0], c[1], sk.decode_select(
        c[2], kc_, seq, TOPK, **GEO, num_blocks=nbk, config=cfg), seq, M, config=cfg) for c, kc_ in zip(caches, kcs)]
    ds_fns = [lambda c=c, kc_=kc_: sk.decode_step(c[2], c[2], c[0], c[1], kc_, seq, TOPK, **GEO, num_blocks=nbk,
                                                  config=cfg) for c, kc_ in zip(caches, kcs)]
    # the dense baselines users get: SDPA's default (cuDNN at a fixed length), SDPA flash, and our split-K
    # dense_decode (length read on the device: what the static decoding stack can put in a graph)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    dd_fns = [lambda c=c: sk.dense_decode(c[2], c[0], c[1], seq) for c in caches]

    def flash_fn(c):
        def f():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(c[2][:, :, None], c[0].transpose(1, 2), c[1].transpose(1, 2),
                                                      enable_gqa=True)
        return f
    fl_fns = [flash_fn(c) for c in caches]
    attempt('decode_dense_flash_graph_us', lambda: 1e3 * graph_time(fl_fns), R)
    attempt('decode_dense_ours_graph_us', lambda: 1e3 * graph_time(dd_fns), R)
    attempt('decode_dense_ours_eager_us', lambda: 1e3 * timeit(lambda: [f() for f in dd_fns], 200) / nrot, R)
    attempt('dense_decode_check_rel', lambda: float((dd_fns[0]().float() - de_fns[0]()[:, :, 0].float()).norm() /
                                                    de_fns[0]()[:, :, 0].float().norm()), R)
    if not args.smoke and torch.cuda.is_available() and args.dec_sweep == 'old':
        DV = R.setdefault('dense_decode_variants_graph_us', {})
        for blk, waves in ((64, 2), (64, 8), (128, 4), (32, 4)):
            cf = dict(dense=dict(BLOCK=blk, WAVES=waves))
            attempt(f'BLOCK={blk},WAVES={waves}', lambda cf=cf: 1e3 * graph_time(
                [lambda c=c: sk.dense_decode(c[2], c[0], c[1], seq, config=cf) for c in caches]), DV)
    def host_us(fns, n=10):   # Python + launch time on the host alone (the GPU queue absorbs the work)
        sync(); t0 = time.perf_counter()
        for _ in range(n):
            for f in fns: f()
        t = time.perf_counter() - t0; sync()
        return 1e6 * t / (n * len(fns))

    def kernel_us(fns, n=5): return kernel_times(fns, n, ndigits=2)   # GPU us per launch of each kernel (profiler, eager)

    attempt('decode_step_graph_us', lambda: 1e3 * graph_time(ds_fns), R)      # selection + attention, one step
    if not args.smoke and torch.cuda.is_available() and args.dec_sweep != 'none':
        # the selection paths (dec.FUSED: 'par' = pooling over many programs + radix top-k of the whole row in the
        # row's last program; 'cand' = the same pooling, the last program ranks bounded candidates; True = one
        # program per row; False = pooling + top-k kernels) and the 'cand' settings: us per step
        SV = R.setdefault('decode_step_variants_graph_us', {})
        # the opt-ins of session 6 together: PDL launches, the one-pass split combine, the logits tile loaded first
        ALL_OPT = dict(FUSED='cand', PDL=True, COMBINE='split', POOL_PRELOAD=True)
        HV = R.setdefault('decode_step_variants_eager_us', {})
        # (--persistent: only the one-launch rows; --dec-sweep old: last session's settings sweep of the 'par' path,
        # flat within +-1 us on the H200; the default sweep: 'par' vs 'cand' at every length, 'cand' settings at the
        # longest)
        for dc in ((dict(PERSISTENT=True), dict(PERSISTENT=True, PROGRAMS=2), dict(PERSISTENT=True, PER=2),
                    dict(PERSISTENT=True, num_warps=8), dict(PERSISTENT=True, FUSED='cand')) if args.persistent else
                   (dict(FUSED=True), dict(FUSED=False), dict(COMBINE='last'), dict(NBC_PAR=16), dict(NBC_PAR=32),
                    dict(NBC_PAR=64), dict(PAR_WARPS=4), dict(TOPK_DIG=4), dict(TOPK_DIG=1), dict(PER=2),
                    dict(PER=4), dict(num_warps=8), dict(COMBINE_WARPS=8), dict(COMBINE_SP=16),
                    dict(PER=2, COMBINE_WARPS=8)) if args.dec_sweep == 'old' else
                   (dict(FUSED='par'), dict(FUSED='cand'), ALL_OPT, dict(FUSED='cand', PDL=True),
                    dict(FUSED='cand', PDL=True, COMBINE='split'), dict(FUSED='cand', COMBINE='split'),
                    dict(FUSED='cand', POOL_PRELOAD=True), dict(FUSED='cand', CAND_CJ=32),
                    dict(FUSED='cand', CAND_CAP=256, CAND_CJ=32), dict(FUSED='cand', NBC_PAR=16),
                    dict(FUSED='cand', PER=1), dict(FUSED='cand', CHP=64), dict(FUSED='par', PER=1))):
            if N != max(args.lengths) and len(dc) > 1 and 'PERSISTENT' not in dc and dc != ALL_OPT:
                continue     # the settings sweep at the longest length only; the paths at every length
            cf = dict(cfg or {}, dec=dc)
            nm = ','.join(f'{k_}={v_}' for k_, v_ in dc.items())
            fns = [lambda c=c, kc_=kc_, cf=cf: sk.decode_step(c[2], c[2], c[0], c[1], kc_, seq, TOPK, **GEO,
                                                              num_blocks=nbk, config=cf) for c, kc_ in zip(caches, kcs)]
            attempt(nm, lambda fns=fns: 1e3 * graph_time(fns), SV)
            if len(dc) == 1 and ('FUSED' in dc or 'COMBINE' in dc) or 'PERSISTENT' in dc or dc == ALL_OPT:
                attempt(nm, lambda fns=fns: 1e3 * timeit(lambda: [f() for f in fns], 200) / nrot, HV)
            if args.dec_sweep != 'old' and (len(dc) == 1 and 'FUSED' in dc or dc == ALL_OPT):
                attempt(nm, lambda fns=fns: kernel_us(fns), R.setdefault('kernel_us_decode_step_variants', {}))
            if 'PERSISTENT' in dc:
                attempt(nm, lambda fns=fns: host_us(fns), R.setdefault('decode_step_variants_host_us', {}))

                def same(fns=fns):   # the one-launch step vs the three-launch one: same lists, output rel (0: bitwise)
                    a, b = fns[0](), ds_fns[0]()
                    return dict(lists=bool(torch.equal(a[1], b[1])),
                                out_rel=float((a[0].float() - b[0].float()).norm() / b[0].float().norm()))
                attempt(nm, same, R.setdefault('decode_step_variants_same_as_default', {}))
        print(f"  decode_step variants @{N}, us per step, graph: {SV}\n    eager: {HV}", flush=True)
        for nm, ku in R.get('kernel_us_decode_step_variants', {}).items():
            print(f"    GPU us per kernel, {nm}: " + (', '.join(f"{k_[:28]} {v_['us']}" for k_, v_ in ku.items())
                                                     if isinstance(ku, dict) else str(ku)), flush=True)
    attempt('decode_step_eager_us', lambda: 1e3 * timeit(lambda: [f() for f in ds_fns], 200) / nrot, R)
    attempt('decode_wrappers_eager_us', lambda: 1e3 * timeit(lambda: [f() for f in st_fns], 200) / nrot, R)

    for nm, fns in (('decode_step', ds_fns), ('decode_wrappers', st_fns), ('decode_select', se_fns),
                    ('sparse_decode', sp_fns), ('dense', de_fns), ('dense_decode', dd_fns)):
        attempt(f'host_us_{nm}', lambda fns=fns: host_us(fns), R)

    def host_profile(fns, n=20):   # where decode_step's host time goes (cProfile, top functions by own time)
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            for f in fns: f()
        pr.disable(); sync()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats('tottime').print_stats(12)
        return buf.getvalue()[-3000:]
    if not args.smoke: attempt('host_profile_decode_step', lambda: host_profile(ds_fns), R)

    if torch.cuda.is_available():
        attempt('kernel_us_decode_step', lambda: kernel_us(ds_fns), R)
        if args.persistent:
            attempt('kernel_us_decode_step_persistent', lambda: kernel_us(
                [lambda c=c, kc_=kc_: sk.decode_step(c[2], c[2], c[0], c[1], kc_, seq, TOPK, **GEO, num_blocks=nbk,
                                                     config=dict(dec=dict(PERSISTENT=True)))
                 for c, kc_ in zip(caches, kcs)]), R)
    attempt('decode_sparse_graph_us', lambda: 1e3 * graph_time(sp_fns), R)
    attempt('decode_dense_graph_us', lambda: 1e3 * graph_time(de_fns), R)
    attempt('decode_select_graph_us', lambda: 1e3 * graph_time(se_fns), R)
    attempt('decode_sparse_eager_us', lambda: 1e3 * timeit(lambda: [f() for f in sp_fns], 200) / nrot, R)
    attempt('decode_dense_eager_us', lambda: 1e3 * timeit(lambda: [f() for f in de_fns], 200) / nrot, R)
    for be_name in ('FLASH_ATTENTION',):   # (EFFICIENT_ATTENTION: no GQA kernel for this call, 'No available kernel')
        def dense_be(be_name=be_name):
            from torch.nn.attention import SDPBackend, sdpa_kernel
            be = getattr(SDPBackend, be_name)
            fns = [lambda c=c: F.scaled_dot_product_attention(c[2][:, :, None], c[0].transpose(1, 2),
                                                              c[1].transpose(1, 2), enable_gqa=True) for c in caches]

            def run():
                with sdpa_kernel([be]):
                    for f in fns: f()
            return 1e3 * timeit(run, 200) / nrot
        attempt(f'decode_dense_{be_name.lower()}_eager_us', dense_be, R)
    # the issue-12 goals at this length: the step >= 3x dense in a graph and >= 2x eager (dense = SDPA's default,
    # cuDNN at a fixed length); also against our split-K dense_decode (what a graph of the growing cache can run)
    def ratio(a, b):
        return R[a] / R[b] if isinstance(R.get(a), float) and isinstance(R.get(b), float) else float('nan')
    R['goal_graph_x'] = ratio('decode_dense_graph_us', 'decode_step_graph_us')
    R['goal_eager_x'] = ratio('decode_dense_eager_us', 'decode_step_eager_us')
    R['vs_dense_decode_graph_x'] = ratio('decode_dense_ours_graph_us', 'decode_step_graph_us')
    R['vs_dense_decode_eager_x'] = ratio('decode_dense_ours_eager_us', 'decode_step_eager_us')
    print(f"  GOALS @{N}: step graph {R.get('decode_step_graph_us')} us vs cuDNN {R.get('decode_dense_graph_us')}: "
          f"{R['goal_graph_x']:.2f}x (goal 3x); eager {R.get('decode_step_eager_us')} vs "
          f"{R.get('decode_dense_eager_us')}: {R['goal_eager_x']:.2f}x (goal 2x); host {R.get('host_us_decode_step')} us",
          flush=True)
    save()
    del caches, kcs
    torch.cuda.empty_cache()


def smooth_q(N, dev, dt, width=64, seed=0):
    """Synthetic queries whose neighbours overlap like a real model's (NOT a model's q): a moving sum of `width`
    i.i.d. normals, so tokens t and t+d share 1 - d/width of their terms; scaled to unit variance."""
    g = torch.Generator(device=dev).manual_seed(seed)
    e = torch.randn(1, N + width, H, D, device=dev, generator=g)
    c = e.cumsum(1)
    return ((c[:, width:] - c[:, :N]) / width ** 0.5).to(dt)


def per_token(N, dev, args):
    """Per-token lists (what the model computes) from stage 1 on (a) random q/k and (b) smooth synthetic q: the
    tile union and the forward/backward time per tile size (tokens per tile x 16 heads)."""
    P = RES.setdefault('per_token', {}).setdefault(str(N), {})
    dt = torch.bfloat16
    torch.manual_seed(N + 7)
    k = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    do = torch.randn(1, N, H, D, device=dev, dtype=dt)
    for src in ('random', 'smooth'):
        q = torch.randn(1, N, H, D, device=dev, dtype=dt) if src == 'random' else smooth_q(N, dev, dt)
        S = P.setdefault(src, {})
        with torch.no_grad():
            lists = sk.prefill_select(q, k, TOPK, **GEO, lse_approx=True)
            S['useful_keys_per_head'] = useful_keys(lists, N)
            for tt in args.tiles:
                m_ = sk._Meta(q, k, lists, M, None, tt)
                S[f'union_mean_blocks_tt{tt}'] = float(m_.cnt.float().mean())
                del m_
                attempt(f'fwd_ms_tt{tt}', lambda tt=tt: timeit(lambda: sk.sparse_attention(
                    q, k, v, lists, M, tile_tokens=tt), args.budget, max_reps=5), S)
        for tt in args.bwd_tiles:
            def bwd(tt=tt):
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                o = sk.sparse_attention(qg, kg, vg, lists, M, tile_tokens=tt)
                return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), args.budget,
                              max_reps=3)
            attempt(f'bwd_ms_tt{tt}', bwd, S)
        del q, lists
        torch.cuda.empty_cache()


def band_check(dev, args):
    """Correctness of `sparse_attention_band` on this device before its timings: stage-1 lists of random data
    (queries = keys, and queries at the end of a longer key range), forward and dq/dk/dv against the reference on
    the union lists (fp32 reference; bf16 and fp32 inputs). Stored under RES['band']['check']."""
    C = RES.setdefault('band', {}).setdefault('check', {})
    n = 512 if args.smoke else 4096
    for T, dt in ((n, torch.bfloat16), (n - 1000 if not args.smoke else n - 100, torch.bfloat16), (n, torch.float32)):
        torch.manual_seed(T)
        q = torch.randn(1, T, H, D, device=dev, dtype=dt)
        k = torch.randn(1, n, HKV, D, device=dev, dtype=dt)
        v = torch.randn(1, n, HKV, D, device=dev, dtype=dt)
        with torch.no_grad():
            kq = torch.cat([torch.randn(1, n - T, H, D, device=dev, dtype=dt), q], 1)   # selection needs T = N
            lists = sk.prefill_select(kq, k, TOPK, **GEO)[:, n - T:].contiguous()
        full = iv.attention_blocks(lists, n, M, LOCAL)
        qs, ks, vs = (x.clone().requires_grad_() for x in (q, k, v))
        o = sk.sparse_attention_band(qs, ks, vs, lists, M, local_blocks=LOCAL)
        do = torch.randn_like(o)
        ga = torch.autograd.grad(o, (qs, ks, vs), do)
        qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
        r = iv.sparse_attention_ref(qr, kr, vr, full, M)
        gr = torch.autograd.grad(r, (qr, kr, vr), do.float())
        def rel(a, b): return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())
        errs = [rel(o, r)] + [rel(a, b) for a, b in zip(ga, gr)]
        tol = 1e-4 if dt == torch.float32 else 1e-2
        C[f'T{T}_N{n}_{str(dt)[6:]}'] = dict(rel_o_dq_dk_dv=errs, ok=bool(max(errs) < tol and o.isfinite().all()))
        print(f'band check T={T} N={n} {dt}: rel o/dq/dk/dv {["%.1e" % e for e in errs]} '
              f'{"OK" if max(errs) < tol else "FAILED"}', flush=True)
    C['all_ok'] = all(c['ok'] for c in C.values() if isinstance(c, dict))
    save()


def band(N, dev, args):
    """Issue 12, the window as a dense causal band (`sparse_attention_band`, opt-in) beside the current kernel and
    dense SDPA, same process, per-token lists from stage 1 on random q/k (and smooth synthetic q): forward ms, the
    max deviation from the current kernel, and the bytes each reads (union blocks per tile x 32 KB of K/V)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    P = RES.setdefault('band', {}).setdefault(str(N), {})
    dt = torch.bfloat16
    torch.manual_seed(N + 7)
    k = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    blk = 2 * M * D * 2                                               # bytes of K+V of one block and kv head
    for src in args.band_sources:
        q = torch.randn(1, N, H, D, device=dev, dtype=dt) if src == 'random' else smooth_q(N, dev, dt)
        S = P.setdefault(src, {})
        with torch.no_grad():
            if src == args.band_sources[0]:
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                for name, be in (('cudnn', SDPBackend.CUDNN_ATTENTION), ('flash', SDPBackend.FLASH_ATTENTION)):
                    def dense(be=be):
                        with sdpa_kernel([be]):
                            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
                    attempt(f'dense_{name}_fwd_ms', lambda: timeit(dense, args.budget), P)
                del qt, kt, vt
            lists = sk.prefill_select(q, k, TOPK, **GEO, lse_approx=True)
            ref = sk.sparse_attention(q, k, v, lists, M)
            m_ = sk._Meta(q, k, lists, M, None, 'auto')
            S['current_tile_tokens'], S['current_union_blocks'] = m_.BM, float(m_.cnt.float().mean())
            S['current_GB'] = S['current_union_blocks'] * blk * m_.NT * HKV / 1e9
            del m_
            attempt('current_fwd_ms', lambda: timeit(lambda: sk.sparse_attention(q, k, v, lists, M), args.budget,
                                                     max_reps=5), S)
            sel, _ = sk._window_lists(lists, N, M, LOCAL)
            for tt in args.band_tiles:
                m_ = sk._Meta(q, k, sel, M, None, tt)
                S[f'sel_union_blocks_tt{tt}'] = float(m_.cnt.float().mean())
                for bt in args.band_tokens:
                    nb_t = -(-N // bt)
                    band_gb = nb_t * HKV * (LOCAL * M + bt) * 2 * D * 2 / 1e9
                    key = f'tt{tt}_bt{bt}'
                    S[f'GB_{key}'] = S[f'sel_union_blocks_tt{tt}'] * blk * m_.NT * HKV / 1e9 + band_gb
                    cfg = {'band': {'tokens': bt}}
                    o = sk.sparse_attention_band(q, k, v, lists, M, local_blocks=LOCAL, tile_tokens=tt, config=cfg)
                    S[f'maxdiff_{key}'] = float((o.float() - ref.float()).abs().max())
                    del o
                    attempt(f'band_fwd_ms_{key}', lambda tt=tt, cfg=cfg: timeit(lambda: sk.sparse_attention_band(
                        q, k, v, lists, M, local_blocks=LOCAL, tile_tokens=tt, config=cfg), args.budget,
                        max_reps=5), S)
                del m_
        del q, lists, ref, sel
        torch.cuda.empty_cache()
    c = P.get('dense_cudnn_fwd_ms')
    for src in args.band_sources:
        S = P[src]
        best = min((v_ for k_, v_ in S.items() if k_.startswith('band_fwd_ms') and isinstance(v_, float)),
                   default=float('nan'))
        S['band_best_ms'] = best
        print(f"band N={N} {src}: dense cuDNN {c} ms, current {S.get('current_fwd_ms')} ms "
              f"({S.get('current_GB', 0):.0f} GB), band best {best:.2f} ms", flush=True)
    save()


def model_level(dev, args):
    """8B-shape MiniCPM4ForCausalLM (random bf16 weights): forward with vs without sparse_config, and cached greedy
    decoding steps (eager) at a long context."""
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    from minicpm4_core.config import default_sparse_config
    MR = RES.setdefault('model', {})
    for L, layers in args.model_prefill:
        cfg = MiniCPM4Config.minicpm4_8b(num_hidden_layers=layers, max_position_embeddings=max(32768, L + 1024))
        torch.manual_seed(0)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(dev):
            model = MiniCPM4ForCausalLM(cfg).eval()
        torch.set_default_dtype(old)
        ids = torch.randint(3, cfg.vocab_size, (1, L), device=dev)
        R = MR.setdefault(f'prefill_{L}', dict(layers=layers))
        for name, sc in (('dense', None), ('sparse', default_sparse_config())):
            model.config.sparse_config = sc
            with torch.no_grad():
                attempt(f'{name}_ms', lambda: timeit(lambda: model(ids), 1, min_reps=2, max_reps=2), R)
        R['x'] = R['dense_ms'] / R['sparse_ms'] if all(isinstance(R.get(f'{n}_ms'), float) for n in ('dense', 'sparse')) else None
        print(f'  model prefill {L} ({layers} layers): x {R["x"]}', flush=True)
        if L in args.model_decode:
            D_ = MR.setdefault(f'decode_{L}', dict(layers=layers, steps=args.decode_steps))
            try:
                decode_at(model, cfg, ids, L, D_, dev, args)
            except Exception as ex:   # record and carry on
                D_['error'] = f'{type(ex).__name__}: {str(ex)[:300]}'
                traceback.print_exc(limit=3)
            print(f'  model decode {L}: {D_}', flush=True)
        save()
        del model
        torch.cuda.empty_cache()


def decode_at(model, cfg, ids, L, D_, dev, args):
    "Prefill L tokens (dense) into a cache, then time eager greedy steps: dense, then sparse (after 2 warm-up steps)."
    from minicpm4_core.config import default_sparse_config
    if True:
            cache = model.new_cache(1, L + 2 * args.decode_steps + 8)
            model.config.sparse_config = None
            with torch.no_grad():
                model(ids, cache=cache)
                tok = torch.randint(3, cfg.vocab_size, (1, 2 * args.decode_steps + 8), device=dev)
                j = 0
                for name, sc in (('dense', None), ('sparse', default_sparse_config())):
                    model.config.sparse_config = sc
                    for _ in range(2):                                # warm-up (the sparse one builds its cache)
                        model(tok[:, j:j + 1], cache=cache); j += 1
                    sync(); t0 = time.perf_counter()
                    for _ in range(args.decode_steps):
                        model(tok[:, j:j + 1], cache=cache); j += 1
                    sync()
                    D_[f'{name}_ms_per_token'] = 1e3 * (time.perf_counter() - t0) / args.decode_steps
            D_['x'] = D_['dense_ms_per_token'] / D_['sparse_ms_per_token']
            del cache


def variants(N, dev, args):
    "A few launch settings of each kernel at one length; the best go into RES['config'] for the main table."
    V = RES.setdefault('variants', {})
    dt = torch.bfloat16
    q = torch.randn(1, N, H, D, device=dev, dtype=dt)
    k = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    v = torch.randn(1, N, HKV, D, device=dev, dtype=dt)
    do = torch.randn(1, N, H, D, device=dev, dtype=dt)
    _, idx = block_lists(N, dev, seed=1)
    best = {}

    def res(names):
        return {nm: dict(n_regs=sk.COMPILED[nm].n_regs, n_spills=sk.COMPILED[nm].n_spills,
                         shared=getattr(sk.COMPILED[nm].metadata, 'shared', None)) for nm in names if nm in sk.COMPILED}

    def consider(kind, name, cfg):
        x = V.get(name)
        if isinstance(x, float) and x < best.get(kind, (1e30,))[0]: best[kind] = (x, cfg)

    with torch.no_grad():
        for c in args.fwd_variants:
            sk.COMPILED.clear()
            nm = f'fwd {c}'
            attempt(nm, lambda: timeit(lambda: sk.sparse_attention(q, k, v, idx, M, config=c), args.budget), V)
            consider('fwd', nm, c)
            V[nm + ' resources'] = res(['fwd', 'plan'])
        kc = iv.compress_keys(k, 32, 16)
        kc2 = iv.compress_keys(k, 128, 64)
        for c in args.s1_variants:
            sk.COMPILED.clear()
            nm = f's1 approx {c}'
            attempt(nm, lambda: timeit(lambda: sk.fused_block_scores(q, k, **GEO, lse_approx=True, kc=kc, kc_coarse=kc2,
                                                                     config=dict(s1=c)), args.budget), V)
            consider('s1', nm, c)
            V[nm + ' resources'] = res(['s1_lse', 's1_score'])
        sc = sk.fused_block_scores(q, k, **GEO, lse_approx=True, kc=kc, kc_coarse=kc2)
        attempt('topk (Triton)', lambda: timeit(lambda: sk.topk_blocks(sc, TOPK), args.budget), V)
        V['topk resources'] = res(['topk'])
        attempt('topk (torch.topk + sort)', lambda: timeit(
            lambda: torch.topk(sc, TOPK, dim=-1, sorted=False).indices.sort(-1), args.budget), V)
        V['topk identical to select_blocks (first 4096 rows)'] = bool(torch.equal(
            sk.topk_blocks(sc[:, :2048], TOPK), iv.select_blocks(sc[:, :2048], TOPK)))
        del sc, kc, kc2
    for c in args.bwd_variants:
        sk.COMPILED.clear()
        nm = f'bwd {c}'

        def run(c=c):
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            o = sk.sparse_attention(qg, kg, vg, idx, M, config=c)
            return timeit(lambda: torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True), args.budget)
        attempt(nm, run, V)
        consider('bwd', nm, c)
        V[nm + ' resources'] = res(['dq', 'dkdv'])
    cfg = {}
    if 'fwd' in best: cfg.update(best['fwd'][1])
    if 's1' in best: cfg['s1'] = best['s1'][1]
    if 'bwd' in best: cfg.update(best['bwd'][1])
    RES['config'] = cfg
    print('chosen config', cfg, flush=True)
    save()
    del q, k, v, do, idx
    torch.cuda.empty_cache()


def table():
    rows = []
    for N, R in RES['lengths'].items():
        def g(k):
            x = R.get(k)
            return x if isinstance(x, float) else float('nan')
        dense_f = min(g('dense_flash_fwd_ms'), g('dense_cudnn_fwd_ms'))
        dense_b = min(g('dense_flash_bwd_ms'), g('dense_cudnn_bwd_ms'))
        Fl = R['flops']
        rows.append(dict(
            N=int(N), dense_fwd_ms=dense_f, dense_bwd_ms=dense_b, flex_fwd_ms=g('flex_fwd_ms'),
            sparse_fwd_ms=g('sparse_fwd_ms'), sparse_bwd_ms=g('sparse_bwd_ms'),
            stage1_exact_ms=g('stage1_exact_ms'), stage1_approx_ms=g('stage1_approx_ms'), topk_ms=g('topk_ms'),
            prefill_exact_ms=g('prefill_exact_ms'), prefill_approx_ms=g('prefill_approx_ms'),
            prefill_x_exact=dense_f / g('prefill_exact_ms'), prefill_x_approx=dense_f / g('prefill_approx_ms'),
            fwd_vs_flex=g('flex_fwd_ms') / g('sparse_fwd_ms'), fwd_x_dense=dense_f / g('sparse_fwd_ms'),
            bwd_x_dense=dense_b / g('sparse_bwd_ms'),
            decode_dense_us=g('decode_dense_graph_us'), decode_sparse_us=g('decode_sparse_graph_us'),
            decode_x=g('decode_dense_graph_us') / g('decode_sparse_graph_us'),
            decode_select_us=g('decode_select_graph_us'),
            decode_step_us=g('decode_step_graph_us'), decode_step_eager_us=g('decode_step_eager_us'),
            decode_dense_eager_us=g('decode_dense_eager_us'),
            decode_step_x_graph=g('decode_dense_graph_us') / g('decode_step_graph_us'),
            decode_step_x_eager=g('decode_dense_eager_us') / g('decode_step_eager_us'),
            # the step against each dense baseline users get (SDPA flash; our split-K dense_decode), graph and eager
            decode_flash_graph_us=g('decode_dense_flash_graph_us'), decode_densedec_graph_us=g('decode_dense_ours_graph_us'),
            decode_flash_eager_us=g('decode_dense_flash_attention_eager_us'),
            decode_densedec_eager_us=g('decode_dense_ours_eager_us'),
            decode_step_x_flash_graph=g('decode_dense_flash_graph_us') / g('decode_step_graph_us'),
            decode_step_x_densedec_graph=g('decode_dense_ours_graph_us') / g('decode_step_graph_us'),
            decode_step_x_flash_eager=g('decode_dense_flash_attention_eager_us') / g('decode_step_eager_us'),
            decode_step_x_densedec_eager=g('decode_dense_ours_eager_us') / g('decode_step_eager_us'),
            TFLOPs_dense_fwd=Fl['dense_fwd'] / dense_f / 1e9, TFLOPs_sparse_fwd=Fl['sparse_fwd'] / g('sparse_fwd_ms') / 1e9,
            TFLOPs_dense_bwd=Fl['dense_bwd'] / dense_b / 1e9, TFLOPs_sparse_bwd=Fl['sparse_bwd'] / g('sparse_bwd_ms') / 1e9,
            TFLOPs_flex_fwd=Fl['sparse_fwd'] / g('flex_fwd_ms') / 1e9,
            TFLOPs_stage1_exact=2 * Fl['stage1_pass'] / g('stage1_exact_ms') / 1e9,
            own_lists_fwd_ms=g('sparse_fwd_own_lists_ms'), own_lists_prefill_ms=g('prefill_approx_own_lists_ms'),
            own_lists_bwd_ms=g('sparse_bwd_own_lists_ms'),
            own_lists_prefill_x=dense_f / g('prefill_approx_own_lists_ms'),
            own_lists_bwd_x=dense_b / g('sparse_bwd_own_lists_ms'),
            own_lists_fwd_vs_flex=g('flex_fwd_ms') / g('sparse_fwd_own_lists_ms')))
    RES['table'] = rows
    save()
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    Ns = [r['N'] // 1024 for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    for key, lab in (('dense_fwd_ms', 'dense SDPA fwd'), ('flex_fwd_ms', 'FlexAttention fwd (same blocks)'),
                     ('sparse_fwd_ms', 'ours: sparse fwd'), ('prefill_approx_ms', 'ours: stage1+topk+fwd (LSE approx)'),
                     ('prefill_exact_ms', 'ours: stage1+topk+fwd (exact)')):
        ax[0].plot(Ns, [r[key] for r in rows], 'o-', label=lab)
    ax[0].set(xlabel='context (K tokens)', ylabel='ms', title='prefill forward', yscale='log')
    ax[0].legend(fontsize=7)
    for key, lab in (('dense_bwd_ms', 'dense SDPA bwd'), ('sparse_bwd_ms', 'ours: sparse bwd')):
        ax[1].plot(Ns, [r[key] for r in rows], 'o-', label=lab)
    ax[1].set(xlabel='context (K tokens)', ylabel='ms', title='backward', yscale='log')
    ax[1].legend(fontsize=7)
    for key, lab in (('decode_dense_us', 'dense GQA decode'), ('decode_sparse_us', 'ours: sparse decode'),
                     ('decode_select_us', 'ours: incremental stage 1 + topk')):
        ax[2].plot(Ns, [r[key] for r in rows], 'o-', label=lab)
    ax[2].set(xlabel='cache (K tokens)', ylabel='us per step (CUDA graph)', title='decoding attention', yscale='log')
    ax[2].legend(fontsize=7)
    fig.suptitle(f"InfLLM v2 kernels, {RES['device']}, B=1 H=32 Hkv=2 D=128 bf16, 96 blocks of 64")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(folder):
    "issue12_summary.png from folder's bench_sparse_attention.json (table) and per_token_model.json (model level)."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    m = json.load(open(os.path.join(folder, 'bench_sparse_attention.json')))
    pm = json.load(open(os.path.join(folder, 'per_token_model.json')))
    rows = m['table']
    Ns = [r['N'] // 1024 for r in rows]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
    for key, lab in (('dense_fwd_ms', 'dense SDPA fwd'), ('flex_fwd_ms', 'FlexAttention (block-shared lists)'),
                     ('sparse_fwd_ms', 'ours fwd, block-shared lists'), ('own_lists_fwd_ms', 'ours fwd, per-token lists'),
                     ('own_lists_prefill_ms', 'ours stage1+topk+fwd, per-token')):
        ax[0].plot(Ns, [r[key] for r in rows], 'o-', label=lab)
    ax[0].set(xlabel='context (K tokens)', ylabel='ms', title='prefill forward', yscale='log')
    for key, lab in (('dense_bwd_ms', 'dense SDPA bwd'), ('sparse_bwd_ms', 'ours bwd, block-shared'),
                     ('own_lists_bwd_ms', 'ours bwd, per-token')):
        ax[1].plot(Ns, [r[key] for r in rows], 'o-', label=lab)
    ax[1].set(xlabel='context (K tokens)', ylabel='ms', title='backward', yscale='log')
    for key, lab in (('decode_dense_us', 'dense decode (graph)'), ('decode_step_us', 'sparse step (graph)'),
                     ('decode_dense_eager_us', 'dense decode (eager)'), ('decode_step_eager_us', 'sparse step (eager)')):
        ax[2].plot(Ns, [r[key] for r in rows], 'o-', label=lab)
    ax[2].set(xlabel='cache (K tokens)', ylabel='us per step', title='decode step: selection + attention', yscale='log')
    names, vals = [], []
    for k_, v_ in pm.get('model', {}).items():
        if isinstance(v_.get('x'), float): names.append(f"{k_}\n({v_['layers']} layers)"); vals.append(v_['x'])
    ax[3].bar(range(len(vals)), vals, color=['tab:blue' if v >= 1 else 'tab:red' for v in vals])
    ax[3].axhline(1.0, color='k', lw=0.8)
    ax[3].set_xticks(range(len(vals)), names, fontsize=8)
    ax[3].set(ylabel='dense time / sparse time', title='8B-shape model, random weights')
    for a in ax[:3]: a.legend(fontsize=7)
    fig.suptitle(f"InfLLM v2, issue 12, {m['device']}: B=1 H=32 Hkv=2 D=128 bf16, 64 top-k + 32 window blocks of 64")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, 'issue12_summary.png'), dpi=100)


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument('--lengths', type=int, nargs='+', default=[32768, 65536, 131072])
    ap.add_argument('--out', default=None, help='folder (default: kernels/results/infllmv2/<device>-<date>/)')
    ap.add_argument('--budget', type=float, default=1500.0, help='ms of repeated timing per measurement')
    ap.add_argument('--variants', type=int, default=131072, help='length for the launch-setting variants (0: none)')
    ap.add_argument('--smoke', action='store_true')
    ap.add_argument('--sections', nargs='+', default=['dense', 'sparse', 'stage1', 'flex', 'decode'])
    ap.add_argument('--per-token', type=int, nargs='*', default=[], help='lengths for the per-token tile sweep')
    ap.add_argument('--tiles', type=int, nargs='+', default=[1, 2, 4, 8])
    ap.add_argument('--bwd-tiles', type=int, nargs='*', default=[8])
    ap.add_argument('--model-prefill', nargs='*', default=[], help='L:layers pairs, e.g. 32768:32 131072:8')
    ap.add_argument('--model-decode', type=int, nargs='*', default=[], help='prefill lengths that also decode')
    ap.add_argument('--decode-steps', type=int, default=16)
    ap.add_argument('--check-only', action='store_true', help='only the per-token / model parts (no main table)')
    ap.add_argument('--summary', default=None, help='only draw issue12_summary.png from the JSONs in this folder')
    ap.add_argument('--persistent', action='store_true', help="decode: sweep the one-launch step's rows (dec.PERSISTENT)")
    ap.add_argument('--dec-sweep', default='cand', choices=['cand', 'old', 'none'],
                    help="decode variants: 'cand' ('par' vs 'cand' + the opt-ins and settings), 'old' (the 'par' "
                         "settings), 'none' (the default step and the baselines only)")
    ap.add_argument('--band', type=int, nargs='*', default=[], help='lengths for the window-as-band variant rows')
    ap.add_argument('--band-tiles', type=int, nargs='+', default=[1, 2], help='tile_tokens of its selected part')
    ap.add_argument('--band-tokens', type=int, nargs='+', default=[8, 16], help='positions per band tile')
    ap.add_argument('--band-sources', nargs='+', default=['random', 'smooth'], choices=['random', 'smooth'])
    args = ap.parse_args()
    if args.summary: return summary(args.summary)
    args.model_prefill = [tuple(int(x) for x in p.split(':')) for p in args.model_prefill]
    if args.smoke:   # a quick dry run of the script itself (CPU interpreter): tiny heads
        global H, HKV, D, G, LOCAL, K, TOPK
        H, HKV, D, LOCAL, TOPK = 4, 2, 32, 2, 4
        K, G = TOPK + LOCAL, H // HKV
        GEO.update(local_blocks=LOCAL)
    f = lambda tt, w, st, pr: dict(tile_tokens=tt, fwd=dict(num_warps=w, num_stages=st, PAIR=pr))  # noqa: E731
    args.fwd_variants = [f(8, 8, 2, 2), f(8, 8, 2, 1), f(4, 4, 2, 1), f(4, 4, 3, 1), f(4, 4, 2, 2), f(4, 8, 2, 2)]
    args.s1_variants = [dict(num_warps=8, num_stages=2, NBC=32, KT=128), dict(num_warps=4, num_stages=2, NBC=16, KT=64),
                        dict(num_warps=4, num_stages=2, NBC=32, KT=128), dict(num_warps=4, num_stages=2, NBC=32, KT=128,
                                                                               BM=4)]
    b = lambda tt, dq, dkdv, ch=256: dict(bwd_tile_tokens=tt, dq=dq, dkdv=dkdv, chunk=ch)  # noqa: E731
    args.bwd_variants = [b(8, dict(num_warps=8, num_stages=2, PAIR=1), dict(num_warps=8, num_stages=2)),
                         b(4, dict(num_warps=4, num_stages=2, PAIR=1), dict(num_warps=8, num_stages=2)),
                         b(4, dict(num_warps=4, num_stages=3, PAIR=1), dict(num_warps=4, num_stages=2)),
                         b(8, dict(num_warps=8, num_stages=2, PAIR=1), dict(num_warps=8, num_stages=2), 128)]
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    OUT = str(args.out or run_dir('infllmv2', dev))
    os.makedirs(OUT, exist_ok=True)
    RES.update(env_stamp(dev),
               shapes=dict(B=1, H=H, Hkv=HKV, D=D, block=M, topk=TOPK, blocks_per_query=K, init_blocks=INIT,
                           local_blocks=LOCAL, selection=GEO['selection'],
                           kernel_size=32, kernel_stride=16, dtype='bfloat16', lengths=args.lengths,
                           lists='one random choice per 64-token query block and kv head'),
               started=time.strftime('%Y-%m-%d %H:%M:%S'), lengths={}, default_config=sk.DEFAULT_CONFIG)
    if dev.type == 'cuda':
        attempt('ceilings', lambda: ceilings(dev), RES)
    if args.variants:
        variants(args.variants, dev, args)
    if args.model_prefill:
        model_level(dev, args)
    for N in args.per_token:
        per_token(N, dev, args)
    if args.band:
        attempt('band_check_ok', lambda: band_check(dev, args) or RES['band']['check']['all_ok'], RES)
    for N in args.band:
        band(N, dev, args)
    if args.check_only:
        RES['finished'] = time.strftime('%Y-%m-%d %H:%M:%S'); save()
        print(json.dumps({k: RES.get(k) for k in ('per_token', 'model', 'band')}, indent=0, default=str)); return
    for N in args.lengths:
        bench_length(N, dev, args)
    rows = table()
    try:
        plot(rows, os.path.join(OUT, 'bench_sparse_attention.png'))
    except Exception as ex:
        print('plot failed', ex)
    RES['finished'] = time.strftime('%Y-%m-%d %H:%M:%S')
    save()
    print(f"\n{RES['device']}  torch {RES['torch']}  triton {RES['triton']}  ceilings {RES.get('ceilings')}")
    print(f"{'N':>7} {'dense f':>8} {'flex f':>8} {'ours f':>8} {'s1 ex':>7} {'s1 apx':>7} {'topk':>6} "
          f"{'pre ex':>8} {'pre apx':>8} {'x ex':>5} {'x apx':>5} {'x flex':>6} {'dense b':>8} {'ours b':>8} "
          f"{'x bwd':>5} {'dec d us':>8} {'dec s us':>8} {'x dec':>5} {'sel us':>7}")
    for r in rows:
        print(f"{r['N']:>7} {r['dense_fwd_ms']:8.2f} {r['flex_fwd_ms']:8.2f} {r['sparse_fwd_ms']:8.2f} "
              f"{r['stage1_exact_ms']:7.2f} {r['stage1_approx_ms']:7.2f} {r['topk_ms']:6.2f} {r['prefill_exact_ms']:8.2f} "
              f"{r['prefill_approx_ms']:8.2f} {r['prefill_x_exact']:5.2f} {r['prefill_x_approx']:5.2f} "
              f"{r['fwd_vs_flex']:6.2f} {r['dense_bwd_ms']:8.2f} {r['sparse_bwd_ms']:8.2f} {r['bwd_x_dense']:5.2f} "
              f"{r['decode_dense_us']:8.1f} {r['decode_sparse_us']:8.1f} {r['decode_x']:5.2f} "
              f"{r['decode_select_us']:7.1f}")
    print('decode step (selection + attention) vs dense, us per step: graph [step, cuDNN, flash, dense_decode] | '
          'eager [step, cuDNN, flash, dense_decode]')
    for r in rows:
        print(f"{r['N']:>7} graph {r['decode_step_us']:7.1f} {r['decode_dense_us']:7.1f} {r['decode_flash_graph_us']:7.1f} "
              f"{r['decode_densedec_graph_us']:7.1f} | eager {r['decode_step_eager_us']:7.1f} "
              f"{r['decode_dense_eager_us']:7.1f} {r['decode_flash_eager_us']:7.1f} {r['decode_densedec_eager_us']:7.1f}")
    def rd(x): return None if x != x else round(x)
    print('TFLOP/s (dense f, sparse f, flex f, dense b, sparse b, stage1 exact):',
          [(r['N'], rd(r['TFLOPs_dense_fwd']), rd(r['TFLOPs_sparse_fwd']), rd(r['TFLOPs_flex_fwd']),
            rd(r['TFLOPs_dense_bwd']), rd(r['TFLOPs_sparse_bwd']), rd(r['TFLOPs_stage1_exact'])) for r in rows])
    print('own-lists (stage-1 selection of random data):', [(r['N'], r['own_lists_fwd_ms'], r['own_lists_prefill_ms'])
                                                             for r in rows])


if __name__ == '__main__':
    main()
