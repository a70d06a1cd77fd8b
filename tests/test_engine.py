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


@pytest.mark.parametrize('sparse', [False, True])
@pytest.mark.parametrize('quant', [None, 'w4a16', 'ternary'])
def test_greedy_equals_model_generate(sparse, quant, torch_kernels):
    "Batch of 3 (left padding) and each prompt alone, chunked prefill (chunk 7): the model's own greedy tokens."
    seed = 10 + 2 * sparse + (quant is not None) + (quant == 'ternary')
    m = model_of(seed, sparse_config=SPARSE if sparse else None)
    ps = prompts_of(seed)
    eng = Engine(m, 37 + 14, max_batch=3, quant=quant, chunk=7)
    if quant: assert eng.n_quant == 14
    assert eng.pick_backend(1) == 'static'                           # packed linears run in the static stack
    # 51 > dense_len: batch 1 goes through StaticSparseDecoder, a batch of InfLLM v2 rows through BatchStaticSparseDecoder
    assert eng.pick_backend(3) == 'static' and eng.sparse_static() == sparse
    ref = m.generate(ps, 14, stop_ids=[], fast=False)
    assert eng.generate(ps, 14, stop_ids=[]) == ref
    for p, r in zip(ps, ref):                                         # the 6-token prompt crosses dense_len=16
        assert eng.generate([p], 14, stop_ids=[]) == [r] and eng.last_timing['backend'] == 'static'
        t = eng.last_timing                  # the sparse route's setup (load_cache) is timed apart from its prefill
        assert 0 < t['prefill_s'] <= t['ttft_s'] and (t['setup_s'] > 0) == sparse
    assert (eng._sparse_dec is not None) == sparse and (eng._static is None) == sparse
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
    eng = Engine(m, 64, chunk=8, backend='static')
    eng.generate([ps[0]], 1)                                          # builds the StaticDecoder / StaticSparseDecoder
    pre = eng.sparse_prefill if sparse else eng.static_prefill
    got = pre(torch.tensor(ps[0]))
    torch.testing.assert_close(got[0], m(torch.tensor([ps[0]]))[0, -1], rtol=1e-4, atol=1e-4)
    if sparse:                                                        # the handed-over state: K/V and compressed keys
        from minicpm4_core.infllmv2 import compress_keys
        d, c = eng._sparse_dec, m.new_cache(1, 45)
        with torch.no_grad(): m(torch.tensor([ps[0]]), cache=c)
        n, Hkv = 45, d.Hkv
        torch.testing.assert_close(d.base.stack.kv[0, :n, :Hkv], c.layers[0].k[0, :n], rtol=1e-5, atol=1e-5)
        kc = compress_keys(c.layers[1].k[:, :n], d.st.kernel_size, d.st.kernel_stride)
        torch.testing.assert_close(d.kc[1, :, :kc.shape[1]], kc, rtol=1e-5, atol=1e-5)


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
    eng = Engine(m, 16, max_batch=512, chunk=4, backend='eager')   # one batched prefill (the sampler is shared)
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
    sized = 2 * c.num_hidden_layers * 2 * 80 * c.num_key_value_heads * c.head_dim * 4
    assert eng._eager_kv_bytes() == sized and eng.memory()['kv_cache'] == 0
    assert eng._cache is None                                          # sized, allocated on the eager path's first use
    eng.generate([[1, 2], [3, 4]], 2)                                  # batch 2: the batched static stack
    assert eng._cache is None and eng._batch.stack.kv.shape == (c.num_hidden_layers, 2, 80, 2 * c.num_key_value_heads,
                                                                c.head_dim)
    assert eng.memory()['static_stack'] >= eng._batch.stack.kv.numel() * 4
    eager = Engine(m, 80, max_batch=2, backend='eager')
    assert eager.generate([[1, 2], [3, 4]], 2) == eng.generate([[1, 2], [3, 4]], 2)
    assert eager._cache is not None and eager.memory()['kv_cache'] == sized     # held once the eager path ran
    eng.backend = 'eager'
    eng.generate([[1, 2], [3, 4]], 2)
    assert eng._cache.layers[0].k.shape == (2, 80, c.num_key_value_heads, c.head_dim)
    m.generate([1, 2, 3], 4)
    assert '_engine_fast' not in m.__dict__                            # CPU, fast=None: the model keeps its own loop
    assert generate_fast(m, [1, 2, 3], 4, stop_ids=[]) == m.generate([1, 2, 3], 4, stop_ids=[])


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
    with pytest.raises(ValueError, match="backend='static' is not possible.*lse_approx"):
        Engine(model_of(1, sparse_config=dict(SPARSE, lse_approx=True)), 64, backend='static')
    with pytest.raises(ValueError, match="backend='static'.*batch 1 only.*got batch 2"):
        Engine(sm, 64, max_batch=2, backend='static', batch_sparse='eager').generate([[5] * 3, [6] * 4], 2)
    with pytest.raises(ValueError, match="batch_sparse must be 'eager' or 'static'"): Engine(sm, 64, batch_sparse='graph')
    with pytest.raises(ValueError, match='spec must be None or a pair'): Engine(m, 16, spec='draft')
    with pytest.raises(ValueError, match='model must be'): Engine(torch.nn.Linear(2, 2), 16)
    eng = Engine(m, 16, max_batch=2)
    with pytest.raises(ValueError, match='max_len=16'): eng.generate([[1] * 10], 8)
    with pytest.raises(ValueError, match='max_batch=2'): eng.generate([[1], [2], [3]], 2)
    with pytest.raises(ValueError, match='vocab_size'): eng.generate([[1, 97]], 2)
    with pytest.raises(ValueError, match='max_new_tokens'): eng.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match='temperature'): eng.generate([[1, 2]], 2, temperature=-1.0)
    assert Engine(m, 16, max_batch=2, backend='static').generate([[1], [2]], 2, stop_ids=[]) == \
        m.generate([[1], [2]], 2, stop_ids=[], fast=False)                 # batch > 1 runs the static stack too


# ---- model.generate through the engine (issue 13, session 3) ----

@pytest.fixture
def fresh_notes(monkeypatch):
    "An empty once-per-reason note set, so each test sees its own notes."
    import minicpm4_core.engine as E
    monkeypatch.setattr(E, '_FAST_NOTED', set())


def test_model_generate_dispatches_to_the_engine(fresh_notes, capsys):
    m = model_of(20)
    p = prompts_of(20, (23,))[0]
    slow = m.generate([p], 12, stop_ids=[], fast=False)
    assert m.generate([p], 12, stop_ids=[], fast=True) == slow
    slot = m._engine_fast
    eng = slot.engine
    assert slot.key[0] == 64 and eng.pick_backend(1) == 'static' and eng._static is not None and eng._cache is None
    assert m.generate([p], 12, stop_ids=[], fast=True) == slow and m._engine_fast.engine is eng   # cached, not rebuilt
    assert m.generate(p, 12, stop_ids=[], fast=None) == slow and not hasattr(eng._static, '_calls')  # CPU auto: own loop
    long = m.generate([p], 50, stop_ids=[], fast=True)                                  # 73 slots: the 128 bucket
    assert m._engine_fast.key[0] == 128 and m._engine_fast.engine is not eng
    assert long == m.generate([p], 50, stop_ids=[], fast=False)
    stop = slow[0][4]                                                                   # early stop: the same cut
    assert m.generate([p], 12, stop_ids=[stop], fast=True) == m.generate([p], 12, stop_ids=[stop], fast=False)
    m.train()
    m.generate([p], 3, fast=True)
    assert m.training                                                                   # mode restored
    import copy
    assert copy.deepcopy(m)._engine_fast.engine is None                                 # copies get an empty slot
    assert capsys.readouterr().out == ''                                                # nothing fell back


