"""BitCPM (minicpm4_core.bitcpm): ternary quantizer, STE, BitLinear, model conversion, QAT branches, export/load."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minicpm4_core.bitcpm import (BitLinear, QATExperiment, TernaryLinear, bitlinear_to_dense, export_ternary,
                                  fake_quant_act8, fake_quant_ternary, load_ternary, memory_footprint,
                                  qat_summary, run_qat_experiment, ternary_dequantize, ternary_quantize,
                                  ternary_scale, to_bitlinear)
from minicpm4_core.config import MiniCPM4Config
from minicpm4_core.kernels.ternary import unpack_ternary
from minicpm4_core.model import MiniCPM4ForCausalLM

W = torch.tensor([[0.2, -0.6, 0.05, 1.0], [0.3, 0.3, -0.3, 0.0]])


def test_quantizer_per_tensor_by_hand():
    q, s = ternary_quantize(W, 'per_tensor')
    assert s.shape == (1, 1) and s.item() == pytest.approx((0.2 + 0.6 + 0.05 + 1.0 + 0.3 + 0.3 + 0.3) / 8)
    # row 0 / 0.34375 = [0.58, -1.75, 0.15, 2.91]; row 1 = [0.87, 0.87, -0.87, 0]
    assert q.tolist() == [[1, -1, 0, 1], [1, 1, -1, 0]]
    assert q.dtype == torch.int8


def test_quantizer_per_channel_by_hand():
    q, s = ternary_quantize(W, 'per_channel')
    assert s.flatten().tolist() == pytest.approx([0.4625, 0.225])
    # row 0 / 0.4625 = [0.43, -1.30, 0.11, 2.16]; row 1 / 0.225 = [1.33, 1.33, -1.33, 0]
    assert q.tolist() == [[0, -1, 0, 1], [1, 1, -1, 0]]
    assert torch.allclose(ternary_dequantize(q, s), torch.tensor([[0, -0.4625, 0, 0.4625], [.225, .225, -.225, 0]]))


def test_quantizer_groups_by_hand():
    q, s = ternary_quantize(W, 2)
    assert s.flatten().tolist() == pytest.approx([0.4, 0.525, 0.3, 0.15])
    # [0.2/0.4, -0.6/0.4 | 0.05/0.525, 1/0.525] = [0.5 -> 0 (half to even), -1.5 -> -2 -> -1 | 0.1, 1.9]
    assert q.tolist() == [[0, -1, 0, 1], [1, 1, -1, 0]]
    w = torch.randn(6, 128)
    for g in (32, 64, 128):
        q, s = ternary_quantize(w, g)
        assert s.shape == (6, 128 // g)
        assert torch.allclose(s, w.abs().view(6, -1, g).mean(-1))
        assert set(q.unique().tolist()) <= {-1, 0, 1}


def test_quantizer_bad_granularity():
    with pytest.raises(ValueError, match="accepted"):
        ternary_scale(W, 'per_row')
    with pytest.raises(ValueError, match="divisible"):
        ternary_scale(W, 3)
    with pytest.raises(ValueError, match="2-D"):
        ternary_scale(torch.zeros(4), 'per_tensor')
    with pytest.raises(ValueError, match="act_bits"):
        BitLinear(4, 4, act_bits=4)


def test_all_zero_group_does_not_divide_by_zero():
    q, s = ternary_quantize(torch.zeros(2, 4), 'per_channel')
    assert (q == 0).all() and torch.isfinite(s).all()


@pytest.mark.parametrize("gran", ['per_tensor', 'per_channel', 16])
def test_ste_gradient_is_identity_on_latent_weights(gran):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 32, generator=g, requires_grad=True)
    x = torch.randn(5, 32, generator=g)
    t = torch.randn(5, 8, generator=g)
    F.mse_loss(x @ fake_quant_ternary(w, gran).T, t).backward()
    wq = ternary_dequantize(*ternary_quantize(w, gran)).requires_grad_()   # the same forward value, as a leaf
    F.mse_loss(x @ wq.T, t).backward()
    assert torch.equal(fake_quant_ternary(w, gran).detach(), wq.detach())
    assert torch.allclose(w.grad, wq.grad)
    assert w.grad.abs().sum() > 0


def test_act8_fake_quant_values_and_ste():
    x = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.01, -0.5]], requires_grad=True)
    y = fake_quant_act8(x)
    s = 127 / torch.tensor([[1.0], [2.0]])
    assert torch.allclose(y, (x.detach() * s).round() / s)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_bitlinear_forward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=True)
    b = BitLinear.from_linear(lin, 32)
    assert b.weight is lin.weight               # latent weights are the trained parameters
    x = torch.randn(3, 64)
    q, s = ternary_quantize(lin.weight, 32)
    assert torch.allclose(b(x), F.linear(x, ternary_dequantize(q, s), lin.bias), atol=1e-6)
    b8 = BitLinear.from_linear(lin, 'per_channel', act_bits=8)
    assert not torch.allclose(b8(x), BitLinear.from_linear(lin, 'per_channel')(x))
    assert torch.allclose(b8(x), F.linear(fake_quant_act8(x), b8.quantized_weight(), lin.bias), atol=1e-6)


def _tiny(**kw):
    cfg = MiniCPM4Config.tiny(hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=128, dim_model_base=16, **kw)
    torch.manual_seed(0)
    return MiniCPM4ForCausalLM(cfg)


def test_converter_and_fake_quant_reference():
    m = _tiny()
    ids = torch.randint(0, 128, (2, 12))
    names = to_bitlinear(m, 'per_channel')
    assert len(names) == 2 * 7 and all(n.startswith('model.layers.') for n in names)
    assert type(m.lm_head) is nn.Linear and isinstance(m.model.embed_tokens, nn.Embedding)
    assert isinstance(m.model.layers[1].mlp.down_proj, BitLinear)
    ref = bitlinear_to_dense(m)
    assert not any(isinstance(x, BitLinear) for x in ref.modules())
    assert torch.equal(m(ids), ref(ids))
    # QAT gradients reach the latent weights
    m(ids).logsumexp(-1).mean().backward()
    assert m.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no nn.Linear"):
        to_bitlinear(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("gran", ['per_channel', 'per_tensor', 32])
def test_export_load_round_trip(tmp_path, gran):
    m = _tiny()
    to_bitlinear(m, gran)
    m.eval()
    export_ternary(m, tmp_path, scale_dtype=torch.float32)
    t = load_ternary(tmp_path)
    assert isinstance(t.model.layers[0].mlp.up_proj, TernaryLinear)
    ql = t.model.layers[0].mlp.up_proj
    q, _ = ternary_quantize(m.model.layers[0].mlp.up_proj.weight, gran)
    assert torch.equal(unpack_ternary(ql.qweight, ql.in_features), q)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        a, b = m(ids), t(ids)
    assert ((a - b).norm() / a.norm()).item() < 1e-5
    if gran == 'per_channel':  # (under the Triton interpreter every decode step is slow: one case is enough)
        out_m = m.generate([[1, 5, 9]], 3, stop_ids=[])
        out_t = t.generate([[1, 5, 9]], 3, stop_ids=[])
        assert out_m == out_t and len(out_t[0]) == 3
    qc = t.config.extra['quantization_config']
    assert qc['quant_method'] == 'bitcpm_ternary' and qc['granularity'] == gran


def test_export_sizes_and_errors(tmp_path):
    m = _tiny()
    with pytest.raises(ValueError, match="BitLinear"):
        export_ternary(m, tmp_path / 'a')
    to_bitlinear(m)
    export_ternary(m, tmp_path / 'b')
    with pytest.raises(ValueError, match="not a BitCPM"):
        from minicpm4_core.model import save_pretrained
        save_pretrained(_tiny(), tmp_path / 'c')
        load_ternary(tmp_path / 'c')


def test_memory_footprint():
    f = memory_footprint(MiniCPM4Config.minicpm4_8b())
    assert 7.5 < f['linear_bf16'] / f['linear_ternary'] < 8.0
    assert f['bf16'] > f['int4'] > f['ternary_g128'] > f['ternary_per_channel']
    assert f['params'] == f['linear_params'] + f['high_precision_params']
    assert 7.5e9 < f['params'] < 8.5e9


def test_qat_experiment_runs_branches_with_rewarmup():
    cfg = MiniCPM4Config.tiny(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
                              num_key_value_heads=1, vocab_size=64, dim_model_base=16)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 64, (16, 17), generator=g)
    exp = QATExperiment(total_steps=10, fractions=(0.2, 0.6), batch_size=2, qat_lr=5e-3, lr=1e-2)
    res = run_qat_experiment(lambda: MiniCPM4ForCausalLM(cfg), rows, rows[:4], exp, keep=(0.6,))
    kinds = [r['kind'] for r in res['runs']]
    assert kinds == ['fp', 'qat', 'qat', 'scratch']
    for r in res['runs']:
        assert math.isfinite(r['final_loss'])
        assert len(r['history']['loss']) == r['steps']
    qat6 = next(r for r in res['runs'] if r['kind'] == 'qat' and r['qat_fraction'] == 0.6)
    assert qat6['start_step'] == 4 and qat6['steps'] == 6
    lr = qat6['history']['lr']
    assert lr[0] < 5e-3 and max(lr) == pytest.approx(5e-3) and lr[-1] < max(lr)   # re-warmup, peak, decay
    assert all(v == pytest.approx(1e-2) for v in res['trunk']['lr'][1:])            # trunk: stable after warmup
    assert any(isinstance(x, BitLinear) for x in res['models'][0.6].modules())
    rows_s = qat_summary(res)
    assert next(r for r in rows_s if r['kind'] == 'scratch')['minus_scratch'] == 0
