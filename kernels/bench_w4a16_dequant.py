"""W4A16 prefill (dequantize + cuBLAS) at the engine's chunk rows: the dequantizer's tile sweep, timed in one run.

The issue's goal: int4 prefill >= 0.9x bf16 cuBLAS. At M = 2048 rows of 4096 x 16384 the session-8 edge run measured
bf16 406 us vs dequant + cuBLAS 453 us (0.896): the dequantizer's ~47 us (32 MB read, 128 MB written: ~38 us at the
copy rate) is the whole gap. This sweeps its tile (block_k rows x block_n columns, warps), checks every config's
weight against the default's bit for bit, and times dequant alone and dequant + matmul beside bf16 `F.linear` in the
same run, for the 8B shape's four linears (q|k|v, o, gate|up, down) at M = 2048.

    PYTHONPATH=. python kernels/bench_w4a16_dequant.py --out DIR [--budget 40]          (GPU)
    TRITON_INTERPRET=1 PYTHONPATH=. python kernels/bench_w4a16_dequant.py --cpu-smoke --out /tmp/x   (tiny, CPU)
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

import torch
import torch.nn.functional as F

import minicpm4_core.kernels.w4a16 as w4
from minicpm4_core.bench import cuda_graph_time, env_stamp, event_time
from minicpm4_core.io import atomic_write_json

G = 128
SHAPES = {'headline': (4096, 16384), 'qkv': (4096, 4608), 'o': (4096, 4096), 'gate_up': (4096, 32768),
          'down': (16384, 4096)}                                        # (K, N), the 8B shape
SMOKE = {'tiny': (256, 256)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=os.environ.get('OUT', '.'))
    ap.add_argument('--budget', type=float, default=40.0, help='seconds; shapes are skipped once it is spent')
    ap.add_argument('--m', type=int, default=2048, help='rows (the engine prefill chunk)')
    ap.add_argument('--cpu-smoke', action='store_true', help='tiny shapes on the CPU (run under TRITON_INTERPRET=1)')
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev, dt = ('cuda', torch.bfloat16) if cuda else ('cpu', torch.float32)
    M = a.m if cuda else 16
    t0, rows = time.time(), []
    os.makedirs(a.out, exist_ok=True)
    res = dict(env=env_stamp(), M=M, default=str(w4.default_config(M, 16384, 4096, G)), rows=rows)
    timer = (lambda f: cuda_graph_time([f], reps=20)) if cuda else (lambda f: event_time(f, max_reps=2))
    tiles = list(itertools.product((32, 64, 128), (64, 128, 256), (2, 4, 8))) if cuda else [(32, 64, 4), (64, 128, 4)]
    for name, (K, N) in (SMOKE if a.cpu_smoke else SHAPES).items():
        if time.time() - t0 > a.budget: print(f"budget spent: skipping {name}"); continue
        qw, s, qz = w4.random_w4(K, N, G, dev, seed=K + N)
        x = torch.randn(M, K, device=dev, generator=torch.Generator(dev).manual_seed(1)).to(dt)
        ref_w = w4.w4a16_dequantize(qw, s, qz, G, dt)                     # the default dispatch's weight
        if not torch.equal(ref_w, w4.dequantize_w4(qw, s, qz, G, dt)):
            print(f"{name}: the default dequantizer differs from the torch reference")
        Wt = ref_w.t().contiguous()                                       # the bf16 layer (nn.Linear layout)
        row = dict(linear=name, K=K, N=N, M=M, bf16_ms=timer(lambda: F.linear(x, Wt)),
                   default_ms=timer(lambda: w4.w4a16_matmul(x, qw, s, qz, G)), tiles=[])
        for bk, bn, nw in tiles:
            cfg = w4.W4A16Config('dequant', 1, bn, bk, 1, nw, 1)
            try: W = w4._dequant_launch(qw, s, qz, G, dt, cfg)
            except Exception as e:                                        # a tile Triton cannot build here: say so
                row['tiles'].append(dict(block_k=bk, block_n=bn, warps=nw, error=repr(e)[:200])); continue
            same = bool(torch.equal(W, ref_w))
            t = dict(block_k=bk, block_n=bn, warps=nw, same=same)
            if same:
                t['dequant_ms'] = timer(lambda: w4._dequant_launch(qw, s, qz, G, dt, cfg))
                t['total_ms'] = timer(lambda: w4.w4a16_matmul(x, qw, s, qz, G, config=cfg))
            row['tiles'].append(t)
        ok = [t for t in row['tiles'] if t.get('same')]
        best = min(ok, key=lambda t: t['total_ms']) if ok else None
        row['best'] = best
        rows.append(row)
        print(f"{name:8s} {K}x{N} M={M}: bf16 {row['bf16_ms'] * 1e3:7.1f} us, default {row['default_ms'] * 1e3:7.1f} "
              f"({row['bf16_ms'] / row['default_ms']:.3f}x)" + (
                  f", best tile bk{best['block_k']} bn{best['block_n']} w{best['warps']}: dequant "
                  f"{best['dequant_ms'] * 1e3:.1f} us, total {best['total_ms'] * 1e3:.1f} "
                  f"({row['bf16_ms'] / best['total_ms']:.3f}x)" if best else '')
              + f"; {sum(not t.get('same', False) for t in row['tiles'])} tiles wrong or not built", flush=True)
        atomic_write_json(os.path.join(a.out, 'w4a16_dequant.json'), res)
    atomic_write_json(os.path.join(a.out, 'w4a16_dequant.json'), res)


if __name__ == '__main__':
    main()
