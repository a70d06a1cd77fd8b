import json
import math

import pytest
import torch
import torch.nn.functional as F

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import (MiniCPM4ForCausalLM, load_pretrained, save_pretrained, count_parameters,
                                 rope_cos_sin, apply_rope, sample_next, KVCache)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = MiniCPM4Config.tiny(**kw)
    m = MiniCPM4ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so that every weight matters
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"): p.uniform_(0.5, 1.5)
    return m


def hand_params(c, tied):
    H, D, L = c.hidden_size, c.head_dim, c.num_hidden_layers
    per_layer = H * c.num_attention_heads * D * 2 + 2 * H * c.num_key_value_heads * D + 3 * H * c.intermediate_size + 2 * H
    return c.vocab_size * H * (1 if tied else 2) + L * per_layer + H


def test_parameter_counts_of_released_shapes():
    c05, c8 = MiniCPM4Config.minicpm4_0_5b(), MiniCPM4Config.minicpm4_8b()
    n05, n8 = count_parameters(c05), count_parameters(c8)
    assert n05 == hand_params(c05, tied=True) and n8 == hand_params(c8, tied=False)
    assert abs(n05 / 0.434e9 - 1) < 0.01   # MiniCPM4-0.5B: 0.43B with tied embeddings
    assert abs(n8 / 8.19e9 - 1) < 0.01     # MiniCPM4-8B: ~8.2B


def hf_names(c):
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(c.num_hidden_layers):
        names |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        names |= {f"model.layers.{i}.{n}_layernorm.weight" for n in ("input", "post_attention")}
    if not c.tie_word_embeddings: names.add("lm_head.weight")
    return names


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", ["2GB", "300KB"])
def test_hf_round_trip(tmp_path, tied, shard):
    from minicpm4_core.model import load_state_dict_files
    m = make_model(tie_word_embeddings=tied)
    save_pretrained(m, tmp_path, max_shard_size=shard)
    sd = load_state_dict_files(tmp_path)
    assert set(sd) == hf_names(m.config)
    if shard == "300KB":
        idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(idx["weight_map"]) == set(sd) and len(set(idx["weight_map"].values())) > 1
    m2 = load_pretrained(tmp_path)
    ids = torch.randint(0, m.config.vocab_size, (2, 19))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    assert (m2.lm_head.weight is m2.model.embed_tokens.weight) == tied


def test_load_reports_missing_and_unexpected(tmp_path):
    from safetensors.torch import save_file
    from minicpm4_core.model import load_state_dict_files
    m = make_model()
    save_pretrained(m, tmp_path)
    sd = load_state_dict_files(tmp_path)
    sd.pop("model.layers.1.mlp.up_proj.weight")
    sd["model.layers.9.extra.weight"] = torch.ones(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['model.layers.1.mlp.up_proj.weight'\].*unexpected keys "
                                         r"\['model.layers.9.extra.weight'\]"):
        load_pretrained(tmp_path)


