"""GPUs for real, on a machine with NVIDIA GPUs: NVML enumeration against nvidia-smi, what
the CUDA driver shows a task or actor, GPU queuing, and ranks of one host sharing its GPUs.

Where NVML finds no GPU (CI has none) these tests skip; run them on a GPU node with
`python -m pytest tests/gpu`. The tests under tests/test_resources.py cover the same
logic against a fake NVML on every machine.
"""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import hpcray
from hpcray import exceptions, resources
from tests.multinode.test_multinode import run_mpi

GPUS = resources.detect_gpus()
REPO = str(Path(__file__).resolve().parents[2])
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(240),
              pytest.mark.skipif(not GPUS, reason="NVML finds no NVIDIA GPU on this machine")]


def cuda_device_uuids() -> list:
    """The GPUs the CUDA driver shows this process, in CUDA order, named as NVML names
    them. Creates a CUDA context's worth of driver state: call it in tasks only."""
    cuda = ctypes.CDLL("libcuda.so.1")
    status = cuda.cuInit(0)
    if status == 100:  # CUDA_ERROR_NO_DEVICE: CUDA_VISIBLE_DEVICES hides every GPU
        return []
    assert status == 0, f"cuInit returned {status}"
    count = ctypes.c_int()
    assert cuda.cuDeviceGetCount(ctypes.byref(count)) == 0
    uuids = []
    for ordinal in range(count.value):
        device = ctypes.c_int()
        assert cuda.cuDeviceGet(ctypes.byref(device), ordinal) == 0
        raw = (ctypes.c_ubyte * 16)()
        assert cuda.cuDeviceGetUuid_v2(raw, device) == 0
        h = bytes(raw).hex()
        uuids.append(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return uuids


@pytest.fixture
def gpu_node():
    hpcray.init(num_cpus=4, object_store_memory=512 * 1024 * 1024)
    try:
        yield hpcray
    finally:
        hpcray.shutdown()


def test_nvml_lists_what_nvidia_smi_lists():
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("no nvidia-smi to compare with")
    rows = subprocess.run([smi, "--query-gpu=uuid,name,memory.total",
                           "--format=csv,noheader,nounits"], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()
    rows = [row.split(", ") for row in rows]
    devices = resources.list_nvml_devices()
    assert [d.uuid for d in devices] == [uuid for uuid, _, _ in rows]
    assert [d.name for d in devices] == [name for _, name, _ in rows]
    for device, (_, _, mib) in zip(devices, rows):
        assert abs(device.memory_total / 2**20 - int(mib)) <= 1
    started = time.perf_counter()
    resources.list_nvml_devices()
    print(f"NVML enumeration of {len(devices)} GPU(s): "
          f"{(time.perf_counter() - started) * 1e3:.2f} ms")


def test_node_resources_count_the_detected_gpus(gpu_node):
    assert hpcray.cluster_resources()["GPU"] == len(GPUS)
    too_many = hpcray.remote(num_gpus=len(GPUS) + 1)(lambda: None).remote()
    assert hpcray.wait([too_many], timeout=0.1)[0] == []  # pending, as in Ray
    hpcray.cancel(too_many)
    with pytest.raises(exceptions.TaskCancelledError):
        hpcray.get(too_many, timeout=30)


def test_gpu_task_sees_exactly_its_gpu_through_cuda(gpu_node):
    @hpcray.remote(num_gpus=1)
    def on_gpu():
        return (os.getpid(), os.environ["CUDA_VISIBLE_DEVICES"], hpcray.get_gpu_ids(),
                cuda_device_uuids())

    @hpcray.remote
    def on_cpu():
        return os.environ.get("CUDA_VISIBLE_DEVICES"), hpcray.get_gpu_ids()

    runs = hpcray.get([on_gpu.remote() for _ in range(3)])
    for _, visible, ids, seen in runs:
        assert len(ids) == 1
        assert visible == GPUS[ids[0]].uuid
        assert seen == [GPUS[ids[0]].uuid]  # CUDA itself shows that GPU and no other
    assert len({pid for pid, _, _, _ in runs}) == 3  # max_calls=1: a fresh worker each
    assert hpcray.get(on_cpu.remote()) == ("", [])


def test_a_task_in_a_gpu_bundle_sees_the_bundles_gpu(gpu_node):
    from hpcray.util.placement_group import placement_group, remove_placement_group
    from hpcray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @hpcray.remote(num_gpus=1)
    def on_gpu():
        return os.environ["CUDA_VISIBLE_DEVICES"], hpcray.get_gpu_ids(), cuda_device_uuids()

    group = placement_group([{"CPU": 1, "GPU": 1}])  # a task also takes 1 CPU, as in Ray
    assert group.wait(60)
    runs = hpcray.get([on_gpu.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, 0)).remote() for _ in range(2)])
    (visible, ids, seen), again = runs
    assert len(ids) == 1 and again == runs[0]  # the bundle's GPU, every time
    assert visible == GPUS[ids[0]].uuid and seen == [visible]
    remove_placement_group(group)