def test_model_generate_falls_back_with_one_note(fresh_notes, capsys, torch_kernels):
    m = model_of(21)
    ps = prompts_of(21, (15, 9))
    assert m.generate(ps, 6, stop_ids=[], fast=True) == m.generate(ps, 6, stop_ids=[], fast=False)
    assert m._engine_fast.engine.last_timing['backend'] == 'static' and m._engine_fast.engine._batch.B == 2
    long = [ps[0], ps[1] * 7]                                                           # the longest row sizes max_len
    assert m.generate(long, 6, stop_ids=[], fast=True) == m.generate(long, 6, stop_ids=[], fast=False)
    assert m._engine_fast.key[0] == 128
    assert capsys.readouterr().out == ''                                                # a dense batch: the engine
    s = model_of(22, sparse_config=SPARSE)                                              # 15 + 6 > dense_len=16
    assert s.generate(ps, 6, stop_ids=[], fast=True) == s.generate(ps, 6, stop_ids=[], fast=False)
    assert s._engine_fast.engine._bsparse is not None and capsys.readouterr().out == ''  # a sparse batch: static too
    la = model_of(24, sparse_config=dict(SPARSE, lse_approx=True))                     # refused by the engine
    assert la.generate(ps, 6, stop_ids=[], fast=True) == la.generate(ps, 6, stop_ids=[], fast=False)
    la.generate(ps, 6, stop_ids=[], fast=True)
    out = capsys.readouterr().out
    assert out.count('lse_approx') == 1, out                                            # once per reason
    assert s.generate([ps[0]], 6, stop_ids=[], fast=True) == s.generate([ps[0]], 6, stop_ids=[], fast=False)
    assert s._engine_fast.engine._sparse_dec is not None and capsys.readouterr().out == ''   # batch 1: static sparse
    ban = lambda ids, logits: logits.index_fill(-1, logits.argmax(-1), float('-inf'))  # never the greedy token
    got = m.generate([ps[0]], 6, stop_ids=[], fast=True, logits_processor=ban)
    assert got == m.generate([ps[0]], 6, stop_ids=[], fast=False, logits_processor=ban)
    assert got != m.generate([ps[0]], 6, stop_ids=[], fast=False)
    assert 'logits_processor' in capsys.readouterr().out
    q = model_of(23)
    Engine(q, 32, quant='w4a16')                                                        # packs q in place
    assert q.generate([ps[0]], 6, stop_ids=[], fast=True) == q.generate([ps[0]], 6, stop_ids=[], fast=False)
    assert capsys.readouterr().out == ''                  # packed linears now run in the static stack: no fallback
    with pytest.raises(ValueError, match='fast must be'): m.generate([1, 2], 2, fast='yes')
    with pytest.raises(ValueError, match='logits_processor must be'): m.generate([1, 2], 2, logits_processor=3)


def test_model_generate_fast_follows_weight_updates(fresh_notes):
    "In-place updates (an optimizer step) refresh the fused copies of the same engine; replaced tensors rebuild it."
    m = model_of(24)
    p = prompts_of(24, (17,))[0]
    m.generate([p], 8, stop_ids=[], fast=True)
    eng = m._engine_fast.engine
    with torch.no_grad():
        for w in m.parameters(): w.add_(torch.randn_like(w) * 0.3)
    assert m.generate([p], 8, stop_ids=[], fast=True) == m.generate([p], 8, stop_ids=[], fast=False)
    assert m._engine_fast.engine is eng
    lin = m.model.layers[0].mlp.up_proj
    lin.weight = torch.nn.Parameter(torch.randn_like(lin.weight) * 0.3)
    assert m.generate([p], 8, stop_ids=[], fast=True) == m.generate([p], 8, stop_ids=[], fast=False)
    # a batch (BatchStaticDecoder) and an InfLLM v2 target past dense_len (StaticSparseDecoder) follow updates too
    s = model_of(25, sparse_config=SPARSE)
    ps = prompts_of(25, (17, 9))
    for rows in (ps, ps[:1]):
        s.generate(rows, 8, stop_ids=[], fast=True)
        with torch.no_grad():
            for w in s.parameters(): w.add_(torch.randn_like(w) * 0.3)
        with torch.no_grad(): s.model.layers[0].mlp.up_proj.weight.add_(1.0)    # a fused gate|up copy must follow
        assert s.generate(rows, 8, stop_ids=[], fast=True) == s.generate(rows, 8, stop_ids=[], fast=False)
    assert m._engine_fast.engine is not eng


def test_model_generate_fast_sampling_matches():
    "Same generator, same filtered law: the static path's logits equal the loop's to float rounding -> same draws."
    m = model_of(25)
    p = prompts_of(25, (19,))[0]
    kw = dict(temperature=0.8, top_k=30, top_p=0.9, stop_ids=[])
    for seed in range(3):
        a = m.generate([p], 10, generator=torch.Generator().manual_seed(seed), fast=True, **kw)
        b = m.generate([p], 10, generator=torch.Generator().manual_seed(seed), fast=False, **kw)
        assert a == b


# ---- bucketed vs static-length graphs ----

class FakeGraph:
    "Stands in for a captured CUDA graph on the CPU: replay runs the step it was captured from."
    def __init__(self, fn): self.fn = fn
    def replay(self): self.fn()


def test_bucket_sizes():
    from minicpm4_core.static_decode import bucket_sizes
    assert bucket_sizes(100) == [100]
    assert bucket_sizes(100, 'bucket', 8) == [8, 16, 32, 64, 100]
    assert bucket_sizes(64, 'bucket', 8) == [8, 16, 32, 64]
    assert bucket_sizes(5, 'bucket', 8) == [5]
    with pytest.raises(ValueError, match="length_mode must be 'static' or 'bucket'"): bucket_sizes(8, 'pow2')
    with pytest.raises(ValueError, match='min_bucket'): bucket_sizes(8, 'bucket', 0)
    with pytest.raises(ValueError, match='length_mode'): Engine(model_of(0), 16, length_mode='x')


@pytest.mark.parametrize('mode', ['static', 'bucket'])
def test_graphs_recaptured_only_at_bucket_boundaries(mode, monkeypatch):
    "Graph logic on the CPU with a fake capture: which bucket each step uses, when a capture happens, same logits."
    import minicpm4_core.static_decode as SD
    calls = []
    monkeypatch.setattr(SD, 'capture_graph', lambda fn, state, **k: calls.append(1) or FakeGraph(fn))
    m = model_of(26)
    ids = prompts_of(26, (40,))[0]
    ref = SD.StaticDecoder(m, 64)                                       # eager static-length reference
    dec = SD.StaticDecoder(m, 64, length_mode=mode, min_bucket=8)
    dec.graphs = True                                                   # the CUDA path's logic, fake graphs
    for start in (5, 3):                                                # a second prefill: graphs are reused
        want = [ref.prefill(ids[:start])[-1].clone()]
        got = [dec.prefill(ids[:start])[-1].clone()]
        used = []
        for t in range(start, 40):
            want.append(ref.step(ids[t]).clone()); got.append(dec.step(ids[t]).clone())
            used.append(dec.bucket)
            assert dec.bucket == dec.bucket_for(t + 1) and dec.bucket >= t + 1   # the step at position t sees t+1 slots
            assert mode == 'static' or dec.bucket < 2 * (t + 1) or dec.bucket == 8
        torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-4)
    if mode == 'static':
        assert dec.captures == [64] and len(calls) == 1
    else:
        assert dec.captures == [8, 16, 32, 64] and len(calls) == 4      # one capture per bucket crossed, in order
        assert used[:5] == [8] * 5 and used[5] == 16 and used[-1] == 64  # prefill 3: positions 3..7 -> 8; 8 -> 16


def test_engine_bucket_mode_equals_model():
    m = model_of(27)
    ps = prompts_of(27, (30, 11))
    e = Engine(m, 64, chunk=8, length_mode='bucket', min_bucket=16)
    for p in ps:
        assert e.generate([p], 20, stop_ids=[]) == m.generate([p], 20, stop_ids=[], fast=False)
    assert e._static.buckets == [16, 32, 64] and e._static.bucket == 32


