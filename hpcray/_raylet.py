"""Where Ray keeps `ObjectRef` and its generators (`from ray._raylet import
ObjectRefGenerator`, as Ray's own documentation does); hpcray's are these."""

from hpcray.object_ref import ObjectRef
from hpcray.object_ref_generator import DynamicObjectRefGenerator, ObjectRefGenerator

__all__ = ["DynamicObjectRefGenerator", "ObjectRef", "ObjectRefGenerator"]
