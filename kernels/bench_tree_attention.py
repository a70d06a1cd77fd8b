"""The sparse tree verify's attention per layer (issue 13, session 8): `sparse_spec`'s three options on the same inputs -
'sdpa' (one masked SDPA over every slot, what the first edge row ran), 'split' (the default: chunks of ATTN_CHUNK slots
as batch entries of the memory-efficient kernel + an LSE merge) and 'triton' (`tree_sparse_attention`: one kernel that
reads the (Hkv, T, nb) block bitmap and only the selected blocks, + a combine) - at 16K / 32K / 128K for the 0.5B heads
(Hq 16, Hkv 2, Dh 64), the 8B heads as the preset has them (Hq 32, Hkv 2, Dh 128) and as the brief wrote them (Hq 32,
Hkv 8, Dh 128), trees of T = 17 and 33 nodes, the released sparse_config (blocks of 64, top-64, a 2K window).

Selections are top-k-like, not all-true: per kv head and node, the init block, the 32-block window at the node's
position, and 64 top-k picks of which a fraction `--shared` is common to the tree's nodes (nearby queries pick alike)
and the rest the node's own. 'sdpa' / 'split' are timed with what they need per layer in the verify (the bitmap's
gather over slots & the round's visibility, then the attention); 'triton' with the bitmap as is. Each option is
captured in a CUDA graph and replayed over enough copies of the layer's K/V to leave L2 (per-layer figures as the
24-32 layers of a real verify see them); outputs are checked against 'sdpa' in the same run. The 'round' stage
(`--stages round`): ms per SparseFastSpec round at 16K (0.5B, random bf16 weights, tree 6x8/32, graph replay) with
'split' and 'triton', and whether their tokens agree.

The 'select' stages (`--stages select:0.5b,select:8b`): the per-layer selection (issue 13 session 8, helper S3) -
`tree_slot_mask(..., bitmap=True)` (the torch 'masks' path, ~15-25 kernels) vs `tree_select_bitmap` (TREE_SELECT =
'triton': two kernels) on the same fresh random bf16 q / kc / knew at the released sparse_config (kernels 32 / 16,
blocks of 64, top-64, window 32, init 1) and a random tree at root ctx, plus 'triton-cand' (the top-k from at most 128
ranked candidates, TREE_SELECT_KERNEL CAP=128); bitmaps compared in the same run (`triton_same`, `triton_diff_rows`:
rows that differ, expected only at rounding ties); each graph-timed over copies of kc beyond L2.
The round stage runs TREE_SELECT 'masks' and 'triton' with TREE_ATTN 'split' (and 'triton' x 'triton').

The variants (first shape, largest tree): tile skip by masked loads instead of a branch, 128-row tiles, chunks of
256 slots at every context (max_splits 1024; the default caps the chunks at 256, so 128K gets 576-slot chunks).

Prints as it goes, writes the JSON after each stage, stops starting stages past --budget seconds.

    PYTHONPATH=. python kernels/bench_tree_attention.py --out layer.json [--budget 55]          # per layer, 3 shapes
    PYTHONPATH=. python kernels/bench_tree_attention.py --out round.json --stages round         # rounds at 16K
    PYTHONPATH=. python kernels/bench_tree_attention.py --out sel.json --stages select:0.5b,select:8b   # selection
    PYTHONPATH=. python kernels/bench_tree_attention.py --cpu-smoke [--stages ...]   # TRITON_INTERPRET=1, tiny, CPU
"""
import argparse
import json
import os
import sys
import time

SMOKE = '--cpu-smoke' in sys.argv
if SMOKE: os.environ['TRITON_INTERPRET'] = '1'           # before triton is imported

import torch  # noqa: E402

from minicpm4_core import sparse_spec as SS  # noqa: E402
from minicpm4_core.bench import copies_beyond_l2, device_time, env_stamp  # noqa: E402

SHAPES = {'0.5b': (16, 2, 64), '8b': (32, 2, 128), '8b-hkv8': (32, 8, 128)}   # Hq, Hkv, Dh


def tree_of(T: int, depth: int, g):
    "A random tree: T nodes, parents first, depths <= depth -> anc (T, T) bool (self included), dep (T,)."
    par, dep = [-1], [0]
    for i in range(1, T):
        cands = [j for j in range(i) if dep[j] < depth]
        j = cands[int(torch.randint(0, len(cands), (1,), generator=g))]
        par.append(j); dep.append(dep[j] + 1)
    anc = torch.eye(T, dtype=torch.bool)
    for i in range(1, T): anc[i] |= anc[par[i]]
    return anc, torch.tensor(dep)


