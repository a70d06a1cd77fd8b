"""Batched InfLLM v2 decoding (session 8, helper B): `Engine(batch_sparse='static')` (`BatchStaticSparseDecoder`, CUDA
graphs) vs the default eager route for a batch past dense_len (the model's layers over the static cache) vs batch 1
(`StaticSparseDecoder`), on the 0.5B shape with random bf16 weights and the released sparse_config, 4 rows of
different lengths (so they complete compression kernels at different steps) at ~16K and ~32K (32,000: LongRoPE's
original 32,768 positions bound the static tables). Per context: decode tok/s summed over the rows, ms per captured
step (sparse, sparse + kc update), greedy agreement of the graph route with the eager route (bf16: ties may flip),
TTFT / prefill split. Stages print as they finish and the JSON is rewritten after each; a time box skips the rest.

    PYTHONPATH=. python kernels/check_batch_sparse.py --out DIR/batch_sparse.json [--budget 60]
    PYTHONPATH=. python kernels/check_batch_sparse.py --cpu-smoke          # tiny fp32 model on the CPU: the same code
"""
import argparse
import json
import time

import torch

from minicpm4_core.bench import env_stamp
from minicpm4_core.config import MiniCPM4Config, default_sparse_config
from minicpm4_core.engine import Engine
from minicpm4_core.model import MiniCPM4ForCausalLM


