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


def test_step_is_graph_capturable(monkeypatch):
    "Outside the attention kernels the step reads nothing on the host and copies in no fresh CPU tensor."
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__(); self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for use_nope in (False, True):
        dec = StaticSparseDecoder(model_of(10, dict(SPARSE, use_nope=use_nope)), 32)
        dec.prefill([1, 2, 3, 4, 5, 6])
        # the attention is the kernels' business (capturable on CUDA, tested in test_sparse_kernels): a device stub
        monkeypatch.setattr(ss, 'attend_step', lambda q, *a, **k: q * 1.0)
        with Record() as r:
            with torch.no_grad(): dec._step_static(True)
        monkeypatch.undo()
        bad = {o for o in r.ops if o.startswith(('aten.lift_fresh', 'aten._local_scalar_dense', 'aten.nonzero',
                                                  'aten.item', 'aten.is_nonzero'))}
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
    with pytest.raises(ValueError, match='one integer id'): dec.step(1.5)
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
