"""minicpm4_core.static_sparse: the static InfLLM v2 decode step equals the model's own cached decoding (fp32, CPU,
random weights, fresh ids); the in-step compressed-key update is bit-equal to CompressedKeyCache; the CUDA path
(`kernels.dense_decode` / `kernels.decode_step` on the static buffers) is run under the Triton interpreter."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported (as tests/test_sparse_kernels.py)

import pytest  # noqa: E402
import torch  # noqa: E402

from minicpm4_core import infllmv2  # noqa: E402
from minicpm4_core.config import MiniCPM4Config  # noqa: E402
from minicpm4_core.infllmv2 import CompressedKeyCache, compress_keys, num_kernels  # noqa: E402
from minicpm4_core.model import MiniCPM4ForCausalLM  # noqa: E402
from minicpm4_core import static_sparse as ss  # noqa: E402
from minicpm4_core.static_sparse import StaticSparseDecoder, update_kc  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')     # tests/conftest.py
TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, initializer_range=0.3, torch_dtype='float32')
SPARSE = dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=8, topk=3, dense_len=16)  # sparse from 21 keys


def model_of(seed=0, sparse=SPARSE, **kw):
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{**TINY, **kw}, sparse_config=sparse)).eval()


def model_keys(dec, l, n):
    "The scoring keys the static stack holds for layer l (positions < n): pre-RoPE ring-free copy or the kv buffer."
    return dec.base.stack.kv[l, :n, :dec.Hkv]


@pytest.mark.parametrize('p,s,R', [(4, 2, 5), (8, 4, 11), (4, 4, 7), (6, 2, 7)])
def test_update_kc_bit_equal_to_compressed_key_cache(p, s, R):
    "One key at a time: flat buffer and ring (R >= p + s - 1 slots) both equal CompressedKeyCache bit for bit."
    g = torch.Generator().manual_seed(p * 10 + s)
    N, Hkv, D = 3 * p + 5, 2, 8
    keys = torch.randn(N, Hkv, D, generator=g)
    nc = num_kernels(N, p, s)
    kc, kcr, ring = (torch.randn(1, nc, Hkv, D, generator=g), torch.randn(1, nc, Hkv, D, generator=g),
                     torch.zeros(R, Hkv, D))
    ref = CompressedKeyCache(p, s)
    for t in range(N):
        ring[t % R] = keys[t]
        L = torch.tensor([t + 1])
        update_kc(kc, keys, L, p, s)
        update_kc(kcr, ring, L, p, s, ring=True)
        want = ref.append(keys[None, t:t + 1])
        k = want.shape[1]
        assert torch.equal(kc[:, :k], want) and torch.equal(kcr[:, :k], want), t
    assert torch.equal(kc, compress_keys(keys[None], p, s))


def decode_pair(model, max_len, n_prompt, seed, graphs=False):
    "Static sparse prefill + steps vs the model's cached loop over the same fresh ids: (ours, ref, modes, dec, cache)."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (max_len,), generator=g)
    dec = StaticSparseDecoder(model, max_len, graphs=graphs)
    dec.prefill(torch.randint(0, model.config.vocab_size, (max_len - 3,), generator=g))   # stale state to overwrite
    cache = model.new_cache(1, max_len)
    with torch.no_grad():
        ref = [model(ids[None, :n_prompt], cache=cache)[0]]
        ours = [dec.prefill(ids[:n_prompt]).clone()]
        modes = []
        for t in range(n_prompt, max_len):
            modes.append(dec.is_sparse(t + 1))
            ours.append(dec.step(ids[t]).clone()[None])
            ref.append(model(ids[None, t:t + 1], cache=cache)[0])
    return torch.cat(ours), torch.cat(ref), modes, dec, cache


@pytest.mark.parametrize('kw', [dict(), dict(use_nope=True), dict(selection='minicpm4.1', topk=4, window_size=4),
                                dict(init_blocks=2, kernel_size=8, kernel_stride=4)],
                         ids=['default', 'use_nope', 'minicpm4.1', 'p8s4'])
@pytest.mark.parametrize('n_prompt', [5, 30], ids=['dense-prompt', 'sparse-prompt'])
def test_steps_equal_model_cached_decoding(kw, n_prompt):
    "Through dense_len and into the sparse regime, across stride boundaries; kc bit-equal to CompressedKeyCache."
    model = model_of(1, dict(SPARSE, **kw))
    ours, ref, modes, dec, cache = decode_pair(model, 44, n_prompt, seed=2)
    assert any(modes) and (n_prompt > 20 or not all(modes))               # both regimes (dense prompt) / sparse
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    st = dec.st
    for l in range(len(model.model.layers)):
        keys = (cache.layers[l].state['infllmv2_k_nope'][0, :dec.n] if st.use_nope else model_keys(dec, l, dec.n))
        if st.use_nope:       # the ring holds the stack's own pre-RoPE keys: check the last window against them
            torch.testing.assert_close(dec.kc[l, :, :num_kernels(dec.n, st.kernel_size, st.kernel_stride)],
                                       compress_keys(keys[None], st.kernel_size, st.kernel_stride), rtol=1e-5, atol=1e-5)
            continue
        ckc = CompressedKeyCache(st.kernel_size, st.kernel_stride)
        for t in range(dec.n): ckc.append(keys[None, t:t + 1])
        assert torch.equal(dec.kc[l, :, :ckc.kc.shape[1]], ckc.kc)            # bit-equal, built in the step
        torch.testing.assert_close(ckc.kc, cache.layers[l].state['infllmv2'].fine[0].kc, rtol=1e-5, atol=1e-5)


def test_greedy_equals_model_generate():
    m = model_of(3)
    p = torch.randint(0, 97, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    dec = StaticSparseDecoder(m, 40)
    assert dec.generate(p, 30) == m.generate(p, 30, stop_ids=[])[0]
    assert dec.generate(p[:2], 3) == m.generate(p[:2], 3, stop_ids=[])[0]


HOST_OPS = ('aten.lift_fresh', 'aten._local_scalar_dense', 'aten.nonzero', 'aten.item', 'aten.is_nonzero')


def host_ops(fn) -> set:
    "The ops of fn() (no grad) that read the device on the host or copy in a fresh CPU tensor (not capturable)."
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__(); self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record() as r:
        with torch.no_grad(): fn()
    return {o for o in r.ops if o.startswith(HOST_OPS)}


def test_step_is_graph_capturable(monkeypatch):
    "Outside the attention kernels the step reads nothing on the host and copies in no fresh CPU tensor."
    for use_nope in (False, True):
        dec = StaticSparseDecoder(model_of(10, dict(SPARSE, use_nope=use_nope)), 32)
        dec.prefill([1, 2, 3, 4, 5, 6])
        # the attention is the kernels' business (capturable on CUDA, tested in test_sparse_kernels): a device stub
        monkeypatch.setattr(ss, 'attend_step', lambda q, *a, **k: q * 1.0)
        bad = host_ops(lambda: dec._step_static(True))
        monkeypatch.undo()
        assert not bad and int(dec.base.pos) == 7


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton import")
def test_triton_path_under_interpreter(monkeypatch):
    "SPARSE_IMPL='triton': dense_decode / decode_step on the static buffers (lengths on the device) == the reference."
    from minicpm4_core.kernels import sparse as sk
    if not sk.interpreter_active(): pytest.skip("triton imported before TRITON_INTERPRET was set")
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=48)
    model = model_of(5, sc, num_hidden_layers=1)
    calls = []
    for name in ('decode_step', 'dense_decode'):
        real = getattr(sk, name)
        monkeypatch.setattr(sk, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 97, (101,), generator=g)
    dec = StaticSparseDecoder(model, 128)
    cache = model.new_cache(1, 128)
    with torch.no_grad():
        model(ids[None, :94], cache=cache)
        dec.prefill(ids[:94])
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', 'triton')            # only the static steps on the kernels
        ours = torch.stack([dec.step(t).clone() for t in ids[94:]])
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', 'torch')
        ref = torch.cat([model(ids[None, t:t + 1], cache=cache)[0] for t in range(94, 101)])
    assert calls.count('dense_decode') == 2 and calls.count('decode_step') == 5   # 95, 96 keys dense; 97.. sparse
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match='sparse_config is None'): StaticSparseDecoder(model_of(0, None), 16)
    with pytest.raises(ValueError, match='lse_approx'): StaticSparseDecoder(model_of(0, dict(SPARSE, lse_approx=True)), 16)
    with pytest.raises(ValueError, match='MiniCPM4ForCausalLM'): StaticSparseDecoder(object(), 16)
    dec = StaticSparseDecoder(model_of(0), 8)
    with pytest.raises(ValueError, match='before step'): dec.step(1)
    with pytest.raises(ValueError, match='exceeds max_len'): dec.prefill(list(range(9)))
    with pytest.raises(ValueError, match='graphs=True'): StaticSparseDecoder(model_of(0), 8, graphs=True)
    dec.prefill([1] * 7)
    for bad in (1.5, True, [1, 2]):
        with pytest.raises(ValueError, match='one integer id'): dec.step(bad)
    dec.step(2)
    with pytest.raises(ValueError, match='full'): dec.step(3)
    with pytest.raises(ValueError, match='KVCache'): dec.load_cache({})
    with pytest.raises(ValueError, match='max_new_tokens'): dec.generate([1], 0)


@pytest.mark.parametrize('quant', ['w4a16', 'ternary'])
def test_packed_linears(quant, monkeypatch):
    "Sparse + int4 / ternary: the packed model (packed in place by the engine) decodes the same through the static step."
    import minicpm4_core.kernels.w4a16 as W, minicpm4_core.kernels.ternary as TK
    from minicpm4_core.engine import Engine
    for mod in (W, TK): monkeypatch.setattr(mod, 'resolve_backend', lambda *a, **k: 'torch')   # torch references
    model = model_of(7)
    Engine(model, 44, quant=quant)                                        # packs the linears in place
    assert not isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    ours, ref, modes, _, _ = decode_pair(model, 40, 12, seed=8)
    assert any(modes) and not all(modes)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('ring', [False, True])
def test_update_kc_with_a_shared_window(ring):
    "The step's form (kc_window once, `at=`) writes what the standalone update writes once a kernel is complete."
    from minicpm4_core.static_sparse import kc_window
    g = torch.Generator().manual_seed(7)
    p, s, N = 6, 2, 40
    keys = torch.randn(N if not ring else p + s - 1, 2, 8, generator=g)
    for t in range(p, 30):
        L = torch.tensor([t])
        a, b = torch.randn(1, 20, 2, 8, generator=g), None
        b = a.clone()
        update_kc(a, keys, L, p, s, ring)
        update_kc(b, keys, L, p, s, ring, at=kc_window(L, p, s, keys.shape[0], ring))
        assert torch.equal(a, b), t


# ---- batches: BatchStaticSparseDecoder (B rows of any lengths) ----
from minicpm4_core.static_sparse import BatchStaticSparseDecoder, kc_rows_window, sparse_rows, update_kc_rows  # noqa: E402


@pytest.fixture
def torch_kernels(monkeypatch):
    "The packed linears' torch references instead of the Triton interpreter (as tests/test_engine.py)."
    import minicpm4_core.kernels.w4a16 as W, minicpm4_core.kernels.ternary as TK
    for mod in (W, TK): monkeypatch.setattr(mod, 'resolve_backend', lambda *a, **k: 'torch')


@pytest.mark.parametrize('p,s', [(4, 2), (8, 4), (6, 2)])
def test_update_kc_rows_bit_equal_per_row(p, s):
    "Rows at different lengths (completing kernels at different steps), flat buffer and ring: each row bit-equal to "
    "CompressedKeyCache of its own keys; rows whose key completes no kernel keep their entries untouched."
    g = torch.Generator().manual_seed(p + 7 * s)
    B, N, Hkv, D, R = 4, 3 * p + 6, 2, 8, p + s - 1
    starts = torch.tensor([1, 2, p + 1, 2 * p + 3])
    keys = torch.randn(B, N + int(starts.max()), Hkv, D, generator=g)
    nc = num_kernels(keys.shape[1], p, s)
    kc, kcr = torch.randn(B, nc, Hkv, D, generator=g), torch.randn(B, nc, Hkv, D, generator=g)
    ring, refs = torch.zeros(B, R, Hkv, D), [CompressedKeyCache(p, s) for _ in range(B)]
    for b in range(B):
        for t in range(int(starts[b])):
            ring[b, t % R] = keys[b, t]; refs[b].append(keys[b:b + 1, t:t + 1])
        k = 0 if refs[b].kc is None else refs[b].kc.shape[1]
        kc[b, :k] = kcr[b, :k] = refs[b].kc[0, :k] if k else kc[b, :0]
    for step in range(N):
        L = starts + step + 1
        before = kc.clone()
        for b in range(B):
            ring[b, (L[b] - 1) % R] = keys[b, L[b] - 1]; refs[b].append(keys[b:b + 1, L[b] - 1:L[b]])
        at = kc_rows_window(L, p, s, keys.shape[1], nc)
        update_kc_rows(kc, keys.view(-1, Hkv, D), L, p, s, at=at)
        update_kc_rows(kcr, ring.view(-1, Hkv, D), L, p, s, ring=True)
        for b in range(B):
            k = 0 if refs[b].kc is None else refs[b].kc.shape[1]
            assert torch.equal(kc[b, :k], refs[b].kc[0]) and torch.equal(kcr[b, :k], refs[b].kc[0]), (step, b)
            if not bool(at[2][b]): assert torch.equal(kc[b], before[b]), (step, b)   # untouched bits (random past k)


BSPARSE = dict(SPARSE, topk=3, dense_len=28)   # dense while n < 28 (5 blocks x 4 = 20 keys fit the budget): sparse from 28


def batch_pair(model, max_len, lens, seed, steps):
    """Teacher-forced: B rows (prompt lengths `lens`, fresh ids) through the batched decoder vs the model's own cached
    decoding of each row alone. -> (ours (B, steps+1, V), ref (same), kinds per step, dec, caches)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, model.config.vocab_size, (n + steps,), generator=g) for n in lens]
    dec = BatchStaticSparseDecoder(model, max_len, len(lens))
    caches = [model.new_cache(1, max_len) for _ in lens]
    with torch.no_grad():
        ref = [[model(x[None, :n], cache=c)[0, -1]] for x, n, c in zip(ids, lens, caches)]
        ours = [[dec.prefill(b, x[:n]).clone()] for b, (x, n) in enumerate(zip(ids, lens))]
        kinds = []
        for t in range(steps):
            kinds.append(dec.step_kind())
            out = dec.step(torch.stack([x[n + t] for x, n in zip(ids, lens)])).clone()
            for b, (x, n, c) in enumerate(zip(ids, lens, caches)):
                ours[b].append(out[b]); ref[b].append(model(x[None, n + t:n + t + 1], cache=c)[0, -1])
    st = lambda rows: torch.stack([torch.stack(r) for r in rows])
    return st(ours), st(ref), kinds, dec, caches