def agreement(a, b):
    "Fraction of equal tokens over all rows, and the mean fraction before each row's first difference."
    n = sum(min(len(x), len(y)) for x, y in zip(a, b))
    same = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    first = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in zip(a, b))
    return round(same / max(n, 1), 4), round(first / max(n, 1), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=None, help='JSON path (rewritten after each stage)')
    ap.add_argument('--budget', type=float, default=60.0, help='seconds; stages that would not fit are skipped')
    ap.add_argument('--new', type=int, default=64, help='new tokens per row (graph and batch-1 routes)')
    ap.add_argument('--eager-new', type=int, default=16, help='new tokens per row for the slow eager route')
    ap.add_argument('--contexts', default='16384,32000')
    ap.add_argument('--cpu-smoke', action='store_true', help='tiny fp32 model on the CPU (eager, no graphs)')
    a = ap.parse_args()
    t_start = time.time()
    left = lambda: a.budget - (time.time() - t_start)
    cuda = not a.cpu_smoke
    if cuda and not torch.cuda.is_available(): ap.error('no CUDA device: use --cpu-smoke on the CPU')
    dev = torch.device('cuda' if cuda else 'cpu')
    res = dict(env_stamp(dev), check='batch_sparse', cpu_smoke=a.cpu_smoke, budget_s=a.budget, stages=[], rows=[])
    save = lambda: a.out and open(a.out, 'w').write(json.dumps(res, indent=1, default=str))
    S = {}

    def stage(name, fn, need: float):
        row = res['rows'][-1] if res['rows'] else res
        before = set(row)
        if left() < need:
            res['stages'].append(f"{name}: skipped ({left():.0f} s left, needs ~{need:.0f})")
        else:
            t0 = time.time()
            try: fn(); res['stages'].append(f"{name}: {time.time() - t0:.1f} s")
            except Exception as e: res['stages'].append(f"{name}: {type(e).__name__}: {e}"[:400])
        print(res['stages'][-1], json.dumps({k: v for k, v in row.items() if k not in before and k != 'stages'},
                                            default=str), flush=True)
        save()

    def build():
        if cuda:
            c = MiniCPM4Config.from_preset('minicpm4_0_5b', sparse_config=default_sparse_config(), torch_dtype='bfloat16',
                                           max_position_embeddings=32768)
            torch.manual_seed(0)
            with torch.device('cuda'): S['m'] = MiniCPM4ForCausalLM(c).to(torch.bfloat16).eval()
            S['shape'] = 'minicpm4_0_5b'
        else:
            sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=64)
            c = MiniCPM4Config.tiny(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=96, initializer_range=0.3,
                                    torch_dtype='float32', sparse_config=sc)
            torch.manual_seed(0)
            S['m'], S['shape'] = MiniCPM4ForCausalLM(c).eval(), 'tiny'
        res.update(shape=S['shape'], sparse_config=c.sparse_config, dtype=str(S['m'].dtype))

    def tiny():
        """A tiny fp32 InfLLM v2 model: the batched decoder with CUDA graphs (capture_all) == the same decoder eager
        (logits per step, teacher-forced on the graph's tokens) == `model.generate` of each row alone (greedy tokens)."""
        from minicpm4_core.static_sparse import BatchStaticSparseDecoder
        sc = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=4, window_size=128, init_blocks=1, dense_len=256)
        c = MiniCPM4Config.tiny(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                                num_key_value_heads=2, intermediate_size=512, max_position_embeddings=4096,
                                initializer_range=0.3, torch_dtype='float32', sparse_config=sc)
        torch.manual_seed(1)
        m = MiniCPM4ForCausalLM(c).to(dev).eval()
        g = torch.Generator().manual_seed(2)
        dg = BatchStaticSparseDecoder(m, 600, 4, graphs=None)       # graphs on CUDA
        de = BatchStaticSparseDecoder(m, 600, 4, graphs=False)
        new, diff, kinds, got, want = 40, 0.0, [], [], []
        # (sparse / crosses at 385 keys / dense x 2: mixed steps), then every row sparse (the buffers reused)
        for lens in ((517, 380, 200, 40), (517, 450, 400, 390)):
            rows = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in lens]
            with torch.no_grad():
                lg = torch.stack([dg.prefill(b, x) for b, x in enumerate(rows)])
                le = torch.stack([de.prefill(b, x) for b, x in enumerate(rows)])
                if cuda: dg.capture_all()
                toks, diff = [lg.argmax(-1)], max(diff, float((lg - le).abs().max()))
                for _ in range(new - 1):
                    kinds.append(dg.step_kind())
                    lg, le = dg.step(toks[-1]).clone(), de.step(toks[-1]).clone()
                    diff = max(diff, float((lg - le).abs().max()))
                    toks.append(lg.argmax(-1))
            got += torch.stack(toks, 1).tolist()
            want += [m.generate([x], new, stop_ids=[], fast=False)[0] for x in rows]
        T = dict(graphs=sorted(f'{a}{"+kc" if u else ""}' for a, u in dg._graphs), max_abs_diff_graph_vs_eager=diff,
                 steps={f'{k}{"+kc" if u else ""}': kinds.count((k, u)) for k in ('dense', 'mixed', 'sparse')
                        for u in (False, True)},
                 agree_vs_model_generate=agreement(got, want)[0])
        T['ok'] = diff < 1e-3 and T['agree_vs_model_generate'] == 1.0
        res['tiny_fp32'] = T
        del m, dg, de

    def route(r, name, eng, rows, warm, new):
        """Greedy `new` tokens per row through `eng` after a warm-up call on the shorter rows `warm` (past dense_len too:
        Triton compiles, graph captures at max_len; untimed): -> tokens; decode tok/s summed over the rows into r."""
        t0 = time.time()
        eng.generate(warm, 3, stop_ids=[])
        r[f'{name}_warmup_s'] = round(time.time() - t0, 1)
        out = eng.generate(rows, new, stop_ids=[])
        t = eng.last_timing
        r[f'{name}_backend'] = t['backend']
        r[f'{name}_tok_s'] = round(len(rows) * t['decode_steps'] / t['decode_s'], 1)
        r[f'{name}_ttft_s'], r[f'{name}_prefill_s'] = round(t['ttft_s'], 3), round(t.get('prefill_s', 0.0), 3)
        r[f'{name}_setup_s'] = round(t.get('setup_s', 0.0), 3)
        return out

    def context(ctx):
        L = ctx + a.new
        lens = [ctx, ctx - 77, ctx - 250, ctx - 1001] if cuda else [ctx, ctx - 3, ctx - 10, ctx - 21]
        g = torch.Generator().manual_seed(ctx)
        V = S['m'].config.vocab_size
        rows = [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]
        st = S['m'].config.sparse_config
        w = st['dense_len'] + 8 * st['block_size']                      # warm-up rows: just past dense_len (cheap)
        warm = [x[:w - 7 * i] for i, x in enumerate(rows)]
        r = dict(context=ctx, lens=lens, new=a.new, eager_new=a.eager_new, max_len=L)
        res['rows'].append(r)
        S.pop('g', None)                                                  # the graph route's tokens of this context

        def graph():
            e = S['e'] = Engine(S['m'], L, max_batch=4, batch_sparse='static')
            t0 = time.time()
            S['g'] = route(r, 'graph', e, rows, warm, a.new)
            r['graph_wall_s'] = round(time.time() - t0, 1)
            d = e._bsparse
            r['graphs'] = sorted(f'{m}{"+kc" if u else ""}' for m, u in d._graphs)
            r['graph_step_ms_sparse'] = round(d.time_step(mode='sparse'), 4)
            r['graph_step_ms_sparse_kc'] = round(d.time_step(mode='sparse', update=True), 4)
            r['graph_step_ms_mixed'] = round(d.time_step(mode='mixed'), 4)   # both attentions (rare steps)
            r['memory_GB_graph_decoder'] = round(sum(t.numel() * t.element_size() for t in
                                                     (d.base.stack.kv, d.kc)) / 1e9, 3)
            del S['e'], e, d
            if cuda: torch.cuda.empty_cache()

        def batch1():
            e = Engine(S['m'], L)
            out = route(r, 'b1', e, rows[:1], warm[:1], a.new)
            if 'g' in S:
                r['b1_agree_graph_row0'] = agreement(out, S['g'][:1])[0]
                r['graph_vs_b1_tok_s'] = round(r['graph_tok_s'] / r['b1_tok_s'], 2)
            del e
            if cuda: torch.cuda.empty_cache()

        def eager():
            e = Engine(S['m'], L, max_batch=4, batch_sparse='eager')      # the model's eager layers (the default until s8)
            out = route(r, 'eager', e, rows, warm, a.eager_new)
            if 'g' in S:
                r['agree_graph_vs_eager'], r['agree_prefix_graph_vs_eager'] = agreement([o[:a.eager_new] for o in S['g']],
                                                                                        out)
                r['graph_vs_eager_tok_s'] = round(r['graph_tok_s'] / r['eager_tok_s'], 2)
                r['ok'] = r['agree_graph_vs_eager'] >= (1.0 if not cuda else 0.5)
            del e
            if cuda: torch.cuda.empty_cache()

        big = ctx > 20000
        stage(f'{ctx}: graph route (batch 4)', graph, 14 if big else 8)
        stage(f'{ctx}: batch 1 StaticSparseDecoder', batch1, 6 if big else 4)
        stage(f'{ctx}: eager route (batch 4)', eager, 12 if big else 7)

    stage('build', build, 0)
    stage('tiny fp32: graphs == eager == model.generate', tiny, 10)
    for ctx in ([int(x) for x in a.contexts.split(',')] if cuda and 'm' in S else [70, 90] if 'm' in S else []):
        context(ctx)
    res['wall_s'] = round(time.time() - t_start, 1)
    res['ok'] = bool(res['rows']) and all(r.get('ok') for r in res['rows']) and res.get('tiny_fp32', {}).get('ok', False)
    save()
    print('OK' if res['ok'] else 'NOT OK (see stages)', f"{res['wall_s']} s", flush=True)


if __name__ == '__main__':
    main()
