"""A task's arguments: plain values take pickle's short way (serialization.plain_call_args),
everything else cloudpickle's; both reach the task as they were given."""

import enum
import pickle

import numpy as np
import pytest

import hpcray
from hpcray.serialization import plain_call_args

pytestmark = pytest.mark.timeout(120)


class Colour(enum.IntEnum):  # an int, but not exactly: its class must travel by value
    RED = 1


def test_only_plain_values_take_the_short_way():
    pickled = plain_call_args((1, 2.5, "s", b"b", True, None), {"k": 3})
    assert pickle.loads(pickled) == ((1, 2.5, "s", b"b", True, None), {"k": 3})
    assert plain_call_args((), {}) == pickle.dumps(((), {}), protocol=5)
    for args, kwargs in [(([1],), {}), ((1,), {"k": [2]}), ((Colour.RED,), {}),
                         ((np.float64(1.0),), {}), ((1, (2, 3)), {})]:
        assert plain_call_args(args, kwargs) is None, (args, kwargs)


def test_every_kind_of_argument_arrives_as_given(ray_shared):
    @hpcray.remote
    def echo(*args, **kwargs):
        return args, kwargs

    big = "x" * (300 * 1024)  # plain, but beyond the inline threshold: stored
    ref = hpcray.put(7)
    cases = [((1, 2.5, "s", b"b", True, None), {"k": 3}),
             ((Colour.RED, [1, 2]), {"nested": {"a": (1,)}}),
             ((big,), {"n": 1})]
    for args, kwargs in cases:
        got_args, got_kwargs = hpcray.get(echo.remote(*args, **kwargs))
        assert got_args == args and got_kwargs == kwargs
        assert [type(a) for a in got_args] == [type(a) for a in args]
    # a ref among plain values is resolved, as a top-level argument is
    assert hpcray.get(echo.remote(1, ref, k=2)) == ((1, 7), {"k": 2})
