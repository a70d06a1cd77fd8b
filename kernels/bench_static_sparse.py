"""Decode ms/token of an InfLLM v2 model at the 8B shape: the model's eager cached decoding (dense and sparse), the
static dense stack in a CUDA graph (`static_decode.StaticDecoder`), and the static sparse step in a CUDA graph
(`static_sparse.StaticSparseDecoder`, its dense and sparse graphs; the sparse step with the compressed-key update,
one step in 16, as its own row). Random bf16 weights, batch 1, the KV cache filled
with random keys/values up to each context (decode cost does not depend on the values; selection lists do, and random
keys give spread-out lists). Also one step's logits: static sparse vs the model's eager sparse step from the same state.

    PYTHONPATH=. python kernels/bench_static_sparse.py --out DIR [--layers 32] [--contexts 32768 131072]
    PYTHONPATH=. python kernels/bench_static_sparse.py --out /tmp/x --tiny      # CPU smoke test (tiny shapes)
    PYTHONPATH=. python kernels/bench_static_sparse.py --out DIR --profile --layers 8 --contexts 131072

--profile (issue 13, the sparse step's overhead): instead of the rows above, per context: the captured step dense /
sparse / sparse+update and with the attention removed (the rest of the step alone), the attention alone (one graph
of a call per layer), the kernels of eager steps by GPU time (torch.profiler: a profiler over a graph replay sees no
kernels), the same after w4a16 packing with q|k|v, gate|up fused and unfused (`static_decode.FUSE_PACKED`), and the
engine's decode loop with a host read per token (the loop before) vs none (`Engine.sync_every`).
"""
import argparse
import json
import time
from pathlib import Path

import torch

from minicpm4_core.attention import dense_attention
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.bench import cpu_time, cuda_graph_time
from minicpm4_core.static_sparse import StaticSparseDecoder

SPARSE_8B = dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=2048, topk=64,
                 use_nope=False, dense_len=8192)          # the released MiniCPM4-8B sparse_config


def build(a, dev):
    if a.tiny:
        cfg = MiniCPM4Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                             intermediate_size=128, vocab_size=97,
                             sparse_config=dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=8, topk=3,
                                                dense_len=16))
    else:
        cfg = MiniCPM4Config(hidden_size=4096, num_attention_heads=32, num_key_value_heads=2, head_dim=128,
                             intermediate_size=16384, num_hidden_layers=a.layers, vocab_size=73448,
                             max_position_embeddings=max(a.contexts) + 1024, sparse_config=SPARSE_8B)
    dt = torch.float32 if a.tiny else torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev): model = MiniCPM4ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    return model


def attempt(row, name, fn):
    "Run fn, store its value (or the error) under name, print it."
    try:
        row[name] = fn()
    except Exception as ex:                     # a failed row must not cost the others (one device call)
        row[name] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
    v = row[name]
    if isinstance(v, dict) and any(isinstance(x, (dict, list)) for x in v.values()):   # nested: the scalars only
        v = {k: x for k, x in v.items() if not isinstance(x, (dict, list))}
    print(f'  {name}: {v}', flush=True)


def sync(dev):
    if dev == 'cuda': torch.cuda.synchronize()


@torch.no_grad()
def eager_ms(model, cache, steps, dev, dense):
    "The model's own cached loop: ms per token over `steps` steps after 2 warm-up steps (the cache grows)."
    for l in model.model.layers: l.self_attn.backend = dense_attention if dense else None
    tok = torch.randint(0, model.config.vocab_size, (1, 1), device=dev)
    try:
        for _ in range(2): model(tok, cache=cache)
        sync(dev); t0 = time.perf_counter()
        for _ in range(steps): model(tok, cache=cache)
        sync(dev)
        return (time.perf_counter() - t0) * 1e3 / steps
    finally:
        for l in model.model.layers: l.self_attn.backend = None


