"""`import ray` answered by hpcray, for running Ray's own programs unmodified.

Put this folder first on PYTHONPATH. `import ray` then returns the `hpcray` module
itself, and `ray.X.Y` is `hpcray.X.Y` (the same module object, so classes, exceptions
and isinstance checks are hpcray's). A name hpcray does not have fails as it would
for a user: `import ray.util.placement_group` raises ModuleNotFoundError, `from ray
import DynamicObjectRefGenerator` raises ImportError.

This only maps names; it adds, patches and wraps nothing in hpcray.
"""

import importlib
import importlib.abc
import importlib.util
import sys

import hpcray


class _RayAsHpcray(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds `ray.<path>` as the module `hpcray.<path>`."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("ray."):
            return None
        # Imports hpcray's parent packages. None where hpcray has no such module: the
        # import then fails with ModuleNotFoundError, as it must.
        if importlib.util.find_spec("hpcray." + fullname[4:]) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module("hpcray." + spec.name[4:])
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):
        # The import machinery set the module's __spec__ to the `ray.` one; give it
        # back its own, so hpcray's module is left exactly as it was.
        module.__spec__ = module.__spec__.loader_state


sys.meta_path.insert(0, _RayAsHpcray())
# The import system returns what sys.modules holds once this file has run.
sys.modules[__name__] = hpcray
