"""One object to N nodes (runtime/relay.py): per-link costs measured here, and a model of
the time against N for the holder sending N copies, for a pipelined chain and for the
relay's default tree (fanout 2).

    /work/main/.venv/bin/mpiexec -n 3 python benchmarks/relay_model.py
    ... relay_model.py --size 1Gi --chunk 8Mi --repeat 5
    ... relay_model.py --latency 2e-6 --bandwidth 12e9 --hop 1e-3   # model only, no MPI

What it measures, with MpiTransport alone (3 ranks, no runtime):
  lam    one control message one way (half a ping-pong of 200, median)
  alpha  a 1 KB transfer, from a barrier to its last byte on the receiver (median)
  beta   bytes per second of one transfer of `--size` (median), 0 -> 1
  hop    what one relay adds: the same size 0 -> 1 -> 2, rank 1 sending on each chunk as
         it arrives (a gated send, as relay.py does), minus the direct time and the one
         chunk the pipeline must fill; rank 1 polls every `--poll` seconds, as a node
         manager does while it sends (1 ms epoll waits: node_manager._wait_for_events)

The model (S bytes, N receivers, chunks of c, fanout k; each node has its own link of
bandwidth beta, as on a cluster):
  holder sends N copies   alpha + N S / beta             (its link carries every copy)
  chain (k = 1)           2 lam + alpha + S / beta + (N - 1) (c / beta + hop)
  tree (fanout k)         2 lam + alpha + k S / beta + (d - 1) (k c / beta + hop),
                          d = levels holding N nodes (k + k^2 + ... + k^d >= N)
  binomial, unpipelined   ceil(log2(N + 1)) (alpha + S / beta)   (for reference)
2 lam is the Relay and PullFrom messages before a relayed transfer starts. On one
machine every "link" is the same memory bus: the copies compete for it, so N copies
from one rank take no longer than a relay there; the gain needs a node per link.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

from _common import parse_size  # noqa: E402


# ---------------------------------------------------------------------------- model
def levels(n: int, k: int) -> int:
    """Depth of a k-ary relay tree under the holder that holds `n` receivers."""
    if k == 1:
        return n
    depth, held, width = 0, 0, 1
    while held < n:
        depth += 1
        width *= k
        held += width
    return depth


def model(n: int, size: float, chunk: float, lam: float, alpha: float, beta: float,
          hop: float) -> dict:
    chain = 2 * lam + alpha + size / beta + (n - 1) * (chunk / beta + hop)
    d = levels(n, 2)
    tree2 = 2 * lam + alpha + 2 * size / beta + (d - 1) * (2 * chunk / beta + hop)
    return {"direct": alpha + n * size / beta, "chain": chain, "tree2": tree2,
            "binomial": math.ceil(math.log2(n + 1)) * (alpha + size / beta)}


def print_model(size: int, chunk: int, lam: float, alpha: float, beta: float,
                hop: float, title: str) -> None:
    print(f"\n{title}: S = {size / 2**20:g} MiB, chunk {chunk / 2**20:g} MiB, "
          f"lam {lam * 1e6:.1f} us, alpha {alpha * 1e6:.1f} us, beta {beta / 1e9:.2f} GB/s, "
          f"hop {hop * 1e3:.2f} ms")
    print("| N receivers | holder sends N (s) | chain (s) | tree, fanout 2 (s) | "
          "binomial, whole copies (s) | N copies / tree |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (2, 3, 4, 8, 16, 32, 64):
        t = model(n, size, chunk, lam, alpha, beta, hop)
        print(f"| {n} | {t['direct']:.3f} | {t['chain']:.3f} | {t['tree2']:.3f} | "
              f"{t['binomial']:.3f} | {t['direct'] / t['tree2']:.1f}x |")


# ---------------------------------------------------------------------------- measuring
def _wait(transport, transfers, poll: float) -> None:
    while not all(t.done for t in transfers):
        transport.poll()
        if poll and not all(t.done for t in transfers):
            time.sleep(poll)


def measure(args) -> tuple[float, float, float, float] | None:
    import numpy as np
    from mpi4py import MPI

    from hpcray.runtime.transport import MpiTransport

    comm = MPI.COMM_WORLD
    if comm.size != 3:
        raise SystemExit("run with: mpiexec -n 3 python benchmarks/relay_model.py")
    rank = comm.rank
    size, chunk = parse_size(args.size), parse_size(args.chunk)
    transport = MpiTransport(chunk_bytes=chunk)
    tag = iter(range(1, 1 << 20))

    # lam: control messages, 0 <-> 1
    rounds = []
    for _ in range(200):
        comm.Barrier()
        start = time.perf_counter()
        if rank == 0:
            transport.send(1, "ping")
            while not transport.poll():
                pass
        elif rank == 1:
            while not transport.poll():
                pass
            transport.send(0, "pong")
            while transport.busy:
                transport.poll()
        rounds.append(time.perf_counter() - start)
    lam = statistics.median(rounds) / 2

    def direct(nbytes: int) -> float:
        src = np.full(nbytes, 7, np.uint8)
        dst = np.ones(nbytes, np.uint8)
        times = []
        for _ in range(args.warmup + args.repeat):
            t = next(tag)
            comm.Barrier()
            start = time.perf_counter()
            if rank == 0:
                _wait(transport, [transport.start_send(1, t, src)], 0)
            elif rank == 1:
                _wait(transport, [transport.start_receive(0, t, dst)], 0)
            times.append(time.perf_counter() - start)
        return statistics.median(times[args.warmup:])

    def relayed(nbytes: int) -> float:
        src = np.full(nbytes, 7, np.uint8)
        dst = np.ones(nbytes, np.uint8)
        times = []
        for _ in range(args.warmup + args.repeat):
            t = next(tag)
            dst[:] = 1
            comm.Barrier()
            start = time.perf_counter()
            if rank == 0:
                _wait(transport, [transport.start_send(1, t, src)], 0)
            elif rank == 1:
                receive = transport.start_receive(0, t, dst)
                send = transport.start_send(
                    2, t, dst, gate=lambda seg, end, r=receive: end <= r.segment_received(0))
                _wait(transport, [receive, send], args.poll)
            else:
                _wait(transport, [transport.start_receive(1, t, dst)], 0)
            times.append(time.perf_counter() - start)
            if rank == 2 and not (dst == 7).all():
                raise SystemExit("the relayed bytes arrived corrupted")
        return statistics.median(times[args.warmup:])

    alpha = direct(1000)
    whole = direct(size)
    chain = relayed(size)
    # Times on the last receiver: rank 1 for direct, rank 2 for the relay.
    alpha = comm.bcast(alpha, root=1)
    whole = comm.bcast(whole, root=1)
    chain = comm.bcast(chain, root=2)
    transport.close()
    if rank != 0:
        return None
    beta = size / max(whole - alpha, 1e-9)
    hop = max(chain - whole - chunk / beta, 0.0)
    print(f"# {MPI.Get_library_version().splitlines()[0]}; load {os.getloadavg()[0]:.2f}; "
          f"{os.cpu_count()} CPUs; median of {args.repeat} after {args.warmup} warm-up")
    print(f"# measured: 1 KB transfer {alpha * 1e6:.0f} us; {size / 2**20:g} MiB direct "
          f"{whole * 1e3:.1f} ms ({size / whole / 1e9:.2f} GB/s); through one relay "
          f"{chain * 1e3:.1f} ms (rank 1 polling every {args.poll * 1e3:g} ms); one "
          f"control message {lam * 1e6:.0f} us")
    return lam, alpha, beta, hop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256Mi", help="the object (default 256Mi)")
    parser.add_argument("--chunk", default="8Mi")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--poll", type=float, default=1e-3,
                        help="seconds between the relay's polls (a node manager: 1 ms)")
    parser.add_argument("--model-size", default="1Gi", help="the object in the tables")
    for name in ("latency", "bandwidth", "hop", "message"):
        parser.add_argument(f"--{name}", type=float, default=None,
                            help="use this instead of measuring (seconds, bytes/s)")
    args = parser.parse_args()
    given = (args.latency, args.bandwidth, args.hop)
    if all(value is not None for value in given):
        lam = args.message if args.message is not None else args.latency
        measured = (lam, args.latency, args.bandwidth, args.hop)
        title = "Model from the given costs"
    else:
        measured = measure(args)
        if measured is None:
            return
        title = "Model from the costs measured here (one machine: memory-bound)"
    lam, alpha, beta, hop = measured
    print_model(parse_size(args.model_size), parse_size(args.chunk), lam, alpha, beta, hop,
                title)


if __name__ == "__main__":
    main()