def test_one_gpu_is_held_by_one_task_at_a_time(gpu_node, tmp_path):
    @hpcray.remote(num_gpus=1)
    def hold(marker):
        fd = os.open(marker, os.O_CREAT | os.O_EXCL)  # fails if another holder is inside
        time.sleep(0.2)
        os.close(fd)
        os.unlink(marker)
        return hpcray.get_gpu_ids()

    holders = [hold.remote(str(tmp_path / f"gpu{i}")) for i in range(len(GPUS))
               for _ in range(3)]
    assert sorted(ids[0] for ids in hpcray.get(holders)) == sorted(
        i for i in range(len(GPUS)) for _ in range(3))


def test_half_gpu_tasks_share_one_gpu_at_the_same_time(gpu_node, tmp_path):
    @hpcray.remote(num_gpus=0.5)
    def meet(me, other):
        (tmp_path / me).touch()
        deadline = time.monotonic() + 60
        while not (tmp_path / other).exists():  # both run at once, or this times out
            assert time.monotonic() < deadline, "the other half-GPU task never ran alongside"
            time.sleep(0.01)
        return os.environ["CUDA_VISIBLE_DEVICES"], cuda_device_uuids()

    first, second = hpcray.get([meet.remote("a", "b"), meet.remote("b", "a")])
    assert first == second
    assert first[1] == [first[0]]


def test_gpu_actor_keeps_its_gpu_and_a_second_waits_for_it(gpu_node):
    torch = pytest.importorskip("torch")

    @hpcray.remote(num_gpus=1)
    class Trainer:
        def __init__(self):
            self.weights = torch.arange(1 << 20, dtype=torch.float32, device="cuda")

        def step(self):
            self.weights *= 2
            return self.weights.sum().item()

        def weights_on_host(self):
            return self.weights.cpu().numpy()

        def device(self):
            return os.environ["CUDA_VISIBLE_DEVICES"], torch.cuda.get_device_name(0)

    trainers = [Trainer.remote() for _ in GPUS]
    first = trainers[0]
    total = float(sum(range(1 << 20)))
    assert hpcray.get(first.step.remote()) == pytest.approx(2 * total)
    assert hpcray.get(first.step.remote()) == pytest.approx(4 * total)
    host = hpcray.get(first.weights_on_host.remote())  # 4 MiB through the object store
    assert host.shape == (1 << 20,) and host[3] == 12.0
    visible, name = hpcray.get(first.device.remote())
    assert visible in {g.uuid for g in GPUS} and name == GPUS[0].name

    waiting = Trainer.remote()  # every GPU is held: it stays pending
    ready, _ = hpcray.wait([waiting.step.remote()], timeout=1.0)
    assert not ready
    hpcray.kill(first)
    assert hpcray.get(waiting.step.remote(), timeout=120) > 0


