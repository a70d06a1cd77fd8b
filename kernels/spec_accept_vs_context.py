"""FR-Spec acceptance against the context length, on the edge notebook's pair at the CPU smoke scale (session 10).

Why does speculation lose past dense_len in the edge run (accept 6.4 at a short context, 2.1 at 32K)? The pair is
trained on short rows (target and draft); this script separates the suspects on a tiny pair: the same text read at a
short and a long context, a dense and an InfLLM v2 target, a draft window (`draft_window`), and a second draft trained
on the target's own continuations of long prompts. Greedy, batch 1, FastSpec / SparseFastSpec, eager on the CPU:
acceptance only (tokens per round), not speed.

    python kernels/spec_accept_vs_context.py --out kernels/results/frspec/cpu-2026-12-05/accept_vs_context.json
    # on a GPU, the edge run's own pair (0.5B shape) at its long contexts:
    python kernels/spec_accept_vs_context.py --edge --train-s 0 --draft-s 0 --contexts 16384,32000 --short 256 \
        --window 256 --chunk 2048 --long-draft-steps 300 --out $OUT/accept_vs_context.json
"""
import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from minicpm4_core import edge_bench as EB
from minicpm4_core import frspec as S
from minicpm4_core.long_context import token_stream
from minicpm4_core.sparse_spec import SparseFastSpec
from minicpm4_core.train import TrainConfig

TREE = dict(method='tree', depth=5, topk=4, tree_size=16)


def trained_pair(train_s: float, draft_s: float, edge: bool = False):
    """The edge notebook's spec pipeline (`run_spec`) stopped before its long rows: the pair and texts. At the CPU smoke
    scale, or with `edge` the edge profile's own (the 0.5B shape on CUDA; train_s / draft_s 0 keep the profile's)."""
    got = {}
    def keep(rec, sp, target, draft, vocab_ids, tok, heldout, train, log=print, deadline=None):
        got.update(target=target, draft=draft, vids=vocab_ids, tok=tok, heldout=heldout, train=train, sp=sp)
    real, EB.run_spec_long = EB.run_spec_long, keep
    try:
        over = dict(long_contexts='1024', int4=False, identity=False, configs='tree5x4/16 FR',
                    **{k: v for k, v in (('train_s', train_s), ('draft_s', draft_s)) if v})
        if edge:
            sp = dataclasses.replace(EB.EdgeParams.from_profile('edge').spec_params(), **over)
        else:
            sp = EB.SpecParams.smoke(distill_prompts=128, **over)
        rec = EB.run_spec(sp, 'cuda' if edge else 'cpu', log=lambda s: None)
    finally:
        EB.run_spec_long = real
    return got, rec


CHUNK = 32


def accept(model, draft, vids, prompts, new: int, **kw) -> float:
    "Mean tokens per round over the prompts (FastSpec for a dense target, SparseFastSpec for an InfLLM v2 one)."
    L = -(-(max(map(len, prompts)) + new + 64) // 16) * 16
    sparse = model.config.sparse_config is not None
    out = []
    for p in prompts:
        e = (SparseFastSpec(model, draft, vids, max_len=L, chunk=CHUNK, **TREE, **kw) if sparse
             else S.FastSpec(model, draft, vids, max_len=L, **TREE, **kw))
        e.generate(p, new)
        out.append(e.last_stats['mean_accept_length'])
    return round(sum(out) / len(out), 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--train-s', type=float, default=40.0, help='target training seconds (smoke shape)')
    ap.add_argument('--draft-s', type=float, default=20.0, help='draft training seconds')
    ap.add_argument('--contexts', default='1024,2048')
    ap.add_argument('--short', type=int, default=40, help='the short context: the last tokens of each long prompt')
    ap.add_argument('--prompts', type=int, default=3)
    ap.add_argument('--new', type=int, default=48)
    ap.add_argument('--window', type=int, default=32)
    ap.add_argument('--long-draft-steps', type=int, default=600, help='0: no long-trained draft')
    ap.add_argument('--edge', action='store_true', help="the edge profile's pair on CUDA (else the CPU smoke pair)")
    ap.add_argument('--chunk', type=int, default=32, help="SparseFastSpec's prefill chunk (2048 on a GPU)")
    ap.add_argument('--out', default=None)
    a = ap.parse_args()
    global CHUNK
    CHUNK = a.chunk
    torch.manual_seed(0)
    t0 = time.time()
    P, rec = trained_pair(a.train_s, a.draft_s, a.edge)
    t, d, vids = P['target'], P['draft'], P['vids']
    ts = copy.deepcopy(t)
    ts.config.sparse_config = EB._long_sparse_config(P['sp'])          # the long rows' InfLLM v2 (dense below 64 keys)
    ctxs = [int(c) for c in a.contexts.split(',')]
    prompts, src = EB._long_prompts(P['tok'], P['heldout'], P['train'], ctxs, a.prompts)
    rows = []
    def row(draft_name, dr, target_name, model, ctx, ps, **kw):
        r = dict(draft=draft_name, target=target_name, context=ctx, draft_window=kw.get('draft_window'),
                 accept=accept(model, dr, vids, ps, a.new, **kw))
        rows.append(r); print(r, flush=True)
    drafts = [('short rows', d)]
    if a.long_draft_steps:        # the target's own continuations of long prompts of the training text
        st = token_stream(P['tok'], P['train'])
        L = min(ctxs) // 2
        starts = torch.randint(0, len(st) - L - 1, (48,), generator=torch.Generator().manual_seed(1)).tolist()
        drows = S.self_distill_rows(t, [st[s:s + L].tolist() for s in starts], 20, batch_size=16, progress=False)
        d2 = S.EagleDraft(t.config).to(t.device)                   # fp32 master weights (as run_spec's draft)
        res = S.train_draft(d2, t, drows, TrainConfig(steps=a.long_draft_steps, batch_size=4, lr=3e-3, progress=False,
                                                      eval_every=10**6, device=str(t.device)))
        d2 = d2.to(t.dtype)
        h = res.history['loss']
        drafts.append((f'long rows ({drows.shape[0]} x {drows.shape[1]}, loss {h[0]:.2f} -> {sum(h[-5:]) / 5:.2f})',
                       d2.eval()))
    for name, dr in drafts:
        short = [p[-a.short:] for p in prompts[ctxs[0]]]
        row(name, dr, 'dense', t, a.short, short)
        for ctx in ctxs:
            row(name, dr, 'dense', t, ctx, prompts[ctx])
            row(name, dr, 'InfLLM v2', ts, ctx, prompts[ctx])
            row(name, dr, 'InfLLM v2', ts, ctx, prompts[ctx], draft_window=a.window)
    res = dict(args=vars(a), prompts=src, short_context_row=rec['rows'][1], target=rec['target'], draft=rec['draft'],
               rows=rows, seconds=round(time.time() - t0, 1), torch=torch.__version__)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: v for k, v in res.items() if k != 'rows'}, default=str)[:800])


if __name__ == '__main__':
    main()
