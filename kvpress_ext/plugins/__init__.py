"""Plugins: the hook specifications a plugin implements, the loader, and our own built-in registrations."""