@torch.no_grad()
def graph_check(dev, dt, seed=0):
    """Small fp32/bf16 model on the device: prompt 360 through the model, then 48 static steps with CUDA graphs
    (dense graph up to 384 keys, sparse after) vs the model's own cached steps: max |logit diff|, argmax agreement."""
    torch.manual_seed(seed)
    sc = dict(kernel_size=32, kernel_stride=16, block_size=64, window_size=128, topk=4, dense_len=256)
    cfg = MiniCPM4Config(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=2,
                         intermediate_size=512, vocab_size=512, sparse_config=sc)
    with torch.device(dev): model = MiniCPM4ForCausalLM(cfg).eval().to(dt)
    ids = torch.randint(0, 512, (408,), device=dev)
    dec = StaticSparseDecoder(model, 408)
    cache = model.new_cache(1, 408)
    model(ids[None, :360], cache=cache)
    dec.prefill(ids[:360])
    diffs, same, modes = [], 0, []
    for t in range(360, 408):
        modes.append(dec.is_sparse(t + 1))
        ours = dec.step(ids[t:t + 1]).float()
        ref = model(ids[None, t:t + 1], cache=cache)[0, -1].float()
        diffs.append(float((ours - ref).abs().max())); same += int(ours.argmax() == ref.argmax())
    return dict(dtype=str(dt), steps=len(diffs), sparse_steps=sum(modes), max_abs_diff=max(diffs),
                argmax_agree=same / len(diffs), graphs=sorted(str(k) for k in dec._graphs))


KINDS = (('sparse selection (scores, pool, top-k)', ('_dec_s1', '_dec_pool', '_dec_lse', '_dec_step', '_topk', '_plan',
                                                   '_kth', '_grid_barrier')),
         ('decode attention (split-K + combine)', ('_dec_attn', '_dec_combine')),
         ('w4a16 gemv', ('w4a16',)), ('ternary', ('ternary',)), ('triton gemv', ('_gemv_kernel',)),
         ('fused small (norm, rope+kv, silu)', ('_add_rms_norm', '_rope_kv', '_silu_mul')),
         ('cuBLAS', ('gemv', 'gemm', 'nvjet', 'cutlass', 'sm90', 'cublas')))


def kind_of(name: str) -> str:
    n = name.lower()
    for k, keys in KINDS:
        if any(x.lower() in n for x in keys): return k
    return 'other'


