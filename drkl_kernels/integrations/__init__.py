"""Adapters for training frameworks: ``trl`` (TRL's trainers) and ``hf`` (a Hugging Face
``Trainer.compute_loss``). Each reads configs, fetches hidden states and heads, and calls the
public API; none holds loss maths. They need their extras (``pip install 'drkl-kernels[trl]'``,
``'drkl-kernels[hf]'``); the core package imports without them."""
