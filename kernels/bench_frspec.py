"""FR-Spec benchmarks at the MiniCPM4 vocabulary (73,448 ids), one GPU, one run.

(a) Draft LM-head time, hidden 1024 and 4096, full vocabulary vs 8K/16K/32K frequent-id subsets.
(b) End-to-end greedy decoding at batch 1: plain target decoding vs speculative decoding with the full-vocabulary
    draft vs the FR-Spec draft, same prompts, outputs compared token for token, mean acceptance length.

The target: the MiniCPM4-0.5B shape (hidden 1024, 16/2 heads, SwiGLU 4096, tied embeddings, vocab 73,448; depth
--layers, 24 = the real 0.5B) trained here for a few hundred steps on the embedded synthetic corpus, tokenized by a
4,096-id BPE whose ids are scattered (a fixed random injection) over the 73,448-id space: the LM head has its real
size, but the corpus only ever uses 4,096 ids (so any k >= 4,096 covers 100% of the tokens; small k show the
coverage effect). The draft: one EAGLE-style layer trained on the target's own greedy text with the project's
training loop. All decoding methods run through `FastSpec` (one CUDA graph per token or per round).

    python kernels/bench_frspec.py                       # GPU; writes kernels/results/frspec/<device>-<date>/
    python kernels/bench_frspec.py --smoke --out /tmp/frs    # CPU pipeline check, tiny shapes
    python kernels/bench_frspec.py --round-profile --out DIR  # where a FastSpec round's time goes (random weights)

(from the repository root, or anywhere after `pip install -e .`; timing and stamps come from `minicpm4_core.bench`)
"""
import argparse
import copy
import json
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (AdamW imports it on first use: do it before any training deadline starts)

from minicpm4_core import data as D
from minicpm4_core import frspec as S
from minicpm4_core.bench import env_stamp, run_dir
from minicpm4_core.io import atomic_write_json
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.train import TrainConfig, train

V_MINICPM4 = 73448


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


class RemapTokenizer:
    "A trained BPE whose ids are mapped into a larger id space by a fixed injection `table` (small id -> big id)."
    def __init__(self, tok, table, vocab_size):
        self.tok, self.table, self.vocab_size = tok, table, vocab_size
        self.bos_id, self.eos_id = int(table[tok.bos_id]), int(table[tok.eos_id])

    def encode_batch(self, texts):
        return [[self.table[i] for i in ids] for ids in self.tok.encode_batch(texts)]


