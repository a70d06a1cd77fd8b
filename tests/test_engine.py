"""minicpm4_core.engine: greedy == model.generate for each combination, chunked == one-shot prefill, batches == each
prompt alone, the sampling law, FR-Spec identity, bad arguments (fp32, CPU, fresh random weights and ids)."""
import math

import pytest
import torch

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.engine import Engine, generate_fast, quant_linear
from minicpm4_core.model import MiniCPM4ForCausalLM, filtered_logits

pytestmark = [pytest.mark.usefixtures('one_thread'),     # tests/conftest.py
              pytest.mark.filterwarnings('ignore:.*using the torch reference')]
TINY = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, initializer_range=0.3, torch_dtype='float32', eos_token_id=2)
SPARSE = dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=8, topk=4, dense_len=16)


def model_of(seed, **kw):
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{**TINY, **kw})).eval()


def prompts_of(seed, lens=(37, 20, 6)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lens]


@pytest.fixture
def torch_kernels(monkeypatch):
    """The packed linears' torch references instead of the Triton interpreter (~40x faster; the kernels themselves are
    checked against these references in test_w4a16 / test_ternary_kernel, and below through `quant_linear`)."""
    import minicpm4_core.kernels.w4a16 as W, minicpm4_core.kernels.ternary as TK
    for mod in (W, TK): monkeypatch.setattr(mod, 'resolve_backend', lambda *a, **k: 'torch')


@pytest.mark.parametrize('sparse', [False, True])
@pytest.mark.parametrize('quant', [None, 'w4a16', 'ternary'])
def test_greedy_equals_model_generate(sparse, quant, torch_kernels):
    "Batch of 3 (left padding) and each prompt alone, chunked prefill (chunk 7): the model's own greedy tokens."
    seed = 10 + 2 * sparse + (quant is not None) + (quant == 'ternary')
    m = model_of(seed, sparse_config=SPARSE if sparse else None)
    ps = prompts_of(seed)
    eng = Engine(m, 37 + 14, max_batch=3, quant=quant, chunk=7)
    if quant: assert eng.n_quant == 14 and eng.pick_backend(1) == 'eager'
    if sparse: assert eng.pick_backend(1) == 'eager'                 # 51 > dense_len: the selection is active
    ref = m.generate(ps, 14, stop_ids=[])
    assert eng.generate(ps, 14, stop_ids=[]) == ref
    for p, r in zip(ps, ref): assert eng.generate([p], 14, stop_ids=[]) == [r]
    stop = ref[0][5]                                                  # early stop: same cut as the model's
    assert eng.generate(ps, 14, stop_ids=[stop]) == m.generate(ps, 14, stop_ids=[stop])


def test_static_and_eager_backends_agree():
    m = model_of(3)
    p = prompts_of(3, (30,))[0]
    ref = m.generate([p], 20, stop_ids=[])
    st, ea = Engine(m, 64, chunk=8, backend='static'), Engine(m, 64, chunk=8, backend='eager')
    assert st.generate([p], 20, stop_ids=[]) == ref == ea.generate([p], 20, stop_ids=[])
    # InfLLM v2 model whose buffer stays dense: the static stack is allowed and exact
    s = model_of(4, sparse_config=dict(SPARSE, dense_len=128))
    e = Engine(s, 64, chunk=8)
    assert e.pick_backend(1) == 'static' and e.generate([p], 20, stop_ids=[]) == s.generate([p], 20, stop_ids=[])


