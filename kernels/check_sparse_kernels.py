#!/usr/bin/env python
"""GPU correctness sweep for the InfLLM v2 Triton kernels (minicpm4_core.kernels) against the reference
(minicpm4_core.infllmv2): forward + dq/dk/dv of sparse_attention, fused stage-1 scores + top-k, decoding
(decode_step: direct launch, radix widths, CUDA graph), dense_decode (eager, and one graph replayed at other lengths).

bf16/fp16 must agree within relative error 1e-2 (fp32: 1e-4; our fp32 dots are exact 'ieee'); block selections
must be identical to `select_blocks` (scores are compared by relative error, +-inf patterns exactly), for both
released selections ('minicpm4': top-k beside a window, the attention lists top-k + window; 'minicpm4.1': window
inside the top-k). Outputs are poisoned (NaN-filled memory handed back to the allocator) before each run and
checked finite.

    PYTHONPATH=. python kernels/check_sparse_kernels.py [--out results.json] [--smoke] [--only decode dense_decode band]
    TRITON_INTERPRET=1 python kernels/check_sparse_kernels.py --smoke     # tiny shapes, CPU (alias: --tiny)
"""
import argparse
import json
import sys
import time

import torch

from minicpm4_core import infllmv2 as iv
from minicpm4_core.kernels import sparse as sk


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def poison(dev, nbytes=1 << 28):
    "Fill a large free block with 0xFF (NaN in every float format) and give it back to the caching allocator."
    if dev.type == 'cuda':
        x = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(255)
        del x


def lists_per_token(B, T, Hkv, N, m, K, dev, gen):
    "Random sorted unique block lists per (token, kv head), a random number of -1 at the end."
    nb = -(-N // m)
    r = torch.rand(B, T, Hkv, nb, generator=gen, device='cpu')
    idx = r.topk(min(K, nb), -1).indices
    keep = torch.rand(B, T, Hkv, 1, generator=gen) * 1.3          # some rows shorter
    n = (keep.clamp(max=1.0) * idx.shape[-1]).long()
    ar = torch.arange(idx.shape[-1])
    idx = torch.where(ar < n, idx, nb).sort(-1).values
    idx = torch.where(idx == nb, -1, idx)
    if idx.shape[-1] < K: idx = torch.nn.functional.pad(idx, (0, K - idx.shape[-1]), value=-1)
    return idx.int().to(dev)


def lists_per_block(B, T, N, Hkv, m, K, init, local, dev, gen):
    """Benchmark-style lists: one per query block of m tokens, -1 padded, laid out as the 'minicpm4' attention lists:
    init blocks + random choices older than the window + the window [qb - local + 1, qb]."""
    nb = -(-N // m)
    qb_all = torch.arange(N - T, N) // m
    b = torch.arange(nb)
    out = []
    for _ in range(B):
        per_h = []
        for _ in range(Hkv):
            qb = torch.arange(nb)[:, None]
            cand = (b[None] >= init) & (b[None] <= qb - local)
            r = torch.where(cand, torch.rand(nb, nb, generator=gen), -1.0)
            nch = max(0, K - init - local)
            v, ch = r.topk(min(nch, nb), -1) if nch else (torch.zeros(nb, 0), torch.zeros(nb, 0, dtype=torch.long))
            ch = torch.where(v >= 0, ch, -1)
            loc = qb - torch.arange(local)[None]
            loc = torch.where(loc >= init, loc, -1)
            ini = torch.arange(init)[None].expand(nb, -1)
            ini = torch.where(ini <= qb, ini, -1)
            lst = torch.cat([ini, loc, ch], -1)
            lst = torch.where(lst < 0, nb, lst).sort(-1).values
            lst = torch.where(lst == nb, -1, lst)[:, :K]
            per_h.append(lst[qb_all])
        out.append(torch.stack(per_h, 1))
    return torch.stack(out).int().to(dev)


def check_attention(case, dev, gen, tol):
    B, T, N, H, Hkv, D, m, K, dtype, kind, cfg = case
    dt = getattr(torch, dtype)
    q = torch.randn(B, T, H, D, generator=gen).to(dev, dt)
    k = torch.randn(B, N, Hkv, D, generator=gen).to(dev, dt)
    v = torch.randn(B, N, Hkv, D, generator=gen).to(dev, dt)
    idx = lists_per_token(B, T, Hkv, N, m, K, dev, gen) if kind == 'token' else \
        lists_per_block(B, T, N, Hkv, m, K, 1, min(4, K - 1), dev, gen)
    do = torch.randn(B, T, H, D, generator=gen).to(dev, dt)
    poison(dev)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    o = sk.sparse_attention(qg, kg, vg, idx, m, config=cfg)
    poison(dev)
    g = torch.autograd.grad(o, (qg, kg, vg), do)
    rd = torch.float64 if dev.type == 'cpu' else torch.float32
    qr, kr, vr = (x.to(rd).requires_grad_() for x in (q, k, v))
    oref = iv.sparse_attention_ref(qr, kr, vr, idx, m)
    gref = torch.autograd.grad(oref, (qr, kr, vr), do.to(rd))
    errs = dict(o=rel(o, oref), dq=rel(g[0], gref[0]), dk=rel(g[1], gref[1]), dv=rel(g[2], gref[2]))
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(x).all()) for x in g)
    ok = finite and max(errs.values()) <= tol
    return dict(case=case[:10], errs=errs, finite=finite, ok=ok)


