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


if __name__ == '__main__':
    main()