# ---- minicpm4 generate ----

def test_cli_generate(tmp_path, capsys, torch_kernels):
    import json
    from minicpm4_core.cli import main
    from minicpm4_core.frspec import EagleDraft
    from minicpm4_core.model import save_pretrained
    from safetensors.torch import save_file
    m = model_of(30)
    save_pretrained(m, tmp_path / 'm')
    p = prompts_of(30, (14,))[0]
    ids = ','.join(map(str, p))
    assert main(['generate', '--model', str(tmp_path / 'm'), '--prompt-ids', ids, '--max-new-tokens', '9',
                 '--no-stop', '--device', 'cpu', '--json']) == 0
    r = json.loads(capsys.readouterr().out)
    assert r['new_ids'] == m.generate([p], 9, stop_ids=[], fast=False)[0] and r['backend'] == 'static'
    assert main(['generate', '--model', str(tmp_path / 'm'), '--prompt-ids', ids, '--max-new-tokens', '5',
                 '--quant', 'w4a16', '--device', 'cpu', '--no-stop']) == 0
    q = model_of(30)
    Engine(q, 32, quant='w4a16')
    assert capsys.readouterr().out.split() == [str(t) for t in q.generate([p], 5, stop_ids=[], fast=False)[0]]
    torch.manual_seed(31)
    save_file(EagleDraft(m.config).state_dict(), str(tmp_path / 'draft.safetensors'))
    assert main(['generate', '--model', str(tmp_path / 'm'), '--prompt-ids', ids, '--max-new-tokens', '9', '--no-stop',
                 '--device', 'cpu', '--spec', str(tmp_path / 'draft.safetensors'), '--json']) == 0
    r2 = json.loads(capsys.readouterr().out)
    assert r2['new_ids'] == r['new_ids'] and r2['spec_stats']['tokens'] >= 9
    for tree in ('3x2/6', 'chain3'):
        assert main(['generate', '--model', str(tmp_path / 'm'), '--prompt-ids', ids, '--max-new-tokens', '9', '--no-stop',
                     '--device', 'cpu', '--spec', str(tmp_path / 'draft.safetensors'), '--spec-tree', tree,
                     '--draft-window', '8', '--json']) == 0
        assert json.loads(capsys.readouterr().out)['new_ids'] == r['new_ids'], tree
    bad = [(['--prompt', 'hi', '--prompt-ids', '1'], 'exactly one of'),
           (['--prompt-ids', '1,x'], 'integers separated'),
           (['--prompt', 'hello'], 'needs a tokenizer'),
           (['--prompt-ids', '1,2', '--max-new-tokens', '0'], 'max-new-tokens must be >= 1'),
           (['--prompt-ids', '1,200'], 'vocab_size'),
           (['--prompt-ids', '1,2', '--sparse', 'on'], 'sparse=True needs'),
           (['--prompt-ids', '1,2', '--spec', str(tmp_path / 'nope.pt')], 'no draft state dict'),
           (['--prompt-ids', '1,2', '--spec-vocab', 'v.safetensors'], '--spec-vocab needs --spec'),
           (['--prompt-ids', '1,2', '--spec-tree', '3x2'], "--spec-tree must be 'DEPTHxTOPK/SIZE'"),
           (['--prompt-ids', '1,2', '--spec', str(tmp_path / 'draft.safetensors'), '--spec-tree', '3x2/6',
             '--draft-window', '3'], 'draft_window must be None')]
    for extra, msg in bad:
        assert main(['generate', '--model', str(tmp_path / 'm'), '--device', 'cpu', *extra]) == 2, extra
        assert msg in capsys.readouterr().err, (extra, msg)
    assert main(['generate', '--model', str(tmp_path / 'missing'), '--prompt-ids', '1', '--device', 'cpu']) == 2
    assert 'missing' in capsys.readouterr().err
    with pytest.raises(SystemExit): main(['generate', '--model', 'x', '--prompt-ids', '1', '--quant', 'int8'])


def test_cli_plan(tmp_path, capsys):
    """`minicpm4 plan`: a preset or a folder's config.json -> memory_plan's bytes (JSON) and, with --memory,
    max_context's longest context; the text table; bad sizes, folders and arguments end in one line (exit 2)."""
    import json
    from minicpm4_core.cli import _parse_bytes, main
    from minicpm4_core.engine import max_context, memory_plan
    from minicpm4_core.model import save_pretrained
    assert main(['plan', '--model', 'tiny', '--max-len', '256', '--max-batch', '2', '--quant', 'w4a16', '--json']) == 0
    r = json.loads(capsys.readouterr().out)
    want = memory_plan(MiniCPM4Config.tiny(), 256, max_batch=2, dtype=torch.bfloat16, quant='w4a16')
    assert r['plan'] == {**want, 'paths': {str(k): v for k, v in want['paths'].items()}} and want['total'] > 0
    save_pretrained(model_of(33), tmp_path / 'm')
    cfg = MiniCPM4Config.from_pretrained(tmp_path / 'm')
    assert main(['plan', '--model', str(tmp_path / 'm'), '--memory', '3MB', '--spec-vocab', '40', '--dtype', 'float32',
                 '--json']) == 0
    r = json.loads(capsys.readouterr().out)
    assert r['longest_context'] == max_context(cfg, 3e6, dtype=torch.float32, spec_vocab=40) > 0
    assert r['plan']['spec'] > 0 and r['max_len'] == cfg.max_position_embeddings
    assert main(['plan', '--model', 'tiny', '--max-len', '128', '--memory', '1GiB']) == 0
    out = capsys.readouterr().out
    assert 'weights' in out and 'total' in out and 'longest context in 1GiB' in out
    assert (_parse_bytes('24GB'), _parse_bytes('64GiB'), _parse_bytes('8e9'), _parse_bytes('1.5 G')) == \
        (24e9, 64 * 2**30, 8e9, 1.5e9)
    for extra, msg in ((['--memory', 'lots'], '--memory must be a size'), (['--memory', '0GB'], '--memory must be'),
                       (['--memory', '5XB'], '--memory must be'), (['--reserve', '1.5'], '--reserve must be'),
                       (['--spec-vocab', '0'], 'spec_vocab must be')):
        assert main(['plan', '--model', 'tiny', '--max-len', '64', *extra]) == 2, extra
        assert msg in capsys.readouterr().err, extra
    assert main(['plan', '--model', str(tmp_path / 'missing')]) == 2 and 'missing' in capsys.readouterr().err
    with pytest.raises(SystemExit): main(['plan', '--model', 'tiny', '--quant', 'int8'])


def test_cli_generate_text_prompt(tmp_path, capsys):
    "A word-level tokenizer saved beside the model: --prompt TEXT in, decoded text out."
    pytest.importorskip('tokenizers'); pytest.importorskip('transformers')
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from minicpm4_core.cli import main
    from minicpm4_core.model import save_pretrained
    m = model_of(32)
    save_pretrained(m, tmp_path / 'm')
    vocab = {f'w{i}': i for i in range(97)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='w0')); tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk).save_pretrained(tmp_path / 'm')
    assert main(['generate', '--model', str(tmp_path / 'm'), '--prompt', 'w5 w17 w3 w44', '--max-new-tokens', '6',
                 '--no-stop', '--device', 'cpu']) == 0
    want = m.generate([[5, 17, 3, 44]], 6, stop_ids=[], fast=False)[0]
    assert capsys.readouterr().out.split() == [f'w{t}' for t in want]


