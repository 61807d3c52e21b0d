"""Ray's `ray._private` modules that Ray programs and tools call."""
