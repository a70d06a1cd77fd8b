#!/usr/bin/env python
"""Which SDPA kernel does dense *decoding* run, and how long does it take? (issues 12 and 13: the suspect baseline)

8B attention shapes (32 query heads, 2 kv heads, head_dim 128, bf16, batch 1). Two call sites of the package:
- the model's `dense_attention` for one new token against the KV cache view `LayerCache.k[:, :N]`
  (q (1, 1, 32, 128), k/v (1, N, 2, 128) strided views, enable_gqa, no mask);
- the static decoding stack's `layer_step` SDPA: q (1, Hkv, G*T, D) against a span of the (L, 2*Hkv, D) buffer with
  an additive mask (1, 1, G*T, S).
For each: the default call's time (CUDA events, fixed N, and N growing by one per call like real decoding), each
SDPA backend forced (time or its refusal), the profiler's kernel names; and a split-K Triton alternative that reads
the length from the device (`kernels.sparse_decode` with every block listed), graph-friendly at a static length,
and `kernels.dense_decode` (the same kernel with DENSE=True: no list, the split sized on the device), eager and in
a CUDA graph, also captured over an allocation 8x the live length.

    python kernels/profile_dense_decode.py --out DIR [--lengths 1024 4096 16384 131072]

--live (session 7, issue 13: dense_decode's splits share the LIVE length; `DEFAULT_CONFIG['dense']['LIVE']`):
dense_decode alone in a CUDA graph at each length with Nmax = --nmax (128K + 64) and Nmax = L + 64, the new path
(LIVE: splits past L exit, the one-pass combine reads only the splits holding keys) vs the old one (LIVE=False:
every split stores, the two-pass combine reads all), MIN_BLOCKS 2 / 4 at the long buffer, the kernels' GPU times,
each output vs a float32 torch definition; then (--engine-layers > 0) the 8B static decode step (StaticDecoder in a
CUDA graph, the engine's decode) at --engine-ctx keys with a --nmax-slot buffer and a ctx + 64 one, LIVE vs old.

    python kernels/profile_dense_decode.py --live --out DIR [--lengths ...] [--engine-layers 32] [--budget 80]
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from minicpm4_core.attention import AttentionInputs, dense_attention
from minicpm4_core.bench import event_time
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import LayerCache
from minicpm4_core import kernels as sk

H, HKV, D = 32, 2, 128
G = H // HKV
BACKENDS = dict(flash=SDPBackend.FLASH_ATTENTION, efficient=SDPBackend.EFFICIENT_ATTENTION,
                cudnn=SDPBackend.CUDNN_ATTENTION, math=SDPBackend.MATH)


def t_us(fn, reps=50):
    return 1e3 * event_time(fn, budget_ms=400.0, min_reps=5, max_reps=reps, warmup=2)


def kernels_of(fn):
    "Names and total CUDA us of the kernels one call launches (profiler)."
    from torch.profiler import ProfilerActivity, profile
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == 'CUDA' or getattr(e, 'device_time_total', 0) > 0:
            out[e.key[:90]] = round(getattr(e, 'device_time_total', getattr(e, 'cuda_time_total', 0)), 1)
    return out


def attempt(store, name, fn):
    try:
        store[name] = fn()
    except Exception as ex:
        store[name] = f'ERROR {type(ex).__name__}: {str(ex)[:200]}'
    print(f'  {name}: {store[name]}', flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--lengths', type=int, nargs='+', default=[1024, 4096, 16384, 131072])
    ap.add_argument('--out', default='.')
    a = ap.parse_args()
    dev, dt = 'cuda', torch.bfloat16
    torch.manual_seed(0)
    cfg = MiniCPM4Config(hidden_size=4096, num_attention_heads=H, num_key_value_heads=HKV, num_hidden_layers=1,
                         intermediate_size=128, vocab_size=128)
    R = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows={})
    for N in a.lengths:
        r = R['rows'][N] = {}
        print(f'N={N}', flush=True)
        lc = LayerCache(1, N + 64, HKV, D, dev, dt)
        lc.k.normal_(); lc.v.normal_()
        q = torch.randn(1, 1, H, D, device=dev, dtype=dt)
        inp = lambda n=N: AttentionInputs(q=q, k=lc.k[:, :n], v=lc.v[:, :n], config=cfg)
        attempt(r, 'model_default_us', lambda: t_us(lambda: dense_attention(inp())))
        ns = iter(range(N - 40, N + 60))
        attempt(r, 'model_growing_us', lambda: t_us(lambda: dense_attention(inp(next(ns))), reps=30))
        for nm, be in BACKENDS.items():
            def forced(be=be):
                with sdpa_kernel([be]): return t_us(lambda: dense_attention(inp()))
            attempt(r, f'model_{nm}_us', forced)
        attempt(r, 'model_kernels', lambda: kernels_of(lambda: dense_attention(inp())))
        kc, vc = lc.k[:, :N].contiguous(), lc.v[:, :N].contiguous()
        attempt(r, 'contig_default_us', lambda: t_us(lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True)))
        kt, vt = kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
        attempt(r, 'headmajor_default_us', lambda: t_us(lambda: F.scaled_dot_product_attention(
            q.transpose(1, 2), kt, vt, enable_gqa=True)))
        # the static stack's call (T = 1): q (1, Hkv, G, D), additive mask over a span S = N of an (L, 2Hkv, D) buffer
        kv = torch.randn(N + 64, 2 * HKV, D, device=dev, dtype=dt)
        qs = torch.randn(1, HKV, G, D, device=dev, dtype=dt)
        mask = torch.zeros(1, 1, G, N, device=dev, dtype=dt)
        mask[..., N - 7:] = float('-inf')
        sv = kv[:N]
        st = lambda: F.scaled_dot_product_attention(qs, sv[:, :HKV].transpose(0, 1)[None], sv[:, HKV:].transpose(0, 1)[None],
                                                    attn_mask=mask)
        attempt(r, 'static_default_us', lambda: t_us(st))
        for nm, be in BACKENDS.items():
            def forced(be=be):
                with sdpa_kernel([be]): return t_us(st)
            attempt(r, f'static_{nm}_us', forced)
        attempt(r, 'static_kernels', lambda: kernels_of(st))
        # split-K Triton decode over every block, length on the device (graph-friendly at a static length)
        kb = kv[:, :HKV][None]; vb = kv[:, HKV:][None]
        nb = -(-(N + 64) // 64)
        idx = torch.arange(nb, device=dev, dtype=torch.int32).expand(1, HKV, nb).contiguous()
        seq = torch.tensor([N - 6], device=dev, dtype=torch.int32)
        q3 = q[:, 0]
        attempt(r, 'splitk_all_blocks_us', lambda: t_us(lambda: sk.sparse_decode(q3, kb, vb, idx, seq)))
        # kernels.dense_decode: the split-K dense kernel (DENSE=True), on the same strided (L, 2Hkv, D) views; eager,
        # in a CUDA graph, and in a graph captured at an allocation 8x the live length (the static stack's case:
        # the grid comes from Nmax, programs past the length exit at once)
        attempt(r, 'dense_decode_eager_us', lambda: t_us(lambda: sk.dense_decode(q3, kb, vb, seq)))
        from minicpm4_core.bench import cuda_graph_time
        attempt(r, 'dense_decode_graph_us', lambda: 1e3 * cuda_graph_time([lambda: sk.dense_decode(q3, kb, vb, seq)],
                                                                           reps=20))
        attempt(r, 'dense_decode_kernels', lambda: kernels_of(lambda: sk.dense_decode(q3, kb, vb, seq)))
        if N * 8 * 2 * HKV * D * 2 < 8e9:
            kv8 = torch.randn(8 * N, 2 * HKV, D, device=dev, dtype=dt)
            kv8[:N] = kv[:N]
            k8, v8 = kv8[:, :HKV][None], kv8[:, HKV:][None]
            attempt(r, 'dense_decode_nmax8x_graph_us', lambda: 1e3 * cuda_graph_time(
                [lambda: sk.dense_decode(q3, k8, v8, seq)], reps=20))
            attempt(r, 'dense_decode_nmax8x_rel', lambda: float((sk.dense_decode(q3, k8, v8, seq).float() -
                                                                 sk.dense_decode(q3, kb, vb, seq).float()).norm() /
                                                                sk.dense_decode(q3, kb, vb, seq).float().norm()))
            del kv8, k8, v8
        attempt(r, 'bytes_kv_MB', lambda: round(2 * N * HKV * D * 2 / 1e6, 2))
        del lc, kv, kc, vc, kt, vt
        torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, 'profile_dense_decode.json'), 'w') as f: json.dump(R, f, indent=1, default=str)


def _split_cfg(live, minb=1):
    "Point the dense_decode default at the new (LIVE) or the old path; plans are rebuilt (they hold the config)."
    sk.DEFAULT_CONFIG['dense'].update(LIVE=live, MIN_BLOCKS=minb)
    sk._DEC_PLANS.clear()


def _definition(q3, kb, vb, L):
    "float32 softmax attention of q3 (1, H, D) over the first L keys (GQA by repetition) -> (1, H, D) float."
    k = kb[0, :L].float().repeat_interleave(G, 1)
    v = vb[0, :L].float().repeat_interleave(G, 1)
    p = torch.einsum('hd,nhd->hn', q3[0].float(), k).mul(D ** -0.5).softmax(-1)
    return torch.einsum('hn,nhd->hd', p, v)[None]


def live_main(a):
    """dense_decode LIVE vs the old path (graph us), two buffer sizes per length; the 8B static step at one context."""
    import time
    from minicpm4_core.bench import cuda_graph_time, kernel_times
    from minicpm4_core.io import atomic_write_json
    dev, dt = 'cuda', torch.bfloat16
    t0 = time.time()
    left = lambda: a.budget - (time.time() - t0)
    R = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, nmax=a.nmax, rows={}, engine={},
             notes='graph us of one dense_decode call (8B attention shape, B 1, bf16); old = LIVE=False')
    out = os.path.join(a.out, 'dense_live.json')
    save = lambda: atomic_write_json(out, json.loads(json.dumps(R, default=str)), indent=1)
    torch.manual_seed(0)
    big = torch.randn(a.nmax, 2 * HKV, D, device=dev, dtype=dt)       # the static stack's (L, 2 Hkv, D) layout
    q3 = torch.randn(1, H, D, device=dev, dtype=dt)
    for L in a.lengths:
        if left() < 0: R['rows'][L] = 'skipped (budget)'; break
        r = R['rows'][L] = {}
        seq = torch.tensor([L], device=dev, dtype=torch.int32)
        small = big[:L + 64].clone()
        ref = _definition(q3, big[None, :, :HKV], big[None, :, HKV:], L)
        for bname, buf in (('nmax', big), ('fit', small)):
            kb, vb = buf[None, :, :HKV], buf[None, :, HKV:]
            cases = [('live', True, 1), ('old', False, 1)] + ([('live_minb2', True, 2), ('live_minb4', True, 4)]
                                                               if bname == 'nmax' else [])
            for name, live, minb in cases:
                _split_cfg(live, minb)
                fn = lambda: sk.dense_decode(q3, kb, vb, seq)
                attempt(r, f'{bname}_{name}_rel', lambda: float((fn().float() - ref).norm() / ref.norm()))
                attempt(r, f'{bname}_{name}_graph_us', lambda: 1e3 * cuda_graph_time([fn], inner=20, reps=20))
                if L == 4096 and bname == 'nmax' and minb == 1:
                    attempt(r, f'{bname}_{name}_kernels', lambda: {k: v['us'] for k, v in
                                                                  kernel_times([fn], n=5, ndigits=2).items()})
        P = sk._DenseDecPlan(q3, HKV, None)
        r['nsplit_nmax'], r['nsplit_fit'] = P.nsplit_for(a.nmax, q3.device), P.nsplit_for(L + 64, q3.device)
        del small
        save()
    _split_cfg(True, 1)
    del big
    torch.cuda.empty_cache()
    if a.engine_layers and left() > 0:
        attempt(R, 'engine', lambda: engine_step(a, R, left, save))
    R['seconds'] = round(time.time() - t0, 1)
    save()
    print('\n== dense_decode in a graph (us), 8B attention shape; nmax = %d slots, fit = L + 64' % a.nmax)
    print(f'{"L":>7} {"nsplit":>11} {"nmax live":>10} {"nmax old":>9} {"fit live":>9} {"fit old":>8} '
          f'{"minb2":>7} {"minb4":>7} {"max rel":>8}')
    for L, r in R['rows'].items():
        if not isinstance(r, dict): continue
        g = lambda k: r.get(k) if isinstance(r.get(k), float) else float('nan')
        rels = [v for k, v in r.items() if k.endswith('_rel') and isinstance(v, float)]
        print(f'{L:>7} {r.get("nsplit_nmax")!s:>5}/{r.get("nsplit_fit")!s:>5} {g("nmax_live_graph_us"):10.2f} '
              f'{g("nmax_old_graph_us"):9.2f} {g("fit_live_graph_us"):9.2f} {g("fit_old_graph_us"):8.2f} '
              f'{g("nmax_live_minb2_graph_us"):7.2f} {g("nmax_live_minb4_graph_us"):7.2f} {max(rels or [float("nan")]):8.1e}')
    e = R.get('engine')
    if isinstance(e, dict) and e:
        print(f'== 8B static decode step ({e.get("layers")} layers) at {a.engine_ctx} keys, graph ms: ' +
              ', '.join(f'{k} {v:.3f}' for k, v in e.items() if isinstance(v, float)))


@torch.no_grad()
def engine_step(a, R, left, save):
    """The engine's decode step (StaticDecoder, one CUDA graph over all slots, dense_decode reading the length) of the
    8B shape with random weights at a.engine_ctx keys (random K/V written into the buffer), buffer a.nmax vs ctx + 64."""
    from dataclasses import replace
    from minicpm4_core.edge_bench import build_model, preset
    from minicpm4_core.static_decode import StaticDecoder
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    c = replace(preset(a.engine_shape, a.nmax + 64, 'bfloat16'), num_hidden_layers=a.engine_layers, sparse_config=None)
    m = build_model(c, dev, torch.bfloat16)
    e = R['engine']
    e['layers'], e['context'] = a.engine_layers, a.engine_ctx
    for bname, slots in (('nmax', a.nmax), ('fit', a.engine_ctx + 64)):
        if left() < 0: e[bname] = 'skipped (budget)'; break
        d = StaticDecoder(m, slots, graphs=dev == 'cuda', dense=True)
        for kv in d.stack.kv: kv[:a.engine_ctx].normal_()
        d.pos.fill_(a.engine_ctx); d.n = a.engine_ctx
        for name, live in (('live', True), ('old', False)):
            _split_cfg(live, 1)
            attempt(e, f'{bname}_{name}_step_ms', lambda: d.time_step(20, 8))
        e[f'{bname}_roofline_tok_s_note'] = 'tok/s = 1000 / step ms (the graph step alone, no host loop)'
        del d
        if dev == 'cuda': torch.cuda.empty_cache()
        save()
    _split_cfg(True, 1)
    return e


if __name__ == '__main__':
    import sys
    if '--live' in sys.argv:
        ap = argparse.ArgumentParser()
        ap.add_argument('--live', action='store_true')
        ap.add_argument('--lengths', type=int, nargs='+', default=[1024, 4096, 16384, 131072])
        ap.add_argument('--nmax', type=int, default=131072 + 64)
        ap.add_argument('--engine-layers', type=int, default=32)
        ap.add_argument('--engine-ctx', type=int, default=4096)
        ap.add_argument('--engine-shape', default='minicpm4_8b')
        ap.add_argument('--budget', type=float, default=80.0)
        ap.add_argument('--out', default='.')
        a = ap.parse_args()
        os.makedirs(a.out, exist_ok=True)
        live_main(a)
    else:
        main()
