"""Benchmark the ternary (2-bit) kernels of `minicpm4_core.kernels.ternary` against bf16 `F.linear` (cuBLAS),
measured in the same run, at the linear shapes of MiniCPM4-0.5B and -8B (from `MiniCPM4Config` presets).

    python kernels/bench_ternary.py [--out DIR] [--quick | --only-8b] [--no-sweep] [--Ms 1] [--no-prefill-sweep]      (DIR: kernels/results/ternary/<device>-<date>/)

Timing: every variant is captured in a CUDA graph of `inner` calls that rotate among enough copies of the weights
(and inputs) that a call reads its weights from device memory rather than from L2 (capped at 64 copies, so the
smallest 0.5B matrices stay L2-resident: flagged `l2_resident` in the JSON); the graph is replayed `reps` times
and the median per-call time reported (`minicpm4_core.bench.cuda_graph_time`). Correctness of every timed variant is checked against the float32
reference on fresh random inputs. Writes ternary_bench.json (+ .png) and ternary_sweep.json into --out.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm4_core.bench import cuda_graph_time, env_stamp, event_time, roofline_ceilings, run_dir
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.io import atomic_write_json
from minicpm4_core.kernels.ternary import (TernaryConfig, pack_ternary, pick_config, ternary_bytes, ternary_matmul,
                                           ternary_matmul_ref, kernel_scales, _num_sms)

L2_FLUSH_BYTES = 256 * 2**20
MAX_COPIES = 64


def model_shapes() -> list[tuple[str, str, int, int]]:
    "(model, layer, K, N) for the distinct linear shapes of the two presets."
    out = []
    for name, cfg in [('0.5B', MiniCPM4Config.minicpm4_0_5b()), ('8B', MiniCPM4Config.minicpm4_8b())]:
        H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
        seen = set()
        for layer, K, N in [('q/o', H, q), ('k/v', H, kv), ('o', q, H), ('gate/up', H, I), ('down', I, H)]:
            if (K, N) in seen: continue
            seen.add((K, N))
            out.append((name, layer, K, N))
    return out


def graph_time(fns, inner: int, reps: int) -> tuple[float, float]:
    "Median and (max-min)/median of the per-call time in us of a CUDA graph cycling through `fns`."
    st = cuda_graph_time(fns, inner, reps, stats=True)
    return st['median_ms'] * 1e3, st['spread']


class Problem:
    "Random ternary weights + scales for one (K, N, group) and their bf16 dense twin, with rotation copies."
    def __init__(self, K: int, N: int, group: int, gen: torch.Generator, dev='cuda'):
        self.K, self.N, self.group = K, N, group
        q = torch.randint(-1, 2, (N, K), generator=gen, device=dev, dtype=torch.int8)
        self.qweight = pack_ternary(q, group or 1)
        del q
        ng = math.ceil(K / group) if group else 1
        self.scale = (torch.rand(N, ng, generator=gen, device=dev) * 0.02 + 0.01).to(torch.float16)
        self.kscale = kernel_scales(self.scale, N, self.qweight.shape[1], group)
        tb = self.qweight.numel() + self.kscale.numel() * 2
        self.n_t = min(MAX_COPIES, max(2, math.ceil(L2_FLUSH_BYTES / tb)))
        self.l2_resident = tb * self.n_t < L2_FLUSH_BYTES
        self.qw_copies = [self.qweight] + [self.qweight.clone() for _ in range(self.n_t - 1)]
        self.s_copies = [self.kscale] + [self.kscale.clone() for _ in range(self.n_t - 1)]
        wb = 2 * K * N
        self.n_b = min(MAX_COPIES, max(2, math.ceil(L2_FLUSH_BYTES / wb)))
        w = (torch.randn(N, K, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        self.w_copies = [w] + [w.clone() for _ in range(self.n_b - 1)]

    def inputs(self, M: int, n: int, gen) -> list[torch.Tensor]:
        x = torch.randn(M, self.K, generator=gen, device='cuda').to(torch.bfloat16)
        return [x] + [torch.randn_like(x) for _ in range(n - 1)]


def time_ternary(P: Problem, M: int, cfg: TernaryConfig | None, gen, inner=None, reps=10):
    xs = P.inputs(M, min(P.n_t, 4), gen)
    # correctness first, on the first input and a fresh one
    y = ternary_matmul(xs[0], P.qweight, P.kscale, P.K, P.group, config=cfg)
    ref = ternary_matmul_ref(xs[0].float(), P.qweight, P.scale, P.K, P.group)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    if not math.isfinite(err) or err > 2e-2:
        raise RuntimeError(f"wrong result: rel err {err}")
    fns = [(lambda i=i: ternary_matmul(xs[i % len(xs)], P.qw_copies[i], P.s_copies[i], P.K, P.group, config=cfg))
           for i in range(P.n_t)]
    inner = inner or max(P.n_t, 20 if M <= 16 else 4)
    t, spread = graph_time(fns, inner, reps)
    # check again after the timed replays (a race in a split-K reduction would show here)
    x = torch.randn_like(xs[0])
    y = ternary_matmul(x, P.qweight, P.kscale, P.K, P.group, config=cfg)
    ref = ternary_matmul_ref(x.float(), P.qweight, P.scale, P.K, P.group)
    err = max(err, ((y.float() - ref).norm() / ref.norm()).item())
    if not math.isfinite(err) or err > 2e-2:
        raise RuntimeError(f"wrong result after timing: rel err {err}")
    return t, spread, err


def time_bf16(P: Problem, M: int, gen, inner=None, reps=10):
    xs = P.inputs(M, min(P.n_b, 4), gen)
    fns = [(lambda i=i: F.linear(xs[i % len(xs)], P.w_copies[i])) for i in range(P.n_b)]
    inner = inner or max(P.n_b, 20 if M <= 16 else 4)
    return graph_time(fns, inner, reps)


def ceilings() -> dict:
    "Measured copy bandwidth (TB/s) and bf16 matmul rate (TFLOP/s) of this GPU."
    c = roofline_ceilings('cuda', copy_bytes=1 << 30, matmul_n=8192)
    return dict(copy_TBps=round(c['copy_GBps'] / 1e3, 3), bf16_matmul_TFLOPs=round(c['bf16_matmul_TFLOPs'], 1))


SWEEP = [  # decode candidates (M = 1): kernel, block_m, block_n, block_k, split_k, warps, stages, accumulators
    TernaryConfig('mv', 16, 64, 128, 1, 4, 3, 1), TernaryConfig('mv', 16, 64, 128, 2, 4, 3, 1),
    TernaryConfig('mv', 16, 64, 128, 4, 4, 3, 1),    # v2 (the previous default and its splits), for reference
] + [TernaryConfig('mvtc', 16, bn, bk, sk, w, st, 1)   # v3 (session 2026-12-04d): paired unpack, x not staged
     for (bn, bk, sk, w, st) in [(64, 128, 1, 4, 3), (64, 64, 1, 4, 4), (64, 64, 2, 4, 4), (64, 128, 2, 4, 3),
                                 (64, 64, 4, 4, 4), (64, 128, 4, 4, 3), (128, 64, 1, 4, 3), (128, 64, 2, 4, 3),
                                 (64, 64, 1, 4, 3), (64, 256, 1, 4, 2), (128, 128, 1, 4, 3), (256, 64, 1, 8, 3),
                                 (64, 64, 8, 4, 4), (64, 128, 8, 4, 3), (32, 64, 1, 4, 4), (32, 128, 2, 4, 3)]] + \
    [TernaryConfig('mvs', 1, bn, bk, sk, w, 1, 1)   # v4 (session 2026-12-04 s6): streaming CUDA-core GEMV
     for (bn, bk, w) in [(256, 32, 4), (512, 32, 8), (128, 32, 2)] for sk in (8, 16, 32)] + \
    [TernaryConfig('mvu', 1, bn, bk, 1, w, ch, 1, r)   # v5 (session 2026-12-04 s7): no loop, atomic split
     for (bn, bk, w, ch, r) in [(256, 32, 4, 1, 0), (256, 32, 4, 2, 0), (256, 32, 4, 1, 64), (256, 32, 4, 2, 80),
                                (512, 32, 8, 2, 80), (512, 64, 8, 1, 96), (1024, 32, 8, 1, 96), (512, 32, 4, 1, 96),
                                (512, 32, 8, 2, 0), (512, 64, 8, 1, 0)]] + \
    [TernaryConfig('mvtu', 1, bn, bk, 1, w, ch, 1, r)   # v6 (session 2026-12-04 s7): v3's tile without the loop
     for (bn, bk, w, ch, r) in [(64, 64, 4, 2, 0), (64, 128, 4, 1, 0), (64, 64, 4, 1, 0), (64, 128, 4, 2, 0),
                                (128, 64, 4, 2, 0), (128, 64, 8, 2, 0), (64, 64, 4, 2, 96)]]
PREFILL_SWEEP = [  # (M, config) on the 8B gate/up shape
    (2048, TernaryConfig('dequant', 1, 64, 64, 1, 4, 1)), (2048, TernaryConfig('dequant', 1, 32, 128, 1, 4, 1)),
    (2048, TernaryConfig('mma', 128, 128, 64, 1, 8, 3)), (256, TernaryConfig('dequant', 1, 64, 64, 1, 4, 1)),
    (256, TernaryConfig('mma', 64, 128, 64, 1, 4, 3)), (256, TernaryConfig('mma', 128, 128, 64, 1, 8, 3)),
    (64, TernaryConfig('mma', 64, 128, 64, 1, 4, 3)), (64, TernaryConfig('mma', 32, 128, 64, 1, 4, 3, 4)),
    (64, TernaryConfig('dequant', 1, 64, 64, 1, 4, 1)), (64, TernaryConfig('mv', 16, 64, 128, 1, 4, 4, 1)),
]


def profile_one():
    "One decode launch at 4096 x 16384, M = 1, with the default config (for ncu)."
    gen = torch.Generator(device='cuda').manual_seed(0)
    P = Problem(4096, 16384, 0, gen)
    x = P.inputs(1, 1, gen)[0]
    for _ in range(3): ternary_matmul(x, P.qweight, P.kscale, P.K)
    torch.cuda.synchronize()
    print('profiled config', pick_config(1, 16384, 1024))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=None, help='folder (default: kernels/results/ternary/<device>-<date>/)')
    ap.add_argument('--quick', action='store_true', help='fewer shapes and M values')
    ap.add_argument('--only-8b', action='store_true', help='the four 8B shapes (q/o, k/v, gate/up, down), all M')
    ap.add_argument('--no-sweep', action='store_true')
    ap.add_argument('--no-prefill-sweep', action='store_true')
    ap.add_argument('--sweep-kernels', default='mv,mvu,mvtu', help='decode kernels of the sweep (comma-separated)')
    ap.add_argument('--Ms', default='1,4,16,2048')
    ap.add_argument('--profile-one', action='store_true', help='one default decode launch (run under ncu)')
    a = ap.parse_args(argv)
    if a.profile_one:
        profile_one(); return []
    assert torch.cuda.is_available(), 'needs a GPU'
    out = Path(a.out) if a.out else run_dir('ternary', 'cuda')
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device='cuda').manual_seed(0)
    t_start = time.time()
    meta = env_stamp('cuda', sm_count=_num_sms(torch.device('cuda')))
    meta.update(ceilings())
    print(meta, flush=True)
    Ms = [int(m) for m in a.Ms.split(',')]
    shapes = model_shapes()
    if a.quick: shapes = [s for s in shapes if s[0] == '8B' and s[1] in ('gate/up', 'down')]
    if a.only_8b: shapes = [s for s in shapes if s[0] == '8B']

    sweep = []
    if not a.no_sweep:
        heads = [s for s in shapes if (s[2], s[3]) in ((4096, 16384), (16384, 4096), (1024, 4096), (4096, 1024))]
        for model, layer, K, N in heads:
            P = Problem(K, N, 0, gen)
            tb, _ = time_bf16(P, 1, gen)
            for cfg in [c for c in SWEEP if c.kernel in a.sweep_kernels.split(',')] + [None]:
                try:
                    tt, sp2, err = time_ternary(P, 1, cfg, gen)
                    row = dict(model=model, layer=layer, K=K, N=N, M=1, bf16_us=tb, ternary_us=tt,
                               speedup=tb / tt, spread=sp2, err=err, config=str(cfg or pick_config(1, N, K // 4)),
                               auto=cfg is None)
                except Exception as e:  # a config that fails to compile or is wrong must not stop the sweep
                    row = dict(model=model, layer=layer, K=K, N=N, M=1, config=str(cfg), error=repr(e)[:300])
                sweep.append(row)
                print('sweep', {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            del P
            torch.cuda.empty_cache()
        # prefill candidates on the largest shape
        P = Problem(4096, 16384, 0, gen) if not a.no_prefill_sweep else None
        if P is None: PREFILL = []
        else: PREFILL = PREFILL_SWEEP
        tbs = {}
        for M, cfg in PREFILL:
            try:
                if M not in tbs: tbs[M] = time_bf16(P, M, gen)[0]
                tb = tbs[M]
                tt, sp2, err = time_ternary(P, M, cfg, gen)
                row = dict(model='8B', layer='gate/up', K=4096, N=16384, M=M, bf16_us=tb, ternary_us=tt,
                           speedup=tb / tt, spread=sp2, err=err, config=str(cfg))
            except Exception as e:
                row = dict(model='8B', layer='gate/up', K=4096, N=16384, M=M, config=str(cfg), error=repr(e)[:300])
            sweep.append(row)
            print('sweep', {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        if P is not None: del P
        torch.cuda.empty_cache()
        atomic_write_json(out / 'ternary_sweep.json', dict(**meta, sweep=sweep), indent=1)

    results = []
    for model, layer, K, N in shapes:
        for group in ([0, 128] if model == '8B' and layer in ('gate/up', 'down') else [0]):
            P = Problem(K, N, group, gen)
            for M in Ms:
                try:
                    tb, spb = time_bf16(P, M, gen)
                    tt, spt, err = time_ternary(P, M, None, gen)
                    row = dict(model=model, layer=layer, K=K, N=N, M=M, group=group, bf16_us=round(tb, 2),
                               ternary_us=round(tt, 2), speedup=round(tb / tt, 3), err=err,
                               spread=round(max(spb, spt), 3), l2_resident=P.l2_resident,
                               config=str(pick_config(M, N, P.qweight.shape[1], group, meta['sm_count'])),
                               bf16_TBps=round(2 * K * N / tb / 1e6, 3),
                               ternary_TBps=round(ternary_bytes(M, K, N, group)['ternary'] / tt / 1e6, 3))
                    if M == 1:    # eager (launch overhead in, L2 flushed), both sides in the same run
                        x1 = P.inputs(1, 1, gen)[0]
                        te = event_time(lambda: ternary_matmul(x1, P.qweight, P.kscale, P.K, P.group), budget_ms=100,
                                        min_reps=10, max_reps=1000, warmup=5, flush=True) * 1e3
                        be = event_time(lambda: F.linear(x1, P.w_copies[0]), budget_ms=100, min_reps=10,
                                        max_reps=1000, warmup=5, flush=True) * 1e3
                        row.update(eager_ternary_us=round(te, 2), eager_bf16_us=round(be, 2),
                                   eager_speedup=round(be / te, 3))
                except Exception as e:
                    row = dict(model=model, layer=layer, K=K, N=N, M=M, group=group, error=repr(e)[:300])
                results.append(row)
                print('result', row, f"[{time.time() - t_start:.0f}s]", flush=True)
            atomic_write_json(out / 'ternary_bench.json', dict(**meta, partial=True, results=results), indent=1)
            del P
            torch.cuda.empty_cache()
    meta['seconds'] = round(time.time() - t_start, 1)
    atomic_write_json(out / 'ternary_bench.json', dict(**meta, results=results), indent=1)
    plot(results, meta, out / 'ternary_bench.png')

    print(f"\n{meta['device']} torch {meta['torch']} triton {meta['triton']}; copy {meta['copy_TBps']} TB/s")
    if sweep:
        print(f"{'shape':>12} {'config':>70} {'us':>7} {'x bf16':>7}")
        for r in sweep:
            if 'error' in r: print(f"{r['K']}x{r['N']:>6} {r['config'][-70:]:>70} ERROR {r['error'][:60]}")
            else: print(f"{r['K']:>5}x{r['N']:<6} M={r['M']:<4} {r['config'].replace('TernaryConfig(kernel=', '').replace('block_', '').replace('num_', '')[-62:]:>62} {r['ternary_us']:>7.1f} {r['speedup']:>6.2f}x")
    print(f"\n{'model':>5} {'layer':>8} {'K':>6} {'N':>6} {'G':>4} {'M':>5} {'bf16 us':>8} {'tern us':>8} {'x':>6} {'err':>8}")
    for r in results:
        if 'error' in r: print(r['model'], r['layer'], r['K'], r['N'], r['M'], 'ERROR', r['error'][:80]); continue
        print(f"{r['model']:>5} {r['layer']:>8} {r['K']:>6} {r['N']:>6} {r['group']:>4} {r['M']:>5} {r['bf16_us']:>8.1f} "
              f"{r['ternary_us']:>8.1f} {r['speedup']:>6.2f} {r['err']:>8.1e}"
              + (f"  eager {r['eager_ternary_us']:.1f} vs {r['eager_bf16_us']:.1f} us x{r['eager_speedup']:.2f}"
                 if 'eager_speedup' in r else ''))
    for r in results:
        if 'error' not in r and r['M'] == 1 and (r['K'], r['N']) == (4096, 16384):
            print(f"GOAL ternary M=1 4096x16384 g{r['group']}: graph x{r['speedup']:.2f} (goal >= 4x), "
                  f"eager x{r.get('eager_speedup', float('nan')):.2f}, {r['ternary_TBps']} TB/s, err {r['err']:.1e} "
                  f"({r['config']})")
    return results


def plot(results, meta, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    ok = [r for r in results if 'error' not in r]
    Ms = sorted({r['M'] for r in ok})
    fig, axes = plt.subplots(1, len(Ms), figsize=(4.2 * len(Ms), 4.2), squeeze=False)
    for ax, M in zip(axes[0], Ms):
        rs = [r for r in ok if r['M'] == M]
        labels = [f"{r['model']} {r['layer']}{' g' + str(r['group']) if r['group'] else ''}\n{r['K']}x{r['N']}" for r in rs]
        ax.bar(range(len(rs)), [r['speedup'] for r in rs], color=['C1' if r['group'] else 'C0' for r in rs])
        ax.axhline(1, color='k', lw=0.8)
        if M == 1: ax.axhline(4, color='r', ls='--', lw=0.8, label='goal 4x (4096x16384)')
        ax.set_ylim(0, max(4.4, 1.1 * max(r['speedup'] for r in rs)))
        ax.set_xticks(range(len(rs))); ax.set_xticklabels(labels, rotation=70, fontsize=7)
        ax.set_title(f"M = {M}"); ax.set_ylabel('speed-up over bf16 F.linear')
        if M == 1: ax.legend(fontsize=8)
    fig.suptitle(f"ternary 2-bit kernel vs bf16 cuBLAS - {meta['device']}, torch {meta['torch']}, "
                 f"triton {meta['triton']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == '__main__':
    sys.exit(0 if main() is not None else 1)
