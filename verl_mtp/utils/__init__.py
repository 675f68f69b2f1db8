"""Utilities of verl-mtp that are not part of the training method itself (CPU support, local runs)."""
