"""pixart-tune: fine-tuning and LoRA toolkit for PixArt-Sigma."""

__version__ = "0.1.0"
