"""Plugins: the hook specifications a plugin implements, the loader, and our own built-in registrations."""

from kvpress_ext.plugins.loader import failed_plugins, load_plugins  # the old kvpress_ext.plugins module's API

__all__ = ["failed_plugins", "load_plugins"]
