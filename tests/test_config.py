import json

import pytest

from minicpm4_core.config import MiniCPM4Config, default_sparse_config, PRESETS

# MiniCPM4-0.5B config.json written from PAPER.md §1 (LongRoPE factor values are not published: ones here).
HALF = 32
RELEASED_0_5B = {
    "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "bos_token_id": 1, "eos_token_id": [2, 73440],
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.1, "intermediate_size": 4096,
    "max_position_embeddings": 32768, "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0 + i / 100 for i in range(HALF)],
                     "long_factor": [2.0 + i / 10 for i in range(HALF)], "original_max_position_embeddings": 32768},
    "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 73448, "use_cache": True, "transformers_version": "4.46.3",
}


def test_released_config_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_0_5B))
    c = MiniCPM4Config.from_pretrained(tmp_path)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (1024, 24, 16, 2)
    assert c.head_dim == 64 and c.tie_word_embeddings and c.rope_type == "longrope"
    assert c.extra == {"use_cache": True, "transformers_version": "4.46.3"}  # unknown keys kept
    c.save_pretrained(tmp_path / "out")
    back = json.loads((tmp_path / "out" / "config.json").read_text())
    for k, v in RELEASED_0_5B.items():
        assert back[k] == v, k
    assert MiniCPM4Config.from_pretrained(tmp_path / "out") == c


@pytest.mark.parametrize("name", PRESETS)
def test_presets_round_trip(name, tmp_path):
    c = MiniCPM4Config.from_preset(name)
    c.save_pretrained(tmp_path)
    assert MiniCPM4Config.from_pretrained(tmp_path) == c
    assert MiniCPM4Config.from_dict(c.to_dict()) == c


def test_8b_sparse_config_is_released_one():
    sc = MiniCPM4Config.minicpm4_8b().sparse_config
    assert sc == dict(kernel_size=32, kernel_stride=16, init_blocks=1, block_size=64, window_size=2048, topk=64,
                      use_nope=False, dense_len=8192, selection="minicpm4")  # ours: the release's block selection


@pytest.mark.parametrize("kw, words", [
    (dict(num_attention_heads=4, num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(hidden_size=130), "not divisible by num_attention_heads"),
    (dict(head_dim=33), "must be even"),
    (dict(rope_scaling={"rope_type": "yarn"}), "unknown rope type"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0],
                        "original_max_position_embeddings": 8}), "head_dim/2=16"),
    (dict(sparse_config={"kernel_size": 8, "kernel_stride": 16}), "kernel_size (8) must be >= kernel_stride (16)"),
    (dict(sparse_config={"block_size": 40}), "block_size (40) must be a multiple of kernel_stride (16)"),
    (dict(sparse_config={"topkk": 3}), "unknown key"),
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(hidden_act="gelu"), "silu"),
])
def test_bad_config_errors(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        MiniCPM4Config.tiny(**kw)


def test_bad_preset_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        MiniCPM4Config.from_preset("minicpm5")
    with pytest.raises(FileNotFoundError):
        MiniCPM4Config.from_pretrained(tmp_path)


def test_default_sparse_config_overrides():
    assert default_sparse_config(topk=16)["topk"] == 16


def test_transformers5_rope_parameters_and_dtype():
    base = {k: v for k, v in RELEASED_0_5B.items() if k not in ("rope_scaling", "rope_theta", "torch_dtype")}
    rs = RELEASED_0_5B["rope_scaling"]
    want = MiniCPM4Config.from_dict(RELEASED_0_5B)
    flat = {**base, "dtype": "bfloat16", "rope_parameters": {**rs, "rope_theta": 10000.0}}
    nested = {**base, "torch_dtype": "bfloat16", "rope_parameters": {"full_attention": {**rs, "rope_theta": 10000.0}}}
    orig_top = {**base, "torch_dtype": "bfloat16", "original_max_position_embeddings": 32768,
                "rope_parameters": {k: v for k, v in rs.items() if k != "original_max_position_embeddings"}
                | {"rope_theta": 10000.0}}
    for d in (flat, nested, orig_top):
        c = MiniCPM4Config.from_dict(d)
        assert c == want, d.keys()
    # plain RoPE through rope_parameters: no rope_scaling, theta read
    c = MiniCPM4Config.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}})
    assert c.rope_scaling is None and c.rope_theta == 5e5 and c.rope_type == "default"
    with pytest.raises(ValueError, match="rope_parameters must be a dict"):
        MiniCPM4Config.from_dict({**base, "rope_parameters": 3})


