"""`ray.experimental.tqdm_ray`: bars drawn by tasks, shown where the job's output is read
(hpcray/experimental/tqdm_ray.py), on one node (3 ranks: tests/multinode/
test_tqdm_ray_multinode.py)."""

import io
import os
import re
import subprocess
import sys
import textwrap

import pytest

from hpcray.experimental import tqdm_ray

TASKS = """
    import os, time, hpcray as ray
    from hpcray.experimental.tqdm_ray import tqdm
    ray.init(num_cpus=2)
    @ray.remote
    def f(name, n):
        for _ in tqdm(range(n), desc=name, flush_interval_s=0.05):
            time.sleep(0.01)
        print("plain line from", name)
        return os.getpid()
    pids = ray.get([f.options(scheduling_strategy="SPREAD").remote(f"task {i}", 30 + i)
                    for i in range(3)])
    with tqdm(total=4, desc="driver's own") as bar:
        for _ in range(4):
            bar.update(1)
    print("PIDS", *pids)
    ray.shutdown()
"""


@pytest.mark.timeout(120)
def test_task_bars_are_shown_as_lines_not_printed_as_state(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(TASKS))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=100, cwd=tmp_path,
                          env=dict(os.environ, HPCRAY_LOG_DIR=str(tmp_path / "logs")))
    assert done.returncode == 0, done.stdout + done.stderr
    pids = re.search(r"^PIDS (.*)$", done.stdout, re.M).group(1).split()
    everything = done.stdout + done.stderr
    assert tqdm_ray.MAGIC not in everything
    for i, pid in enumerate(pids):  # each bar's last state, under its task and pid
        assert f"(f pid={pid}) task {i}: {30 + i}/{30 + i} (100%), done" in done.stderr
        assert f"(f pid={pid}) plain line from task {i}" in done.stdout
    assert "driver's own: 4/4 (100%), done" in done.stderr
    # The workers' log files keep the states, as Ray's do.
    kept = "".join(path.read_text() for path in (tmp_path / "logs").glob("*worker*.out"))
    assert kept.count(tqdm_ray.MAGIC) >= 3


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_tqdm_bar_per_bar_until_it_closes():
    pytest.importorskip("tqdm")
    terminal = _Terminal()
    board = tqdm_ray.BarBoard(terminal)
    state = {"uuid": "a", "pid": 1, "pos": 0, "desc": "task 1", "x": 1, "total": 10,
             "closed": False}
    board.show("(f pid=1)", state)
    board.show("(f pid=1)", dict(state, uuid="b", desc="task 2"))
    assert len(board.bars) == 2
    board.show("(f pid=1)", dict(state, x=10, closed=True))
    assert list(board.bars) == ["b"]
    assert "(f pid=1) task 1:" in terminal.getvalue() and "|" in terminal.getvalue()


def test_a_program_named_tqdm_is_not_imported_as_the_tqdm_package(tmp_path, monkeypatch):
    # Ray's doc program is tqdm.py: importing "tqdm" from the node's thread found it (the
    # script's folder is first on sys.path) and ran it again there, which deadlocked.
    (tmp_path / "tqdm.py").write_text("raise AssertionError('imported the program')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tqdm", raising=False)
    assert tqdm_ray._real_tqdm() is None
    assert tqdm_ray.BarBoard(_Terminal()).tqdm is None
