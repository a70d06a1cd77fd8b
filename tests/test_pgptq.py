"""P-GPTQ: quantization grids, RTN vs GPTQ, the prefix-aware Hessian, packing, QuantLinear, whole-model pipeline."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.model import MiniCPM4ForCausalLM
from minicpm4_core.pgptq import (PrefixHessian, QuantLinear, QuantizedWeight, _fold_smoothing, dequantize_model,
                                 gptq_quantize, grid_params, load_quantized, output_error, pack_quantized,
                                 quantize_model, rtn_quantize, save_quantized, search_smooth_scales)

warnings.filterwarnings('ignore', message='w4a16_matmul')


def correlated(n, K, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(K, K, generator=g) / math.sqrt(K)
    big = torch.ones(K)
    big[torch.randperm(K, generator=g)[:3]] = 6.0
    return (torch.randn(n, K, generator=g) @ A) * big


# ---------------------------------------------------------------- grids and RTN
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_grid_codes_in_range_and_exact_max(bits):
    w = torch.randn(16, 64)
    qw = rtn_quantize(w, bits, 32, sym=False)
    assert int(qw.q.max()) <= 2 ** bits - 1
    assert ((qw.dequantize() - w).abs() <= qw.scales.max() / 2 + 1e-6).all()     # never more than half a step
    s, z = grid_params(w[:, :32], bits, sym=True)
    assert torch.all(z == 2 ** (bits - 1))
    qs = rtn_quantize(w, bits, 32, sym=True)
    amax_err = (qs.dequantize() - w).abs().gather(1, w.abs().argmax(1, keepdim=True))
    assert float(amax_err.max()) < 1e-5                                            # symmetric grid never clips max|w|


def test_rtn_and_gptq_reject_bad_arguments():
    W, H = torch.randn(8, 16), torch.eye(16)
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(W, 1)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(W, 4, 0)
    with pytest.raises(ValueError, match=r"H \(K, K\)"):
        gptq_quantize(W, torch.eye(8))
    with pytest.raises(ValueError, match="damp"):
        gptq_quantize(W, H, damp=1.5)


# ---------------------------------------------------------------- GPTQ < RTN
@pytest.mark.parametrize("bits,G,sym,act_order", [(4, 64, False, False), (3, 64, False, True), (4, -1, True, False),
                                                  (4, 32, False, True), (3, 128, True, True)])
def test_gptq_beats_rtn_on_random_layers(bits, G, sym, act_order):
    X = correlated(1024, 128, seed=bits + (G if G > 0 else 7))
    W = torch.randn(64, 128) * 0.05
    H = X.T @ X
    e_rtn = output_error(W, rtn_quantize(W, bits, G, sym).dequantize(), H)
    qw = gptq_quantize(W, H, bits, G, sym, act_order)
    e_gptq = output_error(W, qw.dequantize(), H)
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert (qw.perm is not None) == act_order
    # the reported error equals the error measured on the activations themselves
    Wh = qw.dequantize()
    assert abs(e_gptq - float((X @ (Wh - W).T).norm() / (X @ W.T).norm())) < 1e-3


def test_gptq_group_layout_invariants():
    """Every group's codes use its own grid; blocks not aligned with groups (G=96, block 64) still give exact grids."""
    X = correlated(512, 192, seed=3)
    W = torch.randn(32, 192)
    qw = gptq_quantize(W, X.T @ X, 4, 96, block_size=64)
    assert qw.scales.shape == (2, 32)
    Wh = qw.dequantize()
    g = torch.arange(192) // 96
    # dequantized values lie on each group's grid
    steps = (Wh / qw.scales[g].T) + qw.zeros[g].T
    assert torch.allclose(steps, steps.round(), atol=1e-3)


