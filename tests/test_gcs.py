"""The GCS shards and clients, driven in-process over a fake network.

Every rank has a client; ranks 0..k-1 also hold a shard. Messages are pickled on the way
(as MPI would) and every shard is validated after each one; cross-shard invariants are
checked whenever the network is empty.
"""

import pickle
import zlib

import pytest

from hpcray import ids
from hpcray.gcs import (
    ActorInfo,
    GcsClient,
    GcsShard,
    NameTaken,
    NodeInfo,
    ObjectInfo,
    is_gcs_request,
    shard_of,
    validate_shards,
)
from hpcray.gcs import shard as shard_module
from hpcray.gcs.shard import LOG_LENGTH
from hpcray.gcs.tables import ALIVE, DEAD, RESTARTING, TASK_ROW_FIELDS

NUM_RANKS = 4


class FakeNetwork:
    def __init__(self, num_shards: int, num_ranks: int = NUM_RANKS) -> None:
        self.now = 100.0
        self.shards = [GcsShard(i, num_shards, clock=lambda: self.now)
                       for i in range(num_shards)]
        self.in_flight: list[tuple[int, int, tuple]] = []  # (source, dest, message)
        self.clients = [GcsClient(rank, num_shards, self._sender(rank))
                        for rank in range(num_ranks)]
        self.delivered: list[tuple[int, int, tuple]] = []
        self.notifications: dict[int, list[tuple[str, object, object]]] = {
            rank: [] for rank in range(num_ranks)}
        for rank, client in enumerate(self.clients):
            for channel in ("object_location", "object_deleted", "actor"):
                client.subscribe_handler(
                    channel, lambda key, payload, rank=rank, channel=channel:
                    self.notifications[rank].append((channel, key, payload)))

    def _sender(self, source: int):
        return lambda dest, message: self.in_flight.append((source, dest, message))

    def pump(self) -> int:
        count = 0
        while self.in_flight:
            source, dest, message = self.in_flight.pop(0)
            message = pickle.loads(pickle.dumps(message))
            self.delivered.append((source, dest, message))
            if is_gcs_request(message):
                for out_dest, out_message in self.shards[dest].handle(source, message):
                    self.in_flight.append((dest, out_dest, out_message))
            else:
                assert self.clients[dest].on_message(source, message), message
            for shard in self.shards:
                shard.validate()
            count += 1
        validate_shards(self.shards)
        return count

    def call(self, rank: int, op: str, key, *args):
        """One request from `rank`, pumped to completion; the result."""
        results = []
        self.clients[rank].request(op, key, *args, callback=results.append)
        self.pump()
        assert len(results) == 1
        return results[0]

    def run(self, rank: int, method: str, *args):
        """A client helper (get_nodes, register_actor...) pumped to completion."""
        results = []
        getattr(self.clients[rank], method)(*args, callback=results.append)
        self.pump()
        assert len(results) == 1
        return results[0]

    def holder(self, table: str, key) -> int:
        """Which shard's `table` holds `key` (exactly one does)."""
        holders = [s.index for s in self.shards if key in getattr(s, table)]
        assert len(holders) == 1, (table, key, holders)
        return holders[0]


@pytest.fixture(params=[1, 2], ids=["k1", "k2"])
def net(request):
    return FakeNetwork(request.param)


def object_ids(count):
    task_id = ids.new_task_id()
    return [ids.object_id_for(task_id, i) for i in range(count)]


def key_on(shard: int, num_shards: int, make):
    """A fresh key from `make()` that lands on `shard`."""
    for _ in range(1000):
        key = make()
        if shard_of(key, num_shards) == shard:
            return key
    raise AssertionError("no key found")


# -- routing ----------------------------------------------------------------------------


def test_shard_of_is_stable_and_typed():
    assert shard_of(b"abc", 1) == 0
    assert shard_of(b"abc", 7) == zlib.crc32(b"abc") % 7
    assert shard_of("actor-name", 5) == zlib.crc32(b"actor-name") % 5
    assert [shard_of(rank, 3) for rank in range(5)] == [0, 1, 2, 0, 1]
    assert shard_of(bytearray(b"abc"), 7) == shard_of(b"abc", 7)
    with pytest.raises(TypeError):
        shard_of(1.5, 2)


