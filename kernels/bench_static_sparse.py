"""Decode ms/token of an InfLLM v2 model at the 8B shape: the model's eager cached decoding (dense and sparse), the
static dense stack in a CUDA graph (`static_decode.StaticDecoder`), and the static sparse step in a CUDA graph
(`static_sparse.StaticSparseDecoder`, its dense and sparse graphs; the sparse step with the compressed-key update,
one step in 16, as its own row). Random bf16 weights, batch 1, the KV cache filled
with random keys/values up to each context (decode cost does not depend on the values; selection lists do, and random
keys give spread-out lists). Also one step's logits: static sparse vs the model's eager sparse step from the same state.

    PYTHONPATH=. python kernels/bench_static_sparse.py --out DIR [--layers 32] [--contexts 32768 131072]
    PYTHONPATH=. python kernels/bench_static_sparse.py --out /tmp/x --tiny      # CPU smoke test (tiny shapes)
"""
import argparse
import json
import time
from pathlib import Path

import torch

from minicpm4_core.attention import dense_attention
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
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
    print(f'  {name}: {row[name]}', flush=True)


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
    a = ap.parse_args()
    dev = 'cpu' if a.tiny else 'cuda'
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