def check_stage1(case, dev, gen):
    B, T, N, H, Hkv, D, geo, topk, approx, dtype = case[:10]
    cfg = dict(s1=case[10]) if len(case) > 10 else None
    sel = geo.get('selection', 'minicpm4')
    dt = getattr(torch, dtype)
    q = torch.randn(B, T, H, D, generator=gen).to(dev, dt)
    k = torch.randn(B, N, Hkv, D, generator=gen).to(dev, dt)
    poison(dev)
    a = sk.fused_block_scores(q, k, **geo, lse_approx=approx, config=cfg)
    b = iv.block_scores(q, k, **geo, lse_approx=approx)
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    pattern = bool(torch.equal(fa, fb)) and bool(torch.equal(a[~fa], b[~fb]))
    err = rel(a[fa], b[fb]) if pattern and fa.any() else (0.0 if pattern else float('nan'))
    ia, ib = sk.topk_blocks(a, topk), iv.select_blocks(b, topk)
    same = float((ia == ib).all(-1).float().mean())
    # the selection of the reference applied to OUR scores must be identical (tie rule): isolates topk from rounding
    ic = iv.select_blocks(a, topk)
    tie_rule = bool(torch.equal(ia, ic))
    # the attention lists of the pipeline (top-k + window for 'minicpm4') = the reference's attention_blocks
    lists = sk.prefill_select(q, k, topk, **geo, lse_approx=approx, config=cfg)
    want = iv.attention_blocks(ia, N, geo['block_size'], geo['local_blocks'], sel)
    lists_ok = bool(torch.equal(lists, want)) and lists.shape[-1] == topk + (geo['local_blocks'] if sel == 'minicpm4'
                                                                            else 0)
    tol = 1e-5 if dt == torch.float32 else 1e-2
    return dict(case=[B, T, N, H, Hkv, D, geo, topk, approx, dtype], pattern=pattern, rel=err, rows_same=same,
                topk_tie_rule=tie_rule, lists_ok=lists_ok, ok=pattern and err <= tol and tie_rule and lists_ok)