def test_keys_spread_over_shards(net):
    oids = object_ids(64)
    for i, oid in enumerate(oids):
        net.clients[i % NUM_RANKS].request("add_location", oid, i % NUM_RANKS, 8, 0, None)
    net.pump()
    counts = [len(shard.objects) for shard in net.shards]
    assert sum(counts) == 64
    assert all(count > 0 for count in counts), counts
    for oid in oids:
        assert net.holder("objects", oid) == shard_of(oid, len(net.shards))
    if len(net.shards) == 2:
        # Requests really went to rank 1, not only to rank 0.
        assert any(dest == 1 and is_gcs_request(m) for _, dest, m in net.delivered)


# -- objects ----------------------------------------------------------------------------


def test_object_locations(net):
    oid, small = object_ids(2)
    producer = ids.new_task_id()
    assert net.call(0, "get_object", oid) is None
    assert net.call(1, "add_location", oid, 1, 1000, 1, producer) is True
    assert net.call(2, "add_location", oid, 2, 1000, 1, None) is True
    info = net.call(3, "get_object", oid)
    assert info == ObjectInfo(1000, 1, {1, 2}, producer, None)
    assert net.call(3, "remove_location", oid, 1).locations == {2}
    assert net.call(0, "get_object", oid).locations == {2}
    # Replies are copies: changing one leaves the table alone.
    info.locations.add(99)
    assert net.call(0, "get_object", oid).locations == {2}
    # An inline value, no store copy.
    assert net.call(1, "add_location", small, None, 3, 1, None, b"abc") is True
    assert net.call(2, "get_object", small) == ObjectInfo(3, 1, set(), None, b"abc")
    assert net.call(2, "remove_location", object_ids(1)[0], 1) is None


def test_object_subscription_until_unsubscribe(net):
    oid = object_ids(1)[0]
    assert net.call(3, "subscribe_object", oid) is None  # not there yet
    net.call(1, "add_location", oid, 1, 10, 1, None)
    assert net.notifications[3] == [("object_location", oid, ObjectInfo(10, 1, {1}))]
    net.call(2, "add_location", oid, 2, 10, 1, None)
    assert net.notifications[3][-1] == ("object_location", oid, ObjectInfo(10, 1, {1, 2}))
    assert net.call(0, "subscribe_object", oid).locations == {1, 2}
    assert net.call(3, "unsubscribe_object", oid) is True
    assert net.call(3, "unsubscribe_object", oid) is False
    net.call(1, "add_location", oid, 3, 10, 1, None)
    assert len(net.notifications[3]) == 2
    assert net.notifications[0] == [("object_location", oid, ObjectInfo(10, 1, {1, 2, 3}))]
    assert all(not net.notifications[rank] for rank in (1, 2))


def test_delete_object_notifies_holders_and_subscribers(net):
    oid = object_ids(1)[0]
    net.call(1, "add_location", oid, 1, 10, 1, None)
    net.call(2, "add_location", oid, 2, 10, 1, None)
    net.call(3, "subscribe_object", oid)
    net.notifications[3].clear()
    deleted = net.call(1, "delete_object", oid)
    assert deleted.locations == {1, 2}
    for rank in (1, 2, 3):
        assert net.notifications[rank] == [("object_deleted", oid, None)]
    assert net.notifications[0] == []
    assert net.call(0, "get_object", oid) is None
    assert net.call(1, "delete_object", oid) is None
    assert all(not shard.object_subscribers for shard in net.shards)


def test_copy_reported_after_delete_is_turned_away(net):
    oid = object_ids(1)[0]
    net.call(1, "add_location", oid, 1, 10, 1, None)
    net.call(1, "delete_object", oid)
    assert net.call(2, "add_location", oid, 2, 10, 1, None) is False
    assert net.notifications[2] == [("object_deleted", oid, None)]
    assert net.call(0, "get_object", oid) is None


# -- tasks and functions ----------------------------------------------------------------


def test_tasks(net):
    task_id = ids.new_task_id()
    assert net.call(0, "get_task", task_id) is None
    assert net.call(1, "put_task", task_id, b"spec") is True
    task = net.call(2, "get_task", task_id)
    assert (task.spec, task.state) == (b"spec", "PENDING")
    assert net.call(2, "set_task_state", task_id, "FINISHED").state == "FINISHED"
    assert net.call(3, "get_task", task_id).state == "FINISHED"
    assert net.call(3, "delete_task", task_id).spec == b"spec"
    assert net.call(3, "get_task", task_id) is None
    assert net.call(3, "delete_task", task_id) is None
    assert net.call(3, "set_task_state", task_id, "RUNNING") is None