def selection(Hkv, T, nb, qblk, topk, window, shared, g):
    """(Hkv, T, nb) bool: init block 0, the window [qb - window + 1, qb], topk picks below the window (a `shared`
    fraction common to all nodes of a kv head, the rest per node)."""
    b = torch.zeros(Hkv, T, nb, dtype=torch.bool)
    ns = int(round(topk * shared))
    for h in range(Hkv):
        lo = max(1, int(qblk.min()) - window + 1)                 # top-k candidates: below every node's window
        common = 1 + torch.randperm(max(lo - 1, 1), generator=g)[:ns]
        for i in range(T):
            qb = int(qblk[i])
            b[h, i, 0] = True
            b[h, i, max(0, qb - window + 1):qb + 1] = True
            b[h, i, common] = True
            own = 1 + torch.randperm(max(lo - 1, 1), generator=g)[:topk - ns]
            b[h, i, own] = True
    return b


def inputs(shape, ctx, T, dev, dtype, bs, topk, window, shared, seed=0, chunk=512):
    Hq, Hkv, Dh = SHAPES[shape] if isinstance(shape, str) else shape
    g = torch.Generator().manual_seed(seed)
    Lt = -(-(ctx + T) // chunk) * chunk                          # the slots, as SparseFastSpec rounds them
    nb = -(-Lt // bs)
    anc, dep = tree_of(T, 6, g)
    m = torch.tensor([ctx])
    tblk = ((m + dep) // bs).clamp(max=nb - 1)
    bsel = selection(Hkv, T, nb, tblk, topk, window, shared, g)
    j = torch.arange(Lt)
    rel = j - m
    blk = torch.where(rel < 0, j // bs, tblk[rel.clamp(0, T - 1)]).clamp(max=nb - 1)    # tree_round_masks' per round
    vis = (rel < 0)[None] | (anc[:, rel.clamp(0, T - 1)] & ((rel >= 0) & (rel < T))[None])
    to = lambda x: x.to(dev)
    gd = torch.Generator(dev).manual_seed(seed)                   # on the device: 128K x 16 x 128 on the host is slow
    q = torch.randn(T, Hq, Dh, generator=gd, device=dev).to(dtype)
    kv = torch.randn(Lt, 2 * Hkv, Dh, generator=gd, device=dev).to(dtype)
    return dict(q=q, kv=kv, bsel=to(bsel), anc=to(anc), tblk=to(tblk), m=to(m), blk=to(blk), vis=to(vis), Lt=Lt, nb=nb,
                union=[int(bsel[h].any(0).sum()) for h in range(Hkv)], per_node=int(bsel.sum(-1).float().mean()))


def options(x, bs, chunk):
    "name -> fn(kv) for one layer's attention (the mask work each option needs in the verify included)."
    def ok_of():
        Hkv, T, _ = x['bsel'].shape
        return x['bsel'].gather(-1, x['blk'][None, None].expand(Hkv, T, -1)) & x['vis'][None]
    o = {'sdpa': lambda kv: SS.masked_tree_attention(x['q'], kv, ok_of()),
         'split': lambda kv: SS.split_tree_attention(x['q'], kv, ok_of(), chunk),
         'triton': lambda kv: SS.tree_sparse_attention(x['q'], kv, x['bsel'], x['anc'], x['tblk'], x['m'], block_size=bs)}
    for name, cfg in (('triton-mask', dict(BRANCH=False)), ('triton-rt128', dict(RT=128)),
                      ('triton-ms1024', dict(max_splits=1024))):
        o[name] = (lambda c: lambda kv: SS.tree_sparse_attention(x['q'], kv, x['bsel'], x['anc'], x['tblk'], x['m'],
                                                                 block_size=bs, config=c))(cfg)
    return o


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=None)
    ap.add_argument('--budget', type=float, default=55.0, help='seconds; no stage starts past it')
    ap.add_argument('--contexts', default='16384,32768,131072')
    ap.add_argument('--trees', default='17,33')
    ap.add_argument('--shapes', default='0.5b,8b,8b-hkv8')
    ap.add_argument('--shared', type=float, default=0.75, help='fraction of the top-k picks common to all nodes')
    ap.add_argument('--variants', default='triton-mask,triton-rt128,triton-ms1024',
                    help="extra 'triton' configs, run for the first layer shape at the largest tree")
    ap.add_argument('--stages', default=None, help="comma list of 'layer:SHAPE' and 'round' in order (default: "
                    "'layer:S' for each of --shapes)")
    ap.add_argument('--round-opts', default='split,triton,split+tsel,triton+tsel',
                    help="the round stage's TREE_ATTN options ('+tsel': with TREE_SELECT='triton'); 'split' first: the "
                    "reference for the token comparison")
    ap.add_argument('--cpu-smoke', action='store_true', help='TRITON_INTERPRET=1, tiny shapes, CPU: proves it runs')
    a = ap.parse_args()
    t0 = time.time()
    left = lambda: a.budget - (time.time() - t0)
    if a.cpu_smoke:
        dev, dtype, bs, topk, window, chunk = torch.device('cpu'), torch.float32, 16, 4, 2, 32
        SHAPES.update({'0.5b': (4, 2, 16), '8b': (8, 2, 32), '8b-hkv8': (8, 4, 32)})
        contexts, trees = [150, 300], [5, 9]
        SS.TREE_KERNEL.update(BN=16, CH=32)
    else:
        if not torch.cuda.is_available(): sys.exit('needs a CUDA device (or --cpu-smoke)')
        dev, dtype, bs, topk, window, chunk = torch.device('cuda'), torch.bfloat16, 64, 64, 32, SS.ATTN_CHUNK or 512
        contexts, trees = [int(v) for v in a.contexts.split(',')], [int(v) for v in a.trees.split(',')]
    res = dict(bench='tree_attention', env=env_stamp(dev) if dev.type == 'cuda' else dict(device='cpu-smoke'),
               settings=dict(block_size=bs, topk=topk, window_blocks=window, shared=a.shared, chunk=chunk,
                             tree_kernel=dict(SS.TREE_KERNEL)), layer=[], notes=[])

    def save():
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, 'w') as f: json.dump(res, f, indent=1)

    extra = [v for v in a.variants.split(',') if v]
    stages = a.stages.split(',') if a.stages else [f'layer:{v}' for v in a.shapes.split(',')]
    bad = [v for v in stages if v != 'round' and not (v.split(':')[0] in ('layer', 'select') and v.split(':')[-1] in SHAPES)]
    if bad: sys.exit(f"--stages: unknown {bad}; use 'round', 'layer:SHAPE' and 'select:SHAPE' with SHAPE in {list(SHAPES)}")
    first = next((v[6:] for v in stages if v.startswith('layer:')), None)
    for stage in stages:
        if stage == 'round':
            round_stage(a, res, left, dev, save)
            continue
        if stage.startswith('select:'):
            select_stage(a, res, left, dev, dtype, stage[7:], contexts, trees, save)
            continue
        shape = stage[6:]
        for ctx in contexts:
            for T in trees:
                if left() < 4:
                    res['notes'].append(f'{shape} ctx {ctx} T {T}: skipped ({left():.0f} s left)'); print(res['notes'][-1])
                    continue
                ts = time.time()
                x = inputs(shape, ctx, T, dev, dtype, bs, topk, window, a.shared, chunk=chunk)
                kvb = x['kv'].numel() * x['kv'].element_size()
                ncopy = copies_beyond_l2(kvb, dev) if dev.type == 'cuda' else 1
                kvs = [x['kv']] + [x['kv'].clone() for _ in range(ncopy - 1)]
                row = dict(shape=shape, heads=SHAPES[shape], ctx=ctx, T=T, slots=x['Lt'], kv_copies=ncopy,
                           union_blocks=x['union'], blocks_per_node=x['per_node'], num_blocks=x['nb'])
                opts = options(x, bs, chunk)
                names = ['sdpa', 'split', 'triton'] + ([v for v in extra if v in opts]
                                                          if (shape, T) == (first, max(trees)) else [])
                with torch.no_grad():
                    want = opts['sdpa'](x['kv']).float()
                    for name in names:
                        if left() < 2: row[f'{name}_ms'] = 'skipped: budget'; continue
                        try:
                            got = opts[name](x['kv']).float()
                            row[f'{name}_maxdiff'] = round(float((got - want).abs().max()), 5)
                            fns = [(lambda kv: lambda: opts[name](kv))(kv) for kv in kvs]
                            ms = device_time(fns, dev, inner=len(fns), reps=10 if dev.type == 'cuda' else 1)
                            row[f'{name}_ms'] = round(ms, 4)
                        except Exception as e:                           # noqa: BLE001 (recorded, next option)
                            row[f'{name}_ms'] = f'{type(e).__name__}: {e}'[:200]
                for name in names[1:]:
                    if isinstance(row.get(f'{name}_ms'), float) and isinstance(row.get('sdpa_ms'), float):
                        row[f'{name}_x_vs_sdpa'] = round(row['sdpa_ms'] / row[f'{name}_ms'], 2)
                if isinstance(row.get('triton_ms'), float) and isinstance(row.get('split_ms'), float):
                    row['triton_x_vs_split'] = round(row['split_ms'] / row['triton_ms'], 2)
                row['stage_s'] = round(time.time() - ts, 1)
                res['layer'].append(row); save()
                print({k: v for k, v in row.items() if k not in ('heads',)}, flush=True)
                del x, kvs, opts
                if dev.type == 'cuda': torch.cuda.empty_cache()
    res['total_s'] = round(time.time() - t0, 1)
    save()
    print('done in', res['total_s'], 's', flush=True)


def select_stage(a, res, left, dev, dtype, shape, contexts, trees, save):
    """Per-layer selection: tree_slot_mask(bitmap=True) (torch) vs tree_select_bitmap (Triton), same inputs, bitmaps
    compared; graph-timed over copies of kc beyond L2."""
    from types import SimpleNamespace
    res.setdefault('select', [])
    if a.cpu_smoke:
        st = SimpleNamespace(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, topk=4,
                             selection='minicpm4')
    else:
        st = SimpleNamespace(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, local_blocks=32, topk=64,
                             selection='minicpm4')
    Hq, Hkv, D = SHAPES[shape]
    for ctx in contexts:
        for T in trees:
            if left() < 4:
                res['notes'].append(f'select {shape} ctx {ctx} T {T}: skipped ({left():.0f} s left)'); print(res['notes'][-1])
                continue
            ts = time.time()
            g = torch.Generator().manual_seed(ctx + T)
            anc, dep = tree_of(T, 6, g)
            Lt = -(-(ctx + T + 64) // 512) * 512
            nb = -(-Lt // st.block_size)
            NC = (Lt - st.kernel_size) // st.kernel_stride + 1
            geo = SS.tree_geometry(torch.tensor([ctx], device=dev), dep.to(dev), anc.to(dev), st.kernel_size,
                                   st.kernel_stride, Lt, st.block_size)
            dense = torch.zeros(T, dtype=torch.bool, device=dev)
            r = SS.tree_round_masks(geo, st, dense, NC, nb)
            gd = torch.Generator(dev).manual_seed(ctx * 7 + T)
            q = torch.randn(T, Hq, D, generator=gd, device=dev).to(dtype)
            kc = torch.randn(NC, Hkv, D, generator=gd, device=dev).to(dtype)
            kn = torch.randn(T, Hkv, D, generator=gd, device=dev).to(dtype)
            ncopy = copies_beyond_l2(kc.numel() * kc.element_size(), dev) if dev.type == 'cuda' else 1
            kcs = [kc] + [kc.clone() for _ in range(ncopy - 1)]
            row = dict(shape=shape, ctx=ctx, T=T, num_blocks=nb, kernels=NC, kc_copies=ncopy)
            cand = dict(CAP=8, GN=8) if a.cpu_smoke else dict(CAP=128, GN=128)
            opts = {'masks': lambda k: SS.tree_slot_mask(q, k, kn, geo, r, st, nb, bitmap=True),
                    'triton': lambda k: SS.tree_select_bitmap(q, k, kn, geo, r, st, nb, dense, config=dict(CAP=0)),
                    'triton-default': lambda k: SS.tree_select_bitmap(q, k, kn, geo, r, st, nb, dense),
                    'triton-cand': lambda k: SS.tree_select_bitmap(q, k, kn, geo, r, st, nb, dense, config=cand)}
            with torch.no_grad():
                want = opts['masks'](kc)
                row['blocks_per_row'] = round(float(want.sum(-1).float().mean()), 1)
                for name in ('triton', 'triton-cand', 'triton-default'):
                    try:
                        got = opts[name](kc)
                        row[f'{name}_same'] = bool(torch.equal(want, got))
                        row[f'{name}_diff_rows'] = int((want != got).any(-1).sum())
                    except Exception as e:                               # noqa: BLE001
                        row[f'{name}_same'] = f'{type(e).__name__}: {e}'[:200]
                for name, fn in opts.items():
                    if left() < 2: row[f'{name}_us'] = 'skipped: budget'; continue
                    try:
                        fns = [(lambda k: lambda: fn(k))(k) for k in kcs]
                        row[f'{name}_us'] = round(1e3 * device_time(fns, dev, inner=len(fns),
                                                                  reps=10 if dev.type == 'cuda' else 1), 2)
                    except Exception as e:                               # noqa: BLE001
                        row[f'{name}_us'] = f'{type(e).__name__}: {e}'[:200]
            for name in ('triton', 'triton-cand', 'triton-default'):
                if isinstance(row.get('masks_us'), float) and isinstance(row.get(f'{name}_us'), float):
                    row[f'{name}_x_vs_masks'] = round(row['masks_us'] / row[f'{name}_us'], 2)
            row['stage_s'] = round(time.time() - ts, 1)
            res['select'].append(row); save()
            print('select', row, flush=True)
            del kcs, q, kc, kn
            if dev.type == 'cuda': torch.cuda.empty_cache()


def round_stage(a, res, left, dev, save):
    "ms per SparseFastSpec round (graph replay from the state after the prompt) with TREE_ATTN 'split' and 'triton'."
    from minicpm4_core.config import MiniCPM4Config, default_sparse_config
    from minicpm4_core.frspec import EagleDraft, frequent_ids
    from minicpm4_core.model import MiniCPM4ForCausalLM
    res['round'] = rr = {}
    if left() < 25:
        rr['note'] = f'skipped ({left():.0f} s left, needs ~25)'; print('round:', rr['note']); save(); return
    if a.cpu_smoke:
        sc = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=3, dense_len=63)
        c = MiniCPM4Config.tiny(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, intermediate_size=96, torch_dtype='float32', sparse_config=sc)
        ctx, tree, dtype = 100, dict(depth=3, topk=2, tree_size=6), torch.float32
    else:
        c = MiniCPM4Config.from_preset('minicpm4_0_5b', sparse_config=default_sparse_config(), torch_dtype='bfloat16',
                                       max_position_embeddings=32768)
        ctx, tree, dtype = 16384, dict(depth=6, topk=8, tree_size=32), torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev): model = MiniCPM4ForCausalLM(c).to(dtype).eval()
    draft = EagleDraft(c).to(dev, dtype).eval()
    vocab = frequent_ids(torch.rand(c.vocab_size), min(8192, c.vocab_size)).to(dev)
    p = torch.randint(0, c.vocab_size, (ctx,), generator=torch.Generator().manual_seed(2)).tolist()
    rr.update(ctx=ctx, tree=tree)
    toks = {}
    for name in a.round_opts.split(','):
        if left() < 12: rr[f'{name}_round_ms'] = f'skipped ({left():.0f} s left)'; continue
        old, olds = SS.TREE_ATTN, SS.TREE_SELECT
        SS.TREE_ATTN = name.split('+')[0]
        SS.TREE_SELECT = 'triton' if name.endswith('+tsel') else 'masks'
        try:
            ts = time.time()
            e = SS.SparseFastSpec(model, draft, vocab, max_len=ctx + 160, chunk=ctx if dev.type == 'cuda' else 32,
                                  **tree)
            e.tune = False
            toks[name] = e.generate(p, 8)                        # warm-up: captures, compiles
            rr[f'{name}_warmup_s'] = round(time.time() - ts, 1)
            rr[f'{name}_round_ms'] = round_ms(e, p, dev)
            rr[f'{name}_accept'] = e.last_stats['mean_accept_length']
            del e
        except Exception as ex:                                  # noqa: BLE001
            rr[f'{name}_round_ms'] = f'{type(ex).__name__}: {ex}'[:200]
        finally:
            SS.TREE_ATTN, SS.TREE_SELECT = old, olds
        print('round', {k: v for k, v in rr.items()}, flush=True); save()
    for name in list(toks)[1:]:
        if 'split' in toks: rr[f'same_tokens_split_{name}'] = toks['split'] == toks[name]
    for name in ('triton', 'split+tsel', 'triton+tsel'):
        if isinstance(rr.get(f'{name}_round_ms'), float) and isinstance(rr.get('split_round_ms'), float):
            rr[f'{name}_x_vs_split'] = round(rr['split_round_ms'] / rr[f'{name}_round_ms'], 2)
    print('round', rr, flush=True); save()


def round_ms(e, p, dev, reps=8):
    "Median ms of one round: graph replays (CUDA) or eager calls (CPU) from the state after the prompt, restored."
    e._prefill(p)
    saved = [getattr(e, n).clone() for n in e._STATE]
    g = e._graphs['_round'].replay if '_round' in getattr(e, '_graphs', {}) else e._round
    def one():
        for t, v in zip((getattr(e, n) for n in e._STATE), saved): t.copy_(v)
        g()
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    ts = []
    for _ in range(reps if dev.type == 'cuda' else 1):
        one(); sync(); t1 = time.perf_counter(); one(); sync()
        ts.append(time.perf_counter() - t1)
    for t, v in zip((getattr(e, n) for n in e._STATE), saved): t.copy_(v)
    return round(sorted(ts)[len(ts) // 2] * 1e3, 3)


if __name__ == '__main__':
    main()