def test_engine_sparse_dense_uses_the_static_stack():
    "sparse='dense' on an InfLLM v2 model past dense_len: the static stack computes exactly that (dense attention)."
    from minicpm4_core.attention import dense_attention
    s = model_of(33, sparse_config=SPARSE)
    p = prompts_of(33, (30,))[0]
    e = Engine(s, 64, sparse='dense', chunk=8)
    assert e.pick_backend(1) == 'static' and Engine(s, 64, max_batch=2, batch_sparse='eager').pick_backend(2) == 'eager'
    assert Engine(s, 64).sparse_static() and not e.sparse_static()
    with e._mode(): want = s.generate([p], 12, stop_ids=[], fast=False)          # forced dense attention
    assert e.generate([p], 12, stop_ids=[]) == want
    with torch.no_grad(), e._mode(): dense = s(torch.tensor([p]))[0, -1]
    with torch.no_grad(): sparse = s(torch.tensor([p]))[0, -1]
    assert (dense - sparse).abs().max() > 1e-3                                     # the two attentions differ here
    assert e.last_timing['backend'] == 'static' and e.last_timing['decode_steps'] == 11
    assert all(l.self_attn.backend is None for l in s.model.layers)               # restored after the engine ran


# ---- the edge benchmark's entry point (CPU, tiny) ----

def test_edge_bench_main_writes_rows(tmp_path, capsys, torch_kernels):
    import json
    from minicpm4_core.edge_bench import EdgeParams, main
    out = tmp_path / 'eb'
    assert main(['--profile', 'ci', '--out', str(out), '--configs', 'dense-eager,generate,engine-bucket,engine-spec',
                 '--parts', 'decode', '--contexts', '20', '--batches', '1,2', '--set', 'new_tokens=3']) == 0
    res = json.loads((out / 'edge_bench.json').read_text())
    got = {(r['config'], r['batch']): r for r in res['rows']}
    assert set(got) == {(c, b) for c in ('dense-eager', 'generate', 'engine-bucket') for b in (1, 2)}
    assert got[('generate', 1)]['backend'] == 'static' and got[('engine-bucket', 2)]['backend'] == 'static'
    for r in res['rows']:
        assert r['decode_steps'] == 3 and r['ttft_s'] > 0 and r['decode_tok_s'] > 0
        assert r['bytes_per_step'] > 0 and set(r['projection_tok_s']) == {'Jetson AGX Orin', 'RTX 4090'}
    assert any('engine-spec' in n and 'no trained draft' in n for n in res['notes'])
    assert (out / 'edge_bench.png').is_file() and 'dense-eager' in (out / 'table.md').read_text()
    with pytest.raises(ValueError, match='configs: unknown'): EdgeParams(configs='fast').checked()
    with pytest.raises(ValueError, match='unknown edge parameter'): EdgeParams.from_profile('ci', colour='red')
    with pytest.raises(SystemExit): main(['--profile', 'ci', '--out', str(out), '--parts', 'everything'])


def test_edge_bench_bytes():
    "Bytes per decode step: dense reads all KV, InfLLM v2 the attended blocks + compressed keys past dense_len."
    from minicpm4_core.edge_bench import kv_bytes, preset, roofline
    c = preset('minicpm4_8b', 40000)
    assert c.max_position_embeddings == 65536 and c.sparse_config is not None
    per_pos = 2 * 32 * 2 * 128 * 2
    assert kv_bytes(c, 4096, True, 2) == kv_bytes(c, 4096, False, 2) == per_pos * 4096       # below dense_len
    assert kv_bytes(c, 32768, True, 2) == per_pos * (64 + 32) * 64 + per_pos // 2 * 32768 // 16
    r = roofline(dict(batch=4, decode_tok_s=100.0), 1000, 250, copy_GBps=1.0)
    assert r['bytes_per_step'] == 2000 and r['roofline_tok_s'] == 4 * 1e9 / 2000 and r['bytes_per_token'] == 500


def test_model_generate_registers_the_engine_on_import():
    "The model never imports the engine (no import cycle): importing the engine installs it as generate's fast path."
    import subprocess, sys
    code = ("import torch; from minicpm4_core.config import MiniCPM4Config; "
            "from minicpm4_core.model import MiniCPM4ForCausalLM; import minicpm4_core.model as M; "
            "m = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(vocab_size=97, hidden_size=64, num_hidden_layers=1)).eval()\n"
            "try: m.generate([5, 6, 7], 3, fast=True); print('no error')\n"
            "except ValueError as e: print('raised', 'import minicpm4_core.engine' in str(e))\n"
            "print(len(M._FAST_GENERATE)); import minicpm4_core.engine; print(len(M._FAST_GENERATE))\n"
            "print(m.generate([5, 6, 7], 3, fast=True, stop_ids=[]) == m.generate([5, 6, 7], 3, fast=False, stop_ids=[]))")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split('\n')[:4] == ['raised True', '0', '1', 'True'], out.stdout + out.stderr[-2000:]