def test_task_events_move_forward_and_deleted_tasks_stay_deleted():
    shard = GcsShard(0, 1)
    early, late, kept, failed = (ids.new_task_id() for _ in range(4))
    parent = ids.new_task_id()
    # RUNNING before its spec (they come from different ranks), with the task's name.
    shard.apply_task_events([(early, "RUNNING", None, 2, "f", 1.0, 41)])
    assert (shard.tasks[early].spec, shard.tasks[early].state) == (None, "RUNNING")
    assert shard.list_tasks()[0][1] == "f"  # named before its spec arrives
    shard.apply_task_events([(early, "PENDING", "spec", None, None, 0.9, parent),  # fills in
                             (kept, "PENDING", "spec", None, None, 0.901, None),
                             (kept, "FINISHED", None, None, None, 1.1, None),
                             (kept, "RUNNING", None, 3, "k", 1.05, 42)])  # late: where only
    assert (shard.tasks[early].spec, shard.tasks[early].state, shard.tasks[early].node) == \
        ("spec", "RUNNING", 2)
    assert (shard.tasks[kept].state, shard.tasks[kept].node) == ("FINISHED", 3)
    row = dict(zip(TASK_ROW_FIELDS, shard.tasks[early].row(early, 7)))
    assert (row["parent_task_id"], row["creation_time_ms"], row["start_time_ms"],
            row["worker_pid"], row["owner"], row["type"]) == (parent, 900, 1000, 41, 7,
                                                               "NORMAL_TASK")
    # FINISHED and FAILED are final; a FAILED names its error type and ends once.
    shard.apply_task_events([(failed, "PENDING", "spec", None, None, 0.902, None),
                             (failed, "FAILED", None, None, None, 1.2, "TASK_CANCELLED"),
                             (failed, "FINISHED", None, None, None, 1.3, None),
                             (kept, "FAILED", None, None, None, 1.4, "WORKER_DIED")])
    row = dict(zip(TASK_ROW_FIELDS, shard.tasks[failed].row(failed, 0)))
    assert (row["state"], row["error_type"], row["end_time_ms"]) == \
        ("FAILED", "TASK_CANCELLED", 1200)
    assert (shard.tasks[kept].state, shard.tasks[kept].error_type) == ("FINISHED", None)
    # DELETED ends the lineage: the spec goes, what list_tasks shows stays in the history,
    # and a late event only fills it in (it never brings the entry back).
    shard.apply_task_events([(late, "PENDING", "spec", None, None, 0.903, None),
                             (late, "DELETED", None, None, None, None, None),
                             (late, "RUNNING", None, 1, "l", 1.5, 43),
                             (late, "PENDING", "spec", None, None, 0.904, None)])
    assert late not in shard.tasks and late in shard.task_history
    rows = {row[0]: dict(zip(TASK_ROW_FIELDS, row)) for row in shard.list_tasks()}
    assert (rows[late]["state"], rows[late]["node"], rows[late]["worker_pid"]) == \
        ("RUNNING", 1, 43)
    assert sorted(row["state"] for row in rows.values()) == \
        ["FAILED", "FINISHED", "RUNNING", "RUNNING"]
    # The history is bounded; an event for a task that left it is ignored.
    for _ in range(shard_module.TASK_HISTORY):
        task_id = ids.new_task_id()
        shard.apply_task_events([(task_id, "PENDING", "spec", None, None, 0.001, None),
                                 (task_id, "DELETED", None, None, None, None, None)])
    assert late not in shard.task_history
    assert len(shard.task_history) == shard_module.TASK_HISTORY
    shard.apply_task_events([(late, "FINISHED", None, None, None, 1.6, None)])
    assert late not in shard.tasks and late not in shard.task_history


def test_functions_idempotent(net):
    function_id = ids.new_task_id()
    assert net.call(0, "get_function", function_id) is None
    assert net.call(1, "put_function", function_id, b"code-1") is True
    assert net.call(2, "put_function", function_id, b"code-2") is False
    assert net.call(3, "get_function", function_id) == b"code-1"


# -- actors -----------------------------------------------------------------------------