@pytest.mark.parametrize('kw', [dict(), dict(use_nope=True), dict(selection='minicpm4.1', topk=4, window_size=4)],
                         ids=['default', 'use_nope', 'minicpm4.1'])
def test_batch_steps_equal_each_row_alone(kw):
    "3 rows: one crossing dense_len while decoding, rows completing kernels at different steps (dense/mixed/sparse)."
    model = model_of(11, dict(BSPARSE, **kw))
    lens = (5, 10, 13)
    ours, ref, kinds, dec, caches = batch_pair(model, 48, lens, seed=12, steps=24)
    modes = [k[0] for k in kinds]
    assert {'dense', 'mixed', 'sparse'} <= set(modes), modes
    comp = [[dec.completes_kernel(n + t + 1) for n in lens] for t in range(24)]
    assert any(any(c) and not all(c) for c in comp) and [any(c) for c in comp] == [k[1] for k in kinds]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert dec.n == [n + 24 for n in lens] and dec.base.pos.tolist() == dec.n
    st = dec.st
    for b, c in enumerate(caches):                    # each row's compressed keys = its own CompressedKeyCache's
        for l in range(len(model.model.layers)):
            if st.use_nope:
                want = compress_keys(c.layers[l].state['infllmv2_k_nope'][:, :dec.n[b]], st.kernel_size, st.kernel_stride)
            else:
                want = c.layers[l].state['infllmv2'].fine[0].kc
            torch.testing.assert_close(dec.kc[l, b, :want.shape[1]], want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('lens', [(3, 10, 30), (25, 30, 1), (2, 3), (30, 31), (5, 40), (44, 1)])
def test_reachable_modes_are_the_steps_modes(lens):
    "What capture_all captures on CUDA: the modes of every step from these lengths until a row's buffer is full."
    dec = BatchStaticSparseDecoder(model_of(0, BSPARSE), 44, len(lens))
    dec.n = list(lens)
    want = [dec.step_kind([n + t for n in lens])[0] for t in range(44 - max(lens))]
    assert dec.reachable_modes() == list(dict.fromkeys(want))


def test_batch_greedy_equals_generate_and_reuse():
    "generate(prompts, n) == model.generate of each prompt alone; a second call (other lengths) reuses the buffers."
    m = model_of(13, BSPARSE)
    dec = BatchStaticSparseDecoder(m, 44, 3)
    for lens in ((6, 16, 25), (30, 3, 9)):
        ps = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in lens]
        assert dec.generate(ps, 15) == [m.generate([p], 15, stop_ids=[], fast=False)[0] for p in ps]


