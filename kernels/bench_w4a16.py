"""Benchmark the W4A16 Triton kernels against bf16 at the MiniCPM4-8B linear shapes, in one run.

Convention: ``y (M, N) = x (M, K) @ W (K, N)``, ``K = in_features``, ``N = out_features``. Shapes ``K x N`` (8B):
4096 x 4096 (q/o proj), 4096 x 256 (k/v proj), 4096 x 16384 (gate/up proj), 16384 x 4096 (down proj). The bf16 baselines are
``F.linear(x, W_nk)`` (the nn.Linear layout) and ``torch.matmul(x, W_kn)``, measured in the same run; the ratio is
taken against the faster of the two.

For every (shape, M) the script tunes a small set of kernel configs (each checked against a float32 reference
before it is timed), then re-times the best one and the baselines with more repetitions, twice, and writes
``w4a16.json`` + ``w4a16.png`` under ``--out``. The last thing printed is the result table.

    python kernels/bench_w4a16.py [--out DIR] [--budget 110] [--ms 1] [--prefill]   (DIR: kernels/results/w4a16/<device>-<date>/)

Each row: the best config and the default one, timed in a CUDA graph (what the engine's graphs see) and eagerly
(launch overhead in, L2 flushed), against bf16 timed the same two ways in the same run; `max_err` is
max|y - ref| / max|ref| against the float32 reference on the device. The last lines are the goal ratios.

Timers, stamp and copy bandwidth: `minicpm4_core.bench`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import asdict

import torch
import torch.nn.functional as F

from minicpm4_core.bench import cuda_graph_time, env_stamp, event_time, roofline_ceilings, run_dir
from minicpm4_core.io import atomic_write_json
from minicpm4_core.kernels.w4a16 import (W4A16Config, default_config, dequantize_w4, w4a16_bytes, w4a16_matmul)

SHAPES = [(4096, 16384), (16384, 4096), (4096, 4096), (4096, 256)]     # gate/up, down, q/o, k/v (8B)
PREFILL_M = 2048
G = 128
ROTATE_BYTES = 256 * 2**20      # each timed graph cycles through weight copies totalling >= this (H100 L2 is 50 MB)

GEMV = [W4A16Config('gemv', 1, bn, 128, sk, 4, 4) for bn in (64, 128) for sk in (2, 4, 8)] + \
       [W4A16Config('gemv', 1, 32, 128, 4, 4, 4), W4A16Config('gemv', 1, 64, 128, 4, 4, 3)]
GEMVTC = [W4A16Config('gemvtc', 1, bn, bk, sk, w, st)      # tensor-core GEMV, session 2026-12-04d
          for (bn, bk, w) in [(128, 128, 4), (256, 128, 8), (64, 128, 4)] for st in (4, 3) for sk in (4, 8, 2, 16, 1)] + \
         [W4A16Config('gemvtc', 1, 128, 64, sk, 4, 4) for sk in (4, 8, 16)]
GEMVS = [W4A16Config('gemvs', 1, bn, bk, sk, w, d)       # streaming CUDA-core GEMV (kernel 5), session 2026-12-04 s6
         for (bn, bk, w, d) in [(256, 32, 1, 2), (256, 8, 1, 3), (512, 32, 1, 2), (1024, 32, 4, 2), (1024, 16, 4, 3)]
         for sk in (32, 16, 64)]
GEMVU = [W4A16Config('gemvu', 1, bn, bk, 1, w, ch, 8, r)   # kernel 6: no loop, atomic split (session 2026-12-04 s7)
         for (bn, bk, w, ch, r) in [(1024, 32, 4, 2, 0), (1024, 32, 4, 2, 96), (1024, 32, 4, 1, 80), (512, 32, 2, 2, 0),
                                    (512, 32, 4, 2, 0), (1024, 32, 4, 1, 0), (512, 32, 2, 2, 96), (1024, 32, 4, 1, 64),
                                    (2048, 32, 8, 2, 0), (256, 32, 1, 2, 0)]]
GEMVTU = [W4A16Config('gemvtu', 1, bn, bk, 1, w, ch, 8, r)   # kernel 7: kernel 4's tile without the loop (s7)
          for (bn, bk, w, ch, r) in [(128, 128, 4, 2, 0), (128, 128, 4, 1, 0), (256, 128, 8, 2, 0), (64, 128, 4, 2, 0),
                                     (128, 64, 4, 2, 0), (256, 128, 8, 1, 0), (128, 128, 4, 2, 96)]]
GEMVS_BATCH = [W4A16Config('gemvs', 1, bn, bk, sk, w, d)   # kernel 5 at M = 2..4 (one accumulator per row)
               for (bn, bk, w, d) in [(1024, 16, 4, 2), (512, 16, 4, 2), (1024, 32, 4, 2), (512, 32, 4, 1)]
               for sk in (16, 8, 32)]
GEMV16 = [W4A16Config('gemv16', 1, bn, bk, sk, w, st)        # fp16-lane (Marlin-style) conversion, session 3
          for (bn, bk, w, st) in [(128, 128, 4, 2), (64, 128, 4, 2), (256, 64, 4, 2), (128, 64, 4, 3)]
          for sk in (1, 2, 4, 8)]
GEMM_SMALL = [W4A16Config('gemm', 16, bn, bk, sk, w, st)
              for (bn, bk, w, st) in [(64, 128, 4, 3), (32, 128, 4, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 4, 3)]
              for sk in (1, 2, 4, 8)]
GEMM_PREFILL = [W4A16Config('gemm', bm, bn, bk, 1, w, st)
                for (bm, bn, bk, w, st) in [(128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4)]]
DEQUANT = [W4A16Config('dequant', 1, bn, 64, 1, w, 1) for (bn, w) in [(64, 4), (128, 4), (128, 8)]]  # + cuBLAS


def bench(fn, rep):
    "Eager timing, ms (L2 flushed before each call; includes whatever launch overhead the GPU cannot hide)."
    return event_time(fn, budget_ms=rep, min_reps=10, max_reps=1000, warmup=5, flush=True)


def graph_time(calls, reps=10):
    """Kernel time in us per call: the calls (over rotating weight copies larger than L2) are captured in one CUDA
    graph, which is replayed `reps` times; median over replays. No launch overhead, no L2 reuse between calls."""
    return cuda_graph_time(calls, inner=max(64, len(calls)), reps=reps) * 1e3


def random_w4_cuda(K, N, seed):
    g = torch.Generator('cuda').manual_seed(seed)
    qw = torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int32, device='cuda', generator=g)  # any bits = 8 codes
    qz = torch.randint(-2**31, 2**31, (K // G, N // 8), dtype=torch.int32, device='cuda', generator=g)
    s = (torch.rand(K // G, N, device='cuda', generator=g) * 0.02 + 0.005).half()
    return qw, s, qz


def copy_bandwidth():
    "Device-to-device copy bandwidth, GB/s (bytes read + written)."
    return roofline_ceilings('cuda', copy_bytes=1 << 30, matmul_n=1024, budget_ms=50)['copy_GBps']


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=os.environ.get('OUT'), help='folder (default: kernels/results/w4a16/<device>-<date>/)')
    ap.add_argument('--budget', type=float, default=110.0, help='seconds for the whole sweep')
    ap.add_argument('--ms', default='1', help='comma-separated decode M values (default 1)')
    ap.add_argument('--kernels', default='gemvtu,gemvu,gemvs,gemvtc',
                    help='M = 1 kernel families to sweep (comma-separated; the default config is always timed)')
    ap.add_argument('--prefill', action='store_true', help=f'also M={PREFILL_M} on the first shape (dequant + cuBLAS)')
    args = ap.parse_args()
    args.out = str(args.out or run_dir('w4a16', 'cuda'))
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    env = env_stamp('cuda')
    print(json.dumps(env), flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write)", flush=True)
    results = []
    decode_ms = [int(m) for m in args.ms.split(',')]
    n_cases = len(SHAPES) * len(decode_ms) + bool(args.prefill)
    for si, (K, N) in enumerate(SHAPES):
        Ms = decode_ms + ([PREFILL_M] if args.prefill and si == 0 else [])
        by1 = w4a16_bytes(1, K, N, G)
        n_q = max(2, -(-ROTATE_BYTES // by1['w4a16']))
        n_b = max(2, -(-ROTATE_BYTES // by1['bf16']))
        wq = [random_w4_cuda(K, N, 100 * si + i) for i in range(n_q)]
        qw, s, qz = wq[0]
        Wf = dequantize_w4(qw, s, qz, G, torch.float32)                  # (K, N)
        W_kn = Wf.to(torch.bfloat16).contiguous()
        W_nk = [W_kn.t().contiguous()] + [torch.randn(N, K, device='cuda', dtype=torch.bfloat16) for _ in range(n_b - 1)]
        for M in Ms:
            x = torch.randn(M, K, device='cuda').to(torch.bfloat16)
            ref = (x.float() @ Wf).double()
            fams = dict(gemvtu=GEMVTU, gemvu=GEMVU, gemvs=GEMVS, gemvtc=GEMVTC, gemv=GEMV, gemv16=GEMV16)
            cands = [c for f in args.kernels.split(',') for c in fams[f]] if M == 1 else \
                (GEMVS_BATCH if M <= 4 and 'gemvs' in args.kernels.split(',') else []) + GEMM_SMALL if M <= 16 else \
                GEMM_PREFILL + DEQUANT
            dflt = default_config(M, N, K, G, torch.device('cuda'))
            cands = [dflt] + [c for c in cands if c != dflt]
            case_budget = (args.budget - (time.time() - t_start)) / (n_cases - len(results))
            if si == 0 and M == 1:     # the goal shape gets the full sweep (and pays the compilations)
                case_budget = max(case_budget, 0.4 * args.budget)
            tried, t_case = [], time.time()
            qcalls = lambda cfg: [(lambda w=w: w4a16_matmul(x, *w, G, config=cfg)) for w in wq]
            for cfg in cands:
                if time.time() - t_case > case_budget and len(tried) >= 4:
                    tried.append(dict(config=asdict(cfg), skipped='budget'))
                    continue
                rec = dict(config=asdict(cfg))
                try:
                    y = torch.full((M, N), float('nan'), device='cuda', dtype=torch.bfloat16)
                    w4a16_matmul(x, qw, s, qz, G, config=cfg, out=y)
                    torch.cuda.synchronize()
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    rec['rel_err'] = err
                    rec['max_err'] = ((y.double() - ref).abs().max() / ref.abs().max()).item()
                    if not (err <= 1e-2) or not torch.isfinite(y).all():
                        rec['skipped'] = 'wrong'
                    else:
                        # second call: the split-K counters must have been reset by the first
                        y2 = w4a16_matmul(x, qw, s, qz, G, config=cfg)
                        rec['rel_err_2nd'] = ((y2.double() - ref).norm() / ref.norm()).item()
                        rec['us'] = graph_time(qcalls(cfg), reps=5)
                        x3 = torch.randn_like(x)             # after the replays, on a fresh input: a race would show
                        y3 = w4a16_matmul(x3, qw, s, qz, G, config=cfg)
                        r3 = (x3.float() @ Wf).double()
                        rec['rel_err_after'] = ((y3.double() - r3).norm() / r3.norm()).item()
                except Exception as e:   # a config that does not compile or launch is recorded, not fatal
                    rec['error'] = f"{type(e).__name__}: {str(e)[:300]}"
                tried.append(rec)
            ok = [r for r in tried if 'us' in r and r.get('rel_err_2nd', 1) <= 1e-2 and r.get('rel_err_after', 1) <= 1e-2]
            by_kernel = {}                                            # the best time of each kernel family
            for r in ok:
                k = r['config']['kernel']
                if k not in by_kernel or r['us'] < by_kernel[k]['us']: by_kernel[k] = dict(us=r['us'], config=r['config'])
            if not ok:
                print(f"K={K} N={N} M={M}: no config passed; errors: {[r.get('error') for r in tried][:3]}")
                results.append(dict(K=K, N=N, M=M, candidates=tried, failed=True))
                continue
            best = min(ok, key=lambda r: r['us'])
            bcfg = W4A16Config(**best['config'])
            lcalls = [(lambda w=w: F.linear(x, w)) for w in W_nk]
            mcalls = [(lambda w=w: torch.matmul(x, w.t())) for w in W_nk]
            t_q = [graph_time(qcalls(bcfg), 20) for _ in range(2)]
            t_l = [graph_time(lcalls, 20) for _ in range(2)]
            t_m = [graph_time(mcalls, 20) for _ in range(2)]
            t_d = graph_time(qcalls(dflt), 20)
            eager = dict(w4a16_us=bench(lambda: w4a16_matmul(x, qw, s, qz, G, config=bcfg), 100) * 1e3,
                         w4a16_default_us=bench(lambda: w4a16_matmul(x, qw, s, qz, G), 100) * 1e3,
                         bf16_linear_us=bench(lambda: F.linear(x, W_nk[0]), 100) * 1e3)
            dflt_rec = next((r for r in tried if r['config'] == asdict(dflt)), {})
            by = w4a16_bytes(M, K, N, G)
            tq, tb = min(t_q), min(min(t_l), min(t_m))
            row = dict(K=K, N=N, M=M, best_config=best['config'], default_config=asdict(dflt), default_us=t_d,
                       w4a16_us=t_q, bf16_linear_us=t_l, bf16_matmul_us=t_m, speedup=tb / tq,
                       ideal_speedup_bytes=by['bf16'] / by['w4a16'], w4a16_GBps=by['w4a16'] / (tq * 1e-6) / 1e9,
                       bf16_GBps=by['bf16'] / (tb * 1e-6) / 1e9, rel_err=best['rel_err'], eager_do_bench=eager,
                       max_err=best.get('max_err'), default_max_err=dflt_rec.get('max_err'),
                       default_speedup=tb / t_d, eager_speedup=eager['bf16_linear_us'] / eager['w4a16_us'],
                       eager_default_speedup=eager['bf16_linear_us'] / eager['w4a16_default_us'],
                       rotating_sets=dict(w4a16=n_q, bf16=n_b), best_by_kernel=by_kernel, candidates=tried)
            results.append(row)
            print(f"K={K:>5} N={N:>5} M={M:>4}: w4a16 {tq:8.1f} us  bf16 {tb:8.1f} us  x{tb / tq:5.2f}  "
                  f"(best {best['config']['kernel']} bm={best['config']['block_m']} bn={best['config']['block_n']} "
                  f"bk={best['config']['block_k']} split={best['config']['split_k']} w={best['config']['num_warps']} "
                  f"st={best['config']['num_stages']} r={best['config'].get('max_regs', 0)}; default {dflt.kernel} {t_d:.1f} us x{tb / t_d:.2f}; eager "
                  f"{eager['w4a16_us']:.1f} (default {eager['w4a16_default_us']:.1f}) vs bf16 {eager['bf16_linear_us']:.1f} us; "
                  f"max_err {best.get('max_err', float('nan')):.1e}; {by['w4a16'] / (tq * 1e-6) / 1e9:.0f} GB/s; "
                  f"{len(ok)}/{len(tried)} timed; {time.time() - t_start:.0f} s)",
                  flush=True)
            print('    best per kernel: ' + ', '.join(f"{k} {v['us']:.1f} us (x{tb / v['us']:.2f})" for k, v in by_kernel.items()),
                  flush=True)
            del ref
            dump(env, bw, results, t_start, args.out)
        del Wf, W_kn, W_nk, wq
        torch.cuda.empty_cache()
    out = dump(env, bw, results, t_start, args.out)
    results = [r for r in results if not r.get('failed')]
    try:
        plot(out, os.path.join(args.out, 'w4a16.png'))
    except Exception:
        traceback.print_exc()
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  copy {bw:.0f} GB/s")
    print(f"{'K':>6} {'N':>6} {'M':>5} {'w4a16 us':>9} {'bf16 us':>9} {'speedup':>8} {'ideal':>6} {'w4 GB/s':>8}  config")
    for r in results:
        c = r['best_config']
        print(f"{r['K']:>6} {r['N']:>6} {r['M']:>5} {min(r['w4a16_us']):>9.1f} "
              f"{min(min(r['bf16_linear_us']), min(r['bf16_matmul_us'])):>9.1f} {r['speedup']:>8.2f} "
              f"{r['ideal_speedup_bytes']:>6.2f} {r['w4a16_GBps']:>8.0f}  {c['kernel']} m{c['block_m']} n{c['block_n']} "
              f"k{c['block_k']} s{c['split_k']} w{c['num_warps']} st{c['num_stages']} r{c.get('max_regs', 0)}")
    for r in results:
        if r['M'] == 1:
            print(f"GOAL w4a16 M=1 {r['K']}x{r['N']}: graph best x{r['speedup']:.2f} default x{r['default_speedup']:.2f}"
                  f" (goal >= 3x at 4096x16384), eager best x{r['eager_speedup']:.2f} default "
                  f"x{r['eager_default_speedup']:.2f}; {r['w4a16_GBps']:.0f} GB/s of {bw / 2:.0f} (copy read rate); "
                  f"max_err {r['max_err']:.1e}")


def dump(env, bw, results, t_start, outdir):
    out = dict(env=env, copy_GBps=bw, group_size=G, convention='y(M,N) = x(M,K) @ W(K,N); K=in, N=out features',
               baseline='min over F.linear(x, W[N,K]) and torch.matmul(x, W[N,K].t()), bf16',
               timing='CUDA graph of >=64 calls cycling over weight copies >= 256 MiB (no L2 reuse, no launch '
                      'overhead); median of replays; eager_do_bench: triton do_bench, L2 flushed, launch overhead in',
               results=results,
               wall_s=time.time() - t_start)
    atomic_write_json(os.path.join(outdir, 'w4a16.json'), out, indent=1)
    return out


def plot(out, path):
    out = dict(out, results=[r for r in out['results'] if not r.get('failed')])
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rs = out['results']
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['K']}x{r['N']}\nM={r['M']}" for r in rs]
    xs = range(len(rs))
    ax.bar(xs, [r['speedup'] for r in rs], color=['C0' if r['M'] <= 16 else 'C1' for r in rs], label='measured')
    ax.scatter(xs, [r['ideal_speedup_bytes'] for r in rs], color='k', marker='_', s=300, label='ideal (bytes)')
    ax.axhline(1, color='gray', lw=0.8)
    ax.axhline(3, color='r', ls='--', lw=0.8, label='goal at M=1 (3x)')
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel('speed-up over bf16')
    e = out['env']
    ax.set_title(f"W4A16 (group {out['group_size']}) vs bf16 — {e['device']}, torch {e['torch']}, triton {e['triton']}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == '__main__':
    sys.exit(main())
