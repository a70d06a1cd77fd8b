#!/usr/bin/env python
"""The static decode step near the bandwidth roofline (issue 13): one-token step time in a CUDA graph, kernels per
step, tok/s and the fraction of the roofline, for the 8B and 0.5B shapes at 1K and 4K context, with the chains of small
ops between the GEMVs fused (`kernels.fused`, `StaticStack(fused='triton')`), unfused (`fused='off'`: `layer_step`'s
torch ops) and through torch.compile (`fused='compile'`), all in the same run. Also the floor of the structure: a
graph of the GEMVs alone (4 per layer + the LM head) and of the attention alone, and one step's logits fused vs unfused.

Roofline: bytes per token (weights read by the step + the KV read at that context) / a copy bandwidth measured in
the same run. Random bf16 weights, batch 1, the KV buffer filled with random values (cost does not depend on them).

    PYTHONPATH=. python kernels/bench_static_step.py --out DIR [--shapes minicpm4_8b minicpm4_0_5b] [--contexts 1024 4096]
    PYTHONPATH=. python kernels/bench_static_step.py --out /tmp/x --tiny      # CPU smoke test (tiny shapes, interpreter off)
"""
import argparse
import dataclasses
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm4_core.bench import cpu_time, cuda_graph_time, env_stamp, roofline_ceilings
from minicpm4_core.edge_bench import build_model, kv_bytes, preset, weight_bytes
from minicpm4_core.static_decode import StaticDecoder, resolve_fused

MODES = ('off', 'triton', 'gemv', 'compile')
VIEWS = {'view', 'slice', 'select', 'reshape', '_reshape_alias', 'as_strided', 't', 'transpose', 'permute', 'unsqueeze',
         'squeeze', 'chunk', 'split', 'expand', 'narrow', 'detach', 'alias', 'empty', 'empty_like', 'empty_strided',
         'lift_fresh', 'unflatten', 'flatten', 'contiguous', 'resolve_conj', 'resolve_neg', 'numpy_T', 'matrix_H'}


def attempt(row, name, fn):
    "Run fn, store its value (or the error) under name, print it: a failed row must not cost the others."
    t0 = time.perf_counter()
    try:
        row[name] = fn()
    except Exception as ex:
        row[name] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
    print(f'  {name}: {row[name]}  ({time.perf_counter() - t0:.1f} s)', flush=True)
    return row[name]


def time_ms(fn, dev, inner=8, reps=15):
    return cuda_graph_time(fn, inner, reps) if dev.type == 'cuda' else cpu_time(fn, inner, reps)


def count_kernels(dec, dev, n_layers):
    "Kernels of one eager step (what the graph replays) from the profiler: total, per layer, by name."
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CUDA] if dev.type == 'cuda' else [ProfilerActivity.CPU]
    saved = dec.pos.clone()
    with torch.no_grad():
        dec._step_static(); dec.pos.copy_(saved)                       # warm (autotune / compile) outside the trace
        if dev.type == 'cuda': torch.cuda.synchronize()
        with profile(activities=acts) as prof:
            dec._step_static()
            if dev.type == 'cuda': torch.cuda.synchronize()
    dec.pos.copy_(saved)
    if dev.type == 'cuda':
        names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                 and not e.name.startswith(('Memcpy', 'Memset'))]
    else:                                                              # top-level aten ops (CPU: the op list)
        names = [e.name for e in prof.events() if e.name.startswith('aten::') and e.name[6:] not in VIEWS
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith('aten::'))]
    c = Counter(n[:90] for n in names)
    return dict(per_step=len(names), per_layer=round(len(names) / n_layers, 2), by_name=dict(c.most_common(40)))