def test_batched_steps_check_their_tokens():
    "Both batched decoders take exactly B integer ids per step (one shared check) and name what they got."
    from minicpm4_core.static_decode import BatchStaticDecoder
    m, dense = model_of(15, BSPARSE), model_of(15, None)
    for dec in (BatchStaticSparseDecoder(m, 44, 2), BatchStaticDecoder(dense, 44, 2)):
        for b in range(2): dec.prefill(b, [3, 4, 5])
        for bad in ([1], [1, 2, 3], [1.0, 2.0], [True, False]):
            with pytest.raises(ValueError, match='tokens must be 2 integer ids'): dec.step(bad)
        assert dec.step(torch.tensor([[6], [7]])).shape == (2, m.config.vocab_size)


@pytest.mark.parametrize('quant,kw', [(None, {}), (None, dict(use_nope=True)), ('w4a16', {}), ('ternary', {})],
                         ids=['none', 'use_nope', 'w4a16', 'ternary'])
def test_engine_batch_sparse_static(quant, kw, torch_kernels):
    "Engine(batch_sparse='static'): a batch past dense_len through BatchStaticSparseDecoder == each prompt alone."
    from minicpm4_core.engine import Engine
    m = model_of(14, dict(BSPARSE, **kw))
    ps = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n + 1)).tolist() for n in (23, 4, 13)]
    eng = Engine(m, 40, max_batch=3, quant=quant, chunk=7, batch_sparse='static')
    assert eng.pick_backend(3) == 'static' and eng.pick_backend(1) == 'static'
    assert Engine(m, 40, max_batch=3, batch_sparse='eager').pick_backend(3) == 'eager'    # the model's layers
    want = [m.generate([p], 14, stop_ids=[], fast=False)[0] for p in ps]
    assert eng.generate(ps, 14, stop_ids=[]) == want
    t = eng.last_timing
    assert t['backend'] == 'static' and t['batch'] == 3 and eng._bsparse is not None and t['prefill_s'] > 0
    assert eng.generate(ps[:2], 9, stop_ids=[]) == [w[:9] for w in want[:2]] and eng._bsparse.B == 2
    d = eng._bsparse                                                  # memory() counts its buffers (kv, kc, ring)
    own = sum(t.numel() * t.element_size() for t in [d.base.stack.kv, d.kc] + ([d.ring] if d.ring is not None else []))
    assert eng.memory()['static_stack'] >= own > 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 before triton import")
