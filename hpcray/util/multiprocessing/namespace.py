"""The module namespace a pool actor keeps for the functions it is sent by value.

A function of the driver's script (`__main__`, a notebook, a lambda) reaches an actor by
value: cloudpickle rebuilds it with a fresh dict of globals on every call. So what a
`multiprocessing.Pool` initializer typically does, `global model; model = load()`, would
land in a dict that the mapped function never sees (Ray's pool documents this as a
limitation). Here every such function runs in one namespace per module name, kept for
the actor's life, as a worker process's module is in Python's pool:

- the names the initializer assigned stay as it left them (the worker's state);
- every other name takes the value the driver sent with the latest call, so a constant
  the driver changed between two maps is seen, as in Ray;
- helper functions sent along (the globals the function uses) are rebound too.

Functions of importable modules are left alone: their globals are the module itself.
"""

from __future__ import annotations

import functools
import sys
import types


def _shipped_by_value(func) -> bool:
    if not isinstance(func, types.FunctionType):
        return False
    module = sys.modules.get(func.__module__)
    return module is None or vars(module) is not func.__globals__


def _rebound(func: types.FunctionType, namespace: dict) -> types.FunctionType:
    copy = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__,
                              func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__dict__.update(func.__dict__)
    copy.__qualname__ = func.__qualname__
    copy.__module__ = func.__module__
    copy.__doc__ = func.__doc__
    return copy


class ScriptNamespaces:
    """One namespace per module name for the functions sent by value to this actor."""

    def __init__(self):
        self._namespaces: dict[str, dict] = {}
        self._initializer_names: dict[str, set] = {}  # module -> names it assigned

    def bind(self, func):
        """`func`, running in its module's namespace when it came by value."""
        if isinstance(func, functools.partial):
            return functools.partial(self.bind(func.func), *func.args, **func.keywords)
        if not _shipped_by_value(func):
            return func
        module = func.__module__
        namespace = self._namespaces.setdefault(module, {})
        kept = self._initializer_names.get(module, ())
        shipped = func.__globals__
        for name, value in shipped.items():
            if name in kept:
                continue
            if isinstance(value, types.FunctionType) and value.__globals__ is shipped:
                value = _rebound(value, namespace)
            namespace[name] = value
        return _rebound(func, namespace)

    def run_initializer(self, initializer, initargs) -> None:
        """Call it in its namespace and keep what it assigned there."""
        target = initializer.func if isinstance(initializer, functools.partial) else initializer
        if not _shipped_by_value(target):
            initializer(*initargs)
            return
        namespace = self._namespaces.setdefault(target.__module__, {})
        bound = self.bind(initializer)
        before = dict(namespace)
        bound(*initargs)
        assigned = {name for name, value in namespace.items()
                    if name not in before or before[name] is not value}
        self._initializer_names.setdefault(target.__module__, set()).update(assigned)