def check_band(case, dev, gen):
    """sparse_attention_band (the window as a dense causal band + the listed blocks) forward and dq/dk/dv against the
    reference on the union lists (`attention_blocks`), incl. float32 at head dim 128 (its shared memory: the fp32
    settings of DEFAULT_CONFIG['fp32'])."""
    B, T, N, H, Hkv, D, m, local, K, dtype = case
    dt = getattr(torch, dtype)
    q = torch.randn(B, T, H, D, generator=gen).to(dev, dt)
    k = torch.randn(B, N, Hkv, D, generator=gen).to(dev, dt)
    v = torch.randn(B, N, Hkv, D, generator=gen).to(dev, dt)
    idx = lists_per_token(B, T, Hkv, N, m, K, dev, gen)
    do = torch.randn(B, T, H, D, generator=gen).to(dev, dt)
    poison(dev)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    o = sk.sparse_attention_band(qg, kg, vg, idx, m, local_blocks=local)
    poison(dev)
    g = torch.autograd.grad(o, (qg, kg, vg), do)
    rd = torch.float64 if dev.type == 'cpu' else torch.float32
    qr, kr, vr = (x.to(rd).requires_grad_() for x in (q, k, v))
    oref = iv.sparse_attention_ref(qr, kr, vr, iv.attention_blocks(idx, N, m, local), m)
    gref = torch.autograd.grad(oref, (qr, kr, vr), do.to(rd))
    errs = dict(o=rel(o, oref), dq=rel(g[0], gref[0]), dk=rel(g[1], gref[1]), dv=rel(g[2], gref[2]))
    finite = bool(torch.isfinite(o).all()) and all(bool(torch.isfinite(x).all()) for x in g)
    tol = 1e-4 if dt == torch.float32 else 1e-2
    return dict(case=case, errs=errs, finite=finite, ok=finite and max(errs.values()) <= tol)


