"""Helpers on top of the core API, as `ray.util`."""

from hpcray.util.actor_pool import ActorPool

__all__ = ["ActorPool"]
