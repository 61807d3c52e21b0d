"""The node operations (messages.ONEWAY_OPS / REQUEST_OPS) as the three sides see them:
the node serves each with one op_<name> method (checked at import), and every operation
a worker's client sends (client.py) is declared, of the right kind, with as many
arguments as its server method takes. A mistyped op or a changed signature fails here,
not as an error reply on some rank at run time."""

import ast
import inspect
from pathlib import Path

from hpcray.runtime import messages
from hpcray.runtime.worker_requests import WorkerRequests

CLIENT = Path(messages.__file__).with_name("client.py")


def _sent_operations() -> list:
    """(kind, op, argument count or None, line) of every operation client.py sends."""
    sent = []
    for node in ast.walk(ast.parse(CLIENT.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("send_oneway", "request") and node.args \
                and isinstance(node.args[0], ast.Constant):
            kind = "oneway" if node.func.attr == "send_oneway" else "request"
            args = node.args[1] if len(node.args) > 1 else None
            count = len(args.elts) if isinstance(args, ast.Tuple) else None
            sent.append((kind, node.args[0].value, count, node.lineno))
        elif isinstance(node, ast.Tuple) and len(node.elts) >= 3 \
                and isinstance(node.elts[0], ast.Name) and node.elts[0].id == "_NOTICE" \
                and isinstance(node.elts[1], ast.Constant):
            args = node.elts[2]
            count = len(args.elts) if isinstance(args, ast.Tuple) else None
            sent.append(("oneway", node.elts[1].value, count, node.lineno))
    return sent


def _takes(op: str, skip: int) -> tuple[int, int]:
    """(fewest, most) arguments op_<op> takes after self, the worker and `skip` more."""
    params = list(inspect.signature(getattr(WorkerRequests, "op_" + op)).parameters.values())
    params = params[2 + skip:]
    return sum(p.default is inspect.Parameter.empty for p in params), len(params)


def test_every_operation_the_client_sends_is_declared_and_fits_its_server():
    sent = _sent_operations()
    # Every declared operation is sent somewhere (the scan finds the client's calls).
    assert {op for _, op, _, _ in sent} == set(messages.ONEWAY_OPS) | set(messages.REQUEST_OPS)
    for kind, op, count, line in sent:
        declared = messages.ONEWAY_OPS if kind == "oneway" else messages.REQUEST_OPS
        assert op in declared, f"client.py:{line} sends {kind} {op!r}, not declared as one"
        fewest, most = _takes(op, 0 if kind == "oneway" else 1)
        assert count is None or fewest <= count <= most, \
            f"client.py:{line} sends {op!r} {count} arguments; op_{op} takes {fewest}-{most}"


def test_the_server_is_held_to_the_declared_list():
    messages.check_operations(WorkerRequests)

    class Extra(WorkerRequests):
        def op_mistyped(self, worker):
            pass

    try:
        messages.check_operations(Extra)
    except TypeError as exc:
        assert "mistyped" in str(exc)
    else:
        raise AssertionError("an undeclared op_ method was accepted")


def _public_methods(cls) -> set:
    names = set()
    for klass in cls.__mro__[:-1]:
        names |= {name for name, value in vars(klass).items()
                  if not name.startswith("_") and callable(value)}
    return names


def test_the_driver_and_a_worker_offer_the_same_operations():
    # The driver calls its node in process (DriverClient), a worker sends (WorkerClient):
    # one API for the code above them (api.py), whichever process it runs in.
    from hpcray.runtime.client import DriverClient, WorkerClient
    only_in_a_generator_task = {"generator_pause", "generator_slot"}
    only_for_the_driver = {"drain"}  # Slurm's drain signal reaches the driver's process
    assert _public_methods(WorkerClient) - _public_methods(DriverClient) == \
        only_in_a_generator_task
    assert _public_methods(DriverClient) - _public_methods(WorkerClient) == only_for_the_driver