def test_logits_follow_mup_formulas_by_hand():
    m = make_model(tie_word_embeddings=False, num_hidden_layers=2, scale_emb=7.0, scale_depth=2.1, dim_model_base=16)
    c = m.config
    ids = torch.randint(0, c.vocab_size, (2, 13))
    T = ids.shape[1]

    def rms(x, w): return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)
    # RoPE by hand, pair (i, i + D/2) rotated by pos * theta^(-2i/D)
    D = c.head_dim
    inv = c.rope_theta ** (-torch.arange(0, D, 2).double() / D)
    ang = torch.arange(T).double()[:, None] * inv[None]

    def rope(x):  # x (B, T, h, D)
        x1, x2 = x[..., : D // 2].double(), x[..., D // 2:].double()
        cs, sn = ang.cos()[None, :, None], ang.sin()[None, :, None]
        return torch.cat([x1 * cs - x2 * sn, x2 * cs + x1 * sn], -1).float()

    h = m.model.embed_tokens.weight[ids] * 7.0
    r = 2.1 / math.sqrt(2)
    for L in m.model.layers:
        a, x = L.self_attn, rms(h, L.input_layernorm.weight)
        q = rope((x @ a.q_proj.weight.T).view(2, T, 4, D))
        k = rope((x @ a.k_proj.weight.T).view(2, T, 2, D))
        v = (x @ a.v_proj.weight.T).view(2, T, 2, D)
        out = torch.empty(2, T, 4, D)
        for hh in range(4):
            s = torch.einsum("btd,bsd->bts", q[:, :, hh], k[:, :, hh // 2]) / math.sqrt(D)
            s = s.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[:, :, hh] = s.softmax(-1) @ v[:, :, hh // 2]
        h = h + (out.reshape(2, T, -1) @ a.o_proj.weight.T) * r
        x = rms(h, L.post_attention_layernorm.weight)
        h = h + ((F.silu(x @ L.mlp.gate_proj.weight.T) * (x @ L.mlp.up_proj.weight.T)) @ L.mlp.down_proj.weight.T) * r
    logits = (rms(h, m.model.norm.weight) / (c.hidden_size / 16)) @ m.lm_head.weight.T
    with torch.no_grad():
        got = m(ids)
    assert (got - logits).abs().max() < 1e-4 * logits.abs().max()


def test_each_mup_scale_factor():
    m = make_model(scale_emb=5.0, scale_depth=3.0, num_hidden_layers=3)
    c = m.config
    ids = torch.randint(0, c.vocab_size, (1, 6))
    assert torch.equal(m.model.embed(ids), m.model.embed_tokens.weight[ids] * 5.0)
    assert c.residual_scale == pytest.approx(3.0 / math.sqrt(3))
    # one decoder layer: h + attn(norm h) * r, then + mlp(norm h) * r
    L = m.model.layers[0]
    h = torch.randn(1, 6, c.hidden_size)
    cos, sin = rope_cos_sin(c, torch.arange(6))
    with torch.no_grad():
        h1 = h + L.self_attn(L.input_layernorm(h), cos, sin) * c.residual_scale
        h2 = h1 + L.mlp(L.post_attention_layernorm(h1)) * c.residual_scale
        assert torch.allclose(L(h, cos, sin), h2, atol=1e-6)
        logits, hid = m(ids, return_hidden=True)
        assert torch.allclose(logits, m.lm_head(m.model.norm(hid)) / (c.hidden_size / c.dim_model_base), atol=1e-6)


# The released 128K LongRoPE factors of MiniCPM4/4.1-8B (head_dim 128; the official README's `long_factor` list).
RELEASED_FACTORS_128 = [
    0.9982316082870437, 1.033048153422584, 1.0749920956484724, 1.1255096879436193, 1.1863348602111476,
    1.259543828902579, 1.3476188888731149, 1.4535223827776373, 1.5807816745852985, 1.7335856049489526,
    1.9168922912975785, 2.1365471404135326, 2.3994084200118646, 2.713475511863602, 3.0880118452194134,
    3.533650295140154, 4.062463396503134, 4.687974098908333, 5.425075306704039, 6.289818967956352,
    7.29902962722721, 8.6357018163639, 10.210822723989212, 12.053807765671676, 14.193944598909404,
    16.65780676784363, 19.463620727694074, 22.628311203524586, 26.150106147261315, 30.02526691405111,
    34.23183327975347, 38.73811934094828, 43.502489489729555, 48.47627117965394, 53.61139491762471,
    58.857366522037935, 64.16798299215064, 69.51359464319125, 74.86555458220285, 80.21497790341579,
    85.55322183307433, 90.89611806932027, 96.26245306514224, 101.68269304046481, 107.18619510219668,
    112.82253283014026, 118.63764063163615, 119.88866203644656, 120.9462882391725, 121.837565139014,
    122.58663780572562, 123.2147719894291, 123.74049454862576, 124.17980424685767, 124.54641761955492,
    124.85202548028222, 125.10654406389756, 125.31835105170659, 125.49450117164764, 125.64091910903052,
    125.76256945356558, 125.86360463815589, 125.94749252260765, 126.01712561287873]


class OfficialLongRoPETable:
    """Transcription of the official `MiniCPMLongRoPE` (modeling_minicpm.py), written from reading it: a float32
    table built once for `max_pos` positions (rebuilt at `seq_len` only when a longer sequence comes), factor set
    chosen by the table length, angles outer(t, 1/f) * inv_freq, cos/sin times the unclamped scale."""
    def __init__(self, dim, max_pos, base, short_factor, long_factor, orig):
        self.dim, self.base, self.short, self.long, self.orig = dim, base, short_factor, long_factor, orig
        self.scaling_factor = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
        self.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.build(max_pos)

    def build(self, seq_len):
        self.cached = seq_len
        t = torch.arange(seq_len, dtype=self.inv_freq.dtype)
        ext = torch.tensor(self.long if seq_len > self.orig else self.short, dtype=torch.float32)
        freqs = torch.mul(torch.outer(t, 1.0 / ext), self.inv_freq.to(torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos, self.sin = emb.cos() * self.scaling_factor, emb.sin() * self.scaling_factor

    def __call__(self, seq_len):
        if seq_len > self.cached: self.build(seq_len)
        return self.cos[:seq_len], self.sin[:seq_len]


def longrope_config(head_dim, orig, max_pos, short, long):
    H = 2
    rs = dict(rope_type="longrope", short_factor=list(short), long_factor=list(long),
              original_max_position_embeddings=orig)
    return MiniCPM4Config.tiny(hidden_size=H * head_dim, num_attention_heads=H, num_key_value_heads=1,
                               rope_scaling=rs, max_position_embeddings=max_pos)


@pytest.mark.parametrize("head_dim,orig,max_pos", [(64, 32768, 32768), (64, 32768, 131072),
                                                   (128, 32768, 32768), (128, 32768, 131072),
                                                   (128, 65536, 131072)])
def test_longrope_tables_equal_official_bit_for_bit(head_dim, orig, max_pos):
    g = torch.Generator().manual_seed(head_dim + max_pos)
    if head_dim == 128:   # the released factors (the official README gives one list for both sets)
        long = RELEASED_FACTORS_128
        short = (torch.tensor(long) * (0.5 + torch.rand(64, generator=g))).clamp_min(1.0).tolist()
    else:                 # no released list at hand for head_dim 64: random factors in [1, 60]
        short, long = (1 + 59 * torch.rand(2, 32, generator=g, dtype=torch.float64)).tolist()
    c = longrope_config(head_dim, orig, max_pos, short, long)
    ref = OfficialLongRoPETable(head_dim, max_pos, c.rope_theta, short, long, orig)
    cos_ref, sin_ref = ref(max_pos)
    pos = torch.cat([torch.randint(0, max_pos, (300,), generator=g), torch.arange(max_pos - 64, max_pos)])
    cos, sin = rope_cos_sin(c, pos, seq_len=17)        # the current length does not pick the factor set
    assert torch.equal(cos, cos_ref[pos]) and torch.equal(sin, sin_ref[pos])
    cos2, sin2 = rope_cos_sin(c, pos.view(4, -1))     # (B, T) positions
    assert torch.equal(cos2, cos_ref[pos].view(4, -1, head_dim)) and torch.equal(sin2, sin_ref[pos].view(4, -1, head_dim))
    # the algebraically equal t * (inv_freq / f) is measurably different at long positions (what we fixed)
    if max_pos > orig:
        far = torch.arange(max_pos - 4096, max_pos)
        alt = far.float()[:, None] * (ref.inv_freq / torch.tensor(long))
        assert (torch.cat([alt, alt], -1).cos() * ref.scaling_factor - cos_ref[far]).abs().max() > 1e-4


def test_longrope_factor_choice_scale_and_growth():
    half = 16
    short, long = [1.0 + i / 7 for i in range(half)], [3.0 + i for i in range(half)]
    for max_pos, orig in [(256, 64), (64, 64), (32, 64)]:
        c = longrope_config(32, orig, max_pos, short, long)
        ref = OfficialLongRoPETable(32, max_pos, c.rope_theta, short, long, orig)
        for T in (10, 40):
            cos, sin = rope_cos_sin(c, torch.arange(T))
            assert torch.equal(cos, ref(T)[0]) and torch.equal(sin, ref(T)[1])
    # max_pos > orig: long factors even for a 10-token prompt
    c = longrope_config(32, 64, 256, short, long)
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, 32, 2).float() / 32))
    f = (torch.arange(10).float()[:, None] * (1.0 / torch.tensor(long))) * inv
    mscale = math.sqrt(1 + math.log(256 / 64) / math.log(64))
    assert torch.equal(rope_cos_sin(c, torch.arange(10))[0], torch.cat([f, f], -1).cos() * mscale)
    # max_pos < orig: the scale is below 1 (not clamped)
    c = longrope_config(32, 64, 32, short, long)
    ratio = rope_cos_sin(c, torch.tensor([0]))[0][0, 0].item()     # cos(0) * scale
    assert ratio == pytest.approx(math.sqrt(1 + math.log(32 / 64) / math.log(64)), rel=1e-6) and ratio < 1
    # beyond max_pos (<= orig) the official table is rebuilt with the long factors: same here, with one warning
    c = longrope_config(32, 64, 64, short, long)
    ref = OfficialLongRoPETable(32, 64, c.rope_theta, short, long, 64)
    with pytest.warns(UserWarning, match="switches to long_factor"):
        cos, _ = rope_cos_sin(c, torch.arange(100))
    assert torch.equal(cos, ref(100)[0])


def test_longrope_cached_decoding_equals_full_forward():
    half = 16
    g = torch.Generator().manual_seed(7)
    short, long = (1 + 59 * torch.rand(2, half, generator=g, dtype=torch.float64)).tolist()
    rs = dict(rope_type="longrope", short_factor=short, long_factor=long, original_max_position_embeddings=16)
    m = make_model(seed=8, rope_scaling=rs, max_position_embeddings=64)
    ids = torch.randint(0, m.config.vocab_size, (2, 40))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 48)
        parts = [m(ids[:, :5], cache=cache), m(ids[:, 5:20], cache=cache)]
        parts += [m(ids[:, t:t + 1], cache=cache) for t in range(20, 40)]
    inc = torch.cat(parts, 1)
    assert (inc - full).abs().max() <= 1e-4 * full.abs().max()
    # and the factors matter: plain RoPE gives other logits
    m.config.rope_scaling = None
    with torch.no_grad():
        assert (m(ids) - full).abs().max() > 1e-3


def test_incremental_decoding_equals_full_forward():
    m = make_model(seed=3)
    ids = torch.randint(0, m.config.vocab_size, (2, 21))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 32)
        parts = [m(ids[:, :9], cache=cache)]                 # prefill
        parts.append(m(ids[:, 9:13], cache=cache))          # chunked prefill
        for t in range(13, 21):                             # one token at a time
            parts.append(m(ids[:, t:t + 1], cache=cache))
    inc = torch.cat(parts, 1)
    assert cache.length == 21
    assert (inc - full).abs().max() < 1e-4


def test_left_padded_batch_equals_single_prompts():
    m = make_model(seed=4)
    a, b = torch.randint(4, 500, (1, 11)), torch.randint(4, 500, (1, 6))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids); mask[1, :5] = 0
    with torch.no_grad():
        both = m(ids, attention_mask=mask)
        assert (both[0] - m(a)[0]).abs().max() < 1e-4
        assert (both[1, 5:] - m(b)[0]).abs().max() < 1e-4


