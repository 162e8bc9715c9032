"""Compress-in-context workflow: precompute a bounded cache of worked examples, answer from it, score."""
