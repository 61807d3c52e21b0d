"""One burst of no-op work for `valgrind --tool=callgrind`: the instructions per task of
the driver's process (its thread and its node's thread), load-proof where wall time is not.

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python benchmarks/instructions.py async 2000
    ... the same with 6000; (the second "Collected" minus the first) / 4000 = per task

Modes: `async` (one batch of N no-op tasks, then get), `actor` (N calls to one actor),
`nn` (two tasks each making N/2 calls to an actor of their own: the node's side only,
the callers and the actors are workers). Compile the tree first (python -m compileall
hpcray): a source compiled during the first run only would count against the difference.
The node's switch interval is Python's 5 ms here, as in 3a2e1e0, so both trees run the
same interleaving; NOGC=1 disables the cyclic GC (its share is the difference). Counts
repeat to about +-1k per task (when collections happen moves them).
"""

import gc
import os
import sys

import hpcray as ray
from hpcray.runtime import node_manager

node_manager.NODE_SWITCH_INTERVAL = 0.005
mode, n = sys.argv[1], int(sys.argv[2])
ray.init(num_cpus=2)
if os.environ.get("NOGC"):
    gc.disable()


@ray.remote
def noop():
    return None


@ray.remote
class Actor:
    def ping(self):
        return None


@ray.remote
def call_actor(actor, calls):
    ray.get([actor.ping.remote() for _ in range(calls)])
    return calls


one = Actor.remote()
ray.get(one.ping.remote())
pairs = [Actor.options(num_cpus=0).remote() for _ in range(2)]
ray.get([actor.ping.remote() for actor in pairs])
ray.get([call_actor.remote(actor, 10) for actor in pairs])
ray.get([noop.remote() for _ in range(50)])
if mode == "async":
    ray.get([noop.remote() for _ in range(n)])
elif mode == "actor":
    ray.get([one.ping.remote() for _ in range(n)])
elif mode == "nn":
    ray.get([call_actor.remote(actor, n // 2) for actor in pairs])
else:
    raise SystemExit(f"unknown mode {mode!r}: async, actor or nn")
ray.shutdown()
