"""Runnable examples: python -m trainops.examples.<name>."""