@pytest.mark.parametrize('quant', ['w4a16', 'ternary'])
def test_static_stack_with_packed_linears_equals_model(quant, torch_kernels):
    "The static stack calls packed modules in place (no fused dense copy): prefill/steps == the packed model's forward."
    from minicpm4_core.static_decode import StaticDecoder
    m = model_of(41 + (quant == 'ternary'))
    eng = Engine(m, 48, quant=quant, chunk=8, backend='static')
    ids = torch.randint(0, m.config.vocab_size, (30,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(): full = m(ids[None])[0]                   # the packed model's own forward
    with eng._mode():
        d = StaticDecoder(m, 48, decode_kernel='dense_decode')     # the GPU's decode attention (torch reference here)
        assert not isinstance(d.stack.p[0]['wqkv'], torch.Tensor)
        pre = d.prefill(ids[:20])
        steps = torch.stack([d.step(int(t)).clone() for t in ids[20:]])
    torch.testing.assert_close(pre, full[:20], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps, full[20:], rtol=1e-4, atol=1e-4)
    assert eng.memory()['static_stack'] == 0                        # nothing fused/allocated before its first use
    assert eng.generate([ids[:20].tolist()], 8, stop_ids=[]) == m.generate([ids[:20].tolist()], 8, stop_ids=[],
                                                                            fast=False)
    assert eng.last_timing['backend'] == 'static'


@pytest.mark.parametrize('kernel', ['sdpa', 'dense_decode'])
def test_batch_static_decode_equals_model(kernel, torch_kernels):
    "Batch 3 of different lengths through BatchStaticDecoder (masked SDPA / dense_decode per-row lengths) == the model."
    m = model_of(51)
    ps = prompts_of(51, (23, 5, 16))
    eng = Engine(m, 40, max_batch=3, chunk=6, decode_kernel=kernel)
    assert eng.pick_backend(3) == 'static'
    ref = m.generate(ps, 12, stop_ids=[], fast=False)
    assert eng.generate(ps, 12, stop_ids=[]) == ref
    assert eng.last_timing['backend'] == 'static' and eng._batch.stack.split_decode == (kernel == 'dense_decode')
    assert [int(x) for x in eng._batch.pos] == [len(p) + 11 for p in ps]    # each row at its own length
    if kernel == 'dense_decode': return                  # the Triton interpreter (conftest) is slow: once is enough
    assert eng.generate(ps[:2], 12, stop_ids=[]) == ref[:2] and eng._batch.B == 2     # a new size: a new decoder
    stop = ref[1][3]
    assert eng.generate(ps, 12, stop_ids=[stop]) == m.generate(ps, 12, stop_ids=[stop], fast=False)
    q = model_of(52)
    e4 = Engine(q, 40, max_batch=2, quant='w4a16', decode_kernel=kernel)   # packed linears, batched
    assert e4.generate(ps[:2], 6, stop_ids=[]) == q.generate(ps[:2], 6, stop_ids=[], fast=False)


# ---- session 5: the spec part (a trained pair, CPU smoke) and the prefill part of the edge benchmark ----

def test_edge_bench_spec_part_smoke(torch_kernels):
    "Train a tiny target and its draft for seconds, then the engine with / without FR-Spec: fp32 greedy is identical."
    from minicpm4_core.edge_bench import SPEC_CONFIGS, SpecParams, run_spec
    sp = SpecParams.smoke(corpus='embedded', train_s=2.0, draft_s=1.5, distill_prompts=8, prompts=2, new=10)
    rec = run_spec(sp, 'cpu', log=lambda s: None)
    t, d = rec['target'], rec['draft']
    assert t['steps'] >= 2 and t['loss_last'] < t['loss_first'] and d['loss_last'] < d['loss_first']
    assert rec['corpus']['k'] == sp.k and 0 < rec['corpus']['k_coverage'] <= 1 and 'embedded' in rec['corpus']['source']
    assert [r['name'] for r in rec['rows']] == ['plain'] + [c[0] for c in SPEC_CONFIGS]
    for r in rec['rows']:
        assert r['identical'] == 2 and r['tok_s'] > 0 and r['mean_accept_length'] >= 1.0   # fp32: speculation is exact
    assert rec['rows'][0]['speedup'] == 1.0 and rec['rows'][0]['mean_accept_length'] == 1.0
    assert max(r['mean_accept_length'] for r in rec['rows'][1:]) > 1.0                 # the draft guesses something
    assert d['rows'] == [sp.distill_prompts, sp.prompt_len + sp.distill_new]
    assert all(r['tokens'] == 1.0 and r['prefix'] == 1.0 for r in rec['rows']) and 0 < rec['rows'][0]['distinct4'] <= 1
    assert [r['identical'] for r in rec['fp32_check']] == [2, 2, 2] and rec['loop_vs_engine']['identical'] == 2
    r4 = rec['int4_rows']                                # the target packed to w4a16: the int4 engine, then int4 + spec
    assert len(r4) == 2 and r4[0]['name'] == 'int4 plain' and r4[1]['name'].startswith('int4 ')
    assert r4[1]['identical'] == 2 and r4[1]['mean_accept_length'] >= 1.0 and 'int4_note' not in rec


def test_agreement_and_distinct_ngrams():
    from minicpm4_core.edge_bench import agreement, distinct_ngrams
    a = agreement([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert a == dict(identical=1, tokens=7 / 8, prefix=6 / 8, first_diff=[2])
    assert distinct_ngrams([[1, 2, 1, 2, 1, 2]], 2) == 2 / 5 and distinct_ngrams([[1, 2, 3, 4, 5]], 4) == 1.0


def test_edge_bench_prefill_part_and_spec_overrides():
    from minicpm4_core.edge_bench import EdgeParams, run_prefill
    p = EdgeParams(prefill_contexts='80,150', chunk=32).checked()
    rows, notes = run_prefill(p)
    assert notes == [] and [(r['context'], r['attention']) for r in rows] == [(80, 'sparse'), (80, 'dense'),
                                                                             (150, 'sparse'), (150, 'dense')]
    for s, d in zip(rows[::2], rows[1::2]):
        assert s['speedup_vs_dense'] == pytest.approx(d['seconds'] / s['seconds']) and s['tok_s'] > 0
    assert EdgeParams(spec='train_s=7,corpus=embedded').spec_params().train_s == 7
    assert EdgeParams(spec='train_s=7', device='cuda').spec_params().shape == 'minicpm4_0_5b'
    with pytest.raises(ValueError, match='spec: expected'): EdgeParams(spec='colour=red').checked()


def test_engine_sparse_route_on_the_triton_kernels(monkeypatch):
    "The GPU's kernels (Triton interpreter): prefill, dense_decode below the switch, decode_step after == model's tokens."
    from minicpm4_core import infllmv2
    from minicpm4_core.kernels import sparse as sk
    if not sk.interpreter_active(): pytest.skip("triton imported before TRITON_INTERPRET was set")
    sc = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4, dense_len=48)
    m = model_of(61, sparse_config=sc, num_hidden_layers=1)
    ids = prompts_of(61, (90,))[0]
    ref = m.generate([ids], 10, stop_ids=[], fast=False)                  # the torch reference path
    calls = []
    for name in ('decode_step', 'dense_decode'):
        real = getattr(sk, name)
        monkeypatch.setattr(sk, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    monkeypatch.setattr(infllmv2, 'SPARSE_IMPL', 'triton')
    e = Engine(m, 128, chunk=32)
    assert e.generate([ids], 10, stop_ids=[]) == ref and e._sparse_dec is not None
    assert calls.count('decode_step') >= 1 and calls.count('dense_decode') >= 1 and len(calls) == 9   # 9 steps


# ---- session 6: the loop without a host read per token, fused packed q|k|v / gate|up, the one-call edge sweep ----

def test_loop_reads_the_device_rarely_and_keeps_the_output(monkeypatch):
    """Greedy decoding reads the device at the first and last step only without stop ids, every sync_every steps with
    them; the output (stops, padding of a batch) is the model's own loop's whatever sync_every."""
    m = model_of(62)
    ps = prompts_of(62, (19, 7))
    ref = m.generate(ps, 14, stop_ids=[], fast=False)
    stop = [ref[0][3], ref[1][0]]                            # row 1 stops at once, row 0 at its 4th token
    want = m.generate(ps, 14, stop_ids=stop, fast=False)
    assert [len(r) for r in want] == [4, 1] and ref[0][:3] != [ref[0][3]] * 3
    import minicpm4_core.engine as E
    reads = []
    real = E._check_flags
    monkeypatch.setattr(E, '_check_flags', lambda fin, step: (reads.append(step), real(fin, step))[1])
    for every in (1, 3, 16):
        eng = Engine(m, 40, max_batch=2, sync_every=every)
        assert eng.generate(ps, 14, stop_ids=stop) == want
        reads.clear()
        assert eng.generate(ps, 14, stop_ids=[]) == ref
        assert reads == [0, 13]                              # no stop ids: the first and the last step only
        reads.clear()
        eng.generate(ps, 14, stop_ids=[-1])                  # a stop that never comes: a read every `every` steps
        assert reads == sorted({s for s in range(14) if s % every == 0} | {13})
    with pytest.raises(ValueError, match='sync_every'): Engine(m, 40, sync_every=0)


def test_loop_names_the_first_non_finite_step(monkeypatch):
    "Logits turning NaN at a late step still raise NonFiniteError, naming that step (read at the next host check)."
    from minicpm4_core.checks import NonFiniteError
    from minicpm4_core.static_decode import StaticDecoder
    m = model_of(62)
    real = StaticDecoder.step
    def step(self, token):
        out = real(self, token)
        if self.n == 30: out.fill_(float('nan'))           # the logits of the 5th step after a 25-token prompt
        return out
    monkeypatch.setattr(StaticDecoder, 'step', step)
    eng = Engine(m, 48)
    p = prompts_of(62, (25,))[0]
    with pytest.raises(NonFiniteError, match='engine step 5'): eng.generate([p], 12, stop_ids=[])
    with pytest.raises(NonFiniteError, match='engine step 5'): eng.generate([p], 12, stop_ids=[-1])
    assert len(eng.generate([p], 5, stop_ids=[])[0]) == 5                    # before it: fine


def test_fused_packed_linears(torch_kernels):
    "w4a16 q|k|v and gate|up become one packed module each: the same outputs as unfused, refreshed in place."
    from minicpm4_core import static_decode as S
    from minicpm4_core.engine import convert_quant
    m = model_of(63)
    convert_quant(m, 'w4a16')
    p = S.prep_layer(m.model.layers[0])
    assert type(p['wqkv']).__name__ == 'QuantLinear' and p['wqkv'].out_features == 64 + 2 * 32
    assert p['wgu'].out_features == 2 * 128 and p['wo'] is m.model.layers[0].self_attn.o_proj
    x = torch.randn(3, 64)
    a = m.model.layers[0].self_attn
    torch.testing.assert_close(p['wqkv'](x), torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1))
    ids = prompts_of(63, (20,))[0]
    d1 = S.StaticDecoder(m, 40)
    S_old = S.FUSE_PACKED
    try:
        S.FUSE_PACKED = False
        d0 = S.StaticDecoder(m, 40)
    finally:
        S.FUSE_PACKED = S_old
    assert isinstance(d0.stack.p[0]['wqkv'], tuple)
    torch.testing.assert_close(d1.prefill(ids), d0.prefill(ids))
    assert d1.generate(ids, 6) == d0.generate(ids, 6) == m.generate([ids], 6, stop_ids=[], fast=False)[0]
    with torch.no_grad(): a.k_proj.scales.mul_(2.0)                     # an in-place change of the model's module
    d1.refresh()
    torch.testing.assert_close(d1.stack.p[0]['wqkv'](x)[:, 64:96], a.k_proj(x))
    eng = Engine(m, 40)
    eng.generate([ids], 3, stop_ids=[])
    # SHARE_WEIGHTS: the fused buffers are the model's own (column views of them), so no copy is counted beside the K/V
    own = {b.untyped_storage()._cdata for b in m.buffers() if b is not None}
    assert all(b.untyped_storage()._cdata in own for p in eng._static.stack.p for k in ('wqkv', 'wgu')
               for b in p[k].buffers() if b is not None)
    assert eng.memory()['static_stack'] == eng._static.stack.kv.numel() * eng._static.stack.kv.element_size()


def test_edge_grid_budget_and_prefill_rows():
    "grid picks each configuration's rows; a row that cannot fit the budget is skipped with a note; prefill rows from decode."
    from minicpm4_core.edge_bench import EdgeParams, prefill_from_decode, run
    with pytest.raises(ValueError, match='grid'): EdgeParams(grid='fast=40/1').checked()
    with pytest.raises(ValueError, match='grid'): EdgeParams(grid='engine-dense=40/x').checked()
    p = EdgeParams(contexts='40,80,120', batches='1,2', new_tokens=3, chunk=32, parts='decode',
                   configs='engine-dense,engine-sparse,dense-eager,hf-compile',
                   grid='engine-dense=all/1+40/2;engine-sparse=40,80,120/1,2;tiny:dense-eager=80/2;hf-compile=40/1').checked()
    assert p.cells('tiny', 'engine-dense') == [(40, 1), (80, 1), (120, 1), (40, 2)]
    assert p.cells('tiny', 'dense-eager') == [(80, 2)] and p.cells('other', 'dense-eager') == p.cells('x', 'engine-bucket')
    q = EdgeParams(grid='tiny:hf-compile=none;hf-compile=40/1').checked()
    assert q.cells('tiny', 'hf-compile') == [] and q.cells('big', 'hf-compile') == [(40, 1)]
    import minicpm4_core.edge_bench as EB
    EB_est = EB.HF_COMPILE_EST_S
    try:
        EB.HF_COMPILE_EST_S = 1e6                       # a compile that cannot fit: skipped, with a note
        p.budget_s = 1e5
        res = run(p)
    finally:
        EB.HF_COMPILE_EST_S = EB_est
    got = [(r['config'], r['context'], r['batch']) for r in res['rows']]
    assert got == [('engine-dense', 40, 1), ('engine-dense', 80, 1), ('engine-dense', 120, 1), ('engine-dense', 40, 2),
                   ('engine-sparse', 80, 1), ('engine-sparse', 80, 2), ('engine-sparse', 120, 1), ('engine-sparse', 120, 2),
                   ('dense-eager', 80, 2)]   # dense_len = 64; sparse batch rows through the batched sparse decoder
    assert all(r['backend'] == 'static' for r in res['rows'] if r['config'] == 'engine-sparse')
    # engine rows say what the engine holds (its memory(): weights + the K/V pool sized for the grid's longest row)
    held = {r['config']: r['held_bytes'] for r in res['rows'] if r['config'].startswith('engine')}
    assert held['engine-sparse'] > held['engine-dense'] > 0 and 'held_bytes' not in res['rows'][-1]
    assert any('hf-compile' in n and 'skipped' in n for n in res['notes'])
    assert any('engine-sparse' in n and 'below dense_len' in n for n in res['notes'])
    assert [(r['context'], r['attention']) for r in res['prefill_rows']] == [(80, 'sparse'), (80, 'dense'),
                                                                            (120, 'sparse'), (120, 'dense')]
    s, d = res['prefill_rows'][:2]
    assert s['speedup_vs_dense'] == pytest.approx(d['seconds'] / s['seconds']) and s['setup_s'] >= 0
    assert all(r['prefill_s'] <= r['ttft_s'] for r in res['rows'] if r['config'] != 'dense-eager')
    assert prefill_from_decode([]) == []
    import minicpm4_core.static_decode as SD                # the run records which library paths it measured
    assert res['paths']['static_decode.PREFILL_ATTN'] == SD.PREFILL_ATTN and 'w4a16.SKINNY_MAX_M' in res['paths']


def test_edge_goal_lines():
    "Each goal's number from one run's rows, with its verdict; absent rows say 'not measured'."
    from minicpm4_core.edge_bench import goal_lines
    row = lambda shape, cfg, ctx, tps, B=1, **kw: dict(shape=shape, config=cfg, context=ctx, batch=B, decode_tok_s=tps, **kw)
    res = dict(rows=[row('minicpm4_8b', 'engine-dense', 4096, 200.0, roofline_fraction=0.85),
                     row('minicpm4_8b', 'hf-static', 4096, 20.0), row('minicpm4_8b', 'hf-compile', 4096, 100.0),
                     row('minicpm4_8b', 'generate', 4096, 190.0), row('minicpm4_8b', 'hf-static', 16384, 50.0),
                     row('minicpm4_8b', 'engine-dense', 131072, 160.0),
                     row('minicpm4_8b', 'engine-sparse-int4', 131072, 240.0)],
               kernel_rows=[dict(kernel='w4a16 gemv (default)', M=1, ratio=1.6)],
               prefill_rows=[dict(shape='minicpm4_8b', context=131072, attention='sparse', speedup_vs_dense=1.5)],
               spec=dict(rows=[dict(name='plain', speedup=1.0), dict(name='tree', speedup=2.2, mean_accept_length=5.0)]),
               seconds=dict(total=480.0))
    g = {l.split(':')[0]: l for l in goal_lines(res)}
    assert g['goal minicpm4_8b model.generate / best transformers (worst of 1 rows)'].endswith('met at ctx 4096 B=1')
    assert '1.90' in g['goal minicpm4_8b model.generate / best transformers (worst of 1 rows)']   # vs the compiled one
    assert g['goal minicpm4_8b engine-dense roofline fraction at 4K'].endswith('met')
    assert g['goal minicpm4_0_5b engine-dense roofline fraction at 4K'].endswith('not measured')
    assert '1.50 (goal >= 3.0) MISSED' in g['goal 8B 128K sparse+int4 / engine-dense']
    assert '4.80 (goal >= 4.0) met (transformers measured up to 16384' in g['goal 8B 128K sparse+int4 / transformers']
    assert 'MISSED' in g['goal W4A16 GEMV M=1 vs bf16'] and 'not measured' in g['goal ternary GEMV M=1 vs bf16']
    assert '2.20 (goal >= 2.0) met (tree, accept 5.00)' in g['goal FR-Spec on the trained 0.5B pair / the same engine without speculation']
    assert g['goal the whole sweep in one call (< 600 s)'].endswith('met')


@pytest.mark.parametrize('quant', ['w4a16', 'ternary'])
def test_frspec_over_a_packed_target(quant, torch_kernels):
    "FR-Spec in the engine over packed linears (the static stack calls them; the draft reads the dense head): greedy =="
    from minicpm4_core.frspec import EagleDraft, frequent_ids
    m = model_of(71, sparse_config=dict(SPARSE, dense_len=256))      # InfLLM v2 on, contexts below dense_len
    torch.manual_seed(71)
    draft = EagleDraft(m.config).eval()
    vocab = frequent_ids(torch.rand(97), 48, force_ids=[2])
    p = prompts_of(71, (12,))[0]
    spec = Engine(m, 96, quant=quant, spec=(draft, vocab), spec_kw=dict(depth=3, topk=3, tree_size=8))
    assert spec.quant == quant and spec.n_quant == 14
    ref = m.generate([p], 20, stop_ids=[], fast=False)                  # the packed model's own loop
    assert spec.generate([p], 20, stop_ids=[]) == ref == Engine(m, 96).generate([p], 20, stop_ids=[])
    assert spec.spec_stats['tokens'] >= 20


@pytest.mark.parametrize('quant', [None, 'w4a16'])
def test_frspec_over_a_sparse_target_past_dense_len(quant, torch_kernels, capsys):
    """FR-Spec in the engine over an InfLLM v2 target that goes sparse (dense_len 16 < a 20-token prompt + 20 new) with
    kernel_stride 2 < depth + 1: the static verification (sparse_spec.SparseFastSpec, tests/test_sparse_spec.py) refuses,
    so EagerSpec verifies each tree through the model's forward, saying why; greedy == the model's own loop."""
    from minicpm4_core.engine import EagerSpec
    from minicpm4_core.frspec import EagleDraft, frequent_ids
    m = model_of(72, sparse_config=SPARSE)
    torch.manual_seed(72)
    draft = EagleDraft(m.config).eval()
    vocab = frequent_ids(torch.rand(97), 48, force_ids=[2])
    p = prompts_of(72, (20,))[0]
    eng = Engine(m, 96, quant=quant, spec=(draft, vocab), spec_kw=dict(depth=3, topk=3, tree_size=8))
    assert isinstance(eng.spec, EagerSpec) and eng.quant == quant
    assert 'eager, no graphs): depth=3: a path of depth + 1 = 4 tokens' in capsys.readouterr().out
    ref = m.generate([p], 20, stop_ids=[], fast=False)
    assert eng.generate([p], 20, stop_ids=[]) == ref
    st = eng.spec_stats
    assert st['tokens'] == 20 and st['path'] == 'eager' and 1 <= st['rounds'] <= 19 and st['mean_accept_length'] >= 1
    with pytest.raises(ValueError, match=r"spec_kw: unknown \['share'\]"):
        Engine(m, 96, spec=(draft, vocab), spec_kw=dict(share=None))
    with pytest.raises(ValueError, match='prompt \\+ max_new_tokens \\+ draft tree'):
        eng.generate([p], 70, stop_ids=[])


@pytest.mark.parametrize('sparse', [False, True])
@pytest.mark.parametrize('quant', [None, 'w4a16', 'ternary'])
def test_memory_plan_equals_what_the_engine_holds(sparse, quant, torch_kernels):
    """`memory_plan` (the meta device: nothing allocated) == `Engine.memory` of a real engine after a batch-1 and a
    batch-3 generation, byte for byte, dense / InfLLM v2 past dense_len x bf16 / w4a16 / ternary; `max_context` finds
    the longest max_len whose plan fits a budget (and 0 when nothing does)."""
    from minicpm4_core.engine import max_context, memory_plan
    cfg = MiniCPM4Config.tiny(**{**TINY, 'max_position_embeddings': 512}, sparse_config=SPARSE if sparse else None)
    plan = memory_plan(cfg, 96, max_batch=3, dtype=torch.float32, quant=quant)
    torch.manual_seed(0)
    e = Engine(MiniCPM4ForCausalLM(cfg).eval(), 96, max_batch=3, quant=quant)
    ps = prompts_of(3, (30, 21, 9))
    e.generate(ps[:1], 4, stop_ids=[]); e.generate(ps, 4, stop_ids=[])
    mem = e.memory()
    assert plan['paths'] == {1: e.pick_backend(1), 3: e.pick_backend(3)}
    assert (plan['weights'], plan['static']) == (mem['weights'], mem['static_stack']) and plan['static'] > 0
    assert plan['total'] == plan['weights'] + plan['static'] + plan['eager_kv']
    B = plan['total'] / 0.9 + 1                                  # bytes whose 90% just hold the plan at 96
    n = max_context(cfg, B, step=32, max_batch=3, dtype=torch.float32, quant=quant)
    total = lambda L: memory_plan(cfg, L, max_batch=3, dtype=torch.float32, quant=quant)['total']
    assert 96 <= n < 512 and total(n) <= 0.9 * B < total(n + 32)
    assert max_context(cfg, 1000, step=32, dtype=torch.float32, quant=quant) == 0
    with pytest.raises(ValueError, match='memory_bytes must be > 0'): max_context(cfg, 0)
    with pytest.raises(ValueError, match='quant must be'): memory_plan(cfg, 96, quant='int8')


@pytest.mark.parametrize('sparse,quant', [(False, None), (False, 'w4a16'), (True, None), (True, 'ternary')])
def test_memory_plan_with_a_spec_draft(sparse, quant, torch_kernels):
    """`memory_plan(spec_vocab=k)` == `Engine.memory` of a real FR-Spec engine (FastSpec, or SparseFastSpec past
    dense_len) after a generation, byte for byte: the static target, the draft's weights / K/V and its head's k rows;
    the full head (k = vocab) adds no rows; bad spec_vocab named."""
    from minicpm4_core.engine import memory_plan
    from minicpm4_core.frspec import EagleDraft
    cfg = MiniCPM4Config.tiny(**{**TINY, 'max_position_embeddings': 512}, sparse_config=SPARSE if sparse else None)
    kw = dict(depth=1, topk=3, tree_size=3) if sparse else dict(depth=3, topk=3, tree_size=8)  # static sparse: depth < stride
    torch.manual_seed(1)
    m = MiniCPM4ForCausalLM(cfg).eval()
    e = Engine(m, 96, quant=quant, spec=(EagleDraft(cfg).eval(), torch.arange(5, 45)), spec_kw=kw)
    e.generate(prompts_of(5, (30,)), 6, stop_ids=[])
    mem = e.memory()
    plan = memory_plan(cfg, 96, dtype=torch.float32, quant=quant, spec_vocab=40, spec_kw=kw)
    assert type(e.spec).__name__ == ('SparseFastSpec' if sparse else 'FastSpec') and plan['paths'] == {1: 'spec'}
    assert (plan['weights'], plan['static'], plan['spec']) == (mem['weights'], mem['static_stack'], mem['spec'])
    assert plan['total'] == plan['weights'] + plan['spec'] and plan['spec'] > e.spec.t.stack.kv.untyped_storage().nbytes()
    full = memory_plan(cfg, 96, dtype=torch.float32, quant=quant, spec_vocab=cfg.vocab_size, spec_kw=kw)
    assert full['spec'] == plan['spec'] - 40 * cfg.hidden_size * 4    # the full head is the target's own (no gathered rows)
    for bad in (0, cfg.vocab_size + 1, 2.5, True):
        with pytest.raises(ValueError, match='spec_vocab must be'): memory_plan(cfg, 96, spec_vocab=bad)


def test_fused_weights_are_stored_once(tmp_path, monkeypatch):
    """SHARE_WEIGHTS: the static stacks' dense q|k|v and gate|up are the model's weights (views of one buffer, shared by
    every decoder), counted once by `memory`; an in-place update of a weight reaches the engine with no refresh;
    model.generate's fast path keeps its engine; the model still saves and loads. SHARE_WEIGHTS off: separate copies."""
    import minicpm4_core.static_decode as SD
    from minicpm4_core.model import load_pretrained, save_pretrained
    m = model_of(40)
    a, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    ps = prompts_of(41, (19, 11))
    eng = Engine(m, 48, max_batch=2)
    eng.generate(ps[:1], 4, stop_ids=[]); eng.generate(ps, 4, stop_ids=[])
    for d in (eng._static, eng._batch):
        p = d.stack.p[0]
        assert p['wqkv'].data_ptr() == a.q_proj.weight.data_ptr() and p['wgu'].data_ptr() == mlp.gate_proj.weight.data_ptr()
    q = a.q_proj.weight
    assert a.k_proj.weight.data_ptr() == q.data_ptr() + q.numel() * q.element_size()      # back to back
    mem = eng.memory()
    assert mem['static_stack'] == eng._kv_pool.numel() * eng._kv_pool.element_size()     # the decoders' one K/V pool
    with torch.no_grad(): a.k_proj.weight.mul_(1.5); mlp.up_proj.weight.add_(0.05)   # as an optimizer step would
    assert eng.generate(ps[:1], 6, stop_ids=[]) == m.generate(ps[:1], 6, stop_ids=[], fast=False)
    assert m.generate(ps[:1], 5, stop_ids=[], fast=True) == m.generate(ps[:1], 5, stop_ids=[], fast=False)
    slot = m.__dict__['_engine_fast']
    first = slot.engine
    assert m.generate(ps[:1], 5, stop_ids=[], fast=True) == m.generate(ps[:1], 5, stop_ids=[], fast=False)
    assert slot.engine is first                                       # the shared weights did not look like a new model
    save_pretrained(m, tmp_path / 'm')
    m2 = load_pretrained(tmp_path / 'm')
    assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), m2.state_dict().values()))
    monkeypatch.setattr(SD, 'SHARE_WEIGHTS', False)
    m3 = model_of(42)
    e3 = Engine(m3, 48)
    e3.generate(ps[:1], 3, stop_ids=[])
    assert e3._static.stack.p[0]['wqkv'].data_ptr() != m3.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert e3.memory()['static_stack'] > e3._static.stack.kv.numel() * e3._static.stack.kv.element_size()


