import pytest
import torch

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM, load_pretrained
from minicpm4_core.train import wsd_lr, mup_param_groups, train, TrainConfig, eval_loss
from minicpm4_core import data as D


def test_wsd_shape():
    total, warm, dec = 1000, 50, 200
    lrs = [wsd_lr(s, total, warm, dec, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(1 / 50) and lrs[49] == pytest.approx(1.0)
    assert all(b > a for a, b in zip(lrs[:50], lrs[1:50]))           # warmup increases
    assert all(x == 1.0 for x in lrs[50:800])                          # stable
    assert all(b < a for a, b in zip(lrs[800:], lrs[801:]))           # decay decreases
    assert lrs[-1] == pytest.approx(0.1)
    for shape in ("linear", "cosine"):
        assert wsd_lr(999, total, warm, dec, 0.1, shape) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        wsd_lr(0, 100, 60, 60)
    with pytest.raises(ValueError, match="shape"):
        wsd_lr(0, 100, 10, 10, shape="step")


def test_mup_groups():
    m = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(tie_word_embeddings=False, mtp=True))
    groups = mup_param_groups(m, lr=0.01)
    width = 128 / 32
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(m.model.layers[0].self_attn.q_proj.weight)]["lr"] == pytest.approx(0.01 / width)
    assert by_id[id(m.mtp.proj.weight)]["lr"] == pytest.approx(0.01 / width)
    assert by_id[id(m.model.embed_tokens.weight)]["lr"] == 0.01
    assert by_id[id(m.model.embed_tokens.weight)]["weight_decay"] == 0
    assert by_id[id(m.lm_head.weight)]["lr"] == 0.01
    assert by_id[id(m.model.norm.weight)]["weight_decay"] == 0
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def _setup(seed=0):
    corpus = D.embedded_corpus(0, 200)
    tok = D.train_tokenizer(corpus["train"], 300)
    rows = D.pack_documents(tok.encode_batch(corpus["train"]), 32)
    torch.manual_seed(seed)
    m = MiniCPM4ForCausalLM(MiniCPM4Config.tiny(vocab_size=300, num_hidden_layers=2, hidden_size=64,
                                                intermediate_size=128, dim_model_base=16, mtp=True))
    return m, rows


def test_training_reduces_loss():
    m, rows = _setup()
    before = eval_loss(m, rows[:32])
    res = train(m, rows, TrainConfig(steps=30, batch_size=8, progress=False), valid_rows=rows[:32])
    assert res.final_eval_loss < before - 1.0
    assert all(x is not None for x in res.history["mtp_loss"])


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    import minicpm4_core.train as T
    m1, rows = _setup()
    train(m1, rows, TrainConfig(steps=12, batch_size=4, progress=False))
    # the same run, interrupted after 6 steps (Ctrl-C from inside the data iterator) ...
    orig = D.batches
    def interrupted(rows_, bs, seed):
        it = orig(rows_, bs, seed)
        for _ in range(6): yield next(it)
        raise KeyboardInterrupt
    cfg = TrainConfig(steps=12, batch_size=4, progress=False, ckpt_dir=str(tmp_path))
    m2, _ = _setup()
    monkeypatch.setattr(T.D, "batches", interrupted)
    res = train(m2, rows, cfg)
    monkeypatch.setattr(T.D, "batches", orig)
    assert res.interrupted and len(res.history["step"]) == 6
    # ... and resumed into a differently initialised model: everything must come from the checkpoint
    m3, _ = _setup(seed=123)
    res3 = train(m3, rows, cfg, resume_from=tmp_path)
    assert res3.history["step"] == list(range(12))                    # no step repeated or skipped
    for (n, a), b in zip(m1.state_dict().items(), m3.state_dict().values()):
        assert torch.equal(a, b), n                                      # bit-identical, not merely close


def test_train_rejects_bad_rows():
    m, _ = _setup()
    with pytest.raises(ValueError, match="rows must be"):
        train(m, torch.zeros(10, dtype=torch.long), TrainConfig(steps=1, progress=False))
