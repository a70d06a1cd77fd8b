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
    a = ap.parse_args(argv)
    dev = torch.device('cpu' if a.smoke or not torch.cuda.is_available() else 'cuda')
    out = Path(a.out) if a.out else run_dir('frspec', dev)
    out.mkdir(parents=True, exist_ok=True)
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
