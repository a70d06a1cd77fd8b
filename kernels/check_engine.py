"""GPU check of the inference engine and the static decoding stack (issue 13): greedy agreement with `model.generate`
in bf16 and fp32 on CUDA, for dense / InfLLM v2 (past dense_len) x none / w4a16 / ternary, and the CUDA-graph path;
then (session 3) `model.generate` dispatching to the engine (fast=None vs fast=False), the bucketed graphs (which
buckets were captured), sparse='dense' on the static stack, and the new W4A16 kernels (gemv16, dequant + cuBLAS)
against float64 at the 8B shapes.

    PYTHONPATH=. python kernels/check_engine.py [--out results.json]
"""
import argparse
import json
import time

import torch

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.engine import Engine
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.bench import env_stamp


def model_of(sparse: bool, dtype, seed=0):
    kw = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=512, max_position_embeddings=4096)
    if sparse: kw['sparse_config'] = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=4, window_size=128,
                                          init_blocks=1, dense_len=256)
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', **kw)).cuda().to(dtype).eval()


def agreement(a, b):
    n = sum(min(len(x), len(y)) for x, y in zip(a, b))
    same = sum(sum(p == q for p, q in zip(x, y)) for x, y in zip(a, b))
    first = sum(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))) for x, y in zip(a, b))
    return same / max(n, 1), first / max(n, 1)


def session3_checks(prompts) -> list[dict]:
    "model.generate -> engine dispatch, bucketed graphs, sparse='dense' static, gemv16 / dequant kernels."
    from minicpm4_core.kernels.w4a16 import W4A16Config, self_check
    out = []
    def run(name, fn):
        t0 = time.time()
        try: r = fn()
        except Exception as e: r = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        out.append(dict(check=name, seconds=round(time.time() - t0, 2), **r))
    def dispatch():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(False, dtype)
            fast = m.generate(prompts[:1], 64)                        # fast=None on CUDA: the engine (graphs)
            slow = m.generate(prompts[:1], 64, fast=False)
            e = m._engine_fast.engine
            rows.append(dict(dtype=str(dtype), agreement=agreement(fast, slow)[0], graphs=e._static.graphs,
                             captures=list(e._static.captures)))
        return dict(ok=rows[0]['agreement'] == 1.0 and all(r['graphs'] for r in rows), rows=rows)
    def buckets():
        m = model_of(False, torch.float32)
        ref = Engine(m, 1024).generate(prompts[:1], 300, stop_ids=[])
        e = Engine(m, 1024, length_mode='bucket', min_bucket=128)
        got = e.generate(prompts[:1], 300, stop_ids=[])                            # 300 + 300 slots: buckets 512 and 1024
        a = agreement(got, ref)[0]                                    # fp32: rounding of a shorter SDPA may flip a tie
        return dict(ok=a >= 0.95 and e._static.captures == [512, 1024], captures=e._static.captures, agreement=a)
    def sparse_dense():
        m = model_of(True, torch.float32)
        e = Engine(m, 1024, sparse='dense')
        got = e.generate(prompts[:1], 64)
        with e._mode(): want = m.generate(prompts[:1], 64, fast=False)
        return dict(ok=got == want and e.last_timing['backend'] == 'static', agreement=agreement(got, want)[0])
    def kernels():
        rs = self_check(((1, 4096, 16384), (1, 16384, 4096), (1, 4096, 1000 * 8), (300, 4096, 4096), (2048, 4096, 16384)),
                        configs=[None, W4A16Config('gemv16', 1, 128, 128, 4, 4, 2), W4A16Config('gemv16', 1, 64, 128, 1)])
        return dict(ok=all(r['finite'] and r['rel_err'] < 1e-2 for r in rs),
                    cases=[(r['M'], r['K'], r['N'], r['config']['kernel'], r['config']['split_k'], r['rel_err']) for r in rs])
    for name, fn in (('generate_dispatch', dispatch), ('bucket_graphs', buckets), ('sparse_dense_static', sparse_dense),
                     ('w4a16_new_kernels', kernels)):
        run(name, fn)
    return out


def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--out', default=None); a = ap.parse_args()
    res = dict(env_stamp(torch.device('cuda')), rows=[])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (300, 517, 40)]
    for dtype in (torch.float32, torch.bfloat16):
        for sparse in (False, True):
            for quant in (None, 'w4a16', 'ternary'):
                t0 = time.time()
                try:
                    m = model_of(sparse, dtype)
                    eng = Engine(m, max_len=1024, max_batch=3, quant=quant)   # quantizes m in place (both compare it)
                    ref = m.generate(prompts, 64)
                    got = eng.generate(prompts, 64)
                    one = eng.generate(prompts[:1], 64)
                    same, prefix = agreement(ref, got)
                    row = dict(dtype=str(dtype), sparse=sparse, quant=quant, token_agreement=same,
                               agree_until_first_diff=prefix, batch1_path=eng.pick_backend(1) if hasattr(eng, 'pick_backend') else None,
                               batch1_equal_batch=one[0] == got[0], seconds=round(time.time() - t0, 2))
                except Exception as e:
                    row = dict(dtype=str(dtype), sparse=sparse, quant=quant, error=f"{type(e).__name__}: {e}"[:300])
                res['rows'].append(row); print(row, flush=True)
    res['session3'] = extra = session3_checks(prompts)
    for r in extra: print(r, flush=True)
    ok = all('error' not in r and (r['dtype'] != 'torch.float32' or r['token_agreement'] == 1.0) for r in res['rows'])
    ok = ok and all(r.get('ok') for r in extra)
    res['ok'] = ok
    print('ALL OK' if ok else 'FAILED')
    if a.out: open(a.out, 'w').write(json.dumps(res, indent=1, default=str))


if __name__ == '__main__':
    main()
