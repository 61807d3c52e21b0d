"""`ray.cloudpickle`: the cloudpickle that hpcray pickles functions and values with.

Refs pickled with it outside a task's arguments or results (out of band: to a file, a
queue of one's own) are pinned for the life of the process that pickled them, as in Ray
(object_ref.py); `hpcray._private.internal_api.free` lets them go.
"""

from cloudpickle import *  # noqa: F401,F403 - the whole module, under Ray's name
from cloudpickle import dump, dumps, load, loads  # noqa: F401 - what programs call
