"""An actor's shared budget of generator items not taken (Ray's actor option
`_actor_generator_backpressure_num_objects=N`).

Every streaming generator method running on the actor draws from one budget of N items:
before each item it makes, the generator asks its node for a slot (`generator_slot`)
and gets it only while fewer than N of the items the actor's generators reported (or
have a slot for) are not taken by their consumers, counting generators that have ended
too, until their items are taken or their consumer is gone (as Ray does). A method's own
`_generator_backpressure_num_objects` applies as well: the tighter one holds it.

The node that hosts the actor keeps the count: items it reported per call (on_item_ready),
slots granted whose item has not come yet, and the items each consumer took as last
heard from the call's owner. While a slot request waits, the node watches each call with
items not taken (Generators.watch: the owner answers once its consumer took one more,
or NO_LIMIT once the consumer is gone) and grants slots as the answers free them.
"""

from __future__ import annotations

import collections



class _Call:
    """One generator call's share of its actor's budget."""

    __slots__ = ("owner", "reported", "taken", "granted", "ended", "watched")

    def __init__(self, owner: int) -> None:
        self.owner = owner      # the node of its consumer
        self.reported = 0       # items it reported
        self.taken = 0          # items its consumer took, as last heard (NO_LIMIT: gone)
        self.granted = 0        # slots granted whose item has not been reported yet
        self.ended = False      # the call ended (its items count until taken)
        self.watched = False    # a watch of its consumer is out


class _Budget:
    __slots__ = ("limit", "calls", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls: dict[bytes, _Call] = {}
        self.waiting: collections.deque = collections.deque()  # (task id, answer)

    def used(self) -> int:
        return sum(max(0, c.reported - c.taken) + c.granted for c in self.calls.values())


class GeneratorBudgets:
    """The budgets of the actors this node hosts that have one."""

    def __init__(self, generators) -> None:
        self.generators = generators     # watches of consumers
        self.budgets: dict[bytes, _Budget] = {}   # actor id -> its budget

    def request_slot(self, actor, record, answer) -> None:
        """The generator call `record` of `actor` makes its next item once `answer()`."""
        budget = self.budgets.get(actor.actor_id)
        if budget is None:
            budget = self.budgets[actor.actor_id] = _Budget(actor.spec.options["generator_budget"])
        task_id = record.spec.task_id
        call = budget.calls.get(task_id)
        if call is None:
            call = budget.calls[task_id] = _Call(record.owner)
        call.ended = False  # (a call run again after its process died runs again)
        budget.waiting.append((task_id, answer))
        self._grant(actor.actor_id, budget)

    def item_reported(self, actor_id: bytes, task_id: bytes) -> None:
        budget = self.budgets.get(actor_id)
        call = budget.calls.get(task_id) if budget is not None else None
        if call is not None:
            call.reported += 1
            call.granted = max(0, call.granted - 1)

    def call_ended(self, actor_id: bytes, task_id: bytes) -> None:
        """The call ended (or its process died): a slot it had and did not use is free."""
        budget = self.budgets.get(actor_id)
        call = budget.calls.get(task_id) if budget is not None else None
        if call is None:
            return
        call.ended = True
        call.granted = 0
        for asked in [a for a in budget.waiting if a[0] == task_id]:
            budget.waiting.remove(asked)  # an async call cancelled while it waited: its
            asked[1](None)                # thread goes free (it makes no item now)
        if call.taken >= call.reported:
            del budget.calls[task_id]
        self._grant(actor_id, budget)

    def process_died(self, actor_id: bytes) -> None:
        """Its process is gone: so are the requests it made; its calls' slots are free
        (a call run again asks again; what it reported before is not made again)."""
        budget = self.budgets.get(actor_id)
        if budget is not None:
            budget.waiting.clear()
            for task_id in list(budget.calls):
                self.call_ended(actor_id, task_id)

    def actor_dead(self, actor_id: bytes) -> None:
        self.budgets.pop(actor_id, None)

    def _grant(self, actor_id: bytes, budget: _Budget) -> None:
        waiting = budget.waiting
        if waiting:
            used = budget.used()
            while waiting and used < budget.limit:
                task_id, answer = waiting.popleft()
                call = budget.calls.get(task_id)
                if call is None:  # (none: a request's call is dropped with it)
                    answer(None)
                    continue
                call.granted += 1
                used += 1
                answer(None)
        if waiting:  # full: wait for consumers to take items
            # (a watch may answer at once, and that answer change the calls: a copy)
            for task_id, call in list(budget.calls.items()):
                if call.reported > call.taken and not call.watched \
                        and budget.calls.get(task_id) is call:
                    call.watched = True
                    self.generators.watch(task_id, call.owner, call.taken + 1,
                                          lambda taken, t=task_id: self._taken(actor_id, t, taken))

    def _taken(self, actor_id: bytes, task_id: bytes, taken: int) -> None:
        budget = self.budgets.get(actor_id)
        call = budget.calls.get(task_id) if budget is not None else None
        if call is None:
            return
        call.watched = False
        call.taken = max(call.taken, taken)  # NO_LIMIT: its consumer is gone, for good
        if call.ended and call.taken >= call.reported:
            del budget.calls[task_id]
        self._grant(actor_id, budget)