def test_actor_register_update_get(net):
    actor_id = ids.new_actor_id()
    assert net.call(0, "get_actor", actor_id) is None
    assert net.call(0, "update_actor", actor_id, {"state": ALIVE}) is None
    assert net.run(1, "register_actor", actor_id, ActorInfo(class_name="Counter")) is True
    assert net.run(1, "register_actor", actor_id, ActorInfo(class_name="Counter")) is False
    updated = net.call(2, "update_actor", actor_id, {"state": ALIVE, "node": 2})
    assert (updated.state, updated.node, updated.class_name) == (ALIVE, 2, "Counter")
    net.call(2, "update_actor", actor_id, {"restarts": 1, "info": {"max_restarts": 3}})
    actor = net.call(3, "get_actor", actor_id)
    assert (actor.restarts, actor.info) == (1, {"max_restarts": 3})
    with pytest.raises(ValueError, match="cannot change"):
        net.call(0, "update_actor", actor_id, {"name": "other"})


def test_actor_names_collision_and_release(net):
    k = len(net.shards)
    # For k = 2 the name lives on the other shard than the actor: releasing it on death
    # takes a message between shards.
    first = key_on(0, k, ids.new_actor_id)
    name = key_on(k - 1, k, lambda: f"counter-{ids.new_task_id().hex()}")
    assert net.call(0, "lookup_actor_name", name) is None
    assert net.run(1, "register_actor", first, ActorInfo(name=name, class_name="C")) is True
    assert net.call(2, "lookup_actor_name", name) == first
    second = ids.new_actor_id()
    taken = net.run(2, "register_actor", second, ActorInfo(name=name, class_name="C"))
    assert taken == NameTaken(name, first)
    assert net.call(0, "get_actor", second) is None
    # A restart keeps the name; death frees it.
    net.call(1, "update_actor", first, {"state": RESTARTING})
    assert net.call(3, "lookup_actor_name", name) == first
    net.call(1, "update_actor", first, {"state": DEAD})
    assert net.call(3, "lookup_actor_name", name) is None
    assert net.call(3, "get_actor", first).state == DEAD
    if k == 2:
        assert any(is_gcs_request(m) and m[0] == "release_actor_name" and (src, dest) == (0, 1)
                   for src, dest, m in net.delivered)
    assert net.run(2, "register_actor", second, ActorInfo(name=name, class_name="C")) is True
    assert net.call(0, "lookup_actor_name", name) == second
    with pytest.raises(ValueError, match="terminal"):
        net.call(0, "update_actor", first, {"state": ALIVE})


def test_actor_subscription(net):
    actor_id = ids.new_actor_id()
    assert net.call(3, "subscribe_actor", actor_id) is None
    net.run(1, "register_actor", actor_id, ActorInfo(class_name="A"))
    assert net.notifications[3] == []  # registration is not a state change
    net.call(1, "update_actor", actor_id, {"state": ALIVE, "node": 1})
    [(channel, key, info)] = net.notifications[3]
    assert (channel, key, info.state, info.node) == ("actor", actor_id, ALIVE, 1)
    net.call(1, "update_actor", actor_id, {"state": ALIVE})  # no change, no notification
    assert len(net.notifications[3]) == 1
    assert net.call(3, "unsubscribe_actor", actor_id) is True
    net.call(1, "update_actor", actor_id, {"state": DEAD})
    assert len(net.notifications[3]) == 1


# -- nodes ------------------------------------------------------------------------------


def test_nodes_fan_out(net):
    for rank in range(NUM_RANKS):
        net.call(rank, "register_node", rank, {"CPU": 4.0 + rank})
    if len(net.shards) == 2:
        assert all(shard.nodes for shard in net.shards), "nodes on one shard only"
    net.now = 105.0
    assert net.call(2, "heartbeat", 2, {"CPU": 1.0}, 7).load == 7
    nodes = net.run(0, "get_nodes")
    assert [node.rank for node in nodes] == list(range(NUM_RANKS))
    assert nodes[2] == NodeInfo(2, {"CPU": 6.0}, {"CPU": 1.0}, 7, True, 105.0)
    assert nodes[3] == NodeInfo(3, {"CPU": 7.0}, {"CPU": 7.0}, 0, True, 100.0)
    # One reply per shard, merged into one callback.
    replies = [m for _, dest, m in net.delivered if dest == 0 and m[0] == "gcs_reply"]
    assert len(replies) >= len(net.shards)
    assert net.call(1, "heartbeat", 9, {}, 0) is None  # unknown rank


