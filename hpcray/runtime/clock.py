"""The clock the timeline reads, and how every rank's clock is put on rank 0's.

Every record of the timeline and the report (recorder.py, a worker's WorkDone.started,
sampler.py) is stamped with `now()`: the wall clock of the host it was taken on. Hosts'
clocks disagree (NTP keeps them within milliseconds at best, and a host without it
drifts freely), so a child task on another host could seem to start before its parent
submitted it. At each job's start, before its nodes are built, rank 0 measures every
other rank's offset (`measure_offsets`, as NTP does): SAMPLES ClockPing/ClockPong round
trips per rank (WINDOW ranks at a time); a sample's offset is the rank's time minus the
midpoint of the round trip on rank 0's clock; the shortest round trip's is kept. The
true offset lies within half that round trip (`bound`) of the estimate, whatever the
delays each way. A rank on rank 0's host reads the same clock: its offset is 0 when 0
is within the bound. The offsets travel in the job (`job["clock"]`); each node subtracts
its own when its records are gathered (`Recorder.rows`), so nothing is added per event.

What this is not: a clock discipline. Offsets are measured once per job, so a clock
that drifts during a long job (NTP slews at most 0.5 ms/s) drifts in the timeline too.

HPCRAY_TEST_CLOCK_SKEW (seconds, read here only; for tests): added to `now()` in this
process and the workers it starts (they inherit it), as if this host's clock were
that far off. Give ranks different values with mpiexec's per-rank `-env`.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from hpcray.runtime import messages
from hpcray.runtime.messages import wire

log = logging.getLogger("hpcray.clock")

SAMPLES = 5              # round trips per rank; the shortest is kept
WINDOW = 32              # ranks pinged together
ANSWER_TIMEOUT = 30.0    # seconds a rank may take to answer one ping

_skew = float(os.environ.get("HPCRAY_TEST_CLOCK_SKEW") or 0.0)
if _skew:
    def now() -> float:
        """This host's wall clock, off by HPCRAY_TEST_CLOCK_SKEW seconds (tests)."""
        return time.time() + _skew
else:
    now = time.time  # the same builtin the recorder called before: no cost per event


def answer_ping(transport, ping) -> None:
    """Ranks > 0: answer rank 0's ClockPing at once, with this rank's clock."""
    transport.send(0, wire(messages.ClockPong, ping.seq, now(), socket.gethostname()))


def measure_offsets(transport) -> dict:
    """Rank 0: {rank: (offset, bound)} of every live rank (its clock minus rank 0's, and
    how far the truth may be from it, in seconds); rank 0's own is (0.0, 0.0).

    WINDOW ranks at a time are pinged together, round after round: a job's start then
    waits for about SAMPLES round trips per window, not per rank, while a pong that
    waits behind its window's other messages only widens its own bound a little."""
    host = socket.gethostname()
    began = time.monotonic()
    offsets = {0: (0.0, 0.0)}
    ranks = [rank for rank in range(1, transport.size) if rank not in transport.dead]
    seq = 0
    for first in range(0, len(ranks), WINDOW):
        best: dict[int, tuple] = {}  # rank -> (round trip, offset, its host)
        window = ranks[first:first + WINDOW]
        for _ in range(SAMPLES):
            seq += 1
            sent = {}
            for rank in window:
                if rank not in transport.dead:  # ULFM: a lost rank answers nothing
                    sent[rank] = now()
                    transport.send(rank, wire(messages.ClockPing, seq))
            for rank, stamp, their_host, back in _pongs(transport, seq, set(sent)):
                sample = (back - sent[rank], stamp - (sent[rank] + back) / 2, their_host)
                if rank not in best or sample[0] < best[rank][0]:
                    best[rank] = sample
        for rank, (round_trip, offset, their_host) in best.items():
            bound = round_trip / 2
            if their_host == host and abs(offset) <= bound:
                offset = 0.0  # one host, one clock: the estimate's error is all it found
            offsets[rank] = (offset, bound)
    log.debug("clock offsets of the ranks against rank 0 (seconds, bound), measured in "
              "%.1f ms: %s", (time.monotonic() - began) * 1e3, offsets)
    return offsets


def _pongs(transport, seq: int, waiting: set) -> list:
    """[(rank, its time, its host, when it arrived here)] of the ClockPong `seq` of each
    rank in `waiting` (a rank lost meanwhile is left out)."""
    answers = []
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while waiting - transport.dead:
        batch = transport.poll()
        back = now()  # stamped before reading the batch: later only widens the bound
        for source, channel, message in batch:
            if (channel == "control" and source in waiting
                    and message[0] == messages.ClockPong.CODE and message[1] == seq):
                answers.append((source, message[2], message[3], back))
                waiting.discard(source)
        if not waiting - transport.dead:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"hpcray: ranks {sorted(waiting - transport.dead)} did not "
                               f"answer ClockPing in {ANSWER_TIMEOUT} s")
        # Short sleeps: the wait here counts in the round trip, so in the bound.
        transport.wait_for_activity(0.0001, timeout=0.5)
    return answers