def test_generate_greedy_equals_repeated_argmax():
    m = make_model(seed=5, initializer_range=0.6)
    prompts = [[1, 40, 41, 300, 7], [1, 9], [1, 77, 12]]
    outs = m.generate(prompts, 10, stop_ids=[])
    assert len({t for o in outs for t in o}) > 3, "degenerate model: the test would prove little"
    for p, o in zip(prompts, outs):
        seq = list(p)
        for _ in range(10):
            with torch.no_grad():
                seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
        assert seq[len(p):] == o


def test_generate_stops_at_stop_id():
    m = make_model(seed=5, initializer_range=0.6)
    free = m.generate([[1, 40, 41]], 10, stop_ids=[])[0]
    stop = free[3]
    out = m.generate([[1, 40, 41]], 10, stop_ids=[stop])[0]
    assert out == free[: free.index(stop) + 1]


def test_sampling_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), logits.argmax(-1))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample_next(logits, 0.8, 10, 0.9, g1), sample_next(logits, 0.8, 10, 0.9, g2))
    # top-k: samples only ever come from the k best
    top3 = logits.topk(3, -1).indices
    for _ in range(50):
        s = sample_next(logits, 2.0, top_k=3)
        assert all(s[i] in top3[i] for i in range(4))
    for bad in [dict(temperature=-1), dict(temperature=1, top_k=0), dict(temperature=1, top_p=0)]:
        with pytest.raises(ValueError):
            sample_next(logits, **bad)


