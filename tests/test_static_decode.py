"""minicpm4_core.static_decode: the static-shape forward equals the model's (fp32, CPU, random weights, fresh ids)."""
import pytest
import torch

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.static_decode import StaticDecoder, StaticStack, check_static_support

pytestmark = pytest.mark.usefixtures('one_thread')     # tests/conftest.py
TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, initializer_range=0.3, torch_dtype='float32')
SPARSE = dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=8, topk=4, dense_len=16)   # 6 blocks of 4


def longrope(max_pos, orig, half=8):
    return dict(max_position_embeddings=max_pos,
                rope_scaling=dict(rope_type='longrope', original_max_position_embeddings=orig,
                                  short_factor=[1.0 + 0.2 * i for i in range(half)],
                                  long_factor=[3.0 + 0.5 * i for i in range(half)]))


def model_of(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{**TINY, **kw})).eval()


def check_against_forward(model, max_len, T, n_prefill, seed):
    "prefill + steps of a StaticDecoder vs the model's full forward over the same fresh random ids."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=g)
    with torch.no_grad():
        full = model(ids[None])[0]
    dec = StaticDecoder(model, max_len)
    dec.prefill(torch.randint(0, model.config.vocab_size, (max_len // 2,), generator=g))   # stale slots: reset must hide them
    pre = dec.prefill(ids[:n_prefill].tolist())
    steps = torch.stack([dec.step(int(t)).clone() for t in ids[n_prefill:]])
    torch.testing.assert_close(pre, full[:n_prefill], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, full[n_prefill:], rtol=1e-4, atol=1e-4)
    assert dec.n == T and int(dec.pos) == T


@pytest.mark.parametrize('kw', [dict(), dict(num_key_value_heads=4), dict(num_key_value_heads=1)],
                         ids=['gqa', 'mha', 'mqa'])
def test_dense_prefill_and_steps_equal_forward(kw):
    check_against_forward(model_of(1, **kw), max_len=40, T=23, n_prefill=7, seed=2)


def test_greedy_equals_model_generate():
    m = model_of(3)
    p = torch.randint(0, 97, (5,), generator=torch.Generator().manual_seed(4)).tolist()
    dec = StaticDecoder(m, 32)
    assert dec.generate(p, 20) == m.generate(p, 20, stop_ids=[])[0]
    assert dec.generate(p[:2], 3) == m.generate(p[:2], 3, stop_ids=[])[0]        # a second prompt on the same buffer


def test_sparse_model_while_dense():
    m = model_of(5, sparse_config=SPARSE)
    check_against_forward(m, max_len=24, T=22, n_prefill=5, seed=6)              # ceil(24/4) = 6 attended blocks
    with pytest.raises(ValueError, match='dense targets.*max_len=64'): StaticDecoder(m, 64)
    check_static_support(model_of(5, sparse_config=dict(SPARSE, dense_len=65)).config, 64)


def test_longrope_guard_and_agreement():
    short = model_of(7, **longrope(max_pos=64, orig=64))                # short factors up to 64
    check_against_forward(short, max_len=48, T=30, n_prefill=4, seed=8)
    long_ = model_of(7, **longrope(max_pos=64, orig=16))                # long factors everywhere: max_len > orig is fine
    check_against_forward(long_, max_len=48, T=30, n_prefill=4, seed=9)
    with pytest.raises(ValueError, match='original_max_position_embeddings=64'):
        StaticDecoder(short, 80)                                         # the model would switch factors at 65
    # the same two models differ (the factors matter), so the agreement above is not trivial
    with torch.no_grad():
        ids = torch.randint(0, 97, (1, 12))
        assert not torch.allclose(short(ids), long_(ids), atol=1e-3)


def test_step_is_graph_capturable():
    "The captured step must not read device values on the host nor copy fresh CPU tensors in."
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__(); self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    dec = StaticDecoder(model_of(10), 16)
    dec.prefill([1, 2, 3])
    with Record() as r:
        with torch.no_grad(): dec._step_static()
    bad = {o for o in r.ops if o.startswith(('aten.lift_fresh', 'aten._local_scalar_dense', 'aten.nonzero', 'aten.item'))}
    assert not bad and int(dec.pos) == 4


def test_bad_arguments():
    m = model_of(11)
    dec = StaticDecoder(m, 8)
    with pytest.raises(ValueError, match='prefill'): dec.step(1)
    with pytest.raises(ValueError, match='ids must be'): dec.prefill([])
    with pytest.raises(ValueError, match='ids must be'): dec.prefill(torch.randn(3))
    with pytest.raises(ValueError, match=r'\[0, vocab_size=97\)'): dec.prefill([1, 97])
    with pytest.raises(ValueError, match='exceeds max_len'): dec.prefill(list(range(9)))
    dec.prefill(list(range(7)))
    dec.step(3)
    with pytest.raises(ValueError, match='full'): dec.step(3)
    with pytest.raises(ValueError, match='max_len must'): StaticDecoder(m, 0)
    with pytest.raises(ValueError, match='model must'): StaticDecoder(torch.nn.Linear(2, 2), 8)
    with pytest.raises(ValueError, match='max_new_tokens'): StaticDecoder(m, 8).generate([1], 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='graphs=True'): StaticDecoder(m, 8, graphs=True)
        with pytest.raises(RuntimeError, match='CUDA'): StaticDecoder(m, 8).capture()
    assert isinstance(StaticDecoder(m, 8).stack, StaticStack)


@pytest.mark.parametrize('mode', ['static', 'bucket'])
def test_split_decode_step_equals_forward(mode):
    "decode_kernel='dense_decode' (the CUDA default: length on the device, no mask) == the model, fresh ids, both modes."
    model = model_of(31)
    g = torch.Generator().manual_seed(31)
    ids = torch.randint(0, model.config.vocab_size, (26,), generator=g)
    with torch.no_grad(): full = model(ids[None])[0]
    dec = StaticDecoder(model, 40, length_mode=mode, min_bucket=8, decode_kernel='dense_decode')
    assert dec.stack.split_decode
    dec.prefill(torch.randint(0, model.config.vocab_size, (30,), generator=g))          # stale slots past the length
    pre = dec.prefill(ids[:9])
    steps = torch.stack([dec.step(int(t)).clone() for t in ids[9:]])
    torch.testing.assert_close(pre, full[:9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, full[9:], rtol=1e-4, atol=1e-4)
    assert int(dec.lens) == 26 and dec.lens.dtype == torch.int32
    assert not StaticDecoder(model, 40).stack.split_decode                             # CPU default: masked SDPA
    with pytest.raises(ValueError, match="decode_kernel must be"): StaticDecoder(model, 40, decode_kernel='flash')


def test_attention_hook_is_called():
    "StaticStack.attn is the one attention call of every layer (a sparse step plugs in there)."
    from minicpm4_core import static_decode as sd
    model = model_of(33)
    dec = StaticDecoder(model, 16)
    calls = []
    dec.stack.attn = lambda q, kv, mask, span, seqlens: calls.append(q.shape) or sd.attend(q, kv, mask, span, seqlens)
    ids = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(): ref = model(ids[None])[0]
    torch.testing.assert_close(dec.prefill(ids), ref, rtol=1e-4, atol=1e-4)
    assert calls == [(6, 4, 16)] * 2


# --- the fused step (kernels.fused): CUDA's default, here under the Triton interpreter ('triton', 'gemv') and with
# --- the fused structure over plain torch ops ('torch')
from minicpm4_core.kernels._common import interpreter_active  # noqa: E402

needs_interp = pytest.mark.skipif(not interpreter_active(), reason="needs TRITON_INTERPRET=1 before triton import")


@pytest.mark.parametrize('fused,dk', [('torch', 'auto'), ('torch', 'dense_decode'),
                                      pytest.param('triton', 'auto', marks=needs_interp),
                                      pytest.param('triton', 'dense_decode', marks=needs_interp),
                                      pytest.param('gemv', 'dense_decode', marks=needs_interp)])
def test_fused_step_equals_forward(fused, dk):
    "The fused layer (prefill chunks and one-token steps, both attention paths) == the model's forward, fresh ids."
    model = model_of(41)
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(0, model.config.vocab_size, (17,), generator=g)
    with torch.no_grad(): full = model(ids[None])[0]
    dec = StaticDecoder(model, 24, fused=fused, decode_kernel=dk)
    assert dec.stack.fused == fused
    dec.prefill(torch.randint(0, model.config.vocab_size, (20,), generator=g))   # stale slots past the length
    pre = dec.prefill(ids[:6])
    steps = torch.stack([dec.step(int(t)).clone() for t in ids[6:]])
    torch.testing.assert_close(pre, full[:6], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, full[6:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fused', [pytest.param('triton', marks=needs_interp), pytest.param('gemv', marks=needs_interp)])
def test_fused_greedy_and_batch(fused):
    "Greedy == model.generate, and the batch decoder's rows == each row alone, with the fused kernels."
    from minicpm4_core.static_decode import BatchStaticDecoder
    m = model_of(43)
    p = torch.randint(0, 97, (5,), generator=torch.Generator().manual_seed(43)).tolist()
    assert StaticDecoder(m, 24, fused=fused).generate(p, 12) == m.generate(p, 12, stop_ids=[])[0]
    rows = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3)]
    bd = BatchStaticDecoder(m, 16, 2, fused=fused)
    assert bd.stack.fused == fused
    last = torch.stack([bd.prefill(b, r) for b, r in enumerate(rows)])
    nxt = last.argmax(-1)
    out = bd.step(nxt)
    with torch.no_grad():
        for b, r in enumerate(rows):
            ref = m(torch.cat([r, nxt[b:b + 1]])[None])[0]
            torch.testing.assert_close(last[b], ref[-2], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(out[b], ref[-1], rtol=1e-4, atol=1e-4)


def test_fused_modes_and_hook():
    "CPU default keeps layer_step; bad modes are refused; the attention hook still sees the K/V written and q rotated."
    from minicpm4_core import static_decode as sd
    model = model_of(45)
    assert StaticDecoder(model, 16).stack.fused is None and sd.resolve_fused('auto', 'cuda') == 'gemv'
    with pytest.raises(ValueError, match='fused must be one of'): StaticDecoder(model, 16, fused='yes')
    ref, dec = StaticDecoder(model, 16, fused='off'), StaticDecoder(model, 16, fused='torch')
    seen = []
    def hook(q, kv, mask, span, seqlens):
        seen.append((q.clone(), kv[:span].clone()))
        return sd.attend(q, kv, mask, span, seqlens)
    ids = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(4))
    dec.stack.attn = hook
    got = dec.prefill(ids)
    torch.testing.assert_close(got, ref.prefill(ids), rtol=1e-5, atol=1e-5)
    assert len(seen) == 2
    for l, (q, kv) in enumerate(seen):
        torch.testing.assert_close(kv, ref.stack.kv[l, :6], rtol=1e-5, atol=1e-5)    # written before the hook runs


@pytest.mark.parametrize('fused', ['torch', pytest.param('triton', marks=needs_interp)])
def test_fused_step_is_graph_capturable(fused):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__(); self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    dec = StaticDecoder(model_of(47), 16, fused=fused, decode_kernel='dense_decode')
    dec.prefill([1, 2, 3])
    with Record() as r:
        with torch.no_grad(): dec._step_static()
    bad = {o for o in r.ops if o.startswith(('aten.lift_fresh', 'aten._local_scalar_dense', 'aten.nonzero', 'aten.item'))}
    assert not bad and int(dec.pos) == 4


@needs_interp
def test_gemv_step_without_prologues(monkeypatch):
    "layer_step_gemv's large-weight branch (separate norm / SiLU kernels, as for the 8B layers) == the model."
    from minicpm4_core.kernels import fused as FU
    monkeypatch.setattr(FU, 'PROLOGUE_MAX_BYTES', 0)
    model = model_of(49)
    assert not FU.prologue_fits(model.model.layers[0].mlp.down_proj.weight)
    ids = torch.randint(0, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(49))
    with torch.no_grad(): full = model(ids[None])[0]
    dec = StaticDecoder(model, 16, fused='gemv', decode_kernel='dense_decode')
    pre = dec.prefill(ids[:4])
    steps = torch.stack([dec.step(int(t)).clone() for t in ids[4:]])
    torch.testing.assert_close(pre, full[:4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, full[4:], rtol=1e-4, atol=1e-4)


def test_prefill_mask_modes_agree(monkeypatch):
    """`prefill_mask` 'mask' (an additive (G*T, s+T) tensor) and 'causal' (a lower-right CausalBias, nothing
    materialised) give the same prefill: StaticDecoder.prefill == the model's forward, the batch decoder's chunked
    prefill and the engine's, in both modes; the mask pattern is the lower-right causal one; bad modes are refused."""
    import minicpm4_core.static_decode as SD
    from minicpm4_core.engine import Engine
    from minicpm4_core.static_decode import BatchStaticDecoder, prefill_mask
    m = model_of(21)
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(0, 97, (37,), generator=g)
    with torch.no_grad(): full = m(ids[None])[0]
    am = prefill_mask(5, 9, 4, 2, torch.float32, 'cpu', 'mask')
    assert am.shape == (1, 1, 10, 14) and torch.equal(am[0, 0, :5], am[0, 0, 5:])          # the G=2 row blocks
    want = torch.zeros(5, 14).masked_fill_(torch.arange(14)[None] > torch.arange(9, 14)[:, None], float('-inf'))
    assert torch.equal(am[0, 0, :5], want)
    assert torch.equal(prefill_mask(5, 9, 4, 2, torch.float32, 'cpu', 'causal')._materialize('cpu'), want == 0)
    with pytest.raises(ValueError, match="'mask' or 'causal'"): prefill_mask(5, 9, 4, 2, torch.float32, 'cpu', 'flash')
    outs = {}
    for mode in ('mask', 'causal'):
        monkeypatch.setattr(SD, 'PREFILL_ATTN', mode)
        dec = StaticDecoder(m, 64)
        pre = dec.prefill(ids.tolist())
        torch.testing.assert_close(pre, full, rtol=1e-4, atol=1e-4)
        bd = BatchStaticDecoder(m, 64, 2)
        last = bd.prefill(1, ids.tolist(), chunk=8)                       # 5 chunks, the last one ragged
        torch.testing.assert_close(last, full[-1], rtol=1e-4, atol=1e-4)
        e = Engine(m, 64, chunk=6)
        outs[mode] = e.generate([ids[:20].tolist()], 12, stop_ids=[])
    assert outs['mask'] == outs['causal'] == m.generate([ids[:20].tolist()], 12, stop_ids=[], fast=False)
    st = StaticDecoder(m, 64).stack                                       # another attention: the additive mask
    st.attn = lambda q, kv, mask, span=None, seqlens=None: (SD.attend(q, kv, mask, span, seqlens)
                                                            if torch.is_tensor(mask) else 1 / 0)
    monkeypatch.setattr(SD, 'PREFILL_ATTN', 'causal')
    st.run_chunk(torch.randn(4, 64), 3)
