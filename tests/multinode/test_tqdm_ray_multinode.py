"""`ray.experimental.tqdm_ray` bars drawn by tasks on every rank of a 3-rank job."""

import re

import pytest

from hpcray.experimental import tqdm_ray
from tests.multinode.test_multinode import run_mpi
from tests.test_tqdm_ray import TASKS


@pytest.mark.multinode
@pytest.mark.timeout(200)
def test_task_bars_on_other_ranks_reach_the_jobs_output(tmp_path):
    out = run_mpi(tmp_path, 3, TASKS)
    assert tqdm_ray.MAGIC not in out
    for i in range(3):
        assert re.search(rf"\(f pid=\d+, rank=\d\) task {i}: {30 + i}/{30 + i} \(100%\), "
                         "done", out), out
    assert len(set(re.findall(r"\(f pid=\d+, rank=(\d)\) task \d: \d+/\d+ \(100%\)", out))) \
        == 3