def test_mtp_head_trains():
    m = make_model(mtp=True).train()
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    logits, h = m(ids, return_hidden=True)
    mtp = m.mtp_logits(h[:, :-1], ids[:, 1:])
    assert mtp.shape == (2, 11, m.config.vocab_size)
    F.cross_entropy(mtp.flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert m.mtp.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no MTP head"):
        make_model().mtp_logits(h, ids)


def test_bad_inputs():
    m = make_model()
    with pytest.raises(ValueError, match="input_ids must be"):
        m(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3))
    cache = m.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache overflow"):
        m(torch.ones(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="prompts"):
        m.generate("hello", 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.generate([1, 2], 0)


def test_cache_truncate_rolls_back():
    m = make_model(seed=6)
    ids = torch.randint(0, 500, (1, 10))
    with torch.no_grad():
        cache = m.new_cache(1, 16)
        m(ids[:, :7], cache=cache)
        m(torch.randint(0, 500, (1, 3)), cache=cache)  # tokens we then reject
        cache.truncate(7)
        out = m(ids[:, 7:], cache=cache)
        assert (out - m(ids)[:, 7:]).abs().max() < 1e-4
    with pytest.raises(ValueError):
        cache.truncate(99)


def test_model_boundary_checks():
    "Bad ids, masks and NaN weights are answered clearly at the model's boundary (issue 14), never silently."
    from minicpm4_core.checks import NonFiniteError
    torch.manual_seed(0)
    m = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=64)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with pytest.raises((ValueError, TypeError), match='input_ids'):
        m(ids.float())                                     # float ids: refused, not truncated
    with pytest.raises((ValueError, IndexError), match='input_ids'):
        m(torch.full((1, 3), 64))                          # outside the vocabulary: named, not a bare IndexError
    with pytest.raises(ValueError, match='attention_mask'):
        m(ids, attention_mask=torch.full((2, 7), 2))       # a mask of 2s would shift positions
    with pytest.raises((ValueError, TypeError), match='prompts'):
        m.generate(torch.tensor([[5.7, 9.9]]), 3)
    with torch.no_grad(): m.model.layers[0].mlp.down_proj.weight[0, 0] = float('nan')
    with pytest.raises(NonFiniteError, match='logits'):
        m.generate([1, 2, 3], 3)


def test_load_pretrained_checks_shapes_and_dtypes(tmp_path):
    "A tensor stored in another dtype is cast with one warning; a tensor of another shape is refused, naming it."
    import warnings
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    m = MiniCPM4ForCausalLM(MiniCPM4Config.from_preset('tiny', vocab_size=64))
    save_pretrained(m, tmp_path / 'a')
    sd = load_file(tmp_path / 'a' / 'model.safetensors')
    sd['model.norm.weight'] = sd['model.norm.weight'].to(torch.float16)
    save_file(sd, tmp_path / 'a' / 'model.safetensors', metadata={'format': 'pt'})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        back = load_pretrained(tmp_path / 'a')
    assert back.model.norm.weight.dtype == torch.float32 and any('model.norm.weight' in str(x.message) for x in w)
    sd['model.norm.weight'] = torch.randn(7)
    save_file(sd, tmp_path / 'a' / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='model.norm.weight'):
        load_pretrained(tmp_path / 'a')


def test_dense_attention_chunk_after_cached_keys():
    "T new queries after N - T cached keys (no padding): causal from the bottom right, == softmax over the visible keys."
    from minicpm4_core.attention import AttentionInputs, dense_attention
    g = torch.Generator().manual_seed(4)
    B, T, N, H, Hkv, D = 2, 5, 12, 4, 2, 8
    q, k, v = (torch.randn(B, n, h, D, generator=g) for n, h in ((T, H), (N, Hkv), (N, Hkv)))
    o = dense_attention(AttentionInputs(q, k, v, MiniCPM4Config.tiny()))
    kk, vv = k.repeat_interleave(H // Hkv, 2), v.repeat_interleave(H // Hkv, 2)
    s = torch.einsum('bthd,bnhd->bhtn', q, kk) / D ** 0.5
    s = s.masked_fill(torch.arange(N)[None] > torch.arange(N - T, N)[:, None], float('-inf'))
    torch.testing.assert_close(o, torch.einsum('bhtn,bnhd->bthd', s.softmax(-1), vv), rtol=1e-5, atol=1e-5)
