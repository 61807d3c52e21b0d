"""Ray's `ray._private` modules that Ray programs and tools call."""

from hpcray._private import internal_api  # noqa: E402,F401 - ray._private.internal_api.free