@pytest.mark.parametrize('sparse', [False, True])
def test_chunked_prefill_equals_one_shot(sparse):
    m = model_of(5, sparse_config=SPARSE if sparse else None)
    ps = prompts_of(5, (45, 29, 3))
    T = 45
    ids = torch.zeros(3, T, dtype=torch.long); mask = torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(ps): ids[i, T - len(p):] = torch.tensor(p); mask[i, T - len(p):] = 1
    want = m(ids, attention_mask=mask)[:, -1]
    for chunk in (1, 8, 45):
        eng = Engine(m, 64, max_batch=3, chunk=chunk)
        got = eng.eager_prefill(ids, mask, eng._cache_view(3))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if not sparse:                                                    # static stack: batch 1
        eng = Engine(m, 64, chunk=8, backend='static')
        eng.generate([ps[0]], 1)                                      # builds the StaticDecoder
        got = eng.static_prefill(torch.tensor(ps[0]))
        torch.testing.assert_close(got[0], m(torch.tensor([ps[0]]))[0, -1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('quant', ['w4a16', 'ternary'])
def test_quant_linear_dispatch_matches_fused(quant):
    "Prefill rows: dequantize + matmul; decode rows: the module's kernel (Triton interpreter here): same numbers."
    m = model_of(6)
    Engine(m, 32, quant=quant)
    lin = m.model.layers[0].mlp.down_proj
    for rows in (1, 3, 40):
        x = torch.randn(rows, lin.in_features)
        torch.testing.assert_close(quant_linear(lin, x), type(lin).forward(lin, x), rtol=1e-4, atol=1e-4)


def chi2_stat(counts, probs):
    keep = probs > 0
    n = counts.sum()
    assert counts[~keep].sum() == 0, "a token outside the filtered support was sampled"
    e = probs[keep] * n
    return float(((counts[keep] - e) ** 2 / e).sum()), int(keep.sum()) - 1


def chi2_p(x, dof):
    "Upper tail of chi-square (Wilson-Hilferty normal approximation; fine for dof >= 3)."
    z = ((x / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampling_law_is_filtered_logits():
    "4096 first tokens of one prompt (one batch of 512 rows, 8 calls) vs softmax(filtered_logits(...))."
    m = model_of(7, initializer_range=1.0)
    p = prompts_of(7, (9,))[0]
    with torch.no_grad(): logits = m(torch.tensor([p]))[0, -1]
    eng = Engine(m, 16, max_batch=512, chunk=4)
    g = torch.Generator().manual_seed(0)
    for kw in (dict(temperature=0.7, top_k=6), dict(temperature=1.3, top_p=0.6)):
        probs = filtered_logits(logits, **kw).softmax(-1)
        toks = torch.tensor([r[0] for _ in range(8) for r in eng.generate([p] * 512, 1, stop_ids=[], generator=g, **kw)])
        counts = torch.bincount(toks, minlength=97).double()
        x, dof = chi2_stat(counts, probs.double())
        assert chi2_p(x, dof) > 1e-3, (kw, x, dof)
        wrong = filtered_logits(logits, **{**kw, 'temperature': kw['temperature'] * 2.5}).softmax(-1).double()
        xw, _ = chi2_stat(counts, torch.where(probs > 0, wrong, 0.0) / wrong[probs > 0].sum())
        assert chi2_p(xw, dof) < 1e-3, "the test cannot tell a wrong temperature apart"


def test_sampling_same_generator_same_tokens():
    m = model_of(8)
    ps = prompts_of(8)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95, stop_ids=[])
    ref = m.generate(ps, 10, generator=torch.Generator().manual_seed(3), **kw)
    got = Engine(m, 64, max_batch=3, chunk=16).generate(ps, 10, generator=torch.Generator().manual_seed(3), **kw)
    assert got == ref


def test_frspec_in_engine_is_greedy_identical():
    from minicpm4_core.frspec import EagleDraft, frequent_ids
    m = model_of(9)
    torch.manual_seed(9)
    draft = EagleDraft(m.config).eval()
    vocab = frequent_ids(torch.rand(97), 48, force_ids=[2])
    p = prompts_of(9, (12,))[0]
    plain = Engine(m, 96, chunk=5).generate([p], 24, stop_ids=[])
    spec = Engine(m, 96, spec=(draft, vocab), spec_kw=dict(depth=3, topk=3, tree_size=8))
    assert spec.generate([p], 24, stop_ids=[]) == plain == m.generate([p], 24, stop_ids=[])
    assert spec.spec_stats['tokens'] >= 24


def test_memory_is_sized_from_max_len():
    m = model_of(0)
    c = m.config
    eng = Engine(m, 80, max_batch=2)
    assert eng.memory()['kv_cache'] == 2 * c.num_hidden_layers * 2 * 80 * c.num_key_value_heads * c.head_dim * 4
    assert generate_fast(m, [1, 2, 3], 4) is None                      # CPU: the model keeps its own loop


def test_bad_arguments():
    m = model_of(1)
    sm = model_of(1, sparse_config=SPARSE)
    with pytest.raises(ValueError, match='max_len must be an int'): Engine(m, 0)
    with pytest.raises(ValueError, match='max_batch'): Engine(m, 16, max_batch=0)
    with pytest.raises(ValueError, match='chunk'): Engine(m, 16, chunk=1.5)
    with pytest.raises(ValueError, match="quant must be None, 'w4a16' or 'ternary'"): Engine(m, 16, quant='int8')
    with pytest.raises(ValueError, match='sparse must be'): Engine(m, 16, sparse='yes')
    with pytest.raises(ValueError, match='sparse=True needs'): Engine(m, 16, sparse=True)
    with pytest.raises(ValueError, match='dtype must be'): Engine(m, 16, dtype=torch.int8)
    with pytest.raises(ValueError, match='backend must be'): Engine(m, 16, backend='graph')
    with pytest.raises(ValueError, match="backend='static' is not possible"): Engine(sm, 64, backend='static')
    with pytest.raises(ValueError, match='spec must be None or a pair'): Engine(m, 16, spec='draft')
    with pytest.raises(ValueError, match='model must be'): Engine(torch.nn.Linear(2, 2), 16)
    eng = Engine(m, 16, max_batch=2)
    with pytest.raises(ValueError, match='max_len=16'): eng.generate([[1] * 10], 8)
    with pytest.raises(ValueError, match='max_batch=2'): eng.generate([[1], [2], [3]], 2)
    with pytest.raises(ValueError, match='vocab_size'): eng.generate([[1, 97]], 2)
    with pytest.raises(ValueError, match='max_new_tokens'): eng.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match='temperature'): eng.generate([[1, 2]], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="backend='static'"): Engine(m, 16, max_batch=2, backend='static').generate([[1], [2]], 2)