def cand_counts(sc, lens, m, topk, groups=128):
    """How many candidates `_cand_select` ranks per row (its bound from `groups` group maxima of the row's scores,
    computed here in torch): the blocks with a score >= the topk-th largest group maximum. Rows with more than
    CAND_CAP (128) take the radix fallback."""
    out = []
    for b, L in enumerate(lens):
        nb = -(-L // m)
        for h in range(sc.shape[1]):
            x = sc[b, h].float()
            nbp = 1 << max(4, (x.shape[-1] - 1).bit_length())
            xp = torch.full((nbp,), float('-inf'), device=x.device)
            xp[:nb] = x[:nb]
            gm = xp.view(-1, min(groups, nbp)).amax(0)             # interleaved groups: g, g + groups, ...
            t = gm.sort(descending=True).values[min(topk, nb) - 1]
            out.append(int((xp[:nb] >= t).sum()))
    return out


QUICK = False        # --quick: the new paths only (cand, PDL, split) + the default and 'par'
PERSISTENT = False   # --persistent: also the one-launch decode step (its grid barriers can hang a broken build)


def check_decode(case, dev, gen):
    lens, H, Hkv, D, geo, topk, dtype = case
    dt = getattr(torch, dtype)
    B, Nmax = len(lens), max(lens) + 100
    kc = torch.randn(B, Nmax, Hkv, D, generator=gen).to(dev, dt)
    vc = torch.randn(B, Nmax, Hkv, D, generator=gen).to(dev, dt)
    q = torch.randn(B, H, D, generator=gen).to(dev, dt)
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    comp = iv.compress_keys(kc, geo['kernel_size'], geo['kernel_stride'])
    m = geo['block_size']
    sel = geo.get('selection', 'minicpm4')
    poison(dev)
    sc = sk.decode_block_scores(q, comp, seq, **geo, num_blocks=-(-Nmax // m))
    idx = sk.decode_select(q, comp, seq, topk, **geo, num_blocks=-(-Nmax // m))     # top-k (+ window)
    o = sk.sparse_decode(q, kc, vc, idx, seq, m)
    res = dict(case=case, score_rel=[], same_sel=[], attn_rel=[])
    ok = bool(torch.isfinite(o).all())
    for b, L in enumerate(lens):
        ref = iv.block_scores(q[b:b + 1, None], kc[b:b + 1, :L], **geo)[0, 0]
        nb = ref.shape[-1]
        f = torch.isfinite(ref)
        pat = bool(torch.equal(torch.isfinite(sc[b, :, :nb]), f)) and bool(torch.isneginf(sc[b, :, nb:]).all())
        e = rel(sc[b, :, :nb][f], ref[f]) if f.any() else 0.0
        ridx = iv.attention_blocks(iv.select_blocks(sc[b:b + 1, None, :, :nb], topk), L, m, geo['local_blocks'],
                                   sel)[0, 0]
        same = bool(torch.equal(idx[b], ridx))
        oref = iv.sparse_attention_ref(q[b:b + 1, None].float(), kc[b:b + 1, :L].float(), vc[b:b + 1, :L].float(),
                                       idx[b:b + 1, None], m)[0, 0]
        ea = rel(o[b], oref)
        res['score_rel'].append(e); res['same_sel'].append(same); res['attn_rel'].append(ea)
        ok = ok and pat and e <= 1e-2 and same and ea <= 1e-2
    # the model's fused path: decode_step == decode_select + sparse_decode, bit for bit (same kernels)
    o2, idx2 = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m))
    # (sparse_decode's combine kernel vs decode_step's default one-pass 'split' combine: equal up to rounding)
    res['decode_step_o_rel'] = rel(o2, o)
    res['decode_step_same'] = bool(torch.equal(idx2, idx)) and res['decode_step_o_rel'] <= 5e-3
    # T = 3 new tokens of each sequence as 3 query rows of one cache row (cached steps of a few tokens)
    T = 3
    q3 = torch.randn(B * T, H, D, generator=gen).to(dev, dt)
    seq3 = (seq[:, None] - T + 1 + torch.arange(T, device=dev)[None]).reshape(-1).int()
    o3, idx3 = sk.decode_step(q3, q3, kc, vc, comp, seq3, topk, **geo, num_blocks=-(-Nmax // m), queries_per_row=T)
    same3, e3 = True, 0.0
    for b, L in enumerate(lens):
        qq = q3[b * T:(b + 1) * T][None]
        ridx = iv.attention_blocks(iv.select_blocks(iv.block_scores(qq, kc[b:b + 1, :L], **geo), topk), L, m,
                                   geo['local_blocks'], sel)[0]
        same3 = same3 and bool(torch.equal(idx3[b * T:(b + 1) * T], ridx))
        oref = iv.sparse_attention_ref(qq.float(), kc[b:b + 1, :L].float(), vc[b:b + 1, :L].float(), ridx[None], m)[0]
        e3 = max(e3, rel(o3[b * T:(b + 1) * T], oref))
    res['qper3_same_sel'], res['qper3_attn_rel'] = same3, e3
    # decode_step's second call of a shape takes the direct launch (cached compiled kernels): bit-identical; other
    # radix widths of the fused top-k: the same lists; under a CUDA graph: the same as eager
    o4, idx4 = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m))
    same4 = bool(torch.equal(idx4, idx)) and bool(torch.equal(o4, o2))
    for dig in (() if QUICK else (1, 4)):
        _, idx5 = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m),
                                 config=dict(dec=dict(TOPK_DIG=dig, NBC_POOL=64)))
        same4 = same4 and bool(torch.equal(idx5, idx))
    if dev.type == 'cuda':
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            og, idxg = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m))
        og.fill_(float('nan')); gr.replay(); torch.cuda.synchronize()
        same4 = same4 and bool(torch.equal(idxg, idx)) and bool(torch.equal(og, o2))
    res['decode_step_direct_radix_graph_same'] = same4
    # every selection path (FUSED 'par' with several pooling widths, True, False, 'auto'): the same lists and output;
    # 'par' repeated 30 times eagerly (its last-program top-k depends on a counter and a fence: a race would show as
    # a changed list), and captured once at Nmax then replayed at other lengths against eager calls at them
    paths = {}
    for nm, dc in (('par', {}), ('cand', dict(FUSED='cand')),
                   ('cand_g32_cap64_cj8', dict(FUSED='cand', CAND_GROUPS=32, CAND_CAP=64, CAND_CJ=8)),
                   ('cand_cap16_fallback', dict(FUSED='cand', CAND_CAP=16)), ('cand_pdl', dict(FUSED='cand', PDL=True)),
                   ('par_pdl', dict(FUSED='par', PDL=True)), ('cand_split', dict(FUSED='cand', COMBINE='split')),
                   ('cand_pdl_split', dict(FUSED='cand', PDL=True, COMBINE='split')),
                   ('cand_pdl_split_per2', dict(FUSED='cand', PDL=True, COMBINE='split', PER=2)),
                   ('cand_preload', dict(FUSED='cand', POOL_PRELOAD=True)),
                   ('cand_all_opt_ins', dict(FUSED='cand', PDL=True, COMBINE='split', POOL_PRELOAD=True)),
                   ('par_nbc64', dict(NBC_PAR=64)), ('par_w4', dict(PAR_WARPS=4)),
                   ('par_per2', dict(PER=2)), ('combine_kernel', dict(COMBINE='kernel')),
                   ('combine_last', dict(COMBINE='last')), ('combine_w8_sp16', dict(COMBINE_WARPS=8, COMBINE_SP=16)),
                   ('one_program', dict(FUSED=True)), ('two_kernels', dict(FUSED=False, COMBINE='kernel')),
                   ('auto', dict(FUSED='auto'))) + ((('persistent', dict(PERSISTENT=True)),
                                                     ('persistent_2_per_sm', dict(PERSISTENT=True, PROGRAMS=2)),
                                                     ('persistent_cand', dict(PERSISTENT=True, FUSED='cand')))
                                                    if PERSISTENT else ()):
        if QUICK and nm not in ('par', 'cand', 'cand_cap16_fallback', 'cand_pdl', 'combine_kernel', 'cand_all_opt_ins'):
            continue
        cf = dict(dec=dict(dc, FUSED=dc.get('FUSED', 'par')))
        try:
            o6, idx6 = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m), config=cf)
        except Exception as e:                              # an opt-in path that cannot run here: a failed path
            paths[nm] = False
            res.setdefault('path_errors', {})[nm] = repr(e)[:300]
            continue
        oo = o2                                             # bit for bit: the same kernels in the same order
        # bit for bit when the combine and the splits are the default's (the same summation order)
        exact = not ({'PER', 'COMBINE_SP'} & set(dc)) and \
            dc.get('COMBINE', sk.DEFAULT_CONFIG['dec']['COMBINE']) == sk.DEFAULT_CONFIG['dec']['COMBINE']
        paths[nm] = bool(torch.equal(idx6, idx)) and (bool(torch.equal(o6, oo)) if exact else rel(o6, o) <= 5e-3)
    rep = True
    for _ in range(30):
        o6, idx6 = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m))
        rep = rep and bool(torch.equal(idx6, idx)) and bool(torch.equal(o6, o2))
    paths['default_30_eager_calls'] = rep
    rep = True
    for _ in range(0 if QUICK else 30):                    # (the default is 'cand': the calls above)
        o6, idx6 = sk.decode_step(q, q, kc, vc, comp, seq, topk, **geo, num_blocks=-(-Nmax // m),
                                  config=dict(dec=dict(FUSED='par')))
        rep = rep and bool(torch.equal(idx6, idx)) and bool(torch.equal(o6, o2))
    if not QUICK: paths['par_30_eager_calls'] = rep
    res['cand_counts'] = cand_counts(sc, lens, m, topk)
    for nm, cf in (('default', None),) + (() if QUICK else (('par', dict(dec=dict(FUSED='par'))),
                                                            ('cand_pdl', dict(dec=dict(FUSED='cand', PDL=True))))) + (
                   ('cand_all_opt_ins', dict(dec=dict(FUSED='cand', PDL=True, COMBINE='split', POOL_PRELOAD=True))),) + \
            ((('persistent', dict(dec=dict(PERSISTENT=True))),) if PERSISTENT else ()):
        if dev.type != 'cuda': break
        sq = seq.clone()
        try:
            gr = torch.cuda.CUDAGraph()
            with torch.cuda.graph(gr):
                og, idxg = sk.decode_step(q, q, kc, vc, comp, sq, topk, **geo, num_blocks=-(-Nmax // m), config=cf)
            g_ok = True
            for i in range(6 if QUICK else 12):
                ls = torch.randint(1, Nmax + 1, (B,), generator=gen) if i % 3 else torch.tensor(lens)
                sq.copy_(ls.to(torch.int32))
                gr.replay()
                oe, idxe = sk.decode_step(q, q, kc, vc, comp, sq.clone(), topk, **geo, num_blocks=-(-Nmax // m),
                                          config=cf)
                torch.cuda.synchronize()
                g_ok = g_ok and bool(torch.equal(idxg, idxe)) and bool(torch.equal(og, oe))
        except Exception as e:
            g_ok = False
            res.setdefault('path_errors', {})[f'{nm}_graph'] = repr(e)[:300]
        paths[f'{nm}_graph_replay_other_lengths'] = g_ok
    res['selection_paths_same'] = paths
    res['ok'] = ok and res['decode_step_same'] and same3 and e3 <= 1e-2 and same4 and all(paths.values())
    return res


def check_dense_decode(case, dev, gen):
    """dense_decode vs float32 softmax attention per row; on CUDA also one graph captured at Nmax and replayed with
    other lengths written into cache_seqlens (the static decoding stack's use)."""
    lens, H, Hkv, D, dtype, static = case
    dt = getattr(torch, dtype)
    B, Nmax = len(lens), max(lens) + 77
    if static:   # views of a (Nmax, 2 Hkv, D) buffer per row, as the static stack keeps K and V
        buf = torch.randn(B, Nmax, 2 * Hkv, D, generator=gen).to(dev, dt)
        k, v = buf[:, :, :Hkv], buf[:, :, Hkv:]
    else:
        k = torch.randn(B, Nmax, Hkv, D, generator=gen).to(dev, dt)
        v = torch.randn(B, Nmax, Hkv, D, generator=gen).to(dev, dt)
    q = torch.randn(B, H, D, generator=gen).to(dev, dt)
    G = H // Hkv

    def ref(ls):
        out = []
        for b, L in enumerate(ls):
            kk, vv = (x[b, :L].float().repeat_interleave(G, 1) for x in (k, v))
            p = torch.einsum('hd,nhd->hn', q[b].float(), kk).mul(D ** -0.5).softmax(-1)
            out.append(torch.einsum('hn,nhd->hd', p, vv))
        return torch.stack(out)
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    poison(dev)
    o = sk.dense_decode(q, k, v, seq)
    errs = [rel(o, ref(lens))]
    ok = bool(torch.isfinite(o).all())
    if dev.type == 'cuda':
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            og = sk.dense_decode(q, k, v, seq)
        for ls in ([1] * B, [Nmax] * B, [int(x) for x in torch.randint(1, Nmax + 1, (B,), generator=gen)]):
            seq.copy_(torch.tensor(ls, dtype=torch.int32))
            og.fill_(float('nan')); gr.replay(); torch.cuda.synchronize()
            ok = ok and bool(torch.isfinite(og).all())
            errs.append(rel(og, ref(ls)))
    tol = 1e-4 if dt == torch.float32 else 1e-2
    return dict(case=case, errs=errs, ok=ok and max(errs) <= tol)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', default=None)
    ap.add_argument('--smoke', '--tiny', action='store_true', help='tiny shapes (CPU interpreter)')
    ap.add_argument('--persistent', action='store_true', help='decode: also check the one-launch step (dec.PERSISTENT)')
    ap.add_argument('--quick', action='store_true', help='fewer cases: decode at 5000/777/12000 and 128K, two band cases')
    ap.add_argument('--only', nargs='+', default=None, choices=['attention', 'stage1', 'decode', 'dense_decode', 'band'],
                    help='run only these sections (default: all)')
    a = ap.parse_args()
    global PERSISTENT, QUICK
    PERSISTENT, QUICK = a.persistent, a.quick
    dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    G64 = dict(kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, local_blocks=32)
    if a.smoke:
        att = [(1, 40, 70, 8, 2, 16, 16, 3, 'float32', 'token', None),
               (1, 64, 64, 16, 1, 16, 16, 4, 'bfloat16', 'block', dict(chunk=2))]
        g16 = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=1)
        s1 = [(1, 40, 90, 8, 2, 16, g16, 3, False, 'float32'),
              (1, 40, 90, 8, 2, 16, dict(g16, selection='minicpm4.1'), 3, True, 'float32')]
        dec = [((50, 31), 8, 2, 16, g16, 3, 'float32'),
               ((50, 31), 8, 2, 16, dict(g16, selection='minicpm4.1'), 3, 'float32')]
        dd = [((1, 150), 8, 2, 32, 'float32', True), ((97, 33), 8, 2, 32, 'bfloat16', False)]
        bd = [(1, 30, 90, 8, 2, 16, 16, 2, 3, 'float32'), (2, 17, 40, 4, 1, 32, 16, 1, 2, 'float32')]
    else:
        att = [  # B, T, N, H, Hkv, D, m, K, dtype, lists, config
            (2, 300, 300, 32, 2, 128, 64, 4, 'bfloat16', 'token', None),
            (1, 1000, 1500, 16, 2, 64, 64, 8, 'bfloat16', 'token', None),
            (2, 257, 513, 8, 8, 128, 64, 6, 'bfloat16', 'token', None),          # G = 1
            (1, 512, 512, 12, 4, 96, 64, 5, 'bfloat16', 'token', None),          # G = 3, head_dim 96
            (3, 200, 700, 16, 1, 128, 32, 5, 'float16', 'token', None),          # G = 16, block 32
            (1, 2048, 2048, 32, 2, 128, 64, 16, 'bfloat16', 'block', dict(chunk=16)),   # split reverse lists
            (1, 2048, 3000, 32, 2, 128, 64, 16, 'bfloat16', 'block', dict(fwd=dict(PAIR=2), dq=dict(PAIR=2))),
            (1, 200, 300, 8, 2, 64, 64, 4, 'float32', 'token', None),
            (1, 300, 700, 32, 2, 128, 64, 6, 'float32', 'token', None),          # fp32 at d 128: its smem settings
            (1, 2048, 2048, 32, 2, 128, 64, 16, 'bfloat16', 'block',     # 64-row tiles, scalar block ids
             dict(tile_tokens=4, fwd=dict(num_warps=4, num_stages=3, PAIR=1), bwd_tile_tokens=4,
                  dq=dict(num_warps=4), dkdv=dict(num_warps=4))),
            (1, 1000, 1500, 32, 2, 128, 64, 8, 'bfloat16', 'token',      # backward with another tile than forward
             dict(tile_tokens=4, fwd=dict(num_warps=8, PAIR=2), bwd_tile_tokens=8, chunk=128)),
        ]
        G41 = dict(G64, selection='minicpm4.1')
        s1 = [  # B, T, N, H, Hkv, D, geometry (+ selection, default 'minicpm4'), topk, approx, dtype
            (1, 2048, 4096, 32, 2, 128, dict(G64, local_blocks=4), 16, False, 'bfloat16'),
            (1, 2048, 4096, 32, 2, 128, dict(G64, local_blocks=4), 16, True, 'bfloat16'),
            (1, 2048, 4096, 32, 2, 128, dict(G41, local_blocks=4), 16, True, 'bfloat16'),
            (2, 1000, 3000, 16, 2, 64, G64, 40, False, 'bfloat16'),
            (2, 1000, 3000, 16, 2, 64, G41, 40, False, 'bfloat16'),
            (1, 700, 9000, 32, 2, 128, G64, 64, True, 'bfloat16'),              # the shipped config: 64 + 32
            (1, 700, 9000, 32, 2, 128, G41, 64, True, 'bfloat16'),              # MiniCPM4.1's: 64, 34 forced
            (1, 300, 2000, 32, 2, 128, dict(G64, local_blocks=2), 8, False, 'float32'),
            (1, 1500, 6000, 32, 2, 128, G64, 96, True, 'bfloat16', dict(num_warps=4, NBC=32, KT=128, BM=4)),
            (1, 1500, 6000, 32, 2, 128, G64, 96, False, 'bfloat16', dict(num_warps=8, NBC=32, KT=128)),
        ]
        dec = [((5000, 777, 12000), 32, 2, 128, G64, 64, 'bfloat16'),
               ((5000, 777, 12000), 32, 2, 128, G41, 64, 'bfloat16'),
               ((3000,), 16, 2, 64, dict(G64, local_blocks=4), 16, 'bfloat16'),
               ((131072, 70001), 32, 2, 128, G64, 64, 'bfloat16')]                  # 2048 blocks: the 128K step
        dd = [  # lengths, H, Hkv, D, dtype, (Nmax, 2 Hkv, D) views
            ((1, 4097, 70000), 32, 2, 128, 'bfloat16', True), ((131072,), 32, 2, 128, 'bfloat16', True),
            ((5000, 63), 32, 2, 128, 'bfloat16', False), ((3000, 777), 12, 4, 64, 'float16', False),
            ((2049, 1), 16, 1, 128, 'float32', True)]
        bd = [  # B, T, N, H, Hkv, D, block, window blocks, listed blocks, dtype
            (1, 1024, 2048, 32, 2, 128, 64, 8, 12, 'float32'),                # the 8B shape in fp32 (was OutOfResources)
            (2, 300, 1000, 32, 2, 128, 64, 4, 6, 'float32'),
            (1, 1500, 3000, 32, 2, 128, 64, 32, 16, 'bfloat16'),
            (1, 700, 1500, 16, 2, 64, 64, 4, 8, 'float16')]
    if a.quick and not a.smoke:
        dec, bd = [dec[3], dec[0]], [bd[0], bd[2]]             # 128K first
    if a.only:
        att, s1, dec, dd, bd = (x if nm in a.only else [] for nm, x in
                                (('attention', att), ('stage1', s1), ('decode', dec), ('dense_decode', dd), ('band', bd)))
    def dump():                                             # after every case: a timeout keeps what ran
        if a.out:
            with open(a.out, 'w') as f: json.dump(results, f, indent=1, default=str)
    results = dict(device=torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu',
                   torch=torch.__version__, triton=__import__('triton').__version__, attention=[], stage1=[],
                   decode=[], dense_decode=[], band=[],
                   pdl_available=sk._gdc_wait is not None)
    for c in bd:                                            # first: short, and a timeout keeps it
        try:
            r = check_band(c, dev, gen)
        except Exception as e:                              # e.g. OutOfResources: a failed case, the rest still run
            r = dict(case=c, errs={}, ok=False, error=repr(e)[:300])
        results['band'].append(r); dump()
        print('band', c, {k: f'{v:.1e}' for k, v in r['errs'].items()}, r.get('error', ''), 'OK' if r['ok'] else 'FAIL',
              flush=True)
    for c in att:
        tol = 1e-4 if c[8] == 'float32' else 1e-2
        r = check_attention(c, dev, gen, tol)
        results['attention'].append(r); dump()
        print('attention', c[:10], {k: f'{v:.1e}' for k, v in r['errs'].items()}, 'OK' if r['ok'] else 'FAIL',
              flush=True)
    for c in s1:
        r = check_stage1(c, dev, gen)
        results['stage1'].append(r); dump()
        print('stage1', c[:6], 'approx' if c[8] else 'exact', f"rel {r['rel']:.1e} rows_same {r['rows_same']:.4f}",
              'tie_rule', r['topk_tie_rule'], 'lists', r['lists_ok'], c[6].get('selection', 'minicpm4'),
              'OK' if r['ok'] else 'FAIL', flush=True)
    for c in dec:
        r = check_decode(c, dev, gen)
        results['decode'].append(r); dump()
        print('decode', c[0], 'scores', ['%.1e' % e for e in r['score_rel']], 'same_sel', r['same_sel'],
              'attn', ['%.1e' % e for e in r['attn_rel']], 'decode_step', r['decode_step_same'],
              '%.1e' % r['decode_step_o_rel'], 'T=3 rows',
              r['qper3_same_sel'], '%.1e' % r['qper3_attn_rel'], 'direct/radix/graph',
              r['decode_step_direct_radix_graph_same'], 'paths', r['selection_paths_same'], 'cand_counts',
              r['cand_counts'], r.get('path_errors', ''), 'OK' if r['ok'] else 'FAIL', flush=True)
    for c in dd:
        r = check_dense_decode(c, dev, gen)
        results['dense_decode'].append(r); dump()
        print('dense_decode', c, 'rel (eager, graph replays at other lengths)', ['%.1e' % e for e in r['errs']],
              'OK' if r['ok'] else 'FAIL', flush=True)
    # a kernel that failed to compile would only warn and take a slower path: that counts as a failure here
    from minicpm4_core.kernels._common import _WARNED
    results['kernel_fallbacks'] = sorted(_WARNED)
    results['all_ok'] = (all(r['ok'] for k in ('attention', 'stage1', 'decode', 'dense_decode', 'band')
                             for r in results[k])
                         and not any(w.startswith('dec_') for w in _WARNED))
    if results['kernel_fallbacks']: print('fallbacks taken:', results['kernel_fallbacks'])
    results['seconds'] = time.time() - t0
    print('ALL OK' if results['all_ok'] else 'SOME CHECKS FAILED', f"({results['seconds']:.0f} s)")
    if a.out:
        with open(a.out, 'w') as f: json.dump(results, f, indent=1, default=str)
    return 0 if results['all_ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
