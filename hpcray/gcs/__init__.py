"""The global control store: key-sharded tables of objects, tasks, actors, functions and
nodes, kept inside the node managers of ranks 0..k-1 (shard.py), and the client each node
manager talks to them through (client.py). No MPI here: the node manager moves the
messages."""

from hpcray.gcs.client import GcsClient
from hpcray.gcs.shard import GCS_OPS, GcsShard, is_gcs_request, shard_of, validate_shards
from hpcray.gcs.tables import ActorInfo, NameTaken, NodeInfo, ObjectInfo, TaskInfo

__all__ = [
    "GCS_OPS",
    "ActorInfo",
    "GcsClient",
    "GcsShard",
    "NameTaken",
    "NodeInfo",
    "ObjectInfo",
    "TaskInfo",
    "is_gcs_request",
    "shard_of",
    "validate_shards",
]