def gemv_floor(dec, dev):
    "ms of the step's GEMVs alone (4 per layer + LM head, dense weights) in one graph: the structure's floor."
    p0 = dec.stack.p
    if not all(isinstance(p[k], torch.Tensor) for p in p0 for k in ('wqkv', 'wo', 'wgu', 'wdown')): return None
    H = dec.H
    x = torch.randn(1, H, device=dev, dtype=dec.head_w.dtype)
    o = torch.randn(1, p0[0]['wo'].shape[1], device=dev, dtype=x.dtype)
    a = torch.randn(1, p0[0]['wdown'].shape[1], device=dev, dtype=x.dtype)
    def fn():
        for p in p0:
            F.linear(x, p['wqkv']); F.linear(o, p['wo']); F.linear(x, p['wgu']); F.linear(a, p['wdown'])
        F.linear(x, dec.head_w)
    return time_ms(fn, dev)


def attn_floor(dec, dev, ctx):
    "ms of the step's attention calls alone (one per layer, the live length `ctx`) in one graph."
    st = dec.stack
    q = torch.randn(1, st.Hq, st.Dh, device=dev, dtype=st.kv.dtype)
    lens = torch.full((1,), ctx, dtype=torch.int32, device=dev)
    if not st.split_decode: return None
    def fn():
        for l in range(len(st.p)): st.attn(q, st.kv[l], None, None, lens)
    return time_ms(fn, dev)


@torch.no_grad()
def logits_agreement(dec, dev):
    "One step from the same state, fused (Triton) vs unfused (torch ops): max |diff| / max |logit|, argmax equal."
    saved, mode = dec.pos.clone(), dec.stack.fused
    out = {}
    for m in ('off', 'triton', 'gemv'):
        dec.stack.fused = resolve_fused(m, dev)
        dec._step_static(); dec.pos.copy_(saved)
        out[m] = dec.out[0].float().clone()
    dec.stack.fused = mode
    ref = out['off']
    return {m: dict(rel_max_diff=float((out[m] - ref).abs().max() / ref.abs().max()),
                    argmax_equal=bool(out[m].argmax() == ref.argmax())) for m in ('triton', 'gemv')}


SWEEP = [(bn, bk, nw) for bn in (2, 4, 8, 16) for bk in (256, 512, 1024, 2048) for nw in (4, 8)
         if bn * bk <= 2048 * nw]                       # the fp32 tile within ~64 registers per thread


@torch.no_grad()
def gemv_sweep(dec, dev):
    """Per weight kind (wqkv, wo, wgu, wdown): ms of one pass over every layer's weight (so nothing stays in L2) with
    cuBLAS F.linear, with the Triton `fused.gemv` at its default tile and at each tile of SWEEP (reported only: the
    'gemv' rows run the defaults). Returns {kind: {...}}."""
    from minicpm4_core.kernels import fused
    out = {}
    for kind in ('wqkv', 'wo', 'wgu', 'wdown'):
        ws = [p[kind] for p in dec.stack.p]
        N, K = ws[0].shape
        x = torch.randn(1, K, device=dev, dtype=ws[0].dtype)
        row = dict(N=N, K=K, mb_per_layer=N * K * ws[0].element_size() / 2**20)
        row['cublas_ms'] = time_ms(lambda: [F.linear(x, w) for w in ws], dev, inner=4, reps=10)
        heur = fused.gemv_config(N, K)
        times = {}
        for cfg in [heur] + [c for c in SWEEP if c != heur]:
            try:
                times[cfg] = time_ms(lambda: [fused.gemv(x, w, config=cfg) for w in ws], dev, inner=4, reps=10)
            except Exception as ex:
                times[cfg] = f'ERROR {type(ex).__name__}: {str(ex)[:100]}'
        ok = {c: t for c, t in times.items() if isinstance(t, float)}
        best = min(ok, key=ok.get)
        row.update(heuristic=list(heur), heuristic_ms=times[heur], best=list(best), best_ms=ok[best],
                   best_vs_cublas=row['cublas_ms'] / ok[best], all={str(c): t for c, t in times.items()})
        row['cublas_GBps'] = len(ws) * N * K * ws[0].element_size() / row['cublas_ms'] / 1e6
        row['best_GBps'] = len(ws) * N * K * ws[0].element_size() / ok[best] / 1e6
        out[kind] = row
        print(f"    {kind} {N}x{K}: cuBLAS {row['cublas_ms']:.3f} ms ({row['cublas_GBps']:.0f} GB/s), triton heuristic "
              f"{heur} {times[heur] if isinstance(times[heur], str) else f'{times[heur]:.3f}'} ms, best {best} "
              f"{ok[best]:.3f} ms ({row['best_GBps']:.0f} GB/s)", flush=True)
    return out


