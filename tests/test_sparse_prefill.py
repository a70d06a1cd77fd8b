"""Interpreter tests of `minicpm4_core.kernels.sparse_prefill` (nbs/11c): the bucketed top-k gives the reference's
lists exactly, the coarse first pass is the reference's block scores on the coarse kernels, the work count adds
up. Tiny shapes, TRITON_INTERPRET=1 (tests/conftest.py)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minicpm4_core import infllmv2_ref as iv  # noqa: E402
from minicpm4_core.kernels import sparse as sk  # noqa: E402
from minicpm4_core.kernels import sparse_prefill as sp  # noqa: E402

pytestmark = [pytest.mark.skipif(not sk.interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import"),
              pytest.mark.usefixtures('one_thread')]


def stage1_like(T, N, Hkv, m, init, local, seed, ties=True):
    "Random block scores with stage 1's rules applied: sinks +inf, window and future -inf; rounded -> many ties."
    g = torch.Generator().manual_seed(seed)
    nb = -(-N // m)
    sc = torch.rand(1, T, Hkv, nb, generator=g)
    if ties: sc = sc.round(decimals=1)
    qb = ((N - T + torch.arange(T)) // m)[:, None, None]
    b = torch.arange(nb)
    sc = torch.where((b >= init) & (b > qb - local), float('-inf'), sc)
    sc = torch.where(b < init, float('inf'), sc)
    return torch.where(b > qb, float('-inf'), sc).contiguous()


@pytest.mark.parametrize("T, N, topk, local, min_cols", [(700, 700 * 6, 6, 3, 16), (257, 2000, 5, 2, 16),
                                                          (64, 3000, 4, 8, 32), (400, 400 * 7, 40, 4, 16)])
def test_bucketed_topk_equals_reference(T, N, topk, local, min_cols):
    seed = int(torch.randint(0, 10 ** 6, ()))                        # fresh scores each run
    sc = stage1_like(T, N, 2, 64, 1, local, seed)
    got = sp.select_lists_bucketed(sc, topk, N, 64, local, min_cols=min_cols)
    ref = iv.attention_blocks(iv.select_blocks(sc, topk, check=False), N, 64, local)
    assert len(sp._bucket_bounds(T, N, 64, min_cols)) >= 1
    assert torch.equal(got, ref.to(got.dtype)), f"seed {seed}"
    assert torch.equal(got, sk.select_lists(sc, topk, N, 64, local))


def test_bucket_bounds_cover_rows_and_fit():
    for T, N, m, mc in ((1000, 1000, 16, 4), (37, 5000, 64, 16), (131072, 131072, 64, 256)):
        runs = sp._bucket_bounds(T, N, m, mc)
        assert runs[0][0] == 0 and runs[-1][1] == T and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        for t0, t1, nbv in runs:
            assert t0 < t1 and nbv == (N - T + t1 - 1) // m + 1         # the widest row of the run
            assert nbv <= max(mc, sk._np2((N - T + t0) // m + 1))
    widths = [sk._np2(nbv) for *_, nbv in sp._bucket_bounds(131072, 131072, 64, 256)]
    assert widths == [256, 512, 1024, 2048]


def test_bucketed_topk_falls_back_and_checks():
    sc = stage1_like(40, 640, 2, 16, 1, 2, 3)
    two = torch.cat([sc, stage1_like(40, 640, 2, 16, 1, 2, 4)])      # B = 2: select_lists itself
    ref = iv.attention_blocks(iv.select_blocks(two, 3, check=False), 640, 16, 2)
    assert torch.equal(sp.select_lists_bucketed(two, 3, 640, 16, 2), ref.to(torch.int32))
    with pytest.raises(ValueError, match='n_keys=600 needs'):
        sp.select_lists_bucketed(sc, 3, 600, 16, 2)
    with pytest.raises(ValueError, match=r'scores must be \(B, T, Hkv, nb\)'):
        sp.select_lists_bucketed(sc[0], 3, 640, 16, 2)
    with pytest.raises(ValueError, match="mode must be 'exact' or 'coarse'"):
        sp.prefill_select_fast(torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16), 2, mode='fine')


@pytest.mark.parametrize("approx", [False, True])
def test_prefill_select_fast_exact_is_prefill_select(approx):
    torch.manual_seed(int(torch.randint(0, 10 ** 6, ())))
    q, k = torch.randn(1, 400, 4, 32), torch.randn(1, 400, 2, 32)
    geo = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, local_blocks=2, lse_approx=approx)
    got = sp.prefill_select_fast(q, k, 4, **geo)
    ref = iv.attention_blocks(iv.select_blocks(iv.block_scores(q, k, **geo), 4, check=False), 400, 16, 2)
    assert torch.equal(got, ref.to(got.dtype))
    assert sp.selection_overlap(got, ref) == 1.0


def test_coarse_first_pass_is_reference_on_coarse_kernels():
    torch.manual_seed(int(torch.randint(0, 10 ** 6, ())))
    q, k = torch.randn(1, 500, 4, 32), torch.randn(1, 500, 2, 32)
    sc = sp.coarse_block_scores(q, k, kernel_size=32, kernel_stride=16, block_size=16, local_blocks=2)
    ref = iv.block_scores(q, k, kernel_size=32, kernel_stride=16, block_size=16, init_blocks=1, local_blocks=2)
    f = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(sc), f) and torch.equal(sc[~f], ref[~f])
    assert ((sc[f] - ref[f]).abs().max() / ref[f].abs().max()) < 1e-4
    lists = sp.prefill_select_fast(q, k, 4, mode='coarse', kernel_size=8, kernel_stride=4, block_size=16,
                                   local_blocks=2)
    rl = iv.attention_blocks(iv.select_blocks(ref, 4, check=False), 500, 16, 2)
    assert torch.equal(lists, rl.to(lists.dtype))                   # lse geometry = 4x the fine kernels


def test_selection_overlap():
    a = torch.tensor([[[[0, 3, 5, -1]]]])
    assert sp.selection_overlap(a, a) == 1.0
    assert sp.selection_overlap(torch.tensor([[[[0, 4, 6, -1]]]]), a) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match='differ'):
        sp.selection_overlap(a, a[:, :0])


def test_stage1_cost_counts():
    """The counted (row, kernel) pairs equal a brute-force walk of the kernels' tiles at a small size, and the
    LSE approximation cuts the normaliser pass about 4x."""
    N, H, Hkv, tt, ck = 3000, 4, 2, 8, 128
    c = sp.stage1_cost(N, H=H, Hkv=Hkv, D=16, tile_tokens=tt, chunk_kernels=ck, lse_approx=False)
    walked = 0
    for t0 in range(0, N, tt):
        hi = min(t0 + tt, N) - 1
        nvis = iv.num_kernels(hi + 1, 32, 16)
        walked += -(-nvis // ck) * ck
    assert c['score']['exp2'] == walked * Hkv * tt * (H // Hkv)
    a = sp.stage1_cost(131072)
    assert 3.5 < sp.stage1_cost(131072, lse_approx=False)['lse']['exp2'] / a['lse']['exp2'] < 4.5
    assert a['topk']['bytes'] == 131072 * 2 * 2048 * 4 and a['total_floor_ms'] > 0
    with pytest.raises(ValueError, match='need 1 <= T <= N'):
        sp.stage1_cost(100, 200)


@pytest.mark.parametrize("T, N, H, geo", [
    (256, 256, 4, dict(kernel_size=8, kernel_stride=4, block_size=16, local_blocks=2)),               # R 4, LEFT 1
    (130, 400, 6, dict(kernel_size=8, kernel_stride=4, block_size=16, local_blocks=2, lse_approx=True)),  # G 3 -> GP 4
    (200, 900, 32, dict(kernel_size=32, kernel_stride=16, block_size=64, local_blocks=3, selection='minicpm4.1')),
    (300, 300, 4, dict(kernel_size=12, kernel_stride=4, block_size=8, local_blocks=2))])             # R 2, LEFT 2
def test_transposed_scores_equal_reference(T, N, H, geo):
    """block_scores_t (the transposed score pass) = the reference's block scores (inf pattern exact, finite values
    to fp32 rounding) and the same lists; fresh inputs each run; G = 16 (the 8B group), G = 3 (padded heads)."""
    torch.manual_seed(int(torch.randint(0, 10 ** 6, ())))
    q, k = torch.randn(1, T, H, 16), torch.randn(1, N, 2, 16)
    geo = dict(init_blocks=1, **geo)
    got = sp.block_scores_t(q, k, **geo)
    ref = iv.block_scores(q, k, **geo)
    f = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), f) and torch.equal(got[~f], ref[~f])
    assert ((got[f] - ref[f]).abs().max() / ref[f].abs().max()) < 1e-5
    kk = 3
    lr = iv.attention_blocks(iv.select_blocks(ref, kk, check=False), N, geo['block_size'], geo['local_blocks'],
                             geo.get('selection', 'minicpm4'))
    lg = iv.attention_blocks(iv.select_blocks(got, kk, check=False), N, geo['block_size'], geo['local_blocks'],
                             geo.get('selection', 'minicpm4'))
    assert sp.selection_overlap(lg, lr) > 0.999
