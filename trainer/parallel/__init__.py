"""Parallel layer: how the processes are arranged and how a model is spread over them.

| module | job |
| --- | --- |
| `dist.py` | the world and its EP / expert-replica groups, the `Layout`, devices, timeouts, shutdown |
| `parallelize.py` | applies expert parallelism to a model built without groups: local experts, initialisation |
| `grad_sync.py` | gradient semantics: dense mean over the world, experts summed over replicas; global-norm clipping |

Imports: `config`, `seeding`, `model`, `moe` and `data` only (the layers below). Model code
never imports this package: the model is built without process groups, then parallelized.
"""
