"""Adapters: the PEFT LoRA path, loading any layout, merging, fusing, exporting."""
