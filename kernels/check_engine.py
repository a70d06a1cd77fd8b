"""GPU check of the inference engine and the static decoding stack (issue 13): greedy agreement with `model.generate`
in bf16 and fp32 on CUDA, for dense / InfLLM v2 (past dense_len) x none / w4a16 / ternary, and the CUDA-graph path;
then (session 3) `model.generate` dispatching to the engine (fast=None vs fast=False), the bucketed graphs (which
buckets were captured), sparse='dense' on the static stack, and the new W4A16 kernels (gemv16, dequant + cuBLAS)
against float64 at the 8B shapes; (session 4) the static stack's one-token attention through `dense_decode` (length
on the device, one graph) vs the masked SDPA, and packed w4a16 / ternary linears inside the CUDA graphs; (session 5)
InfLLM v2 targets past dense_len through `StaticSparseDecoder` in the engine and in model.generate, batches in
model.generate's fast path; (session 7) FR-Spec over an InfLLM v2 target past dense_len in CUDA graphs
(`sparse_spec.SparseFastSpec`): graph == eager, agreement, and its cost at 16K on the 0.5B shape; (session 11) the
weights the engine shares with the model (dense and w4a16), W4A16 kernels on column views, memory_plan vs allocated.

    PYTHONPATH=. python kernels/check_engine.py [--out results.json] [--parts agreement,session3,session4,session5,session6,session7,session11]
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


def _recorder(out: list):
    "run(name, fn): time fn(), append dict(check=name, seconds=..., **fn()) to out (an exception becomes ok=False)."
    def run(name, fn):
        t0 = time.time()
        try: r = fn()
        except Exception as e: r = dict(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        out.append(dict(check=name, seconds=round(time.time() - t0, 2), **r))
    return run


def session3_checks(prompts) -> list[dict]:
    "model.generate -> engine dispatch, bucketed graphs, sparse='dense' static, gemv16 / dequant kernels."
    from minicpm4_core.kernels.w4a16 import W4A16Config, self_check
    out = []
    run = _recorder(out)
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


def session4_checks(prompts) -> list[dict]:
    "dense_decode in the static graphs vs masked SDPA; packed linears (w4a16, ternary) captured in the graphs."
    from minicpm4_core.static_decode import StaticDecoder
    out = []
    run = _recorder(out)
    def split_vs_sdpa():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(False, dtype)
            got = [Engine(m, 1024, decode_kernel=k).generate(prompts[:2][i:i + 1], 200, stop_ids=[])[0]
                   for k in ('auto', 'sdpa') for i in range(2)]
            a = agreement(got[:2], got[2:])[0]
            ds = {k: StaticDecoder(m, 1024, decode_kernel=k) for k in ('auto', 'sdpa')}
            ids = prompts[1][:500]
            for d in ds.values(): d.prefill(ids[:400])
            steps = {k: torch.stack([d.step(t).float().clone() for t in ids[400:]]) for k, d in ds.items()}
            err = ((steps['auto'] - steps['sdpa']).abs().max() / steps['sdpa'].abs().max()).item()
            ms = {k: StaticDecoder(m, 4096, decode_kernel=k).capture().time_step() for k in ('auto', 'sdpa')}
            rows.append(dict(dtype=str(dtype), agreement=a, rel_err_logits=err, graphs=ds['auto'].graphs,
                             step_ms_at_4096_slots=ms))
        return dict(ok=rows[0]['agreement'] >= 0.99 and rows[0]['rel_err_logits'] < 1e-3 and
                    rows[1]['rel_err_logits'] < 5e-2, rows=rows)
    def packed_graphs():
        rows = []
        for quant in ('w4a16', 'ternary'):
            for dtype in (torch.float32, torch.bfloat16):
                m = model_of(False, dtype)
                e = Engine(m, 1024, quant=quant)
                got = e.generate(prompts[:1], 64, stop_ids=[])
                with e._mode(): want = m.generate(prompts[:1], 64, stop_ids=[], fast=False)
                rows.append(dict(quant=quant, dtype=str(dtype), agreement=agreement(got, want)[0],
                                 backend=e.last_timing['backend'], graphs=e._static.graphs,
                                 decode_tok_s=e.last_timing['decode_steps'] / e.last_timing['decode_s']))
        ok = all(r['backend'] == 'static' and r['graphs'] for r in rows)
        ok = ok and all(r['agreement'] >= 0.95 for r in rows if r['dtype'] == 'torch.float32')
        return dict(ok=ok, rows=rows)
    def spec_sparse_tree():
        "FR-Spec tree verification over an InfLLM v2 target past dense_len (sparse_tree_backend): the target's tokens."
        from minicpm4_core.frspec import EagleDraft, SpecStats, speculative_generate
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(True, dtype)                                  # dense_len=256 < the 300-token prompt
            draft = EagleDraft(m.config).to('cuda', dtype).eval()      # untrained: exactness, not speed-up
            t0 = time.time(); ref = m.generate(prompts[:1], 48, stop_ids=[], fast=False)[0]; t1 = time.time()
            st = SpecStats()
            got = speculative_generate(m, draft, prompts[0], 48, method='tree', topk=3, tree_size=10, stop_ids=[],
                                       stats=st)
            rows.append(dict(dtype=str(dtype), agreement=agreement([got], [ref])[0], target_s=round(t1 - t0, 2),
                             spec_s=round(time.time() - t1, 2), mean_accept=st.mean_accept_length))
        return dict(ok=rows[0]['agreement'] == 1.0, rows=rows)
    def batch_graphs():
        "Batch 3 (300 / 517 / 40 tokens) through BatchStaticDecoder (one graph, per-row lengths) vs the model's loop."
        rows = []
        for quant in (None, 'w4a16'):
            for dtype in (torch.float32, torch.bfloat16):
                m = model_of(False, dtype)
                e = Engine(m, 1024, max_batch=3, quant=quant)
                got = e.generate(prompts, 64, stop_ids=[])
                with e._mode(): want = m.generate(prompts, 64, stop_ids=[], fast=False)
                t = e.last_timing
                rows.append(dict(quant=quant, dtype=str(dtype), agreement=agreement(got, want)[0], backend=t['backend'],
                                 graphs=e._batch.graphs, decode_tok_s=3 * t['decode_steps'] / t['decode_s']))
        ok = all(r['backend'] == 'static' and r['graphs'] for r in rows)
        ok = ok and all(r['agreement'] >= 0.95 for r in rows if r['dtype'] == 'torch.float32')
        return dict(ok=ok, rows=rows)
    for name, fn in (('dense_decode_vs_sdpa', split_vs_sdpa), ('packed_linears_in_graphs', packed_graphs),
                     ('batch_static_graphs', batch_graphs),
                     ('frspec_tree_sparse_target', spec_sparse_tree)):
        run(name, fn)
    return out


def session5_checks(prompts) -> list[dict]:
    """InfLLM v2 targets past dense_len through StaticSparseDecoder inside the engine (dense graph below dense_len,
    sparse graphs after; bf16/fp32 x none/w4a16/ternary) and through model.generate's fast path; model.generate's
    fast path for a batch (BatchStaticDecoder)."""
    out = []
    run = _recorder(out)
    p = prompts[0]           # 300 + 120 new tokens: sparse from 385 keys on (> dense_len 256 and > 6 attended blocks x 64)
    def sparse_engine():
        rows = []
        for quant in (None, 'w4a16', 'ternary'):
            for dtype in (torch.float32, torch.bfloat16):
                m = model_of(True, dtype)
                e = Engine(m, 1024, quant=quant)
                got = e.generate([p], 120, stop_ids=[])
                with e._mode(): want = m.generate([p], 120, stop_ids=[], fast=False)
                d, t = e._sparse_dec, e.last_timing
                rows.append(dict(quant=quant, dtype=str(dtype), agreement=agreement(got, want)[0],
                                 agree_until_first_diff=agreement(got, want)[1], backend=t['backend'],
                                 sparse_decoder=d is not None, graphs=sorted(map(str, d._graphs)) if d else None,
                                 decode_tok_s=t['decode_steps'] / t['decode_s']))
        ok = all(r['backend'] == 'static' and r['sparse_decoder'] and len(r['graphs'] or []) == 4 for r in rows)
        ok = ok and all(r['agreement'] >= 0.95 for r in rows if r['dtype'] == 'torch.float32')
        return dict(ok=ok, rows=rows)
    def generate_sparse():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(True, dtype)
            fast = m.generate([p], 120, stop_ids=[])            # fast=None on CUDA: the engine
            slow = m.generate([p], 120, stop_ids=[], fast=False)
            e = m._engine_fast.engine
            rows.append(dict(dtype=str(dtype), agreement=agreement(fast, slow)[0], max_len=e.max_len,
                             sparse_decoder=e._sparse_dec is not None))
        return dict(ok=rows[0]['agreement'] >= 0.95 and all(r['sparse_decoder'] for r in rows), rows=rows)
    def generate_batch():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(False, dtype)
            fast = m.generate(prompts, 64, stop_ids=[])
            slow = m.generate(prompts, 64, stop_ids=[], fast=False)
            e = m._engine_fast.engine
            rows.append(dict(dtype=str(dtype), agreement=agreement(fast, slow)[0], batch_decoder=e._batch is not None,
                             graphs=bool(e._batch and e._batch.graphs)))
        return dict(ok=rows[0]['agreement'] >= 0.95 and all(r['graphs'] for r in rows), rows=rows)
    for name, fn in (('sparse_static_engine', sparse_engine), ('generate_fast_sparse', generate_sparse),
                     ('generate_fast_batch', generate_batch)):
        run(name, fn)
    return out


def session6_checks(prompts) -> list[dict]:
    "The loop's rare host reads keep the output; fused packed linears == unfused; spec over a packed target."
    from minicpm4_core import static_decode as S
    from minicpm4_core.engine import convert_quant
    from minicpm4_core.frspec import EagleDraft, frequent_ids
    out = []
    run = _recorder(out)
    def stop_loop():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(False, dtype)
            ref = Engine(m, 1024, max_batch=3).generate(prompts, 64, stop_ids=[])
            early = {t for r in ref for t in r[:10]}          # stops that first come mid-answer (if the text allows),
            stop = sorted({next((t for t in r[10:40] if t not in early), -1) for r in ref} - {-1})
            stop = stop or [ref[-1][0]]                       # else one that ends the last row at once (rows differ)
            got = {k: Engine(m, 1024, max_batch=3, sync_every=k).generate(prompts, 64, stop_ids=stop) for k in (1, 16)}
            one = {k: Engine(m, 1024, sync_every=k).generate(prompts[:1], 64, stop_ids=stop) for k in (1, 16)}
            want = m.generate(prompts, 64, stop_ids=stop, fast=False)
            rows.append(dict(dtype=str(dtype), stop=stop, same_sync=got[1] == got[16] and one[1] == one[16],
                             agreement=agreement(got[16], want)[0], lengths=[len(r) for r in got[16]]))
        ok = all(r['same_sync'] and min(r['lengths']) < 64 for r in rows) and rows[0]['agreement'] == 1.0
        return dict(ok=ok, rows=rows)
    def fused_packed():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(False, dtype)
            convert_quant(m, 'w4a16')
            ids = prompts[0][:200]
            d1 = S.StaticDecoder(m, 512)
            S.FUSE_PACKED = False
            try: d0 = S.StaticDecoder(m, 512)
            finally: S.FUSE_PACKED = True
            a, b = d1.prefill(ids).float(), d0.prefill(ids).float()
            g1, g0 = d1.generate(ids, 64), d0.generate(ids, 64)
            rows.append(dict(dtype=str(dtype), fused=type(d1.stack.p[0]['wqkv']).__name__,
                             prefill_max_abs_diff=float((a - b).abs().max()), ref_max_abs=float(b.abs().max()),
                             greedy_agreement=agreement([g1], [g0])[0]))
        ok = rows[0]['fused'] == 'QuantLinear' and rows[0]['prefill_max_abs_diff'] < 1e-3 and rows[0]['greedy_agreement'] == 1.0
        return dict(ok=ok, rows=rows)
    def spec_int4():
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            m = model_of(False, dtype)
            convert_quant(m, 'w4a16')
            torch.manual_seed(3)
            draft = EagleDraft(m.config).cuda().to(dtype).eval()
            vocab = frequent_ids(torch.rand(m.config.vocab_size), 256).cuda()
            plain = Engine(m, 1024).generate([prompts[0]], 64, stop_ids=[])
            e = Engine(m, 1024, spec=(draft, vocab))
            got = e.generate([prompts[0]], 64, stop_ids=[])
            rows.append(dict(dtype=str(dtype), agreement=agreement(got, plain)[0], quant=e.quant,
                             accept=e.spec_stats['mean_accept_length'], graphs=e.spec.graphs))
        return dict(ok=rows[0]['agreement'] == 1.0 and all(r['graphs'] for r in rows), rows=rows)
    for name, fn in (('loop_stop_ids', stop_loop), ('fused_packed_w4a16', fused_packed), ('spec_over_w4a16', spec_int4)):
        run(name, fn)
    return out


def session7_checks(prompts, budget_s: float = 78.0, save=None) -> list[dict]:
    """FR-Spec over an InfLLM v2 target past dense_len in CUDA graphs (`sparse_spec.SparseFastSpec`), in stages that each
    print and save as they finish (a time box skips the rest): at a 16K prompt on the 0.5B shape (random bf16 weights,
    the released sparse_config, a random draft: acceptance ~1, so the figures are costs) ms per round (graph replay)
    for the edge row's tree 6x8/32 and FastSpec's default 5x4/16, ms per plain StaticSparseDecoder step, tok/s of both,
    the acceptance that breaks even, spec tokens vs plain decoding's (`fallback` off), then with `fallback` on; the verify variants (one masked SDPA - what the
    edge row ran first -, one attention call per kv head); a tiny fp32 model: graph == eager == model.generate, a
    verify's logits vs `tree_forward`; last, if time is left, a kernel profile of one eager round."""
    from minicpm4_core import sparse_spec as SS
    from minicpm4_core.config import default_sparse_config
    from minicpm4_core.frspec import EagleDraft, frequent_ids, tree_attention_mask, tree_forward
    from minicpm4_core.static_sparse import StaticSparseDecoder
    from minicpm4_core.bench import kernel_times
    t_start = time.time()
    left = lambda: budget_s - (time.time() - t_start)
    r = dict(check='sparse_spec_16k_0.5b', ok=False, stages=[])
    out = [r]

    def stage(name, fn, need: float):
        if left() < need:
            r['stages'].append(f"{name}: skipped ({left():.0f} s left, needs ~{need:.0f})"); print(r['stages'][-1], flush=True)
        else:
            t0 = time.time()
            try: fn(); r['stages'].append(f"{name}: {time.time() - t0:.1f} s")
            except Exception as e: r['stages'].append(f"{name}: {type(e).__name__}: {e}"[:300])
            print(r['stages'][-1], {k: v for k, v in r.items() if k not in ('stages', 'top_kernels', 'check')}, flush=True)
        if save: save(out)

    def round_ms(e, p, reps=8):
        "Median ms of one round alone: graph replays from the state after the prompt (restored each time)."
        e._prefill(p)
        saved = [getattr(e, n).clone() for n in e._STATE]
        g = e._graphs['_round'].replay if '_round' in e._graphs else e._round   # (a CPU dry run has no graphs)
        def one():
            for t, v in zip((getattr(e, n) for n in e._STATE), saved): t.copy_(v)
            g()
        ts = []
        for _ in range(reps):
            one(); torch.cuda.synchronize(); t1 = time.perf_counter(); one(); torch.cuda.synchronize()
            ts.append(time.perf_counter() - t1)
        return round(sorted(ts)[len(ts) // 2] * 1e3, 3)

    ctx, new = 16384, 64
    L = ctx + new + 96
    S = {}

    def build():
        c = MiniCPM4Config.from_preset('minicpm4_0_5b', sparse_config=default_sparse_config(), torch_dtype='bfloat16',
                                       max_position_embeddings=32768)
        torch.manual_seed(0)
        with torch.device('cuda'): S['m'] = MiniCPM4ForCausalLM(c).to(torch.bfloat16).eval()
        S['draft'] = EagleDraft(c).cuda().to(torch.bfloat16).eval()
        S['vocab'] = frequent_ids(torch.rand(c.vocab_size), 8192).cuda()
        S['p'] = torch.randint(0, c.vocab_size, (ctx,), generator=torch.Generator().manual_seed(2)).tolist()
        r.update(context=ctx, new=new, shape='minicpm4_0_5b', attn_chunk=SS.ATTN_CHUNK)

    def spec_main():                          # the edge row's tree; one prefill chunk (the model decides per call)
        t0 = time.time()
        e = S['e'] = SS.SparseFastSpec(S['m'], S['draft'], S['vocab'], max_len=L, chunk=ctx, depth=6, topk=8,
                                       tree_size=32)
        e.fallback = None                                # the rounds' own cost (a random draft would fall back)
        e.generate(S['p'], 8)                                               # tuning, capture, compiles: untimed
        r['warmup_s'] = round(time.time() - t0, 1)
        r['slots'], r['efficient_lse_kernel'] = e.sd.max_len, SS._EFFICIENT
        r['round_ms_tree6x8_32'] = round_ms(e, S['p'])

    def plain():
        d = S['d'] = StaticSparseDecoder(S['m'], L)
        cache = S['m'].new_cache(1, ctx)
        with torch.no_grad(): SS.prefill_hidden(S['m'], torch.tensor(S['p']).cuda(), cache, ctx)
        d.load_cache(cache); del cache
        d.capture_all()
        r['plain_step_ms'] = round(d.time_step(), 4)
        r['break_even_accept_tree6x8_32'] = round(r['round_ms_tree6x8_32'] / r['plain_step_ms'], 2)

    def decode():
        e, d = S['e'], S['d']
        torch.cuda.synchronize(); t0 = time.perf_counter()
        got = e.generate(S['p'], new)
        torch.cuda.synchronize()
        st = e.last_stats
        r.update(spec_wall_s=round(time.perf_counter() - t0, 3), spec_decode_s=round(st['decode_s'], 4),
                 rounds=st['rounds'], accept=st['mean_accept_length'], spec_tok_s=round((new - 1) / st['decode_s'], 1))
        cache = S['m'].new_cache(1, ctx)
        with torch.no_grad(): SS.prefill_hidden(S['m'], torch.tensor(S['p']).cuda(), cache, ctx)
        d.load_cache(cache); del cache
        tok, plain_t = torch.tensor([got[0]]).cuda(), []
        torch.cuda.synchronize(); t1 = time.perf_counter()
        for _ in range(new - 1):
            tok = d.step(tok).argmax().view(1); plain_t.append(tok)
        torch.cuda.synchronize()
        r['plain_tok_s'] = round((new - 1) / (time.perf_counter() - t1), 1)
        S['plain_out'] = torch.cat(plain_t).tolist()
        r['agreement_spec_vs_plain'] = agreement([got[1:new]], [S['plain_out']])[0]   # bf16 ties may flip
        r['ok'] = r['agreement_spec_vs_plain'] >= 0.5

    def fallback():                              # FastSpec.fallback (the default 0.95): a random draft should trip it
        e = S['e']
        e.fallback = 0.95
        got = e.generate(S['p'], new)
        st = e.last_stats
        r.update(fallback=st['fallback'], fallback_rounds=st['rounds'],
                 fallback_tok_s=round((new - 1) / st['decode_s'], 1),
                 fallback_agreement_vs_plain=agreement([got[1:new]], [S['plain_out']])[0])

    def variant(name, **kw):
        def fn():
            old = (SS.TREE_SELECT, SS.ATTN_CHUNK, SS.ATTN_GROUPED, SS.TREE_ATTN)
            SS.TREE_SELECT, SS.ATTN_CHUNK, SS.ATTN_GROUPED = kw.get('select', 'masks'), kw.get('chunk', 512), \
                kw.get('grouped', False)
            SS.TREE_ATTN = kw.get('attn', 'split')        # the session-7 variants name the torch attentions
            try:
                ev = SS.SparseFastSpec(S['m'], S['draft'], S['vocab'], max_len=L, chunk=ctx,
                                       **kw.get('tree', dict(depth=6, topk=8, tree_size=32)))
                ev.tune = False
                ev.generate(S['p'], 4)
                r[f'round_ms_{name}'] = round_ms(ev, S['p'], 5)
                del ev
            finally: SS.TREE_SELECT, SS.ATTN_CHUNK, SS.ATTN_GROUPED, SS.TREE_ATTN = old
        return fn

    def tiny():
        rows = []
        for dtype in (torch.float32,):
            kw = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=512, max_position_embeddings=4096, initializer_range=0.3,
                      sparse_config=dict(kernel_size=32, kernel_stride=16, block_size=64, topk=4, window_size=128,
                                         init_blocks=1, dense_len=256))
            torch.manual_seed(0)
            m = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', **kw)).cuda().to(dtype).eval()
            torch.manual_seed(3)
            draft = EagleDraft(m.config).cuda().to(dtype).eval()
            p = prompts[1]                                          # 517 tokens: past dense_len=256
            want = m.generate([p], 32, stop_ids=[], fast=False)[0]
            vocab = torch.tensor(sorted(set(want) | {1, 2, 3, 4})).cuda()
            g = SS.SparseFastSpec(m, draft, vocab, depth=4, topk=4, tree_size=16, max_len=1024)
            ea = SS.SparseFastSpec(m, draft, vocab, depth=4, topk=4, tree_size=16, max_len=1024, graphs=False)
            got_g, got_e = g.generate(p, 32), ea.generate(p, 32)
            gen, par, dep = torch.Generator().manual_seed(5), [-1], [0]
            for i in range(1, 17):
                cands = [j for j in range(i) if dep[j] < 4]
                j = cands[int(torch.randint(0, len(cands), (1,), generator=gen))]
                par.append(j); dep.append(dep[j] + 1)
            dep, mask = torch.tensor(dep).cuda(), tree_attention_mask(par).cuda()
            tok = torch.randint(0, 1024, (17,), generator=gen).cuda()
            ea._prefill(p)
            with torch.no_grad():
                lg, _ = ea._verify_forward(tok, torch.tensor([len(p)]).cuda(), dep, mask)
                cache = m.new_cache(1, len(p) + 32)
                SS.prefill_hidden(m, torch.tensor(p).cuda(), cache, 1024)
                ref, _ = tree_forward(m, tok[None], len(p) + dep, mask, cache)
            rows.append(dict(dtype=str(dtype), graph_equals_eager=got_g == got_e, equals_model=got_g == want,
                             accept=g.last_stats['mean_accept_length'],
                             verify_max_abs_diff=float((lg.float() - ref[0].float()).abs().max())))
        r['tiny'] = rows

    def profile():
        e = S['e']
        e._prefill(S['p'])
        kt = kernel_times([e._round], n=1)
        top = sorted(kt.items(), key=lambda kv: -kv[1]['us'] * kv[1]['per_step'])[:16]
        r['round_kernel_us_total'] = round(sum(v['us'] * v['per_step'] for v in kt.values()), 1)
        r['round_launches'] = round(sum(v['per_step'] for v in kt.values()), 1)
        r['top_kernels'] = {k_[:60]: [round(v['us'] * v['per_step'], 1), v['per_step']] for k_, v in top}
        print(r['top_kernels'], flush=True)

    stage('build', build, 60)
    stage('spec tree6x8/32: warm-up + round', spec_main, 50)
    stage('plain step', plain, 30)
    stage('spec + plain decode', decode, 20)
    stage('fallback to plain steps', fallback, 10)
    stage('round tree5x4/16', variant('tree5x4_16', tree=dict(depth=5, topk=4, tree_size=16)), 14)
    stage('round one SDPA (no split)', variant('sdpa', chunk=None), 12)
    stage('round grouped', variant('grouped', grouped=True), 12)
    stage('tiny fp32 exactness', tiny, 12)
    stage('profile', profile, 12)
    return out


def session11_checks(prompts) -> list[dict]:
    """Sessions 10-11 on CUDA: the weights the engine shares (SHARE_WEIGHTS, dense and w4a16: the model's q|k|v and
    gate|up are views of the fused tensors), the W4A16 kernels on column views at the 8B q|k|v shape, and
    `memory_plan` against what an engine really allocates."""
    from minicpm4_core.engine import memory_plan
    from minicpm4_core.frspec import EagleDraft
    from minicpm4_core.kernels.w4a16 import random_w4, w4a16_matmul
    out = []
    run = _recorder(out)
    def shared():
        rows = []
        for quant in (None, 'w4a16'):
            m = model_of(False, torch.bfloat16)
            eng = Engine(m, 1024, max_batch=3, quant=quant)
            got = eng.generate(prompts, 64, stop_ids=[])
            a, f = m.model.layers[0].self_attn, eng._static.stack.p[0]['wqkv'] if eng._static else None
            if f is None: eng.generate(prompts[:1], 8, stop_ids=[]); f = eng._static.stack.p[0]['wqkv']
            ptr = (a.q_proj.weight if quant is None else a.q_proj.qweight).data_ptr()
            rows.append(dict(quant=quant, views=ptr == (f if quant is None else f.qweight).data_ptr(),
                             agreement=agreement(got, m.generate(prompts, 64, stop_ids=[], fast=False))[0],
                             static_stack_bytes=eng.memory()['static_stack']))
        return dict(ok=all(r['views'] and r['agreement'] > 0.9 for r in rows), rows=rows)
    def column_views():
        rows = []
        K, G, widths = 4096, 128, (4096, 256, 256)                 # the 8B q|k|v
        qw, s, qz = random_w4(K, sum(widths), G, device='cuda', seed=3)
        a = 0
        for w in widths:
            v = qw[:, a:a + w], s[:, a:a + w], qz[:, a // 8:(a + w) // 8]
            for M in (1, 33, 2048):
                x = torch.randn(M, K, device='cuda', dtype=torch.bfloat16)
                y, yc = w4a16_matmul(x, *v, G), w4a16_matmul(x, *(t.contiguous() for t in v), G)
                rows.append(dict(offset=a, width=w, M=M, equal=bool(torch.equal(y, yc)),
                                 rel=float((y.float() - yc.float()).norm() / yc.float().norm())))
            a += w
        return dict(ok=all(r['rel'] < 1e-3 for r in rows), rows=rows)
    def plan_vs_allocated():
        rows = []
        for quant, spec in ((None, False), ('w4a16', False), (None, True)):
            m = model_of(False, torch.bfloat16)
            if quant: Engine(m, 8, quant=quant)                    # pack first: weights are not what is measured
            torch.cuda.synchronize(); base = torch.cuda.memory_allocated()
            sp = (EagleDraft(m.config).to('cuda', torch.bfloat16).eval(), torch.arange(256, device='cuda')) if spec else None
            eng = Engine(m, 1024, spec=sp, graphs=False)
            eng.generate(prompts[:1], 8, stop_ids=[])
            torch.cuda.synchronize(); held = torch.cuda.memory_allocated() - base
            p = memory_plan(m.config, 1024, dtype=torch.bfloat16, quant=quant, spec_vocab=256 if spec else None)
            rows.append(dict(quant=quant, spec=spec, plan=p['static'] + p['spec'], allocated=held))
            del eng, m
        return dict(ok=all(r['plan'] <= r['allocated'] <= 1.1 * r['plan'] + (4 << 20) for r in rows), rows=rows)
    run('shared weights (bf16, dense and w4a16)', shared)
    run('w4a16 column views == copies (8B q|k|v)', column_views)
    run('memory_plan vs allocated', plan_vs_allocated)
    return out


def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--out', default=None)
    ap.add_argument('--parts', default='agreement,session3,session4,session5,session6', help='comma list of the parts to run')
    a = ap.parse_args()
    parts = set(a.parts.split(','))
    known = {'agreement', 'session3', 'session4', 'session5', 'session6', 'session7', 'session11'}
    if not parts <= known: ap.error(f"--parts: choose from {sorted(known)}; got {a.parts!r}")
    res = dict(env_stamp(torch.device('cuda')), rows=[], parts=sorted(parts))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1024, (n,), generator=g).tolist() for n in (300, 517, 40)]
    for dtype in (torch.float32, torch.bfloat16) if 'agreement' in parts else ():
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
    res['session3'] = extra = session3_checks(prompts) if 'session3' in parts else []
    res['session4'] = extra4 = session4_checks(prompts) if 'session4' in parts else []
    res['session5'] = extra5 = session5_checks(prompts) if 'session5' in parts else []
    res['session6'] = extra6 = session6_checks(prompts) if 'session6' in parts else []
    def save7(rows):                                  # the session7 part saves after each of its stages
        res['session7'] = rows
        if a.out: open(a.out, 'w').write(json.dumps(res, indent=1, default=str))
    res['session7'] = extra7 = session7_checks(prompts, save=save7) if 'session7' in parts else []
    res['session11'] = extra11 = session11_checks(prompts) if 'session11' in parts else []
    for r in extra + extra4 + extra5 + extra6 + extra7 + extra11: print(r, flush=True)
    extra = extra + extra4 + extra5 + extra6 + extra7 + extra11
    ok = all('error' not in r and (r['dtype'] != 'torch.float32' or r['token_agreement'] == 1.0) for r in res['rows'])
    ok = ok and all(r.get('ok') for r in extra)
    res['ok'] = ok
    print('ALL OK' if ok else 'FAILED')
    if a.out: open(a.out, 'w').write(json.dumps(res, indent=1, default=str))


if __name__ == '__main__':
    main()
