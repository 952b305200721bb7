"""The command layer: how each verb of ``pixart-tune`` reads its arguments."""
