"""Files we write and read back: safe atomic writes, saved caches, input files."""
