"""Dataset preparation: scan and validate, caption, bucket, and cache features."""
