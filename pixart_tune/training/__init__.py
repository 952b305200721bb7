"""LoRA training: diffusion math, optimizers, the trainer, checkpoints and memory plans."""