@pytest.mark.parametrize('lens,steps,kw', [((104, 108, 112), 6, {}), ((2, 9, 113), 3, dict(use_nope=True))],
                         ids=['near', 'short-rows-use_nope'])
def test_batch_triton_path_under_interpreter(monkeypatch, lens, steps, kw):
    "SPARSE_IMPL='triton': dense_decode / decode_step over all rows (lengths on the device), mixed steps by a "
    "device-side select: == each row's reference decoding (short-rows: decode_step also runs over rows of 3-11 keys, "
    "fewer than one compression kernel, whose output the select discards)."
    from minicpm4_core.kernels import sparse as sk
    if not sk.interpreter_active(): pytest.skip("triton imported before TRITON_INTERPRET was set")
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=112, **kw)
    model = model_of(15, sc, num_hidden_layers=1)                     # dense below 112 keys, sparse from 112
    calls = []
    for name in ('decode_step', 'dense_decode'):
        real = getattr(sk, name)
        monkeypatch.setattr(sk, name, lambda *a, _r=real, _n=name, **k: calls.append((_n, a[0].shape[0])) or _r(*a, **k))
    g = torch.Generator().manual_seed(16)
    ids = [torch.randint(0, 97, (n + steps,), generator=g) for n in lens]
    dec = BatchStaticSparseDecoder(model, 128, 3)
    caches = [model.new_cache(1, 128) for _ in lens]
    with torch.no_grad():
        for b, (x, n) in enumerate(zip(ids, lens)):
            model(x[None, :n], cache=caches[b]); dec.prefill(b, x[:n])
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', 'triton')            # only the static steps on the kernels
        kinds = [dec.step_kind([n + t for n in lens]) for t in range(steps)]
        ours = torch.stack([dec.step(torch.stack([x[n + t] for x, n in zip(ids, lens)])).clone() for t in range(steps)])
        monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', 'torch')
        ref = torch.stack([torch.cat([model(x[None, n + t:n + t + 1], cache=c)[0] for x, n, c in zip(ids, lens, caches)])
                           for t in range(steps)])
    assert [k[0] for k in kinds] == ['mixed'] * steps and any(k[1] for k in kinds)  # row 0 stays dense (< 112 keys)
    assert calls.count(('decode_step', 3)) == steps and calls.count(('dense_decode', 3)) == steps
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('kw', [dict(), dict(selection='minicpm4.1', topk=4, window_size=4), dict(dense_len=40),
                                dict(dense_len=0)])
