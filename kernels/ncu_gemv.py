"""Launch each decode GEMV of the quantized kernels (and cuBLAS bf16) a few times between cudaProfilerStart/Stop, for
Nsight Compute (issue 13: why W4A16 / ternary M = 1 GEMVs stream slower than cuBLAS's bf16 GEMV).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section LaunchStats --section SchedulerStats \
        python kernels/ncu_gemv.py [--K 4096 --N 16384] [--which bf16,gemvs,gemvu,gemvu_nogate,gemvu1,gemvtu,ternary,ternary_mvu,ternary_mvu1] > ncu.txt

Everything is compiled and run once before the profiled region; inside it each variant runs `--reps` times on
the same weights (ncu flushes the caches before each profiled launch by default). Without ncu it just prints the
variants' maximum error against the float32 reference, so it also serves as a quick correctness check.
"""
import argparse

import torch
import torch.nn.functional as F

from minicpm4_core.kernels.w4a16 import W4A16Config, default_config, dequantize_w4, w4a16_matmul
from minicpm4_core.kernels.ternary import pack_ternary, pick_config, ternary_matmul, TernaryConfig

GEMVS = {'gemvs': W4A16Config('gemvs', 1, 256, 32, 32, 1, 2), 'gemvs_d3': W4A16Config('gemvs', 1, 1024, 32, 16, 2, 3),
         'gemvu': W4A16Config('gemvu', 1, 1024, 32, 1, 4, 2), 'gemvu1': W4A16Config('gemvu', 1, 1024, 32, 1, 4, 1),
         'gemvtu': W4A16Config('gemvtu', 1, 128, 128, 1, 4, 2)}
MVU = {'ternary_mvu': TernaryConfig('mvu', 1, 256, 32, 1, 4, 2, 1), 'ternary_mvu1': TernaryConfig('mvu', 1, 512, 32, 1, 4, 1, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--K', type=int, default=4096)
    ap.add_argument('--N', type=int, default=16384)
    ap.add_argument('--which', default='bf16,gemvs,gemvu,gemvu_nogate,gemvu1,gemvtu,ternary,ternary_mvu,ternary_mvu1')
    ap.add_argument('--reps', type=int, default=2)
    ap.add_argument('--device', default='cuda', help="'cpu' (with TRITON_INTERPRET=1, small --K/--N): a dry run")
    a = ap.parse_args()
    K, N, G = a.K, a.N, 128
    g = torch.Generator(a.device).manual_seed(0)
    qw = torch.randint(-2**31, 2**31, (K // 8, N), dtype=torch.int32, device=a.device, generator=g)
    qz = torch.randint(-2**31, 2**31, (K // G, N // 8), dtype=torch.int32, device=a.device, generator=g)
    s = (torch.rand(K // G, N, device=a.device, generator=g) * 0.02 + 0.005).half()
    x = torch.randn(1, K, device=a.device, generator=g).to(torch.bfloat16)
    Wf = dequantize_w4(qw, s, qz, G, torch.float32)
    ref = x.float() @ Wf
    W_nk = Wf.t().contiguous().to(torch.bfloat16)
    del Wf
    tq = torch.randint(-1, 2, (N, K), device=a.device, generator=g)
    tw = pack_ternary(tq)
    ts = torch.rand(N, 1, device=a.device, generator=g) * 0.02 + 0.005
    tref = x.float() @ (tq.float() * ts).t()
    calls = {}
    for w in a.which.split(','):
        if w == 'bf16':
            calls[w] = (lambda: F.linear(x, W_nk), ref)
        elif w in ('gemvtc', 'gemv'):
            d = default_config(1, N, K, G, x.device)
            cfg = d if d.kernel == w or a.device == 'cpu' else W4A16Config(w, 1, 64, 128, 4, 4, 4)
            calls[w] = (lambda cfg=cfg: w4a16_matmul(x, qw, s, qz, G, config=cfg), ref)
            print(w, cfg)
        elif w == 'gemvu_nogate':     # kernel 6 without its load gate: what the gate is worth
            import minicpm4_core.kernels.w4a16 as w4
            def nogate(cfg=GEMVS['gemvu']):
                w4._GEMVU_GATE = False
                try:
                    return w4a16_matmul(x, qw, s, qz, G, config=cfg)
                finally:
                    w4._GEMVU_GATE = True
            calls[w] = (nogate, ref)
            print(w, GEMVS['gemvu'])
        elif w in GEMVS:
            calls[w] = (lambda cfg=GEMVS[w]: w4a16_matmul(x, qw, s, qz, G, config=cfg), ref)
            print(w, GEMVS[w])
        elif w == 'ternary':
            print(w, pick_config(1, N, K // 4))
            calls[w] = (lambda: ternary_matmul(x, tw, ts, K), tref)
        elif w in MVU:
            print(w, MVU[w])
            calls[w] = (lambda tcfg=MVU[w]: ternary_matmul(x, tw, ts, K, config=tcfg), tref)
        elif w == 'ternary_mvs':
            tcfg = TernaryConfig('mvs', 1, 512, 32, 8, 4, 1, 1)
            print(w, tcfg)
            calls[w] = (lambda: ternary_matmul(x, tw, ts, K, config=tcfg), tref)
        else:
            raise ValueError(f"--which: unknown variant {w!r}")
    for w, (fn, r) in calls.items():
        y = fn(); fn()
        if a.device != 'cpu': torch.cuda.synchronize()
        print(f"{w}: max_err {((y.float() - r).abs().max() / r.abs().max()).item():.2e}", flush=True)
    if a.device == 'cpu':
        return
    torch.cuda.cudart().cudaProfilerStart()
    for w, (fn, r) in calls.items():
        for _ in range(a.reps):
            fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == '__main__':
    main()