def tiny_model(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = MiniCPM4Config.tiny(num_hidden_layers=layers, vocab_size=96, mtp=False, torch_dtype='float32')
    return MiniCPM4ForCausalLM(cfg)


def pattern_batch(n, T, vocab, seed):
    "Sequences with learnable structure: a random start, then a fixed affine recurrence mod vocab."
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    steps = torch.arange(T + 1)[None]
    return (start * 7 + steps * 5 + (steps * start) % 3) % vocab


@pytest.fixture(scope='module')
def trained():
    "A 2-layer tiny model trained briefly (a few seconds) on structured sequences."
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(25):
        b = pattern_batch(8, 32, 96, step)
        loss = F.cross_entropy(model(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    return model, float(loss.detach())


def test_gptq_beats_rtn_on_trained_layers(trained):
    model, loss = trained
    assert loss < 3.0, "the fixture model did not train"
    calib = pattern_batch(16, 32, 96, 1000)[:, :-1]
    acts = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: acts.setdefault(n, PrefixHessian(a[0].shape[-1], 0)).add(a[0]))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and 'layers' in n]
    with torch.no_grad(): model(calib)
    for h in hooks: h.remove()
    wins = 0
    for n, m in model.named_modules():
        if n not in acts: continue
        H = acts[n].hessian(False)
        W = m.weight.detach()
        e_r = output_error(W, rtn_quantize(W, 3, 128).dequantize(), H)
        e_g = output_error(W, gptq_quantize(W, H, 3, 128).dequantize(), H)
        assert e_g < e_r, (n, e_g, e_r)
        wins += 1
    assert wins == 14


# ---------------------------------------------------------------- prefix-aware Hessian
@pytest.mark.parametrize("s", [0, 1, 4, 40])
def test_prefix_hessian_excludes_first_positions(s):
    x = torch.randn(5, 12, 8)
    ph = PrefixHessian(8, prefix=s)
    ph.add(x[:2]); ph.add(x[2:4]); ph.add(x[4])                 # streamed, and a 2-D (T, K) piece
    ref = sum(x[b, s:].T @ x[b, s:] for b in range(5))
    ref = ref if isinstance(ref, torch.Tensor) else torch.zeros(8, 8)
    assert torch.allclose(ph.rest, ref, atol=1e-4)
    assert ph.n_rest == 5 * max(12 - s, 0) and ph.n_prefix == 5 * min(s, 12)
    full = sum(x[b].T @ x[b] for b in range(5)) / 60
    assert torch.allclose(ph.hessian(exclude_prefix=False), full, atol=1e-5)
    if s < 12:
        assert torch.allclose(ph.hessian(), ref / (5 * (12 - s)), atol=1e-5)


def test_prefix_hessian_rejects_bad_input():
    with pytest.raises(ValueError, match="prefix"):
        PrefixHessian(8, prefix=-1)
    with pytest.raises(ValueError, match=r"\(B, T, 8\)"):
        PrefixHessian(8).add(torch.randn(2, 3, 7))


def test_prefix_exclusion_helps_when_sinks_are_massive():
    g = torch.Generator().manual_seed(0)
    X = correlated(48 * 32, 128, seed=5).view(48, 32, 128)
    X[:, :4, :3] *= 60.0                                        # planted massive activations at positions 0..3
    W = torch.randn(64, 128, generator=g) * 0.05
    ph = PrefixHessian(128, 4); ph.add(X)
    H_rest = ph.hessian(True)
    e_gptq = output_error(W, gptq_quantize(W, ph.hessian(False), 4, 64).dequantize(), H_rest)
    e_pgptq = output_error(W, gptq_quantize(W, H_rest, 4, 64).dequantize(), H_rest)
    assert ph.prefix_share() > 0.5 and e_pgptq < 0.9 * e_gptq


# ---------------------------------------------------------------- packing and QuantLinear
@pytest.mark.parametrize("act_order,bits", [(False, 4), (True, 4), (False, 3)])
def test_pack_round_trip_and_quantlinear(act_order, bits):
    X = correlated(256, 128, seed=1)
    W = torch.randn(48, 128) * 0.1
    qw = gptq_quantize(W, X.T @ X, bits, 64, act_order=act_order)
    packed = pack_quantized(qw)
    assert packed['qweight'].shape == (16, 48) and packed['qzeros'].shape == (2, 6)
    ql = QuantLinear.from_quantized(qw)
    Wq = qw.dequantize()
    assert torch.allclose(ql.dequantize(), Wq, atol=1e-2 * float(qw.scales.max()))   # fp16 scales only
    x = torch.randn(3, 128)
    y = ql(x)                                 # the Triton kernel, in the interpreter
    assert float((y - x @ ql.dequantize().T).norm() / (x @ Wq.T).norm()) < 1e-4


def test_pack_and_quantlinear_reject_bad_shapes():
    qw = rtn_quantize(torch.randn(12, 64), 4, 32)
    with pytest.raises(ValueError, match="N % 8"):
        pack_quantized(qw)
    with pytest.raises(ValueError, match="bits <= 4"):
        pack_quantized(rtn_quantize(torch.randn(16, 64), 8, 32))
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(64, 16, bits=8)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(64, 16, group_size=48)


# ---------------------------------------------------------------- smoothing
def test_smoothing_fold_is_exact(trained):
    model = copy.deepcopy(trained[0])
    ids = pattern_batch(2, 16, 96, 7)[:, :-1]
    with torch.no_grad():
        ref = model(ids)
        layer = model.model.layers[0]
        t = torch.rand(128) + 0.5
        _fold_smoothing(layer, 0, t, {}, '')
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj): m.weight.data *= t
        t2 = torch.rand(384) + 0.5
        _fold_smoothing(layer, 3, t2, {}, '')
        layer.mlp.down_proj.weight.data *= t2
        assert torch.allclose(model(ids), ref, atol=1e-3, rtol=1e-3)
    assert not _fold_smoothing(layer, 1, torch.ones(128), {}, '')      # GQA: o_proj has no exact fold