def test_packed_weights_are_stored_once(tmp_path, torch_kernels, monkeypatch):
    """SHARE_WEIGHTS with w4a16: the model's q|k|v and gate|up packed buffers become column views of the static stack's
    fused modules (one storage, counted once by `memory` and by `memory_plan`); a later batched decoder takes a view of
    the same buffers; the engine still gives the model's own tokens; the quantized model saves (each view written
    alone) and loads. SHARE_WEIGHTS off: a fused copy beside the model's buffers, as before."""
    import minicpm4_core.static_decode as SD
    from minicpm4_core.engine import memory_plan
    from minicpm4_core.pgptq import load_quantized, quantize_model, save_quantized
    ps = prompts_of(47, (19, 11))
    calib = torch.tensor([ps[0][:16], ps[0][3:19]])
    m, _ = quantize_model(model_of(46), calib, method='rtn', group_size=-1, progress=False)
    ref = m.generate(ps[:1], 5, stop_ids=[], fast=False)
    a, mlp = m.model.layers[1].self_attn, m.model.layers[1].mlp
    qbytes = a.q_proj.qweight.untyped_storage().nbytes()
    eng = Engine(m, 48, max_batch=2)
    assert eng.generate(ps[:1], 5, stop_ids=[]) == ref
    eng.generate(ps, 4, stop_ids=[])
    for d in (eng._static, eng._batch):
        f = d.stack.p[1]['wqkv']
        assert not f._fused_copy and f.qweight.data_ptr() == a.q_proj.qweight.data_ptr()
        assert d.stack.p[1]['wgu'].scales.data_ptr() == mlp.gate_proj.scales.data_ptr()
    q, k = a.q_proj.qweight, a.k_proj.qweight
    assert q.stride(0) == f.out_features and k.data_ptr() == q.data_ptr() + q.shape[1] * q.element_size()
    assert q.untyped_storage().nbytes() > qbytes                        # q|k|v's storage, not q's alone
    mem = eng.memory()
    assert mem['static_stack'] == eng._kv_pool.numel() * eng._kv_pool.element_size()
    plan = memory_plan(m.config, 48, max_batch=2, dtype=torch.float32, quant='w4a16')
    assert plan['weights'] == mem['weights'] and plan['static'] == mem['static_stack']
    assert m.generate(ps[:1], 5, stop_ids=[], fast=False) == ref         # the model's own layers on the views
    save_quantized(m, tmp_path / 'q')
    m2 = load_quantized(tmp_path / 'q')
    assert all(torch.equal(x, y) for x, y in zip(m.state_dict().values(), m2.state_dict().values()))
    assert m2.model.layers[1].self_attn.q_proj.qweight.is_contiguous()
    assert Engine(m2, 48).generate(ps[:1], 5, stop_ids=[]) == ref
    monkeypatch.setattr(SD, 'SHARE_WEIGHTS', False)
    m3, _ = quantize_model(model_of(46), calib, method='rtn', group_size=-1, progress=False)
    e3 = Engine(m3, 48)
    assert e3.generate(ps[:1], 5, stop_ids=[]) == ref
    assert e3._static.stack.p[1]['wqkv']._fused_copy
    assert e3.memory()['static_stack'] > e3._static.stack.kv.numel() * e3._static.stack.kv.element_size()


