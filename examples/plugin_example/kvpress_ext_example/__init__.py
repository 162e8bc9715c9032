"""An example kvpress-ext plugin: one press, registered through the plugin hook."""