def test_sparse_rows_is_dense_at(kw):
    "The device-side per-row switch of the mixed step == SparseSettings.dense_at at every length."
    st = infllmv2.sparse_settings(MiniCPM4Config.tiny(**TINY, sparse_config=dict(SPARSE, **kw)))
    L = torch.arange(1, 80)
    assert sparse_rows(L, st).tolist() == [not st.dense_at(n) for n in L.tolist()]


def test_batch_step_is_graph_capturable(monkeypatch):
    "Every variant (dense/sparse/mixed x update): no host read, no fresh CPU tensor outside the attention kernels."
    for use_nope in (False, True):
        dec = BatchStaticSparseDecoder(model_of(10, dict(BSPARSE, use_nope=use_nope)), 32, 2)
        dec.prefill(0, [1, 2, 3, 4, 5, 6]); dec.prefill(1, list(range(1, 25)))
        for mode in ('dense', 'sparse', 'mixed'):
            for update in (False, True):
                monkeypatch.setattr(ss, 'attend_step', lambda q, *a, **k: q * 1.0)   # the kernels' business
                monkeypatch.setattr(ss, '_kernels', lambda x: object())             # the all-rows (device) path
                pos = dec.base.pos.clone()
                bad = host_ops(lambda: dec._step_static(mode, update))
                monkeypatch.undo()
                assert not bad and torch.equal(dec.base.pos, pos + 1), (mode, update, bad)
                dec.base.pos.copy_(pos)