@pytest.mark.parametrize('sparse', [False, True])
def test_static_decoders_share_one_kv_pool(sparse):
    """max_batch > 1: the batch-1 and the batched static decoders (StaticDecoder / BatchStaticDecoder, or the InfLLM v2
    ones past dense_len) take their K/V from one pool of max_batch rows, counted once; alternating batch sizes (1, 3, 2,
    1) still gives the model's own tokens each time (each generation prefills its rows anew); max_batch 1: no pool.
    A buffer of the wrong shape is refused, naming kv."""
    from dataclasses import replace
    from minicpm4_core.static_decode import StaticStack
    m = model_of(48 + sparse, sparse_config=SPARSE if sparse else None)
    ps = prompts_of(49, (30, 21, 19))
    eng = Engine(m, 48, max_batch=3)
    for rows in (ps[:1], ps, ps[1:], ps[2:]):
        assert eng.generate(rows, 6, stop_ids=[]) == m.generate(rows, 6, stop_ids=[], fast=False), len(rows)
    one, many = (eng._sparse_dec, eng._bsparse) if sparse else (eng._static, eng._batch)
    kv1, kvb = (d.base.stack.kv if sparse else d.stack.kv for d in (one, many))
    pool = eng._kv_pool
    assert pool.shape[:3] == (2, 3, 48) and many.B == 2
    assert kv1.data_ptr() == kvb.data_ptr() == pool.data_ptr() and kv1.untyped_storage()._cdata == pool.untyped_storage()._cdata
    kc = sum(d.kc.untyped_storage().nbytes() + (d.ring.untyped_storage().nbytes() if d.ring is not None else 0)
             for d in (one, many)) if sparse else 0
    assert eng.memory()['static_stack'] == pool.untyped_storage().nbytes() + kc
    solo = Engine(m, 48)
    assert solo.generate(ps[:1], 6, stop_ids=[]) == eng.generate(ps[:1], 6, stop_ids=[]) and solo._kv_pool is None
    with pytest.raises(ValueError, match='kv must be'):
        StaticStack(m.model.layers, replace(m.config, sparse_config=None), 48, 'cpu', m.dtype, kv=torch.zeros(2, 40, 4, 16))


def test_training_after_the_engine_shares_the_weights():
    """A training step on a model whose q|k|v / gate|up are views of the engine's fused tensors: gradients reach those
    parameters, the optimizer's update reaches the engine (no refresh), and a deep copy is independent of the original."""
    import copy
    m = model_of(43).train()
    p = prompts_of(44, (17,))[0]
    eng = Engine(m, 40)
    eng.generate([p], 3, stop_ids=[])
    q = m.model.layers[0].self_attn.q_proj.weight
    assert q.data_ptr() == eng._static.stack.p[0]['wqkv'].data_ptr()
    twin = copy.deepcopy(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m(torch.tensor([p]))[0].float().logsumexp(-1).mean().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    opt.step()
    m.eval()
    assert eng.generate([p], 6, stop_ids=[]) == m.generate([p], 6, stop_ids=[], fast=False)
    assert not torch.equal(twin.model.layers[0].self_attn.q_proj.weight, q)            # the copy kept its own values
    assert twin.generate([p], 6, stop_ids=[], fast=False) == Engine(twin, 40).generate([p], 6, stop_ids=[])
