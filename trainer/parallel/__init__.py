"""Parallel layer: how the processes are arranged and how a model is spread over them.

| module | job |
| --- | --- |
| `dist.py` | the world and its EP / expert-replica groups, the `Layout`, devices, timeouts, shutdown |
| `parallelize.py` | applies expert parallelism to a model built without groups: local experts, initialisation |
| `grad_sync.py` | gradient semantics: dense mean over the world, experts summed over replicas; global-norm clipping |
| `fsdp.py` | FSDP2 units composed with EP: dense over the world, experts over their replicas (divided by the world) |
| `activation_checkpointing.py` | `train.activation_checkpointing`: blocks or MoE layers recomputed, routing replayed |
| `memory.py` | the memory plan: bytes per rank (params, grads, optimizer, activations) and all_to_all traffic |
| `compile.py` | `train.compile`: torch.compile of the norms, attention and dense FFNs; what inductor needs |

Imports: `config`, `seeding`, `model`, `moe` and `data` only (the layers below). Model code
never imports this package: the model is built without process groups, then parallelized.
"""
