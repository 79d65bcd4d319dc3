"""Expert-parallel Mixture-of-Experts trainer."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """`model, cfg = load_model(PATH)`: a trained model in one process, in eval mode.

    PATH is a run.dir (its newest complete checkpoint, saved at any EP size), a checkpoint
    directory, or an export (`python -m trainer export`). `model(tokens_BS).logits` is
    `[B, S, vocab]`; tokens are the run's tokenizer's ids (bytes by default). See `trainer.interop.export.load_model`."""
    from .interop.export import load_model as _load_model  # torch is imported on first use only

    return _load_model(path, device)
