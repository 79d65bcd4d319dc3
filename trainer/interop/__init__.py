"""Interop layer: trained weights outside training.

| module | job |
| --- | --- |
| `export.py` | a checkpoint (any EP size) as safetensors; `load_model` in one process; `python -m trainer eval` |
| `hf_mixtral.py` | the Hugging Face transformers Mixtral mapping: export to it, `init.from_hf` from it |
| `generate.py` | sampling a continuation (`python -m trainer sample`) |

Imports: `build` and the layers below it; never the loop or a tool.
"""
