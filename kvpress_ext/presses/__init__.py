"""kvpress_ext's own presses, one module per method; each registers itself by name on import."""