def test_batch_bad_arguments():
    from minicpm4_core.engine import Engine
    with pytest.raises(ValueError, match='sparse_config is None'): BatchStaticSparseDecoder(model_of(0, None), 16, 2)
    with pytest.raises(ValueError, match='lse_approx'): BatchStaticSparseDecoder(model_of(0, dict(SPARSE, lse_approx=True)), 16, 2)
    with pytest.raises(ValueError, match='MiniCPM4ForCausalLM'): BatchStaticSparseDecoder(object(), 16, 2)
    with pytest.raises(ValueError, match='batch must be'): BatchStaticSparseDecoder(model_of(0), 16, 0)
    with pytest.raises(ValueError, match='graphs=True'): BatchStaticSparseDecoder(model_of(0), 16, 2, graphs=True)
    with pytest.raises(ValueError, match='batch_sparse'): Engine(model_of(0), 16, batch_sparse='graphs')
    m = model_of(0)
    dec = BatchStaticSparseDecoder(m, 8, 2)
    dec.prefill(0, [1, 2, 3])
    with pytest.raises(ValueError, match='every row before step'): dec.step([1, 2])
    with pytest.raises(ValueError, match='b must be a row'): dec.prefill(2, [1])
    with pytest.raises(ValueError, match='b must be a row'): dec.load_cache(True, m.new_cache(1, 2))
    with pytest.raises(ValueError, match='exceeds max_len'): dec.prefill(1, list(range(9)))
    with pytest.raises(ValueError, match='KVCache'): dec.load_cache(1, {})
    with pytest.raises(ValueError, match='batch 1 only'): dec.load_cache(1, m.new_cache(2, 4))
    with pytest.raises(RuntimeError, match='CUDA'): dec.capture_all()
    dec.prefill(1, [4, 5, 6, 7, 8, 9, 10])
    with pytest.raises(ValueError, match='2 integer ids'): dec.step([1])
    with pytest.raises(ValueError, match='2 integer ids'): dec.step([1.0, 2.0])
    with pytest.raises(ValueError, match='mode must be'): dec.time_step(mode='both')
    dec.step([1, 2])
    with pytest.raises(ValueError, match='full'): dec.step([1, 2])
    with pytest.raises(ValueError, match='max_new_tokens'): dec.generate([[1], [2]], 0)
    with pytest.raises(ValueError, match='need 2 prompts'): dec.generate([[1]], 2)
    with pytest.raises(ValueError, match='slots > max_len'): dec.generate([[1] * 5, [2]], 5)
