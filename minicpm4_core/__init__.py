"""A literate, notebook-driven reimplementation of MiniCPM4: InfLLM v2 sparse attention, UltraClean, ModelTunnel, chunk-wise RL, FR-Spec, P-GPTQ and BitCPM.

Modules:

- `minicpm4_core.config`: One dataclass that reads and writes a Hugging Face `config.json` of the MiniCPM4 family, with presets for the released 0.5B and 8B shapes and a tiny one for CPU teaching runs.
- `minicpm4_core.data`: Everything here runs with no network. A seeded generator writes a small synthetic *world* (facts about invented people and places, arithmetic with worked steps, short stories), long-context retrieval items (a pass key hidden in filler text), and labelled low-quality text for the data-quality section. A BPE tokenizer is trained on it.
- `minicpm4_core.infllmv2`: PAPER.md section 2. Every query looks at only a few *blocks* of the context. Which blocks? The ones whose *semantic kernels* (means of small overlapping windows of keys) score highest against the query. No new parameters: the same keys that dense attention uses decide where to look.
- `minicpm4_core.kernels.w4a16`: Packed 4-bit weights with group-wise scales and zeros, a pure-torch reference, and two Triton kernels that dequantize in registers: a split-K GEMV for decode (M = 1) and a tiled GEMM (prefill, and decode with M = 2..16). Used by the `QuantLinear` of `minicpm4_core.pgptq` (notebook 70) on CUDA.
- `minicpm4_core.model`: RMSNorm, RoPE/LongRoPE, grouped-query attention, SwiGLU and the muP scale factors; a KV cache, `generate()`, and Hugging Face safetensors I/O, so a real MiniCPM4 folder on disk loads and runs.
- `minicpm4_core.runner`: `minicpm4 run --profile ci|gpu|edge [--only NAME]` executes the notebooks of `nbs/` and `tutorials/` with papermill, injecting the profile's parameters, and writes a report of status, time and the metrics each notebook recorded.
- `minicpm4_core.train`: A small, complete pretraining loop. In the `ci` profile a tiny model learns the embedded corpus on the CPU in about a minute; in the `gpu` profile a ~26M-parameter model learns the synthetic world well enough to answer its questions and do its sums, and is saved for the later sections."""

__version__ = "0.0.1"
