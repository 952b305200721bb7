"""Launcher for the pixart-tune preview app, as Hugging Face Spaces expect."""
