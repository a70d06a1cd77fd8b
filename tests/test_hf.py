"""A folder written by `save_pretrained` loads through transformers' Auto classes (trust_remote_code) and gives our
logits; `load_pretrained` resolves hub names through huggingface_hub without touching the network in tests."""
import dataclasses
import json
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from minicpm4_core.config import MiniCPM4Config  # noqa: E402
from minicpm4_core.model import (MiniCPM4ForCausalLM, REMOTE_CODE, load_pretrained, save_pretrained,  # noqa: E402
                                 resolve_pretrained_path)


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    m = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(**{"initializer_range": 0.6, **kw})).eval()
    with torch.no_grad():  # norms away from 1 so that every weight matters
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"): p.uniform_(0.5, 1.5)
    return m


def auto_load(path):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(path, trust_remote_code=True)
    return cfg, AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [True, False])
def test_auto_classes_give_our_logits(tmp_path, dtype, tied):
    m = make_model(tie_word_embeddings=tied)
    save_pretrained(m, tmp_path, dtype=dtype)
    cj = json.loads((tmp_path / "config.json").read_text())
    assert cj["torch_dtype"] == str(dtype).removeprefix("torch.")
    assert set(cj["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert m.config.torch_dtype == "float32"                      # the model's own config is left alone
    cfg, hf = auto_load(tmp_path)
    assert type(cfg).__name__ == "MiniCPMConfig" and type(hf).__name__ == "MiniCPMForCausalLM"
    assert hf.dtype == dtype and not hf.training
    ours = load_pretrained(tmp_path)
    assert ours.dtype == dtype
    ids = torch.randint(0, m.config.vocab_size, (2, 13))
    mask = torch.ones_like(ids); mask[1, :4] = 0                  # left padding on row 1
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            a, b = ours(ids, **kw), hf(ids, **kw).logits
            assert b.shape == (2, 13, m.config.vocab_size) and b.dtype == dtype
            assert rel(b, a) <= (1e-6 if dtype == torch.float32 else 0.0)
        if dtype == torch.float32:                                # and the fp32 source model itself
            assert rel(hf(ids).logits, m(ids)) <= 1e-6


def test_labels_give_the_shifted_loss_and_gradients(tmp_path):
    m = make_model(seed=1)
    save_pretrained(m, tmp_path)
    _, hf = auto_load(tmp_path)
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    labels = ids.clone(); labels[0, 3] = -100
    out = hf(ids, labels=labels)
    with torch.no_grad():
        logits = m(ids)
    keep = labels[:, 1:] != -100
    want = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    assert abs(out.loss.item() - want.item()) <= 1e-6 * want.item()
    out.loss.backward()
    assert hf.model.embed_tokens.weight.grad.abs().sum() > 0 and hf.lm_head.weight.grad is not None
    with pytest.raises(ValueError, match="labels must have the shape"):
        hf(ids, labels=labels[:, :5])
    with pytest.raises(ValueError, match="input_ids is required"):
        hf(attention_mask=torch.ones(1, 3))


def test_generate_through_transformers_equals_ours(tmp_path):
    m = make_model(seed=2)
    save_pretrained(m, tmp_path)
    _, hf = auto_load(tmp_path)
    prompts = [[1, 40, 41, 300, 7], [1, 9, 77]]
    want = m.generate(prompts, 8, stop_ids=[])
    assert len({t for o in want for t in o}) > 3, "degenerate model: the test would prove little"
    ids = torch.zeros(2, 5, dtype=torch.long); mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):                               # left-padded batch, as our generate pads
        ids[i, 5 - len(p):] = torch.tensor(p); mask[i, 5 - len(p):] = 1
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[:, 5:].tolist() == want


def test_sparse_config_and_head_dim_folders(tmp_path):
    sc = dict(kernel_size=8, kernel_stride=4, block_size=8, window_size=16, topk=2, init_blocks=1, dense_len=0)
    for i, kw in enumerate([dict(sparse_config=sc), dict(head_dim=48), dict(head_dim=16, mtp=True)]):
        m = make_model(seed=3 + i, **kw)
        save_pretrained(m, tmp_path / str(i))
        cfg, hf = auto_load(tmp_path / str(i))
        assert cfg.to_core() == dataclasses.replace(MiniCPM4Config.from_pretrained(tmp_path / str(i)), extra={})
        ids = torch.randint(0, m.config.vocab_size, (1, 70))
        with torch.no_grad():
            assert rel(hf(ids).logits, m(ids)) <= 1e-6, kw


def test_folder_written_by_transformers_loads_back_in_ours(tmp_path):
    m = make_model(seed=6)
    save_pretrained(m, tmp_path / "a")
    _, hf = auto_load(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")                            # transformers' own config.json writer
    assert {"configuration_minicpm.py", "modeling_minicpm.py"} <= {p.name for p in (tmp_path / "b").iterdir()}
    assert not (tmp_path / "b" / "hf.py").exists()                # thin files, not a copy of the package
    back = load_pretrained(tmp_path / "b")
    _, hf2 = auto_load(tmp_path / "b")
    ids = torch.randint(0, m.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), m(ids)) and torch.equal(hf2(ids).logits, m(ids))


def test_hf_config_reads_transformers5_spellings():
    from minicpm4_core.hf import MiniCPMConfig
    c = MiniCPM4Config.minicpm4_0_5b()
    d = c.to_dict()
    rs = d.pop("rope_scaling")
    d.pop("torch_dtype")
    d["rope_parameters"] = {**rs, "rope_theta": d.pop("rope_theta")}
    hc = MiniCPMConfig(**d, dtype="bfloat16")
    assert hc.to_core() == c and hc.rope_scaling["rope_type"] == "longrope"
    assert MiniCPMConfig().to_core().scale_emb == 1                 # missing keys: the official defaults


def test_remote_files_ask_for_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "minicpm4_core.hf", None)    # as if minicpm4_core were not installed
    for name, text in REMOTE_CODE.items():
        with pytest.raises(ImportError, match="pip install minicpm4_core"):
            exec(compile(text, name, "exec"), {})