@torch.no_grad()
def agreement(m, L, label):
    """Is fused vs unfused only rounding? Teacher-forced over one sequence (prompt + the unfused path's greedy tokens):
    per step argmax agreement and max|diff| / max|logit| of each path against the unfused static step ('off'), with
    two baselines that differ from 'off' only in rounding order: the model's own eager forward over the sequence, and
    (bf16) the same unfused static step in fp32. Also where the paths disagree, the top-1 - top-2 gap of 'off' there
    (relative): a near tie is below the rel. diff. Free-running greedy agreement (a first flip changes the rest)."""
    g = torch.Generator().manual_seed(0)
    P = min(64, L // 2); n = min(48, L - P)
    prompt = torch.randint(0, m.config.vocab_size, (P,), generator=g).tolist()
    on = ('triton', 'gemv') if m.device.type == 'cuda' or os.environ.get('TRITON_INTERPRET') == '1' else ()
    ref_dec = StaticDecoder(m, L, dense=True, fused='off')
    toks = ref_dec.generate(prompt, n)
    seq = torch.tensor(prompt + toks[:-1], device=m.device)

    def forced(dec):
        out = [dec.prefill(prompt)[-1].float().clone()]
        out += [dec.step(t).float().clone() for t in toks[:-1]]
        return torch.stack(out)                                          # (n, V)
    ref = forced(ref_dec)
    paths = {f: forced(StaticDecoder(m, L, dense=True, fused=f)) for f in on}
    paths['model_eager'] = m(seq[None])[0, P - 1:].float()
    if m.dtype != torch.float32:
        try:
            m.float()                                                    # in place: restored below
            paths['off_fp32'] = forced(StaticDecoder(m, L, dense=True, fused='off'))
        except Exception as ex:
            res_err = f'off_fp32 ERROR {type(ex).__name__}: {str(ex)[:200]}'
            print('    ' + res_err, flush=True)
        finally:
            m.to(torch.bfloat16)
    top2 = ref.topk(2, -1).values
    gap = (top2[:, 0] - top2[:, 1]) / ref.abs().amax(-1)
    res = dict(dtype=str(m.dtype), steps=n, off_gap_median=float(gap.median()), off_gap_min=float(gap.min()))
    for k, v in paths.items():
        rel = (v - ref).abs().amax(-1) / ref.abs().amax(-1)
        dis = (v.argmax(-1) != ref.argmax(-1)).nonzero().flatten().tolist()
        res[k] = dict(forced_argmax_agree=f'{n - len(dis)}/{n}', rel_diff_median=float(rel.median()),
                      rel_diff_max=float(rel.max()), off_gap_where_disagree=[round(float(gap[i]), 5) for i in dis[:8]])
    for f in on:
        free = StaticDecoder(m, L, dense=True, fused=f).generate(prompt, n)
        res[f]['free_greedy_agree'] = f'{sum(a == b for a, b in zip(toks, free))}/{n}'
    print(f'    agreement {label}: ' + json.dumps(res), flush=True)
    return res


@torch.no_grad()
def batch_check(m, L):
    "One batch step (2 rows of different lengths): max |diff| / max |logit| and argmax, fused vs unfused."
    from minicpm4_core.static_decode import BatchStaticDecoder
    prompt = torch.randint(0, m.config.vocab_size, (min(64, L // 2),), generator=torch.Generator().manual_seed(1))
    on = 'auto' if m.device.type == 'cuda' else 'triton'
    outs = {}
    for f in ('off', on):
        bd = BatchStaticDecoder(m, L, 2, dense=True, fused=f)
        bd.prefill(0, prompt[:len(prompt) // 2]); bd.prefill(1, prompt)
        outs[f] = bd.step([int(prompt[len(prompt) // 2]), 7]).float().clone()
    return dict(rel_diff=float((outs[on] - outs['off']).abs().max() / outs['off'].abs().max()),
                argmax_equal=(outs[on].argmax(-1) == outs['off'].argmax(-1)).tolist())


def run_shape(name, a, dev, dtype, copy_GBps):
    L = max(a.contexts) + 16
    c = preset(name, L) if not a.tiny else preset('tiny', L)
    if a.layers: c = dataclasses.replace(c, num_hidden_layers=a.layers)
    t0 = time.perf_counter()
    m = build_model(c, dev, dtype)
    dec = StaticDecoder(m, L, graphs=False, dense=True, fused='off')
    dec.stack.kv.normal_()
    wb = weight_bytes(m)
    res = dict(shape=name, layers=c.num_hidden_layers, hidden=c.hidden_size, weight_bytes=wb, max_len=L,
               build_s=round(time.perf_counter() - t0, 1), rows=[])
    print(f'{name}: {c.num_hidden_layers} layers, {wb / 1e9:.2f} GB of weights, built in {res["build_s"]} s', flush=True)
    dec.prefill([1]); dec.pos.fill_(min(a.contexts)); dec.n = min(a.contexts)
    attempt(res, 'gemv_only_ms', lambda: gemv_floor(dec, dev))
    if dev.type == 'cuda' and a.sweep: attempt(res, 'gemv_sweep', lambda: gemv_sweep(dec, dev))
    for mode in MODES:
        if mode in ('triton', 'gemv') and dev.type != 'cuda' and not a.interpret: continue
        dec.stack.fused = resolve_fused(mode, dev)
        t = time.perf_counter()
        attempt(res, f'kernels_{mode}', lambda: count_kernels(dec, dev, c.num_hidden_layers))
        if mode == 'compile': res['compile_s'] = round(time.perf_counter() - t, 1)
    for ctx in a.contexts:
        dec.pos.fill_(ctx); dec.n = ctx
        kvb = kv_bytes(c, ctx, False, torch.finfo(dtype).bits // 8)
        row = dict(context=ctx, bytes_per_token=wb + kvb)
        row['roofline_tok_s'] = copy_GBps * 1e9 / row['bytes_per_token'] if copy_GBps else None
        attempt(row, 'attn_only_ms', lambda: attn_floor(dec, dev, ctx))
        for mode in MODES:
            if mode in ('triton', 'gemv') and dev.type != 'cuda' and not a.interpret: continue
            dec.stack.fused = resolve_fused(mode, dev)
            ms = attempt(row, f'{mode}_ms', lambda: dec.time_step(reps=a.reps, inner=a.inner))
            if isinstance(ms, float):
                row[f'{mode}_tok_s'] = 1e3 / ms
                if row['roofline_tok_s']: row[f'{mode}_fraction'] = row[f'{mode}_tok_s'] / row['roofline_tok_s']
        if dev.type == 'cuda' or a.interpret: attempt(row, 'logits_fused_vs_unfused', lambda: logits_agreement(dec, dev))
        res['rows'].append(row)
    dec = None                                                         # free its fused copies before the checks
    if dev.type == 'cuda': torch.cuda.empty_cache()
    if a.check and (dev.type == 'cuda' or a.interpret):
        attempt(res, 'agreement_' + str(m.dtype)[6:], lambda: agreement(m, L, f'{name} {m.dtype}'))
        attempt(res, 'batch_check', lambda: batch_check(m, L))
        if m.dtype != torch.float32:                                     # fused vs unfused in fp32: ~all should agree
            m.float()
            attempt(res, 'agreement_float32', lambda: agreement(m, L, f'{name} float32'))
            m.to(dtype)
    dec = m = None                                                     # free the GPU memory before the next shape
    if dev.type == 'cuda': torch.cuda.empty_cache()
    return res


def table(results, copy_GBps):
    lines = [f'copy bandwidth {copy_GBps:.0f} GB/s' if copy_GBps else 'copy bandwidth: not measured',
             '| shape | ctx | roofline tok/s | ' + ' | '.join(f'{m} tok/s (frac)' for m in MODES) +
             ' | kernels/layer ' + ' / '.join(MODES) + ' | gemv-only ms | attn-only ms |',
             '|---|---|---|' + '---|' * len(MODES) + '---|---|---|']
    f = lambda r, m: (f"{r[m + '_tok_s']:.1f} ({r.get(m + '_fraction', float('nan')):.2f})"
                      if isinstance(r.get(m + '_tok_s'), float) else str(r.get(m + '_ms', '-'))[:40])
    k = lambda s, m: (s[f'kernels_{m}']['per_layer'] if isinstance(s.get(f'kernels_{m}'), dict) else '-')
    for s in results:
        for r in s['rows']:
            rf = f"{r['roofline_tok_s']:.0f}" if r['roofline_tok_s'] else '-'
            g = s['gemv_only_ms'] if isinstance(s.get('gemv_only_ms'), float) else None
            at = r['attn_only_ms'] if isinstance(r.get('attn_only_ms'), float) else None
            lines.append(f"| {s['shape']} | {r['context']} | {rf} | " + ' | '.join(f(r, m) for m in MODES) + ' | ' +
                         ' / '.join(str(k(s, m)) for m in MODES) + ' | ' +
                         f"{'-' if g is None else f'{g:.3f}'} | {'-' if at is None else f'{at:.3f}'} |")
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', required=True)
    ap.add_argument('--shapes', nargs='+', default=['minicpm4_8b', 'minicpm4_0_5b'])
    ap.add_argument('--contexts', nargs='+', type=int, default=[1024, 4096])
    ap.add_argument('--layers', type=int, default=None, help='override the layer count (quick runs)')
    ap.add_argument('--reps', type=int, default=15)
    ap.add_argument('--inner', type=int, default=8)
    ap.add_argument('--no-sweep', dest='sweep', action='store_false', help='skip the Triton GEMV tile sweep')
    ap.add_argument('--no-check', dest='check', action='store_false', help='skip the greedy / batch agreement checks')
    ap.add_argument('--tiny', action='store_true', help='CPU smoke test: the tiny preset, fp32')
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    dev = torch.device('cuda' if torch.cuda.is_available() and not a.tiny else 'cpu')
    a.interpret = os.environ.get('TRITON_INTERPRET') == '1'
    if a.tiny: a.shapes, a.contexts, a.reps, a.inner = ['tiny'], [16, 48], 2, 1
    dtype = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    copy_GBps = roofline_ceilings(dev, copy_bytes=1 << 30)['copy_GBps'] if dev.type == 'cuda' else None
    results = []
    for s in a.shapes:
        try:
            results.append(run_shape(s, a, dev, dtype, copy_GBps))
        except Exception as ex:
            print(f'{s}: ERROR {type(ex).__name__}: {ex}', flush=True)
            results.append(dict(shape=s, error=f'{type(ex).__name__}: {str(ex)[:300]}', rows=[]))
    res = dict(env=env_stamp(dev, script='kernels/bench_static_step.py', argv=argv), copy_GBps=copy_GBps,
               total_s=round(time.perf_counter() - t0, 1), shapes=results)
    (out / 'static_step.json').write_text(json.dumps(res, indent=1, default=str))
    tab = table(results, copy_GBps)
    (out / 'static_step.md').write_text(tab + '\n')
    print(tab)
    print(f'total {res["total_s"]} s -> {out}/static_step.json')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