def holds_cuda(pid: int) -> bool:
    """Whether the process has run cuInit: CUDA opens /dev/nvidia-uvm then, NVML never
    does (NVML maps libcuda.so, so mappings say nothing; nvidia-smi lists no pids in a
    VM or container)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/nvidia-uvm":
                return True
        except OSError:
            continue
    return False


def test_only_gpu_workers_hold_a_cuda_context(tmp_path):
    # The driver, its node manager, the fork server and CPU workers must never create a
    # CUDA context (slow, takes GPU memory, and breaks CUDA in forked children).
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, psutil
        sys.path.insert(0, {REPO!r})
        import hpcray
        from tests.gpu.test_gpu import cuda_device_uuids, holds_cuda
        hpcray.init(num_cpus=2)
        @hpcray.remote
        def cpu_task():
            return os.getpid()
        @hpcray.remote(num_gpus=1)
        class OnGpu:
            def start(self):
                return os.getpid(), cuda_device_uuids()
        cpu_workers = set(hpcray.get([cpu_task.remote() for _ in range(4)]))
        actor = OnGpu.remote()
        actor_pid, seen = hpcray.get(actor.start.remote())
        job = {{os.getpid()}} | {{p.pid for p in psutil.Process().children(recursive=True)}}
        holders = {{pid for pid in job if holds_cuda(pid)}}
        assert seen and holders == {{actor_pid}}, (holders, actor_pid, job)
        hpcray.shutdown()
        print("ONLY-GPU-WORKERS-HOLD-CUDA")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=180)
    print(done.stdout)
    assert "ONLY-GPU-WORKERS-HOLD-CUDA" in done.stdout, done.stdout + done.stderr


def test_ranks_on_one_host_deal_its_gpus_out(tmp_path):
    # Two ranks on this host: GPUs go round-robin, so with one GPU rank 0 has it and
    # rank 1 has none; a GPU task from the driver runs where the GPU is.
    path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    out = run_mpi(tmp_path, 2, f"""
        import hpcray as ray
        from tests.gpu.test_gpu import cuda_device_uuids
        ray.init(num_cpus=1)
        per_node = sorted(n["Resources"].get("GPU", 0) for n in ray.nodes())
        assert sum(per_node) == {len(GPUS)}, per_node
        @ray.remote(num_gpus=1)
        def where():
            return ray.get_runtime_context().get_node_id(), cuda_device_uuids()
        results = ray.get([where.remote() for _ in range({2 * len(GPUS)})])
        gpu_nodes = {{n["NodeID"] for n in ray.nodes() if n["Resources"].get("GPU")}}
        assert all(node in gpu_nodes and len(seen) == 1 for node, seen in results), results
        print("RANKS-SHARE-GPUS", per_node)
    """, env={"PYTHONPATH": path})
    assert "RANKS-SHARE-GPUS" in out


def test_report_reads_each_gpus_utilization_as_nvidia_smi_does(tmp_path):
    """The report's GPU readings on real GPUs (sampler.NvmlUtilization): one per GPU of
    the node, each within 0..1, and, where a task keeps a GPU busy (torch or cupy,
    whichever imports), that GPU reads busy, as nvidia-smi says it is."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("no nvidia-smi to compare with")
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import json, subprocess, sys, time, hpcray as ray
        ray.init(report="job.html")

        @ray.remote(num_gpus=1)
        def busy(seconds):  # keeps its GPU busy; None when no GPU library is installed
            try:
                import torch
                x = torch.rand(4096, 4096, device="cuda")
                end = time.time() + seconds
                while time.time() < end:
                    x = x @ x
                    x = x / x.norm()
                torch.cuda.synchronize()
            except ImportError:
                try:
                    import cupy
                except ImportError:
                    return None
                x = cupy.random.rand(4096, 4096, dtype=cupy.float32)
                end = time.time() + seconds
                while time.time() < end:
                    x = x @ x
                    x = x / cupy.linalg.norm(x)
                cupy.cuda.Device().synchronize()
            smi = subprocess.run([sys.argv[1], "--query-gpu=uuid,utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True,
                                 text=True).stdout
            return ray.get_runtime_context().get_accelerator_ids()["GPU"], smi
        print("BUSY", json.dumps(ray.get(busy.remote(4.0))))
    """))
    done = subprocess.run([sys.executable, str(script), smi], capture_output=True, text=True,
                          timeout=200, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=REPO,
                                                              HPCRAY_REPORT_INTERVAL="0.5"))
    assert done.returncode == 0, done.stdout + done.stderr
    page = (tmp_path / "job.html").read_text()
    data = json.loads(re.search(r'id="hpcray-data">(.*?)</script>', page, re.S)
                      .group(1).replace("<\\/", "</"))
    readings = [s[3] for s in data["samples"]["0"]]
    assert readings and all(len(r) == len(GPUS) for r in readings), readings
    assert all(v is None or 0.0 <= v <= 1.0 for r in readings for v in r)
    busy = json.loads(re.search(r"^BUSY (.*)$", done.stdout, re.M).group(1))
    if busy is None:
        pytest.skip("neither torch nor cupy imports here: utilization not loaded")
    gpu_ids, smi_rows = busy
    print("nvidia-smi during the busy task:", smi_rows, "readings:", readings)
    index = int(gpu_ids[0]) if str(gpu_ids[0]).isdigit() else 0
    assert max(r[index] or 0.0 for r in readings) > 0.3, readings