def test_heartbeat_without_reply(net):
    net.call(1, "register_node", 1, {"CPU": 1.0})
    sent = len(net.delivered)
    net.clients[1].request("heartbeat", 1, {"CPU": 0.0}, 3)
    assert net.pump() == 1  # the request, and no reply
    assert len(net.delivered) == sent + 1
    assert net.run(0, "get_nodes")[0].load == 3


def test_mark_node_dead(net):
    for rank in range(NUM_RANKS):
        net.call(rank, "register_node", rank, {"CPU": 1.0})
    only_on_2, on_1_and_2, inline = object_ids(3)
    net.call(2, "add_location", only_on_2, 2, 10, 0, b"t" * 16)
    net.call(2, "add_location", on_1_and_2, 2, 10, 0, None)
    net.call(1, "add_location", on_1_and_2, 1, 10, 0, None)
    net.call(2, "add_location", inline, 2, 3, 0, None, b"abc")
    actor_on_2, actor_on_3 = ids.new_actor_id(), ids.new_actor_id()
    net.run(0, "register_actor", actor_on_2, ActorInfo(ALIVE, node=2, class_name="A"))
    net.run(0, "register_actor", actor_on_3, ActorInfo(ALIVE, node=3, class_name="A"))
    watched = object_ids(1)[0]
    net.call(2, "subscribe_object", watched)
    result = net.run(0, "mark_node_dead", 2)
    assert result == {"lost_objects": [only_on_2], "actors": [actor_on_2]}
    assert net.call(0, "get_object", on_1_and_2).locations == {1}
    assert net.call(0, "get_object", inline).locations == set()
    nodes = net.run(0, "get_nodes")
    assert [node.alive for node in nodes] == [True, True, False, True]
    net.call(2, "heartbeat", 2, {"CPU": 1.0}, 0)
    assert not net.run(0, "get_nodes")[2].alive  # a dead node stays dead
    net.call(1, "add_location", watched, 1, 1, 1, None)
    assert not [n for n in net.notifications[2] if n[0] == "object_location"]


# -- bookkeeping ------------------------------------------------------------------------


def test_log_records_source_and_is_bounded():
    shard = GcsShard(0, 1, clock=lambda: 7.0)
    oid = object_ids(1)[0]
    shard.handle(3, ("get_object", 1, oid))
    assert list(shard.log) == [(7.0, 3, "get_object", oid)]
    for _ in range(LOG_LENGTH + 10):
        shard.handle(1, ("get_object", None, oid))
    assert len(shard.log) == LOG_LENGTH


def test_handle_returns_messages_only():
    shard = GcsShard(0, 1)
    oid = object_ids(1)[0]
    assert shard.handle(2, ("subscribe_object", 5, oid)) == [(2, ("gcs_reply", 5, None))]
    assert shard.handle(1, ("add_location", 6, oid, 1, 4, 1, None)) == [
        (2, ("gcs_notify", "object_location", oid, ObjectInfo(4, 1, {1}))),
        (1, ("gcs_reply", 6, True)),
    ]
    with pytest.raises(ValueError, match="unknown op"):
        shard.handle(1, ("no_such_op", 7, oid))


def test_validate_catches_broken_invariants():
    shard = GcsShard(0, 1)
    actor_id = ids.new_actor_id()
    shard.handle(0, ("claim_actor_name", None, "x", actor_id))
    shard.handle(0, ("register_actor", None, actor_id, ActorInfo(ALIVE, name="x")))
    shard.validate()
    shard.actors[actor_id].name = "y"
    with pytest.raises(AssertionError):
        shard.validate()
    wrong = GcsShard(1, 2)
    wrong.functions[key_on(0, 2, ids.new_task_id)] = b""
    with pytest.raises(AssertionError, match="not shard 1"):
        wrong.validate()


def test_stray_reply_is_counted_not_raised():
    client = GcsClient(0, 1, lambda dest, message: None)
    assert client.on_message(0, ("gcs_reply", 12345, None))
    assert client.stray_replies == 1
    assert not client.on_message(0, ("something_else",))


def test_request_ids_are_unique():
    sent = []
    client = GcsClient(0, 2, lambda dest, message: sent.append((dest, message)))
    for key in object_ids(10):
        client.request("get_object", key, callback=lambda result: None)
    assert len({message[1] for _, message in sent}) == 10
    assert {dest for dest, _ in sent} <= {0, 1}
