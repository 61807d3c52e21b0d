"""`inspect_serializability`: find what in an object cannot be pickled, as Ray's
`ray.util.inspect_serializability` does (a debugging aid, not used by the runtime)."""

from __future__ import annotations

import inspect
import sys

from hpcray.serialization import dumps_value

_RULE = "=" * 61


class FailureTuple:
    """An object that cannot be pickled, the name it was found under and what holds it."""

    __slots__ = ("obj", "name", "parent")

    def __init__(self, obj, name: str, parent):
        self.obj = obj
        self.name = name
        self.parent = parent

    def __repr__(self) -> str:
        return f"FailTuple({self.name} [obj={self.obj}, parent={self.parent}])"


def _pickle_error(obj) -> Exception | None:
    try:
        dumps_value(obj)
    except Exception as exc:  # noqa: BLE001 - any pickling failure
        return exc
    return None


def _members(obj) -> list[tuple[str, object]]:
    """What `obj` carries when pickled: a function's globals and closure, an object's
    attributes."""
    if inspect.isfunction(obj):
        found = inspect.getclosurevars(obj)
        return list(found.globals.items()) + list(found.nonlocals.items())
    try:
        return list(vars(obj).items())
    except TypeError:
        return []


def _inspect(obj, name: str, depth: int, parent, failures: set, out, indent: str) -> bool:
    error = _pickle_error(obj)
    if error is None:
        return True
    print(f"{indent}!!! FAIL serialization: {error}", file=out)
    found = False
    if depth > 0:
        members = _members(obj)
        if members:
            print(f"{indent}Detected {len(members)} member(s) of {name}. Checking "
                  "serializability...", file=out)
        for member_name, member in members:
            if _pickle_error(member) is not None:
                print(f"{indent}    Serializing {member_name!r} {member!r:.100}...", file=out)
                _inspect(member, member_name, depth - 1, obj, failures, out, indent + "    ")
                found = True
    if not found:
        failures.add(FailureTuple(obj, name, parent))
    return False


def inspect_serializability(base_obj, name: str | None = None, depth: int = 3,
                            print_file=None) -> tuple[bool, set]:
    """Whether `base_obj` pickles, and the set of `FailureTuple`s of the innermost objects
    that do not (looked for down to `depth` levels of globals, closures and attributes);
    prints what it checks to `print_file` (stdout)."""
    out = print_file if print_file is not None else sys.stdout
    name = name or repr(base_obj)
    print(_RULE, file=out)
    print(f"Checking Serializability of {base_obj!r:.200}", file=out)
    print(_RULE, file=out)
    failures: set = set()
    ok = _inspect(base_obj, name, depth, None, failures, out, "")
    if ok:
        print("Serialization succeeded!", file=out)
    else:
        print(_RULE, file=out)
        print("Variable:\n", file=out)
        for failure in failures:
            print(f"\t{failure}", file=out)
        print("\nwas found to be non-serializable.", file=out)
    print(_RULE, file=out)
    return ok, failures
