"""Placement groups across ranks (`mpiexec -n 3`): the global scheduler on rank 0 picks
the nodes, each reserves its bundles, and tasks and actors in a bundle run on that
bundle's node only."""

import pytest

from tests.multinode.test_multinode import run_mpi

pytestmark = [pytest.mark.multinode, pytest.mark.timeout(200)]


def test_strategies_removal_and_table_across_three_ranks(tmp_path):
    out = run_mpi(tmp_path, 3, """
        import os, time, hpcray as ray
        from hpcray import exceptions
        from hpcray.util.placement_group import (placement_group, placement_group_table,
            remove_placement_group, get_current_placement_group)
        from hpcray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as In
        ray.init(num_cpus=2)

        @ray.remote(num_cpus=1)
        def where():
            group = get_current_placement_group()
            return ray.get_runtime_context().node_id, group and group.id.hex()

        # STRICT_SPREAD over 3 ranks: one bundle per node.
        spread = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
        assert spread.wait(60)
        row = placement_group_table(spread)
        assert row["state"] == "CREATED"
        assert len(set(row["bundles_to_node_id"].values())) == 3, row
        seen = ray.get([where.options(scheduling_strategy=In(spread, i)).remote()
                        for i in range(3) for _ in range(4)], timeout=60)
        for i in range(3):
            nodes = {node for node, _ in seen[4 * i:4 * i + 4]}
            assert nodes == {row["bundles_to_node_id"][i]}, (i, nodes, row)
        assert {group for _, group in seen} == {spread.id.hex()}
        print("STRICT_SPREAD ok", flush=True)

        # STRICT_PACK: both bundles on one node. With 1 CPU free on each node it waits,
        # and is created once the spread group is removed.
        pack = placement_group([{"CPU": 1}] * 2, strategy="STRICT_PACK")
        assert pack.wait(1) is False
        remove_placement_group(spread)
        assert pack.wait(60)
        packed = placement_group_table(pack)["bundles_to_node_id"]
        assert len(set(packed.values())) == 1
        nodes = {node for node, _ in ray.get(
            [where.options(scheduling_strategy=In(pack, i % 2)).remote() for i in range(6)],
            timeout=60)}
        assert nodes == set(packed.values())
        print("STRICT_PACK ok", flush=True)

        # Infeasible: 4 bundles on 3 nodes, each its own. Pending, then removed.
        never = placement_group([{"CPU": 1}] * 4, strategy="STRICT_SPREAD")
        stuck = where.options(scheduling_strategy=In(never, 3)).remote()
        assert not never.wait(1)
        assert placement_group_table(never)["state"] == "PENDING"
        remove_placement_group(never)
        try:
            ray.get(stuck, timeout=60)
            raise AssertionError("a task of a removed group ran")
        except exceptions.TaskUnschedulableError:
            pass
        print("infeasible ok", flush=True)

        # Removal kills the group's actors, on whichever node they are.
        remove_placement_group(pack)
        spread = placement_group([{"CPU": 1}] * 3, strategy="SPREAD")
        assert spread.wait(60)

        @ray.remote(num_cpus=1)
        class Member:
            def node(self):
                return ray.get_runtime_context().node_id

        members = [Member.options(scheduling_strategy=In(spread, i)).remote()
                   for i in range(3)]
        member_nodes = ray.get([m.node.remote() for m in members], timeout=60)
        assert member_nodes == [placement_group_table(spread)["bundles_to_node_id"][i]
                                for i in range(3)]
        remove_placement_group(spread)
        for member in members:
            try:
                ray.get(member.node.remote(), timeout=60)
                raise AssertionError("an actor of a removed group answered")
            except exceptions.RayActorError:
                pass
        for _ in range(400):
            if ray.available_resources().get("CPU") == 6.0:
                break
            time.sleep(0.05)
        assert ray.available_resources()["CPU"] == 6.0, ray.available_resources()
        print("removal ok", flush=True)

        # Children captured into the group, from a task on another rank; the table
        # read from there too.
        group = placement_group([{"CPU": 1}, {"CPU": 1}], strategy="STRICT_SPREAD")
        assert group.wait(60)

        @ray.remote(num_cpus=1)
        def parent():
            child = ray.get(where.remote(), timeout=60)
            return child, placement_group_table()[get_current_placement_group().id.hex()]

        (node, captured), row = ray.get(parent.options(scheduling_strategy=In(
            group, 1, True)).remote(), timeout=60)
        assert captured == group.id.hex() and row["state"] == "CREATED"
        assert node in set(row["bundles_to_node_id"].values())
        print("capture ok", flush=True)
        ray.shutdown()
    """)
    for line in ("STRICT_SPREAD ok", "STRICT_PACK ok", "infeasible ok", "removal ok",
                 "capture ok"):
        assert line in out, out


def test_gpu_bundles_and_the_state_list_across_three_ranks(tmp_path):
    # Each rank declares 2 GPUs (no hardware: ids 0 and 1). A bundle's GPU is a fixed id
    # on its node: tasks and actors in it see that id, a task outside the group on that
    # node the other one. list_placement_groups from a task on another rank.
    out = run_mpi(tmp_path, 3, """
        import os, hpcray as ray
        from hpcray.util.placement_group import (placement_group, placement_group_table,
                                                 remove_placement_group)
        from hpcray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as In
        from hpcray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
        from hpcray.util.state import list_placement_groups
        ray.init(num_cpus=2, num_gpus=2)
        assert ray.cluster_resources()["GPU"] == 6.0

        @ray.remote(num_cpus=0, num_gpus=1)
        def gpus():
            ids = ray.get_gpu_ids()
            assert os.environ["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, ids))
            return ray.get_runtime_context().get_node_id(), ids

        @ray.remote(num_cpus=0, num_gpus=1)
        class Holder:
            def gpus(self):
                return ray.get_runtime_context().get_node_id(), ray.get_gpu_ids()

        group = placement_group([{"GPU": 1}] * 3, strategy="STRICT_SPREAD")
        assert group.wait(60)
        where = placement_group_table(group)["bundles_to_node_id"]
        for i in range(3):
            seen = ray.get([gpus.options(scheduling_strategy=In(group, i)).remote()
                            for _ in range(3)], timeout=60)
            assert {node for node, _ in seen} == {where[i]} and len({tuple(ids) for _, ids
                                                                     in seen}) == 1, seen
            mine = seen[0][1]
            holder = Holder.options(scheduling_strategy=In(group, i)).remote()
            assert ray.get(holder.gpus.remote(), timeout=60) == (where[i], mine)
            node, other = ray.get(gpus.options(
                scheduling_strategy=On(where[i], soft=False)).remote(), timeout=60)
            assert node == where[i] and len(other) == 1 and other != mine, (mine, other)

        @ray.remote(num_cpus=0)
        def listed():
            return [(row.placement_group_id, row.state, len(row.bundles))
                    for row in list_placement_groups(detail=True)]

        rank2 = {n["rank"]: n["NodeID"] for n in ray.nodes()}[2]
        assert ray.get(listed.options(scheduling_strategy=On(rank2, soft=False)).remote(),
                       timeout=60) == [(group.id.hex(), "CREATED", 3)]
        remove_placement_group(group)
        print("gpu bundles ok", flush=True)
        ray.shutdown()
    """)
    assert "gpu bundles ok" in out, out