@pytest.mark.parametrize("spelling", ["type", "su"])
def test_rope_scaling_old_spellings(spelling):
    rs = {k: v for k, v in RELEASED_0_5B["rope_scaling"].items() if k != "rope_type"}
    rs["type"] = "longrope" if spelling == "type" else "su"
    c = MiniCPM4Config.from_dict({**RELEASED_0_5B, "rope_scaling": rs})
    assert c.rope_type == "longrope" and c.rope_scaling["rope_type"] == "longrope" and "type" not in c.rope_scaling
    assert c == MiniCPM4Config.from_dict(RELEASED_0_5B)


def test_missing_mup_keys_default_to_official_ones():
    d = {k: v for k, v in RELEASED_0_5B.items() if k not in ("scale_emb", "scale_depth", "dim_model_base")}
    c = MiniCPM4Config.from_dict(d)
    assert (c.scale_emb, c.scale_depth, c.dim_model_base) == (1, 1, 1)
    assert c.residual_scale == pytest.approx(1 / 24 ** 0.5) and c.logit_scale == 1024
    # given keys win; direct construction and presets keep our (released) defaults
    assert MiniCPM4Config.from_dict(RELEASED_0_5B).scale_emb == 12
    assert (MiniCPM4Config().scale_emb, MiniCPM4Config().dim_model_base) == (12.0, 256)
    assert MiniCPM4Config.minicpm4_8b().scale_depth == 1.4


@pytest.mark.parametrize("kw, err, words", [
    (dict(hidden_size="128"), TypeError, "hidden_size must be an int, got str '128'"),
    (dict(num_hidden_layers=2.0), TypeError, "num_hidden_layers must be an int"),
    (dict(vocab_size=True), TypeError, "vocab_size must be an int"),
    (dict(rope_theta=0.0), ValueError, "rope_theta must be > 0"),
    (dict(rope_theta="1e4"), TypeError, "rope_theta must be a number"),
    (dict(rms_norm_eps=-1e-6), ValueError, "rms_norm_eps must be > 0"),
    (dict(num_key_value_heads=0), ValueError, "num_key_value_heads must be a positive int"),
    (dict(sparse_config={"window_size": 100}), ValueError, "window_size (100) must be a multiple of block_size (64)"),
    (dict(sparse_config={"use_nope": "yes"}), ValueError, "use_nope must be True or False"),
])
def test_config_validates_once_with_named_errors(kw, err, words):
    with pytest.raises(err, match=words.replace("(", r"\(").replace(")", r"\)")):
        MiniCPM4Config.tiny(**kw)


def test_sparse_settings_is_the_one_schema():
    from minicpm4_core.config import SparseSettings, SPARSE_CONFIG_DEFAULT
    from minicpm4_core import infllmv2, infllmv2_ref
    assert infllmv2.SparseSettings is SparseSettings is infllmv2_ref.SparseSettings
    # the released block round-trips unchanged; the optional LSE keys appear only when set
    assert SparseSettings.from_dict(SPARSE_CONFIG_DEFAULT).to_dict() == SPARSE_CONFIG_DEFAULT
    assert "lse_approx" not in SPARSE_CONFIG_DEFAULT
    d = default_sparse_config(lse_approx=True, topk=8)
    assert d["lse_approx"] is True and d["topk"] == 8 and "lse_kernel_size" not in d
    c = MiniCPM4Config.tiny(sparse_config=dict(topk=8, lse_approx=True))
    assert c.sparse_config == d
    assert MiniCPM4Config.from_dict(c.to_dict()) == c
    st = SparseSettings.from_dict(c.sparse_config)
    assert (st.local_blocks, st.attended_blocks) == (32, 40)