@torch.no_grad()
def kernel_table(fn, steps: int = 3) -> dict:
    """GPU kernels of `steps` eager calls of fn (after one warm-up) by torch.profiler: per call, total us and launches
    per kernel name and per kind (`KINDS`), and their sum (the device busy time; a graph removes the gaps between)."""
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn(); sync()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps): fn()
        sync()
    by_name = {}
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for e in prof.events():
        if e.device_type != want or (not cuda and e.cpu_parent is not None): continue   # CPU (smoke): top-level ops
        d = by_name.setdefault(e.name, [0.0, 0])
        d[0] += e.time_range.elapsed_us() / steps; d[1] += 1 / steps
    kinds = {}
    for n, (us, c) in by_name.items():
        k = kinds.setdefault(kind_of(n), [0.0, 0])
        k[0] += us; k[1] += c
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    return dict(busy_us=sum(v[0] for v in by_name.values()), launches=sum(v[1] for v in by_name.values()),
                kinds={k: dict(us=round(v[0], 1), launches=round(v[1], 1)) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
                top=[dict(name=n[:90], us=round(v[0], 1), launches=round(v[1], 1)) for n, v in top])


def filled_decoder(model, N, dev):
    "A StaticSparseDecoder of N + 64 slots holding a random state of N keys (values do not change decode cost)."
    cache = model.new_cache(1, N + 64)
    for lc in cache.layers: lc.k[:, :N].normal_(); lc.v[:, :N].normal_()
    cache.length = N
    dec = StaticSparseDecoder(model, N + 64)
    dec.load_cache(cache)
    return dec


def profile_context(model, N, dev, reps, tag=''):
    """The sparse step's parts at N keys: graph ms of the step (dense / sparse / sparse+update / attention removed),
    the attention alone per layer, the eager steps' kernels."""
    from minicpm4_core.static_sparse import attend_step
    r, inner = {}, 8 if dev == 'cuda' else 1
    timer = cuda_graph_time if dev == 'cuda' else cpu_time
    dec = filled_decoder(model, N, dev)
    attempt(r, 'graph_dense_ms', lambda: dec.time_step(reps, inner, sparse=False))
    attempt(r, 'graph_sparse_ms', lambda: dec.time_step(reps, inner, sparse=True))
    attempt(r, 'graph_sparse_update_ms', lambda: dec.time_step(reps, inner, sparse=True, update=True))
    Hq, Dh = dec.Hq, dec.Dh
    dec._attn = lambda q, kv, *a, **k: q.reshape(q.shape[0], Hq * Dh)        # the step without its attention
    attempt(r, 'graph_noattn_ms', lambda: dec.time_step(reps, inner, sparse=True))
    del dec._attn
    S = dec.base.stack
    q = torch.randn(1, Hq, Dh, device=dev, dtype=model.dtype)
    seq = torch.full((1,), N + 1, dtype=torch.int32, device=dev)
    nl = len(S.p)
    for sp in (True, False):
        calls = [lambda l=l: attend_step(q, q, S.kv[l][None, :, :dec.Hkv], S.kv[l][None, :, dec.Hkv:], dec.kc[l], seq,
                                         dec.st, sparse=sp, n=N + 1, num_blocks=dec.num_blocks) for l in range(nl)]
        attempt(r, f'attn_alone_{"sparse" if sp else "dense"}_us_per_layer',
                lambda calls=calls: timer(calls, nl, reps) * 1e3)
    for k in ('sparse', 'dense'):
        if isinstance(r.get(f'graph_{k}_ms'), float) and isinstance(r.get('graph_noattn_ms'), float):
            r[f'attn_in_step_{k}_us_per_layer'] = (r[f'graph_{k}_ms'] - r['graph_noattn_ms']) * 1e3 / nl
    saved = dec.base.pos.clone()
    for name, sp, up in (('sparse', True, False), ('dense', False, False), ('sparse_update', True, True)):
        fn = lambda sp=sp, up=up: (dec.base.pos.copy_(saved), dec._step_static(sp, up))
        attempt(r, f'eager_kernels_{name}', lambda fn=fn: kernel_table(fn))
    dec.base.pos.copy_(saved)
    line = ', '.join(f'{k}={v:.3f}' for k, v in r.items() if isinstance(v, float))
    print(f'PROFILE{tag} N={N}: {line}', flush=True)
    for name in ('sparse', 'dense', 'sparse_update'):
        t = r.get(f'eager_kernels_{name}')
        if isinstance(t, dict):
            print(f'  eager {name}: busy {t["busy_us"]:.0f} us, {t["launches"]:.0f} launches; ' +
                  '; '.join(f'{k} {v["us"]:.0f} us/{v["launches"]:.0f}' for k, v in t['kinds'].items()), flush=True)
    del dec
    if dev == 'cuda': torch.cuda.empty_cache()
    return r


@torch.no_grad()
def engine_loop_ab(shape, layers, ctx, new, dev):
    """Engine decode tok/s with a host read per token (sync_every=1 with stop id -1, which never comes: the loop before)
    vs none (no stop ids), same engine and graph; also the captured step alone (ms)."""
    from minicpm4_core.edge_bench import build_model, preset
    from minicpm4_core.engine import Engine
    c = preset(shape, ctx + new + 64, 'bfloat16')
    if layers:
        from dataclasses import replace
        c = replace(c, num_hidden_layers=layers)
    m = build_model(c, dev, torch.bfloat16)
    m.config.sparse_config = None
    e = Engine(m, ctx + new + 64, sparse='dense')
    ids = torch.randint(3, c.vocab_size, (ctx,)).tolist()
    out = dict(shape=shape, layers=m.config.num_hidden_layers, context=ctx, new=new)
    e.generate([ids], 4, stop_ids=[])                                            # capture
    for name, kw in (('per_token_sync', dict(stop_ids=[-1])), ('no_sync', dict(stop_ids=[]))):
        e.sync_every = 1 if name == 'per_token_sync' else 16
        best = None
        for _ in range(2):
            e.generate([ids], new, **kw)
            lt = e.last_timing
            tps = lt['decode_steps'] / lt['decode_s']
            best = max(best or 0, tps)
        out[f'{name}_tok_s'] = best
    out['graph_step_ms'] = e._static.time_step(10, 8)
    out['host_gap_ms_per_token'] = 1e3 / out['per_token_sync_tok_s'] - 1e3 / out['no_sync_tok_s']
    print(f'ENGINE LOOP {out}', flush=True)
    return out


def profile_main(a, dev):
    from minicpm4_core import static_decode
    from minicpm4_core.engine import convert_quant
    t0 = time.perf_counter()
    cuda = dev == 'cuda'
    R = dict(device=torch.cuda.get_device_name() if cuda else 'cpu', torch=torch.__version__, mode='profile')
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    _attempt = globals()['attempt']
    def attempt(row, name, fn):                  # rewrite the JSON after every part: a cut run keeps what it measured
        _attempt(row, name, fn)
        R['wall_s'] = time.perf_counter() - t0
        (out / 'profile_static_sparse.json').write_text(json.dumps(R, indent=1, default=str))
    for shape in a.engine_shapes:
        attempt(R, f'engine_loop_{shape}', lambda shape=shape: engine_loop_ab(
            shape, a.layers if shape == 'minicpm4_8b' else 0, 4096 if cuda else 40, 128 if cuda else 8, dev))
        if cuda: torch.cuda.empty_cache()
    model = build(a, dev)
    R['layers'], R['sparse_config'] = model.config.num_hidden_layers, model.config.sparse_config
    R['build_s'] = time.perf_counter() - t0
    for N in a.contexts:
        attempt(R, f'bf16_{N}', lambda N=N: profile_context(model, N, dev, a.reps))
    t1 = time.perf_counter()
    attempt(R, 'w4a16_converted', lambda: convert_quant(model, 'w4a16'))
    R['w4a16_convert_s'] = time.perf_counter() - t1
    for N in a.contexts:
        attempt(R, f'w4a16_fused_{N}', lambda N=N: profile_context(model, N, dev, a.reps, ' w4a16 fused'))
        static_decode.FUSE_PACKED = False
        try:
            def unfused(N=N):
                dec = filled_decoder(model, N, dev)
                r = {k: dec.time_step(a.reps, 8 if cuda else 1, sparse=s) for k, s in (('graph_dense_ms', False), ('graph_sparse_ms', True))}
                dec.base.pos.fill_(N)
                r['eager_kernels_sparse'] = kernel_table(lambda: (dec.base.pos.fill_(N), dec._step_static(True, False)))
                return r
            attempt(R, f'w4a16_unfused_{N}', unfused)
        finally:
            static_decode.FUSE_PACKED = True
        if cuda: torch.cuda.empty_cache()
    if cuda: R['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
    R['wall_s'] = time.perf_counter() - t0
    (out / 'profile_static_sparse.json').write_text(json.dumps(R, indent=1, default=str))
    print(f'wrote {out / "profile_static_sparse.json"} in {R["wall_s"]:.0f} s', flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    ap.add_argument('--layers', type=int, default=32)
    ap.add_argument('--contexts', type=int, nargs='+', default=[32768, 131072])
    ap.add_argument('--steps', type=int, default=8, help='eager steps timed per row')
    ap.add_argument('--reps', type=int, default=20, help='graph replays per static row (8 steps each)')
    ap.add_argument('--tiny', action='store_true', help='CPU smoke test: tiny model, contexts 24 and 40')
    ap.add_argument('--quant', default='w4a16', choices=['none', 'w4a16', 'ternary'],
                    help='after the bf16 rows, pack the linears in place (engine.convert_quant) and time the static rows again')
    ap.add_argument('--profile', action='store_true', help="the sparse step's parts and kernels (see the docstring)")
    ap.add_argument('--engine-shapes', nargs='*', default=['minicpm4_0_5b', 'minicpm4_8b'],
                    help='--profile: shapes of the engine-loop A/B at 4K (the 8B one with --layers layers)')
    a = ap.parse_args()
    dev = 'cpu' if a.tiny else 'cuda'
    if a.profile:
        if a.tiny: a.contexts, a.reps, a.engine_shapes = [24, 40], 2, ['tiny']
        return profile_main(a, dev)
    if a.tiny: a.contexts, a.reps = [24, 40], 3
    torch.manual_seed(0)
    t_start = time.perf_counter()
    model = build(a, dev)
    R = dict(device=torch.cuda.get_device_name() if dev == 'cuda' else 'cpu', torch=torch.__version__,
             layers=model.config.num_hidden_layers, sparse_config=model.config.sparse_config, rows={})
    print(f'built in {time.perf_counter() - t_start:.1f} s', flush=True)
    if dev == 'cuda':
        for dt in (torch.float32, torch.bfloat16):
            attempt(R, f'graph_check_{str(dt)[6:]}', lambda dt=dt: graph_check(dev, dt))
    for N in a.contexts:
        print(f'context {N}', flush=True)
        r = R['rows'][N] = {}
        max_len = N + 64
        try:
            cache = model.new_cache(1, max_len)
            for lc in cache.layers: lc.k[:, :N].normal_(); lc.v[:, :N].normal_()
            cache.length = N
            dec = StaticSparseDecoder(model, max_len)
            dec.load_cache(cache)
        except Exception as ex:                 # e.g. out of memory: record it and try the next context
            r['setup'] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
            print(f'  setup: {r["setup"]}', flush=True)
            cache = dec = None
            if dev == 'cuda': torch.cuda.empty_cache()
            continue
        r['sparse_at_N'] = dec.is_sparse(N + 1)
        inner = 8 if dev == 'cuda' else 1
        attempt(r, 'static_dense_stack_ms', lambda: dec.base.time_step(a.reps, inner))   # StaticDecoder (dense)
        attempt(r, 'static_dense_graph_ms', lambda: dec.time_step(a.reps, inner, sparse=False))
        attempt(r, 'static_sparse_graph_ms', lambda: dec.time_step(a.reps, inner, sparse=True))
        attempt(r, 'static_sparse_graph_update_ms', lambda: dec.time_step(a.reps, inner, sparse=True, update=True))
        tok = torch.randint(0, model.config.vocab_size, (1,), device=dev)

        def agree():      # one step from the same state: static sparse (graph) vs the model's eager sparse step
            ours = dec.step(tok).float()
            with torch.no_grad(): ref = model(tok[None], cache=cache)[0, -1].float()
            return dict(max_abs_diff=float((ours - ref).abs().max()), ref_max_abs=float(ref.abs().max()),
                        same_argmax=bool(ours.argmax() == ref.argmax()))
        attempt(r, 'one_step_vs_model', agree)
        del dec
        if dev == 'cuda': torch.cuda.empty_cache()
        attempt(r, 'model_eager_sparse_ms', lambda: eager_ms(model, cache, a.steps, dev, dense=False))
        attempt(r, 'model_eager_dense_ms', lambda: eager_ms(model, cache, a.steps, dev, dense=True))
        f = lambda k: r[k] if isinstance(r.get(k), float) else None
        for num, den, name in (('static_dense_stack_ms', 'static_sparse_graph_ms', 'speedup_sparse_graph_vs_stack'),
                               ('static_dense_graph_ms', 'static_sparse_graph_ms', 'speedup_sparse_vs_dense_graph'),
                               ('model_eager_dense_ms', 'model_eager_sparse_ms', 'speedup_eager_sparse_vs_dense'),
                               ('model_eager_dense_ms', 'static_sparse_graph_ms', 'speedup_sparse_graph_vs_eager_dense')):
            if f(num) and f(den): r[name] = f(num) / f(den)
        print(f'SUMMARY N={N}: ' + ', '.join(f'{k}={v:.3f}' for k, v in r.items() if isinstance(v, float)), flush=True)
        del cache
        if dev == 'cuda': torch.cuda.empty_cache()
    if a.quant != 'none':
        from minicpm4_core.engine import convert_quant
        t0 = time.perf_counter()
        attempt(R, f'{a.quant}_converted', lambda: convert_quant(model, a.quant))
        R[f'{a.quant}_convert_s'] = time.perf_counter() - t0
        for N in a.contexts:
            print(f'{a.quant} context {N}', flush=True)
            r = R['rows'][f'{a.quant}_{N}'] = {}
            try:
                cache = model.new_cache(1, N + 64)
                for lc in cache.layers: lc.k[:, :N].normal_(); lc.v[:, :N].normal_()
                cache.length = N
                dec = StaticSparseDecoder(model, N + 64)
                dec.load_cache(cache)
                del cache
            except Exception as ex:
                r['setup'] = f'ERROR {type(ex).__name__}: {str(ex)[:300]}'
                print(f'  setup: {r["setup"]}', flush=True)
                cache = dec = None
                continue
            inner = 8 if dev == 'cuda' else 1
            attempt(r, 'static_dense_stack_ms', lambda: dec.base.time_step(a.reps, inner))
            attempt(r, 'static_dense_graph_ms', lambda: dec.time_step(a.reps, inner, sparse=False))
            attempt(r, 'static_sparse_graph_ms', lambda: dec.time_step(a.reps, inner, sparse=True))
            attempt(r, 'static_sparse_graph_update_ms',
                    lambda: dec.time_step(a.reps, inner, sparse=True, update=True))
            bf = R['rows'].get(N, {})
            for k in ('static_dense_stack_ms', 'static_dense_graph_ms', 'model_eager_dense_ms'):
                if isinstance(bf.get(k), float) and isinstance(r.get('static_sparse_graph_ms'), float):
                    r[f'speedup_vs_bf16_{k[:-3]}'] = bf[k] / r['static_sparse_graph_ms']
            print(f'SUMMARY {a.quant} N={N}: ' + ', '.join(f'{k}={v:.3f}' for k, v in r.items() if isinstance(v, float)),
                  flush=True)
            dec = None
            if dev == 'cuda': torch.cuda.empty_cache()
    if dev == 'cuda': R['peak_gib'] = torch.cuda.max_memory_allocated() / 2**30
    R['wall_s'] = time.perf_counter() - t_start
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out / 'bench_static_sparse.json').write_text(json.dumps(R, indent=1, default=str))
    print(f'wrote {out / "bench_static_sparse.json"} in {R["wall_s"]:.0f} s', flush=True)


if __name__ == '__main__':
    main()