def test_smooth_search_never_worse_than_no_smoothing():
    X = correlated(512, 64, seed=2)
    W = torch.randn(32, 64) * 0.1
    t, alpha = search_smooth_scales([W], X, X.abs().mean(0), 3, 32)
    err = lambda tt: float((X @ (rtn_quantize(W * tt, 3, 32).dequantize() / tt).T - X @ W.T).pow(2).mean())
    assert err(t) <= err(torch.ones(64)) + 1e-9 and 0.0 <= alpha <= 1.0


# ---------------------------------------------------------------- whole model
def test_quantize_model_pipeline_save_load_generate(trained, tmp_path):
    base = trained[0]
    calib = pattern_batch(8, 32, 96, 11)[:, :-1]
    ids = pattern_batch(2, 16, 96, 12)[:, :-1]
    qm, rep = quantize_model(copy.deepcopy(base), calib, bits=4, group_size=128, prefix=4, batch_size=4,
                             progress=False)
    qls = [n for n, m in qm.named_modules() if isinstance(m, QuantLinear)]
    assert len(qls) == 14 and len(rep.layers) == 14
    assert all(r['err_all'] < 0.2 and math.isfinite(r['err_rest']) for r in rep.layers), rep.table()
    with torch.no_grad():
        lq, lf = qm(ids), base(ids)
    assert float((lq - lf).norm() / lf.norm()) < 0.2
    save_quantized(qm, tmp_path)
    qm2 = load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.allclose(qm2(ids), lq, atol=1e-5)
        assert torch.allclose(dequantize_model(qm2)(ids), lq, atol=1e-3)
    assert qm2.generate([[1, 2, 3]], 3, stop_ids=[]) == qm.generate([[1, 2, 3]], 3, stop_ids=[])


def test_quantize_model_later_layers_see_quantized_inputs(trained):
    "Layer 1's Hessian must be collected with layer 0 already quantized: compare against a manual two-stage run."
    base = trained[0]
    calib = pattern_batch(8, 32, 96, 21)[:, :-1]
    a, _ = quantize_model(copy.deepcopy(base), calib, bits=3, prefix=0, batch_size=8, pack=False, progress=False)
    b = copy.deepcopy(base)
    quantize_model(b, calib, bits=3, prefix=0, batch_size=8, pack=False, progress=False, layers=[0])
    quantize_model(b, calib, bits=3, prefix=0, batch_size=8, pack=False, progress=False, layers=[1])
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_smoothed_model_pipeline(trained):
    base = trained[0]
    calib = pattern_batch(8, 32, 96, 31)[:, :-1]
    ids = pattern_batch(2, 16, 96, 32)[:, :-1]
    qm, rep = quantize_model(copy.deepcopy(base), calib, bits=8, prefix=4, smooth=True, pack=False, batch_size=8,
                             progress=False)
    with torch.no_grad():
        assert float((qm(ids) - base(ids)).norm() / base(ids).norm()) < 0.02     # 8 bit + exact folds ~ float
    assert any(math.isfinite(r['alpha']) for r in rep.layers)


def test_quantize_model_rejects_bad_arguments(trained):
    m, calib = trained[0], torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="method"):
        quantize_model(m, calib, method='awq')
    with pytest.raises(ValueError, match="bits"):
        quantize_model(m, calib, bits=1)
    with pytest.raises(ValueError, match="pack=True needs bits <= 4"):
        quantize_model(m, calib, bits=8)
    with pytest.raises(ValueError, match="prefix"):
        quantize_model(m, calib, prefix=-2)
    with pytest.raises(ValueError, match="calib"):
        quantize_model(copy.deepcopy(m), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="save_quantized needs"):
        save_quantized(m, '/tmp/never')
