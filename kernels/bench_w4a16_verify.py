"""W4A16 at the row counts of an FR-Spec tree verify (17-64 rows): which kernel path serves them, timed in one run.

Each linear of a decoder layer (fused q|k|v, o, fused gate|up, down) of the 0.5B and 8B shapes, at M = 17 / 33 / 49
rows, in a CUDA graph: bf16 `F.linear` (the baseline, same run), w4a16 with the default dispatch (`SKINNY_MAX_M` = 16:
the prefill tiling 64 x 128, no split), with `SKINNY_MAX_M` = 64 (one 32/64-row M tile + split-K), and dequantize +
cuBLAS. Every output is checked against the float32 reference first. Per-layer sums say which setting the engine's
verify should take (session 7 measured the int4 target's whole verify forward at 17-49 rows at 3.32 ms vs bf16 1.29).

    PYTHONPATH=. python kernels/bench_w4a16_verify.py --out DIR [--budget 45]      (GPU)
    TRITON_INTERPRET=1 PYTHONPATH=. python kernels/bench_w4a16_verify.py --cpu-smoke --out /tmp/x   (tiny, CPU)
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import minicpm4_core.kernels.w4a16 as w4
from minicpm4_core.bench import cuda_graph_time, env_stamp, event_time
from minicpm4_core.io import atomic_write_json

G = 128
SHAPES = {  # (K, N) per linear of one layer, the fused packed modules of `static_decode.prep_layer`
    '0.5B': {'qkv': (1024, 1280), 'o': (1024, 1024), 'gate_up': (1024, 8192), 'down': (4096, 1024)},
    '8B': {'qkv': (4096, 4608), 'o': (4096, 4096), 'gate_up': (4096, 32768), 'down': (16384, 4096)},
}
SMOKE = {'tiny': {'qkv': (256, 192), 'down': (512, 128)}}


def variants(M, N, K):
    "name -> config (None = the dispatch under that SKINNY_MAX_M), each resolved now so the table says what ran."
    out = {}
    for name, smax in (('default', w4.SKINNY_MAX_M), ('skinny64', 64)):
        saved = w4.SKINNY_MAX_M
        w4.SKINNY_MAX_M = smax
        w4.default_config.cache_clear()
        try:
            out[name] = w4.default_config(M, N, K, G)
        finally:
            w4.SKINNY_MAX_M = saved
            w4.default_config.cache_clear()
    out['dequant'] = w4.W4A16Config('dequant', 1, 64, 64, 1, 4, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=os.environ.get('OUT', '.'))
    ap.add_argument('--budget', type=float, default=45.0, help='seconds; rows are skipped once it is spent')
    ap.add_argument('--ms', default='17,33,49')
    ap.add_argument('--cpu-smoke', action='store_true', help='tiny shapes on the CPU (run under TRITON_INTERPRET=1)')
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev, dt = ('cuda', torch.bfloat16) if cuda else ('cpu', torch.float32)
    t0, rows = time.time(), []
    os.makedirs(a.out, exist_ok=True)
    res = dict(env=env_stamp(), skinny_max_m_default=w4.SKINNY_MAX_M, rows=rows)
    timer = (lambda fns: cuda_graph_time(fns, reps=20)) if cuda else (lambda fns: event_time(fns[0], max_reps=3))
    for model, shapes in (SMOKE if a.cpu_smoke else SHAPES).items():
        for M in [int(m) for m in a.ms.split(',')]:
            for lin, (K, N) in shapes.items():
                if time.time() - t0 > a.budget:
                    print(f"budget spent: skipping {model} M={M} {lin}"); continue
                qw, s, qz = w4.random_w4(K, N, G, dev, seed=M + K + N)
                x = torch.randn(M, K, device=dev, generator=torch.Generator(dev).manual_seed(M)).to(dt)
                ref = x.float() @ w4.dequantize_w4(qw, s, qz, G, torch.float32)
                Wt = w4.dequantize_w4(qw, s, qz, G, dt).t().contiguous()           # the bf16 layer (nn.Linear layout)
                row = dict(model=model, M=M, linear=lin, K=K, N=N, bf16_ms=timer([lambda: F.linear(x, Wt)]))
                for name, cfg in variants(M, N, K).items():
                    y = w4.w4a16_matmul(x, qw, s, qz, G, config=cfg)
                    err = float((y.float() - ref).abs().max() / ref.abs().max())
                    row[f'{name}_cfg'] = [cfg.kernel, cfg.block_m, cfg.block_n, cfg.block_k, cfg.split_k]
                    row[f'{name}_err'] = err
                    row[f'{name}_ms'] = timer([lambda: w4.w4a16_matmul(x, qw, s, qz, G, config=cfg)]) \
                        if err < (2e-2 if cuda else 1e-4) else None
                rows.append(row)
                print(f"{model:4s} M={M:2d} {lin:7s} {K}x{N}: bf16 {row['bf16_ms'] * 1e3:7.1f} us | " + ' | '.join(
                    f"{n} {row[n + '_ms'] * 1e3:7.1f}" if row[n + '_ms'] is not None else f"{n} WRONG {row[n + '_err']:.1e}"
                    for n in ('default', 'skinny64', 'dequant')), flush=True)
                atomic_write_json(os.path.join(a.out, 'w4a16_verify.json'), res)
    for model in {r['model'] for r in rows}:
        for M in sorted({r['M'] for r in rows if r['model'] == model}):
            rs = [r for r in rows if r['model'] == model and r['M'] == M]
            tot = {k: sum(r[k] or float('nan') for r in rs) * 1e3 for k in ('bf16_ms', 'default_ms', 'skinny64_ms', 'dequant_ms')}
            print(f"per layer {model} M={M} ({len(rs)} linears): " + ', '.join(f"{k[:-3]} {v:.1f} us" for k, v in tot.items()))
    atomic_write_json(os.path.join(a.out, 'w4a16_verify.json'), res)


if __name__ == '__main__':
    main()
