"""Tests of the issue-12 helpers of `minicpm4_core.kernels.sparse_prefill` (nbs/11c) that do not launch kernels:
`list_stats` (overlap and tile unions of per-token lists) against a set-based count on fresh random lists, and the
table builder's verdicts (`goal_verdict`, `issue12_rows`)."""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minicpm4_core.kernels import sparse_prefill as sp  # noqa: E402


def random_lists(T, N, Hkv, K, m, local, seed):
    "Per-token lists in the released shape: random chosen visible blocks outside the window, then the window."
    g = torch.Generator().manual_seed(seed)
    nb = -(-N // m)
    qb = (N - T + torch.arange(T)) // m
    out = torch.full((1, T, Hkv, K), -1, dtype=torch.int32)
    for t in range(T):
        for h in range(Hkv):
            win = [b for b in range(int(qb[t]) - local + 1, int(qb[t]) + 1) if b >= 0]
            cand = [b for b in range(0, int(qb[t]) - local + 1)]
            pick = [cand[i] for i in torch.randperm(len(cand), generator=g)[: K - len(win)].tolist()]
            row = sorted(pick + win)
            out[0, t, h, :len(row)] = torch.tensor(row, dtype=torch.int32)
    return out, nb


def set_stats(lists, N, m, local, distances, tiles):
    "The same statistics counted with Python sets (the definition)."
    _, T, Hkv, K = lists.shape
    qb = [(N - T + t) // m for t in range(T)]
    first = next((t for t in range(T) if qb[t] + 1 > K), T)
    rows = range(first, T)
    full = {(t, h): {int(b) for b in lists[0, t, h] if b >= 0} for t in rows for h in range(Hkv)}
    sel = {(t, h): {b for b in s if not (qb[t] - local < b <= qb[t])} for (t, h), s in full.items()}
    out = {}
    for name, S in (('full', full), ('sel', sel)):
        n = T - first
        ov = []
        for d in distances:
            if d >= n: ov.append(float('nan')); continue
            inter = sum(len(S[(t, h)] & S[(t + d, h)]) for t in range(first, T - d) for h in range(Hkv))
            size = sum(len(S[(t, h)]) for t in range(first, T - d) for h in range(Hkv))
            ov.append(inter / max(size, 1))
        out[f'{name}_overlap'] = ov
        out[f'{name}_size'] = sum(len(s) for s in S.values()) / len(S)
        for tt in tiles:
            m_ = n // tt
            u = [len(set().union(*(S[(first + i * tt + j, h)] for j in range(tt)))) for i in range(m_) for h in range(Hkv)]
            out[f'{name}_union_tile{tt}'] = sum(u) / len(u)
    return out, T - first


@pytest.mark.parametrize("T, N, K, local", [(300, 300, 6, 2), (200, 700, 5, 3), (130, 130, 4, 1)])
def test_list_stats_matches_set_count(T, N, K, local):
    m = 16
    seed = int(torch.randint(0, 10 ** 6, ()))                       # fresh lists each run
    lists, _ = random_lists(T, N, 2, K, m, local, seed)
    dist, tiles = (1, 3, 16), (1, 2, 8)
    got = sp.list_stats(lists, N, m, local, distances=dist, tiles=tiles)
    want, rows = set_stats(lists, N, m, local, dist, tiles)
    assert got['rows'] == rows and rows > 0
    for k, v in want.items():
        if isinstance(v, list):
            assert all((math.isnan(a) and math.isnan(b)) or a == pytest.approx(b) for a, b in zip(got[k], v)), (k, seed)
        else:
            assert got[k] == pytest.approx(v), (k, seed)
    assert sp.list_stats(lists[0], N, m, local, distances=dist, tiles=tiles) == got       # (T, Hkv, K) input


def test_list_stats_identical_and_disjoint_rows():
    # 64 queries, the last of 640 keys (all in block 9), blocks of 64, window 1 block; lists of 3 blocks
    T, N, m = 64, 640, 64
    same = torch.tensor([2, 7, 9], dtype=torch.int32).expand(1, T, 1, 3).contiguous()
    s = sp.list_stats(same, N, m, 1, distances=(1, 5), tiles=(1, 8, 64))
    assert s['sel_overlap'] == [1.0, 1.0] and s['sel_size'] == 2 and s['sel_union_tile64'] == 2
    assert s['full_size'] == 3 and s['full_union_tile8'] == 3
    alt = same.clone()
    alt[0, 1::2, 0, :2] = torch.tensor([4, 5], dtype=torch.int32)       # odd rows choose two other blocks
    s = sp.list_stats(alt, N, m, 1, distances=(1, 2), tiles=(1, 2))
    assert s['sel_overlap'] == [0.0, 1.0] and s['sel_union_tile2'] == 4 and s['full_overlap'][0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match='lists must be'):
        sp.list_stats(same[0, 0], N, m, 1)
    with pytest.raises(ValueError, match='n_keys'):
        sp.list_stats(same, 10, m, 1)


def test_goal_verdict():
    assert sp.goal_verdict(6.0, 5.25) == ('met', pytest.approx(6.0 / 5.25))
    v, m = sp.goal_verdict(1.36, 5.25)
    assert v == 'missed' and m == pytest.approx(5.25 / 1.36)
    assert sp.goal_verdict(1.0, 1.0)[0] == 'met' and sp.goal_verdict(1.0, 1.0, strict=True)[0] == 'missed'
    assert sp.goal_verdict(float('nan'), 2.0) == ('not measured', None)
    assert sp.goal_verdict(None, 2.0) == ('not measured', None)
    assert sp.goal_verdict(0.5, None) == ('no goal', None)
    with pytest.raises(ValueError, match='goal'):
        sp.goal_verdict(1.0, 0.0)


def test_issue12_rows_verdicts_from_a_result():
    g = torch.Generator().manual_seed(int(torch.randint(0, 10 ** 6, ())))
    dense, pre, flex, band = (float(x) for x in torch.rand(4, generator=g) * 100 + 1)
    res = dict(attention={'131072': dict(dense_cudnn_fwd_ms=dense, dense_cudnn_bwd_ms='ERROR OutOfMemory',
                                         random=dict(prefill_ms=pre, fwd_band_ms=band, flex=dict(ms=flex),
                                                     bwd_band_ms=3.0),
                                         block_shared=dict(fwd_general_ms=band * 2, fwd_band_ms=band * 3,
                                                           flex='SKIPPED (budget)'))},
               decode={'131072': dict(step_graph_us=10.0, dense_graph_us=40.0, step_eager_us=30.0, dense_eager_us=40.0,
                                      step_select_us=5.0, step_attention_us=4.0,
                                      select_graph_us=5.0, attention_graph_us=4.0)},
               model={'32768': dict(layers=4, sparse_est32_ms=100.0, dense_est32_ms=125.0, x_measured=1.2),
                      '131072': dict(layers=2, sparse_est32_ms=100.0)},
               static_decode=dict(rows={'16384': dict(static_sparse_graph_ms=6.0, static_dense_stack_ms=5.0),
                                        '131072': dict(static_sparse_graph_ms=6.0, static_dense_stack_ms=6.0)}))
    rows = {r['row']: r for r in sp.issue12_rows(res)}
    pf = next(r for k, r in rows.items() if k.startswith('prefill @128K, per-token lists (a'))
    assert pf['ratio'] == pytest.approx(dense / pre) and pf['goal'] == 5.25
    assert pf['verdict'] == ('met' if dense / pre >= 5.25 else 'missed')
    fx = next(r for k, r in rows.items() if 'FlexAttention @128K, same per-token' in k)
    assert fx['ratio'] == pytest.approx(flex / band) and fx['strict']
    bs = next(r for k, r in rows.items() if 'FlexAttention @128K, same block-shared' in k)
    assert bs['ours'] == pytest.approx(band * 2) and bs['verdict'] == 'not measured'     # a skipped row: no guess
    bw = next(r for k, r in rows.items() if k.startswith('sparse bwd @128K'))
    assert bw['verdict'] == 'not measured'                                             # the baseline failed
    dec = [r for r in rows.values() if r['group'] == 'decode']
    assert [r['verdict'] for r in dec] == ['met', 'missed', 'missed', 'no goal', 'no goal']
    assert dec[0]['margin'] == pytest.approx(4 / 3) and dec[2]['margin'] == pytest.approx(1.25)
    mod = [r for r in rows.values() if r['group'] == 'model']
    assert [(r['goal'], r['verdict']) for r in mod] == [(1.3, 'missed'), (2.0, 'not measured')]
    assert mod[0]['margin'] == pytest.approx(1.3 / 1.25)
    cd = [r for r in rows.values() if r['group'] == 'cached decoding' and 'static' in r['row']]
    assert [(r['goal'], r['verdict']) for r in cd] == [(None, 'no goal'), (1.0, 'missed')]   # 1.0x is not faster
    md = sp.format_issue12_rows(sp.issue12_rows(res), notes=False)
    assert md.count('\n') == len(rows) + 1 and '| what |' in md


def test_issue12_rows_derived_model_row():
    pre = float(torch.rand(()) * 20 + 5)
    res = dict(attention={'32768': dict(dense_cudnn_fwd_ms=14.0, trained=dict(prefill_ms=pre))},
               model={'32768': dict(layers=2, head_ms=30.0, sparse_layer_ms=62.0, dense_est32_ms=1500.0,
                                    sparse_est32_ms=2014.0, sparse_split_per_layer=dict(attention=31.0))})
    rows = [r for r in sp.issue12_rows(res) if r['group'] == 'model']
    assert len(rows) == 2 and 'derived' in rows[1]['row']
    assert rows[1]['ours'] == pytest.approx(32 * (62.0 - 31.0 + pre) + 30.0)
    assert rows[1]['ratio'] == pytest.approx(1500.0 / rows[1]['ours']) and rows[1]['verdict'] == 'no goal'
