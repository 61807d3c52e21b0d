"""How long after init() returns a job's first actor runs its constructor and first call.

Ray's actors.py creates an actor, calls it, sleeps 1 s "until the task is scheduled" and
cancels the call: the first actor must be running well within that second. Run as
`python benchmarks/first_actor.py [RUNS]` (one node, a fresh job per run); prints the
medians. Compare trees by running it from each, interleaved.
"""

import statistics
import subprocess
import sys
import time

ONE_RUN = """
import time
t0 = time.monotonic()
import hpcray as ray
ray.init()
t1 = time.monotonic()

@ray.remote
class Actor:
    def __init__(self):
        self.born = time.monotonic()

    def born_and_now(self):
        return self.born, time.monotonic()

born, called = ray.get(Actor.remote().born_and_now.remote())
print(t1 - t0, born - t1, called - t1, time.monotonic() - t1)
"""

COLUMNS = ("init s", "constructor after init s", "call after init s", "reply after init s")


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rows = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", ONE_RUN], capture_output=True,
                             text=True, check=True).stdout.split()
        rows.append([float(x) for x in out[-4:]])
        time.sleep(0.2)
    print(f"| {' | '.join(COLUMNS)} |")
    print(f"| {' | '.join('---' for _ in COLUMNS)} |")
    medians = [statistics.median(r[i] for r in rows) for i in range(len(COLUMNS))]
    print(f"| {' | '.join(f'{m:.3f}' for m in medians)} |  (median of {runs} runs)")


if __name__ == "__main__":
    main()