# ---- hub names -------------------------------------------------------------------------------------------------

def test_hub_name_offline_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        load_pretrained("openbmb/MiniCPM4-0.5B")
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "huggingface-cli download openbmb/MiniCPM4-0.5B" in msg and "pass its path" in msg


def test_hub_name_resolves_cache_first_and_local_folders_win(tmp_path, monkeypatch):
    import huggingface_hub
    m = make_model(seed=7)
    snap = save_pretrained(m, tmp_path / "snapshot")
    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, **kw):
        calls.append((repo_id, local_files_only))
        if local_files_only and len(calls) == 1 and repo_id == "owner/cached":
            return str(snap)
        if not local_files_only and repo_id == "owner/online":
            return str(snap)
        raise FileNotFoundError(f"{repo_id} not available (fake hub)")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    ids = torch.randint(0, m.config.vocab_size, (1, 6))
    with torch.no_grad():
        assert torch.equal(load_pretrained("owner/cached")(ids), m(ids))
    assert calls == [("owner/cached", True)]                      # found in the cache: the hub is not asked
    calls.clear()
    assert resolve_pretrained_path("owner/online") == snap and calls == [("owner/online", True), ("owner/online", False)]
    calls.clear()
    with pytest.raises(FileNotFoundError, match="the hub could not provide it"):
        resolve_pretrained_path("owner/missing")
    # a local folder of that name is used as is; a non-hub-like missing path is a plain missing folder
    (tmp_path / "owner").mkdir(); save_pretrained(m, tmp_path / "owner" / "local")
    calls.clear()
    assert resolve_pretrained_path("owner/local").resolve() == (tmp_path / "owner" / "local").resolve() and not calls
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nowhere" / "x" / "y")