class deadline:
    "Interrupt the project's train() loop (it stops cleanly on KeyboardInterrupt) after `seconds`."
    def __init__(self, seconds): self.s = int(seconds)
    def __enter__(self):
        def boom(*_): raise KeyboardInterrupt
        self.old = signal.signal(signal.SIGALRM, boom); signal.alarm(self.s)
    def __exit__(self, *exc):
        signal.alarm(0); signal.signal(signal.SIGALRM, self.old)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default=None, help='folder (default: kernels/results/frspec/<device>-<date>/)')
    ap.add_argument('--smoke', action='store_true', help='tiny shapes on the CPU: checks the pipeline only')
    ap.add_argument('--layers', type=int, default=24)
    ap.add_argument('--docs', type=int, default=30000)
    ap.add_argument('--train-steps', type=int, default=500)
    ap.add_argument('--lr', type=float, default=1e-2)
    ap.add_argument('--train-seconds', type=int, default=90, help='stop target training after this long')
    ap.add_argument('--draft-seconds', type=int, default=45, help='stop draft training after this long')
    ap.add_argument('--draft-steps', type=int, default=400)
    ap.add_argument('--distill-prompts', type=int, default=512)
    ap.add_argument('--prompts', type=int, default=8)
    ap.add_argument('--new', type=int, default=128)
    ap.add_argument('--skip-head', action='store_true')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--replot-head', metavar='JSON', help='only redraw frspec_lm_head.png from a frspec_lm_head.json')
    ap.add_argument('--round-profile', action='store_true',
                    help='only profile FastSpec rounds on random weights of the 0.5B shape (phases, kernels, host loop)')
    ap.add_argument('--configs', default='tree6x8/32,tree8x8/48,chain4', help='--round-profile: spec configurations')
    ap.add_argument('--prompt-len', type=int, default=128, help='--round-profile: prompt tokens')
    ap.add_argument('--k', type=int, default=2048, help="--round-profile: the FR-Spec head's ids (the edge run's k)")
    ap.add_argument('--round-only', default='', help='--round-profile: more configurations, round graph time only')
    ap.add_argument('--time-box', type=float, default=80.0,
                    help='--round-profile: start no configuration after this many seconds (round-only: +15 s)')
    ap.add_argument('--int4', action='store_true', help='--round-profile: also the w4a16 target forward by rows')
    ap.add_argument('--no-kernels', action='store_true', help='--round-profile: skip the torch.profiler kernel table')
    a = ap.parse_args(argv)
    dev = torch.device('cpu' if a.smoke or not torch.cuda.is_available() else 'cuda')
    out = Path(a.out) if a.out else run_dir('frspec', dev)
    out.mkdir(parents=True, exist_ok=True)
    if a.round_profile: return round_profile(a, dev, out)
    if a.replot_head:
        j = json.loads(Path(a.replot_head).read_text())
        return plot_lm_head(j['rows'], out / 'frspec_lm_head.png', f"{j['device']}, torch {j['torch']}. {j.get('note', '')[:90]}")
    torch.manual_seed(a.seed); random.seed(a.seed)
    if a.smoke:
        torch.set_num_threads(1)
        V, bpe, shape = 4096, 300, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, dim_model_base=32)
        a.docs, a.train_steps, a.draft_steps, a.distill_prompts, a.prompts, a.new = 400, 30, 30, 32, 2, 24
        head_sizes, head_ks, ks = (64,), (512, 1024), (512, 1024, 2048)
        seq, bs, new_distill = 64, 8, 40
    else:
        V, bpe, shape = V_MINICPM4, 4096, dict(num_hidden_layers=a.layers)
        head_sizes, head_ks, ks = (1024, 4096), (8192, 16384, 32768), (1024, 2048, 8192, 16384, 32768)
        seq, bs, new_distill = 256, 16, 224
    res = dict(env_stamp(dev), args=vars(a))
    save = lambda: atomic_write_json(out / 'frspec_e2e.json', res, indent=1)

    # (a) the draft LM head
    if not a.skip_head:
        log('LM-head benchmark')
        rows = []
        for r in (1, 4):
            rows += S.bench_lm_head(head_sizes, V, head_ks, rows=r, device=dev,
                                    dtype=torch.bfloat16 if dev.type == 'cuda' else torch.float32,
                                    reps=5 if a.smoke else 30, inner=4 if a.smoke else 16)
        res['lm_head'] = rows
        atomic_write_json(out / 'frspec_lm_head.json', dict(env_stamp(dev), rows=rows), indent=1)
        plot_lm_head(rows, out / 'frspec_lm_head.png', f"{res['device']}, torch {res['torch']}")
        for x in rows:
            log(f"  rows {x['rows']} hidden {x['hidden']:5d} k {x['k']:6d}: matmul {x['matmul_ms'] * 1e3:7.1f} us "
                f"({x['matmul_reduction']:+.1%}), step {x['step_ms'] * 1e3:7.1f} us ({x['step_reduction']:+.1%})")
        save()

    # corpus, tokenizer, ids scattered over the big vocabulary
    t0 = time.time()
    corpus = D.embedded_corpus(a.seed, a.docs)
    tok = D.train_tokenizer(corpus['train'], bpe)
    rng = random.Random(a.seed)
    pool = [i for i in range(len(D.SPECIAL_TOKENS), V) if i != 73440]
    table = list(range(len(D.SPECIAL_TOKENS))) + rng.sample(pool, tok.vocab_size - len(D.SPECIAL_TOKENS))
    rtok = RemapTokenizer(tok, table, V)
    counts = S.count_token_frequencies(corpus['train'], rtok, V, eos_id=rtok.eos_id, progress=False)
    cov = dict(zip(ks, S.coverage_curve(counts, ks)))
    vocabs = {k: S.build_freq_vocab(counts, k, rtok.eos_id, corpus='embedded', docs=a.docs) for k in ks}
    vocabs[ks[-2]].save(out / f'frspec_vocab_{ks[-2]}.safetensors')
    res['corpus'] = dict(docs=a.docs, bpe_vocab=tok.vocab_size, vocab=V, tokens=int(counts.sum()),
                         ids_used=int((counts > 0).sum()), coverage={str(k): c for k, c in cov.items()})
    log(f"tokenizer + counts in {time.time() - t0:.1f}s; ids used {res['corpus']['ids_used']}, coverage {cov}")

    # the target
    ids = dict(vocab_size=V, eos_token_id=rtok.eos_id, bos_token_id=rtok.bos_id, pad_token_id=0)
    cfg = MiniCPM4Config.tiny(**ids, torch_dtype='float32', **shape) if a.smoke else \
        MiniCPM4Config.minicpm4_0_5b(**ids, **shape)
    enc = rtok.encode_batch(corpus['train'])
    rows = D.pack_documents(enc, seq, rtok.bos_id, rtok.eos_id)
    target = MiniCPM4ForCausalLM(cfg).to(dev)
    n_params = sum(p.numel() for p in target.parameters())
    t0 = time.time()
    with deadline(a.train_seconds):
        tr = train(target, rows, TrainConfig(steps=a.train_steps, batch_size=bs, lr=a.lr, device=str(dev), seed=a.seed,
                                             eval_every=10**9, progress=False))
    h = tr.history['loss']
    res['target'] = dict(shape='MiniCPM4-0.5B' if not a.smoke else 'tiny', layers=cfg.num_hidden_layers,
                         hidden=cfg.hidden_size, vocab=V, params=n_params, train_steps=len(h), interrupted=tr.interrupted,
                         train_tokens=tr.tokens, train_seconds=tr.seconds, loss_first=h[0],
                         loss_last=sum(h[-20:]) / len(h[-20:]), unigram_entropy=D.unigram_entropy(rows))
    log(f"target {n_params / 1e6:.0f}M params trained in {tr.seconds:.0f}s: loss {h[0]:.2f} -> "
        f"{res['target']['loss_last']:.2f} (unigram {res['target']['unigram_entropy']:.2f})")
    save()
    dt = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    target = target.to(dt).eval()

    # the draft, trained on the target's own greedy text
    t0 = time.time()
    plen = 32 if not a.smoke else 12
    pr = [[rtok.bos_id] + d[:plen - 1] for d in enc if len(d) >= plen - 1][:a.distill_prompts]
    drows = S.self_distill_rows(target, pr, new_distill, batch_size=256, progress=False)
    draft = S.EagleDraft(cfg).to(dev)
    with deadline(a.draft_seconds):
        dres = S.train_draft(draft, target, drows, TrainConfig(steps=a.draft_steps, batch_size=bs, lr=a.lr,
                                                                device=str(dev), seed=a.seed, eval_every=10**9,
                                                                progress=False))
    draft = draft.to(dt).eval()
    dh = dres.history['loss']
    res['draft'] = dict(params=sum(p.numel() for p in draft.parameters()), distill_rows=list(drows.shape),
                        train_steps=len(dh), loss_first=dh[0], loss_last=sum(dh[-20:]) / len(dh[-20:]),
                        seconds=time.time() - t0)
    log(f"draft trained in {time.time() - t0:.0f}s on {tuple(drows.shape)} rows: loss {dh[0]:.2f} -> "
        f"{res['draft']['loss_last']:.2f}")
    save()

    # (b) end to end
    venc = rtok.encode_batch(corpus['valid'])
    prompts = [[rtok.bos_id] + d[:plen - 1] for d in venc if len(d) >= plen - 1][:a.prompts]
    k16 = ks[-2]
    T = lambda name, vk=None, **kw: dict(name=name, vocab_ids=None if vk is None else vocabs[vk].ids, **kw)
    tree_a = dict(method='tree', depth=5, topk=4, tree_size=16)
    tree_b = dict(method='tree', depth=6, topk=8, tree_size=32)
    chain = dict(method='chain', gamma=4)
    configs = [T('chain4 full', **chain), T(f'chain4 FR{k16 // 1024}K', k16, **chain),
               T('tree5x4/16 full', **tree_a)] + \
              [T(f'tree5x4/16 FR{k // 1024}K' if k >= 1024 else f'tree5x4/16 FR{k}', k, **tree_a) for k in ks] + \
              [T('tree6x8/32 full', **tree_b), T(f'tree6x8/32 FR{k16 // 1024}K', k16, **tree_b)]
    t0 = time.time()
    try:
        e2e = S.bench_e2e(target, draft, prompts, a.new, configs, progress=False)
    except Exception as ex:  # a capture failure must not cost the whole run: time the same loop eagerly, say so
        log(f"CUDA-graph decoding failed ({ex!r:.300}); timing eagerly instead")
        res['graphs_error'] = repr(ex)[:1000]
        torch.cuda.synchronize() if dev.type == 'cuda' else None
        e2e = S.bench_e2e(target, draft, prompts, a.new, configs, progress=False, graphs=False)
    for r in e2e: r.pop('vocab_ids', None)
    res['e2e'] = e2e
    res['e2e_seconds'] = time.time() - t0
    byname = {r['name']: r for r in e2e}
    for r in e2e:
        full = byname.get(r['name'].split(' FR')[0] + ' full')
        r['speedup_vs_full_draft'] = r['tokens_per_s'] / full['tokens_per_s'] if full and ' FR' in r['name'] else None
        log(f"  {r['name']:18s} {r['tokens_per_s']:8.0f} tok/s  x{r['speedup_vs_plain']:.2f} vs plain"
            + (f"  x{r['speedup_vs_full_draft']:.3f} vs full draft" if r['speedup_vs_full_draft'] else '')
            + f"  accept {r['mean_accept_length']:.2f}  identical {r['identical']}/{r['prompts']} {r['first_diff']}")
    save()

    # eager reference vs the static plain path (bf16 numerics differ slightly), and an fp32 identity check
    ref = [target.generate(p, a.new, stop_ids=[])[0] for p in prompts[:2]]
    plain = S.FastSpec(target, None, max_len=-(-(max(map(len, prompts)) + a.new + 96) // 16) * 16)
    res['eager_vs_static_plain_identical'] = sum(plain.generate(p, a.new, speculative=False) == r
                                                 for p, r in zip(prompts[:2], ref))
    del plain
    t32, d32 = copy.deepcopy(target).float(), copy.deepcopy(draft).float()
    e32 = S.bench_e2e(t32, d32, prompts, a.new, [T(f'tree5x4/16 FR{k16 // 1024}K', k16, **tree_a),
                                                 T('chain4 full', **chain)], progress=False)
    res['fp32_identity'] = [dict(name=r['name'], identical=r['identical'], prompts=r['prompts'],
                                 tokens_per_s=r['tokens_per_s'], first_diff=r['first_diff']) for r in e32]
    log('fp32 identity:', res['fp32_identity'], '| eager vs static plain (bf16):', res['eager_vs_static_plain_identical'])
    del t32, d32
    save()
    plot(res, counts, out)
    log('done; wrote', out / 'frspec_e2e.json')
    return res


SPEC_KW = {'chain4': dict(method='chain', gamma=4), 'tree5x4/16': dict(method='tree', depth=5, topk=4, tree_size=16),
           'tree6x8/32': dict(method='tree', depth=6, topk=8, tree_size=32),
           'tree8x8/48': dict(method='tree', depth=8, topk=8, tree_size=48)}


def _parse_spec(name):
    "'chain4' / 'treeDxK/N' (the edge run's names) -> FastSpec keywords."
    if name in SPEC_KW: return SPEC_KW[name]
    if name.startswith('chain'): return dict(method='chain', gamma=int(name[5:]))
    d, rest = name[4:].split('x'); k, n = rest.split('/')
    return dict(method='tree', depth=int(d), topk=int(k), tree_size=int(n))


def round_profile(a, dev, out):
    """Where a FastSpec round's time goes, on random weights of the MiniCPM4-0.5B shape (the costs do not depend on
    the weights: static shapes; acceptance does, and is not measured here). Per configuration: CUDA-graph replay ms of
    the round and of its parts (each part replayed from the same state: catch-up, draft = catch-up + expand + best-N,
    the target's verify forward, the whole verify phase), GPU kernel time per round from torch.profiler on an eager
    round (launches, top kernels), and generate's loop: one host read per round vs queued rounds, eager vs graph
    prefill (same outputs required). Baselines in the same run: the engine's plain graph step and its generate."""
    from minicpm4_core.bench import cuda_graph_time, kernel_times
    from minicpm4_core.engine import Engine
    from minicpm4_core.static_decode import attend
    t_start = time.time()
    dt = torch.bfloat16 if dev.type == 'cuda' else torch.float32
    cfg = MiniCPM4Config.minicpm4_0_5b() if not a.smoke else \
        MiniCPM4Config.tiny(vocab_size=4096, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=128, torch_dtype='float32')
    with torch.device(dev): target = MiniCPM4ForCausalLM(cfg).to(dt).eval()
    draft = S.EagleDraft(cfg).to(dev, dt).eval()
    g = torch.Generator().manual_seed(a.seed)
    vids = torch.randperm(cfg.vocab_size, generator=g)[:min(a.k, cfg.vocab_size)].sort().values.to(dev)
    n_new = a.new
    prompts = torch.randint(4, cfg.vocab_size, (a.prompts, a.prompt_len), generator=g).tolist()
    Lt = -(-(a.prompt_len + n_new + 64) // 16) * 16                   # the edge run's engine size
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    gt = (lambda fn, inner=4, reps=10: cuda_graph_time(fn, inner, reps)) if dev.type == 'cuda' else \
        (lambda fn, inner=1, reps=2: S.device_time(fn, dev, inner, reps))
    res = dict(env_stamp(dev), args=vars(a), Lt=Lt, configs={})
    save = lambda: atomic_write_json(out / 'round_profile.json', res, indent=1)

    def wall(fn, reps=3):
        ts = []
        for _ in range(reps):
            sync(); t0 = time.perf_counter(); fn(); sync(); ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    # baselines: the engine without speculation (what the edge run's x-factor divides by)
    eng = Engine(target, Lt)
    eng.generate([prompts[0]], n_new, stop_ids=[])
    res['engine_plain_tok_s'] = a.prompts * n_new / sum(wall(lambda p=p: eng.generate([p], n_new, stop_ids=[]), 1)
                                                        for p in prompts)
    if eng._static is not None and dev.type == 'cuda': res['engine_plain_step_ms'] = eng._static.time_step()
    del eng
    plain = S.FastSpec(target, None, max_len=Lt)
    plain.generate(prompts[0], 8, speculative=False)
    res['fastspec_plain_step_ms'] = gt(lambda: plain._plain_step(), 8)      # its masked step (no split-K decode)
    log(f"engine plain {res['engine_plain_tok_s']:.0f} tok/s, step {res.get('engine_plain_step_ms', 0):.3f} ms; "
        f"FastSpec plain step {res['fastspec_plain_step_ms']:.3f} ms")
    # the target's masked forward (a verify's) against its rows, and its LM head alone
    ar, m0 = plain.ar, a.prompt_len
    tid = torch.randint(4, cfg.vocab_size, (64,), generator=g).to(dev)
    res['target_forward_ms'] = {}
    for T in (1, 9, 17, 33, 49):
        sl = m0 + ar[:T]
        allowed = ar[None, :Lt] <= sl[:, None]
        res['target_forward_ms'][T] = gt(lambda: plain.t.forward(tid[:T], sl, sl, allowed))
    hx = torch.randn(33, cfg.hidden_size, device=dev, dtype=dt)
    res['target_head_33_ms'] = gt(lambda: torch.nn.functional.linear(hx, plain.t.head_w).argmax(-1))
    log('target masked forward ms by rows: ' + ', '.join(f"{T}: {v:.3f}" for T, v in res['target_forward_ms'].items())
        + f"; head (33 rows) + argmax {res['target_head_33_ms']:.3f}")
    save()
    if a.int4:       # the same forward with the target packed to w4a16 (the int4 + spec verify: M = N+1 rows)
        import copy as _copy
        from minicpm4_core.engine import convert_quant
        from minicpm4_core.static_decode import StaticDecoder
        t4 = _copy.deepcopy(target)
        convert_quant(t4, 'w4a16')
        s4 = StaticDecoder(t4, Lt, graphs=False)
        res['int4_target_forward_ms'] = {}
        for T in (1, 9, 17, 33, 49):
            sl = m0 + ar[:T]
            allowed = ar[None, :Lt] <= sl[:, None]
            try: res['int4_target_forward_ms'][T] = gt(lambda: s4.forward(tid[:T], sl, sl, allowed))
            except Exception as ex: res['int4_target_forward_ms'][T] = repr(ex)[:200]
        log('int4 target masked forward ms by rows: ' + ', '.join(
            f"{T}: {v:.3f}" if isinstance(v, float) else f"{T}: {v}" for T, v in res['int4_target_forward_ms'].items()))
        del s4, t4
        save()

    for name in a.configs.split(','):
        if time.time() - t_start > a.time_box: log(f'time box: skipping {name}'); continue
        kw = _parse_spec(name)
        e = S.FastSpec(target, draft, vids, max_len=Lt, share=plain, **kw)
        r = res['configs'][name] = dict(kw, D=e.D, k=e.k, N=e.N, C=e.C)
        # generate: outputs and timings of the loop variants (random pair: acceptance ~1 token per round)
        outs = {}
        for qr, gp in ((False, False), (True, False), (True, True)):
            e.queue_rounds, e.graph_prefill = qr, gp
            e.generate(prompts[0], n_new)                                       # captures, untimed
            secs, o, st = 0.0, [], []
            for p in prompts:
                sync(); t0 = time.perf_counter(); o.append(e.generate(p, n_new)); sync()
                secs += time.perf_counter() - t0; st.append(e.last_stats)
            rounds = sum(s['rounds'] for s in st)
            key = f"{'queued' if qr else 'read_per_round'}{'+graph_prefill' if gp else ''}"
            outs[key] = o
            r[key] = dict(tok_s=len(prompts) * n_new / secs, ms_per_round=secs * 1e3 / rounds, rounds=rounds,
                          accept=sum(s['mean_accept_length'] for s in st) / len(st),
                          prefill_ms=1e3 * sum(s['prefill_s'] for s in st) / len(st),
                          decode_ms_per_round=1e3 * sum(s['decode_s'] for s in st) / rounds,
                          host_reads=sum(s['host_reads'] for s in st) / len(st))
        first = next(iter(outs.values()))
        r['loop_outputs_identical'] = all(v == first for v in outs.values())
        r['tuning'] = e.tuning
        # the parts, each a graph replayed from the state after a prefill
        e.queue_rounds, e.graph_prefill = True, True
        e._prefill(prompts[0])
        state = [getattr(e, n) for n in e._STATE]
        saved = [t.clone() for t in state]
        restore = lambda: [t.copy_(v) for t, v in zip(state, saved)]
        with torch.no_grad():
            f_root, d1, m = S._fast_catchup(e); restore()
            dr = S._fast_draft(e); restore()
            fexp = [f_root.clone(), d1.clone(), m.clone()]
            drs = [x.clone() for x in dr]
            parts = {'restore': lambda: restore(),
                     'round': lambda: (restore(), e._round()),
                     'round_ref_expand': lambda: (setattr(e, 'lean_expand', False), restore(), e._round(),
                                                  setattr(e, 'lean_expand', True)),
                     'expand_ref': lambda: S._fast_expand_ref(e, *fexp),
                     'draft': lambda: (restore(), S._fast_draft(e)),
                     'catchup': lambda: (restore(), S._fast_catchup(e)),
                     'expand': lambda: S._fast_expand(e, *fexp),
                     'verify': lambda: (restore(), S._fast_verify(e, *drs)),
                     'verify_forward': lambda: e._verify_forward(drs[1], drs[0], drs[2], drs[4]),
                     'draft_head_k_rows': lambda: S._head_topk(e.d.logits(fexp[0].expand(e.k, -1)), e.k, logprobs=e.k > 1),
                     'round_untuned': lambda: (untuned(True), restore(), e._round(), untuned(False)),
                     'verify_forward_untuned': lambda: (untuned(True), e._verify_forward(drs[1], drs[0], drs[2], drs[4]),
                                                        untuned(False))}
            ms = {}
            tuned = (e.t.stack.attn, e.d.stack.attn, e.head_impl, e._vlin)
            def untuned(on):                  # the defaults (`attend`, torch.topk, cuBLAS) vs what `_tune` picked
                e.t.stack.attn, e.d.stack.attn, e.head_impl, e._vlin = (attend, attend, 'topk', None) if on else tuned
            for pn, fn in parts.items():
                try: ms[pn] = gt(fn)
                except Exception as ex: ms[pn] = None; r.setdefault('errors', []).append(f"{pn}: {ex!r:.200}")
            base = ms['restore'] or 0.0
            r['graph_ms'] = {k: (v - base if v is not None and k not in ('restore', 'expand', 'expand_ref', 'verify_forward',
                                                                        'verify_forward_untuned',
                                                                        'draft_head_k_rows') else v) for k, v in ms.items()}
            r['graph_ms']['select+anc (draft - catchup - expand)'] = (r['graph_ms']['draft'] - r['graph_ms']['catchup']
                                                                     - ms['expand'])
            r['graph_ms']['accept+rollback (verify - verify_forward)'] = r['graph_ms']['verify'] - ms['verify_forward']
            if not a.no_kernels:
                kt = kernel_times([lambda: (restore(), e._round())], n=3)
                rkt = kernel_times([lambda: restore()], n=3)
                for k_, v in rkt.items():
                    if k_ in kt: kt[k_]['per_step'] -= v['per_step']
                rows = sorted(((k_, v['us'], v['per_step']) for k_, v in kt.items() if v['per_step'] > 0.01),
                              key=lambda x: -x[1] * x[2])
                r['kernels'] = dict(launches=sum(x[2] for x in rows), busy_ms=sum(x[1] * x[2] for x in rows) / 1e3,
                                    top=[dict(name=k_, us=round(u, 2), per_round=round(c, 2), total_us=round(u * c, 1))
                                         for k_, u, c in rows[:40]])
        restore()
        gm = r['graph_ms']
        log(f"{name}: round {gm['round']:.3f} ms (with the reference expand {gm['round_ref_expand']:.3f}; expand "
            f"{ms['expand_ref']:.3f} -> {ms['expand']:.3f}); untuned (attend, torch.topk, cuBLAS): round {gm['round_untuned']:.3f}, "
            f"verify forward {ms['verify_forward_untuned']:.3f}")
        log(f"   tuning: " + '; '.join(f"{k_} -> {v['choice']} {v['us']}" for k_, v in (e.tuning or {}).items()
                                        if isinstance(v, dict)))
        log(f"{name}: round {gm['round']:.3f} ms = draft {gm['draft']:.3f} (catch-up {gm['catchup']:.3f}, expand "
            f"{ms['expand']:.3f}, select {gm['select+anc (draft - catchup - expand)']:.3f}) + verify {gm['verify']:.3f} "
            f"(forward {ms['verify_forward']:.3f}); head(k rows) {ms['draft_head_k_rows']:.3f}"
            + (f"; eager kernels {r['kernels']['launches']:.0f} per round, busy {r['kernels']['busy_ms']:.3f} ms"
               if 'kernels' in r else ''))
        for key in ('read_per_round', 'queued', 'queued+graph_prefill'):
            x = r[key]
            log(f"   loop {key:22s}: {x['tok_s']:7.0f} tok/s, {x['ms_per_round']:.3f} ms/round (decode "
                f"{x['decode_ms_per_round']:.3f}), prefill {x['prefill_ms']:.2f} ms, host reads {x['host_reads']:.1f}, "
                f"accept {x['accept']:.2f}")
        log(f"   outputs identical across loop variants: {r['loop_outputs_identical']}")
        del e
        save()
    res['round_only'] = {}
    for name in [c for c in a.round_only.split(',') if c]:
        if time.time() - t_start > a.time_box + 15: log(f'time box: skipping {name}'); continue
        e = S.FastSpec(target, draft, vids, max_len=Lt, share=plain, **_parse_spec(name))
        e.generate(prompts[0], 8)                                           # tunes (on CUDA), captures the prefill
        e._prefill(prompts[0])
        state = [getattr(e, n) for n in e._STATE]
        saved = [t.clone() for t in state]
        restore = lambda: [t.copy_(v) for t, v in zip(state, saved)]
        res['round_only'][name] = x = dict(round_ms=gt(lambda: (restore(), e._round())) - gt(restore), D=e.D, k=e.k, N=e.N,
                                           tuning={k_: v.get('choice') for k_, v in (e.tuning or {}).items()
                                                   if isinstance(v, dict)})
        log(f"{name}: round {x['round_ms']:.3f} ms")
        restore(); del e
    res['seconds'] = time.time() - t_start
    save()
    log('done; wrote', out / 'round_profile.json')
    return res


def plot_lm_head(rows, path, title=''):
    "Bars: draft LM-head time per (hidden, k), product and whole head step, with the reduction vs the full head."
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    Hs = sorted({r['hidden'] for r in rows})
    fig, axes = plt.subplots(1, len(Hs), figsize=(6 * len(Hs), 3.6), squeeze=False)
    for ax, H in zip(axes[0], Hs):
        rr = [r for r in rows if r['hidden'] == H and r['rows'] == 1]
        x = range(len(rr))
        ax.bar([i - 0.2 for i in x], [r['matmul_ms'] * 1e3 for r in rr], 0.4, label='product')
        ax.bar([i + 0.2 for i in x], [r['step_ms'] * 1e3 for r in rr], 0.4, label='head step')
        for i, r in zip(x, rr):
            ax.text(i - 0.2, r['matmul_ms'] * 1e3, f"{-r['matmul_reduction']:+.0%}" if i else '', ha='center',
                    va='bottom', fontsize=8)
        ax.set_xticks(list(x)); ax.set_xticklabels(['full' if r['k'] == r['vocab'] else f"{r['k'] // 1024}K" for r in rr])
        ax.set_ylabel('us per call (1 row)'); ax.set_title(f"hidden {H}, vocab {rr[0]['vocab']}"); ax.legend(fontsize=8)
    fig.suptitle(f"FR-Spec draft LM head. {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot(res, counts, out):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.2))
    S.plot_coverage(counts, mark=[int(k) for k in res['corpus']['coverage']][-3:-2], ax=ax[0])
    ax[0].set_title(f"coverage: {res['corpus']['ids_used']} of {res['corpus']['vocab']} ids used")
    rows = [r for r in res.get('lm_head', []) if r['rows'] == 1]
    for H in sorted({r['hidden'] for r in rows}):
        rr = [r for r in rows if r['hidden'] == H]
        ax[1].plot([r['k'] for r in rr], [r['step_ms'] * 1e3 for r in rr], 'o-', label=f'hidden {H}: head step')
        ax[1].plot([r['k'] for r in rr], [r['matmul_ms'] * 1e3 for r in rr], 'x--', label=f'hidden {H}: matmul')
    ax[1].set_xscale('log'); ax[1].set_xlabel('ids in the draft head'); ax[1].set_ylabel('us'); ax[1].legend(fontsize=7)
    ax[1].set_title('draft LM head, 1 row')
    e = res['e2e']
    ax[2].barh([r['name'] for r in e], [r['tokens_per_s'] for r in e], color=['grey'] + ['C0'] * (len(e) - 1))
    for i, r in enumerate(e):
        ax[2].text(r['tokens_per_s'], i, f" {r['tokens_per_s']:.0f} (x{r['speedup_vs_plain']:.2f}, "
                                        f"acc {r['mean_accept_length']:.2f})", va='center', fontsize=7)
    ax[2].invert_yaxis(); ax[2].set_xlabel('tokens/s, batch 1, greedy')
    ax[2].set_title(f"{res['device']}: {res['target']['shape']} x{res['target']['layers']} layers, vocab {res['target']['vocab']}")
    fig.tight_layout()
    fig.savefig(out / 'frspec_e2e.png', dpi=110)


if __name__ == '__main__':
    main(sys.argv[1:])
