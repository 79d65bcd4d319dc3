"""Interop layer: trained weights outside training.

| module | job |
| --- | --- |
| `export.py` | a checkpoint (any EP size) as safetensors; `load_model` in one process; `python -m trainer eval` |
| `hf.py` | `export --format hf` and `init.from_hf` for every family; the family registry and `--hf-arch auto` |
| `hf_mapping.py` | what the families share: family records, tensor links, config.json and its checks |
| `hf_mixtral.py` | Mixtral as a family: what it cannot express, its config keys |
| `hf_qwen3_moe.py` | Qwen3-MoE as a family (per-head q/k norms, dense `mlp_only_layers`) |
| `hf_olmoe.py` | OLMoE as a family (q/k norms over the whole projection, every block MoE) |
| `hf_glm4_moe.py` | GLM-4.5 as a family (DeepSeek-V3 routing: sigmoid, expert bias, groups, shared experts) |
| `generate.py` | sampling a continuation (`python -m trainer sample`) |

Imports: `build` and the layers below it; never the loop or a tool.
"""
