"""The InfLLM v2 prefill without host syncs (session 7, issue 13): the band forward takes tile_tokens='auto''s
re-tiling decision on the device (`kernels.sparse.DEFER_AUTO_TILE`: both plans, the selected-blocks kernel launched
for each, gated by a device flag) and the model's own lists skip the ids check (`check_ids=False`). Triton
interpreter (conftest), tiny shapes, fresh random inputs; outputs compared bit for bit with the host-sync path and
against the float64 reference."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from minicpm4_core import infllmv2_ref as iv  # noqa: E402
from minicpm4_core.kernels import sparse as sk  # noqa: E402

pytestmark = pytest.mark.skipif(not sk.interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import")


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def lists_for(T, N, Hkv, m, topk, local, shared, g):
    "Per-token lists (top-k + window) of the last T of N positions: random scores, or one score row for all tokens."
    nb = -(-N // m)
    sc = torch.rand(1, 1 if shared else T, Hkv, nb, generator=g).expand(1, T, Hkv, nb).contiguous()
    return sk.select_lists(sc, topk, N, m, local, 'minicpm4', backend='torch')


def test_band_deferred_tile_decision_equals_the_host_one(monkeypatch):
    """Unrelated lists (the union of a tile is large: re-tile to 2 positions) and shared lists (no re-tile): the
    deferred decision builds both plans, its flag equals the host rule, and the output is bit-identical to the
    host-sync path's (and to the reference)."""
    monkeypatch.setattr(sk, 'AUTO_MIN_T', 16)                        # 'auto' re-tiles from 16 queries here
    g = torch.Generator().manual_seed(int(torch.randint(0, 10 ** 6, ())))
    B, T, N, H, Hkv, D, m, topk, local = 1, 48, 768, 8, 1, 16, 16, 6, 2
    flags = set()
    for shared in (False, True):
        q = torch.randn(B, T, H, D, generator=g)
        k, v = torch.randn(B, N, Hkv, D, generator=g), torch.randn(B, N, Hkv, D, generator=g)
        idx = lists_for(T, N, Hkv, m, topk, local, shared, g)
        sel, _ = sk._window_lists(idx, N, m, local)
        Md = sk._Meta(q, k, sel, m, None, 'auto', defer=True)
        Mh = sk._Meta(q, k, sel, m, None, 'auto')
        host_retile = Mh.BM == 2
        assert Md.plans is not None and [p[0] for p in Md.plans] == [sk._default_tile_tokens(8), 2]
        assert int(Md.flag) == int(host_retile)
        flags.add(int(Md.flag))
        outs = {}
        for defer in (True, False):
            monkeypatch.setattr(sk, 'DEFER_AUTO_TILE', defer)
            outs[defer] = sk.sparse_attention_band(q, k, v, idx, m, local_blocks=local, tile_tokens='auto')
        assert torch.equal(outs[True], outs[False]), shared
        ref = iv.sparse_attention_ref(q, k, v, iv.attention_blocks(idx, N, m, local, 'minicpm4'), m)
        assert rel(outs[True], ref) < 1e-5
    assert flags == {0, 1}                                           # both branches of the gate were exercised


def test_band_check_ids_switch(monkeypatch):
    "check_ids=True still rejects a repeated id; check_ids=False skips the check (no sort, no host sync)."
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 8, 2, 16, generator=g), torch.randn(1, 64, 1, 16, generator=g)
    bad = torch.tensor([0, 0, -1], dtype=torch.int32).expand(1, 8, 1, 3).contiguous()
    with pytest.raises(ValueError, match='repeats'):
        sk.sparse_attention_band(q, k, k, bad, 16, local_blocks=1)
    with pytest.raises(ValueError, match='repeats'):
        sk.sparse_attention(q, k, k, bad, 16)
    seen = []
    monkeypatch.setattr(iv, '_check_block_ids', lambda *a: seen.append(1))
    ok = torch.tensor([0, -1, -1], dtype=torch.int32).expand(1, 8, 1, 3).contiguous()
    sk.sparse_attention_band(q, k, k, ok, 16, local_blocks=1, check_ids=False)
    sk.sparse_attention(q, k, k, ok, 16, check_ids=False)
    assert seen == []
    sk.sparse_attention_band(q, k, k, ok, 16, local_blocks=1)
    assert seen == [1]


def test_model_prefill_skips_the_ids_check_and_matches_reference(monkeypatch):
    """The model's InfLLM v2 prefill (kernels through the interpreter, band on) in two chunks over a KV cache never
    calls the ids check, and its logits equal the torch reference's on fresh random weights and tokens."""
    from minicpm4_core import infllmv2
    from minicpm4_core.config import MiniCPM4Config
    from minicpm4_core.model import MiniCPM4ForCausalLM
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=2, dense_len=48)
    torch.manual_seed(int(torch.randint(0, 10 ** 6, ())))
    model = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(num_hidden_layers=1, sparse_config=sc)).eval()
    ids = torch.randint(3, 512, (1, 96))
    called = []
    real = iv._check_block_ids
    monkeypatch.setattr(iv, '_check_block_ids', lambda *a: called.append(1) or real(*a))
    bands = []
    band = sk.sparse_attention_band
    monkeypatch.setattr(sk, 'sparse_attention_band', lambda *a, **k: bands.append(k.get('check_ids')) or band(*a, **k))

    def chunked(impl):
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', impl)
        monkeypatch.setattr(infllmv2, 'SPARSE_BAND', True)
        cache = model.new_cache(1, 96)
        with torch.no_grad():
            a = model(ids[:, :56], cache=cache).detach()
            b = model(ids[:, 56:], cache=cache).detach()
        return torch.cat([a, b], 1)

    ref = chunked('torch')
    called.clear()                                                   # (the torch reference validates its lists)
    got = chunked('triton')
    assert called == [] and bands == [False]          # the second chunk (the first is within the budget: dense)
    assert rel(got, ref) <= 1e-4
