"""Node resource detection: CPUs, memory, NVML enumeration, CUDA_VISIBLE_DEVICES rules."""

import ctypes
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

RESOURCES_PY = pathlib.Path(__file__).resolve().parent.parent / "hpcray" / "resources.py"

try:
    from hpcray import resources
except Exception:  # noqa: BLE001 -- hpcray/__init__ may be mid-edit; the module stands alone
    _spec = importlib.util.spec_from_file_location("hpcray_resources_standalone", RESOURCES_PY)
    resources = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = resources
    _spec.loader.exec_module(resources)

GpuDevice = resources.GpuDevice
GiB = 1 << 30

U0 = "GPU-11111111-aaaa-0000-0000-000000000000"
U1 = "GPU-22222222-bbbb-0000-0000-000000000000"
U2 = "GPU-22223333-cccc-0000-0000-000000000000"
U3 = "GPU-44444444-dddd-0000-0000-000000000000"
DEVICES = [GpuDevice(i, u, "Fake GPU", 80 * GiB) for i, u in enumerate([U0, U1, U2, U3])]
D0, D1, D2, D3 = DEVICES

M0 = "MIG-aaaa0000-0000-0000-0000-000000000000"
M1 = "MIG-aaaa1111-0000-0000-0000-000000000000"
M2 = "MIG-bbbb2222-0000-0000-0000-000000000000"
MIG_DEVICES = [D0] + [GpuDevice(1, u, "Fake MIG 1g.10gb", 10 * GiB) for u in (M0, M1, M2)]


# Loads the module from its path as `r` in a fresh interpreter, without the package.
PRELUDE = (
    "import importlib.util, sys\n"
    f"spec = importlib.util.spec_from_file_location('r', {str(RESOURCES_PY)!r})\n"
    "r = importlib.util.module_from_spec(spec); sys.modules['r'] = r\n"
    "spec.loader.exec_module(r)\n"
)


def run_isolated(code: str, env_extra=None) -> str:
    """Run code in a fresh interpreter after PRELUDE."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(env_extra or {})
    done = subprocess.run([sys.executable, "-c", PRELUDE + code], env=env, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# ---------------------------------------------------------------------------- CPUs


def test_num_cpus_is_the_affinity_mask():
    assert resources.detect_num_cpus({}) == len(os.sched_getaffinity(0))


def test_num_cpus_respects_a_one_cpu_affinity():
    out = run_isolated(
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "print(r.detect_num_cpus())\n"
    )
    assert out == "1"


def test_num_cpus_respects_taskset():
    if not os.path.exists("/usr/bin/taskset"):
        pytest.skip("no taskset")
    cpu = str(min(os.sched_getaffinity(0)))
    code = PRELUDE + "print(r.detect_num_cpus({}))"
    done = subprocess.run(["/usr/bin/taskset", "-c", cpu, sys.executable, "-c", code],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


def test_num_cpus_capped_by_slurm_cpus_per_task():
    assert resources.detect_num_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1
    affinity = len(os.sched_getaffinity(0))
    assert resources.detect_num_cpus({"SLURM_CPUS_PER_TASK": str(affinity + 64)}) == affinity


def test_num_cpus_affinity_below_slurm_cpus_per_task():
    out = run_isolated(
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "print(r.detect_num_cpus())\n",
        env_extra={"SLURM_CPUS_PER_TASK": "8"},
    )
    assert out == "1"


@pytest.mark.parametrize("value", ["", "abc", "0", "-3"])
def test_num_cpus_ignores_a_bad_slurm_cpus_per_task(value):
    affinity = len(os.sched_getaffinity(0))
    assert resources.detect_num_cpus({"SLURM_CPUS_PER_TASK": value}) == affinity


def test_num_cpus_reads_the_process_environment_by_default(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert resources.detect_num_cpus() == 1


# -------------------------------------------------------------------------- memory


def test_memory_is_positive_and_at_most_physical():
    memory = resources.detect_memory_bytes()
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert isinstance(memory, int)
    assert 0 < memory <= physical


def _write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_and_parent_limits(tmp_path):
    _write(tmp_path / "cgroup.controllers", "cpu memory\n")
    _write(tmp_path / "job" / "memory.max", str(4 * GiB) + "\n")
    _write(tmp_path / "job" / "step" / "memory.max", "max\n")
    assert resources._cgroup_memory_limit("0::/job/step\n", str(tmp_path)) == 4 * GiB
    _write(tmp_path / "job" / "step" / "memory.max", str(GiB) + "\n")
    assert resources._cgroup_memory_limit("0::/job/step\n", str(tmp_path)) == GiB


def test_cgroup_v2_no_limit(tmp_path):
    _write(tmp_path / "cgroup.controllers", "cpu memory\n")
    _write(tmp_path / "job" / "memory.max", "max\n")
    assert resources._cgroup_memory_limit("0::/job\n", str(tmp_path)) is None
    assert resources._cgroup_memory_limit("0::/missing/path\n", str(tmp_path)) is None


def test_cgroup_v1_limit(tmp_path):
    _write(tmp_path / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(tmp_path / "memory" / "slurm" / "memory.limit_in_bytes", str(2 * GiB) + "\n")
    text = "4:memory:/slurm\n3:cpu,cpuacct:/slurm\n0::/\n"
    assert resources._cgroup_memory_limit(text, str(tmp_path)) == 2 * GiB


# ---------------------------------------------------------------------------- NVML


def test_nvml_without_driver_returns_empty():
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        assert resources.list_nvml_devices() == []
    else:
        devices = resources.list_nvml_devices()
        assert all(isinstance(d, GpuDevice) for d in devices)


def test_nvml_never_creates_a_cuda_context_or_imports_frameworks():
    out = run_isolated(
        "import sys\n"
        "r.detect_gpus({})\n"
        "print(sorted(m for m in ('torch', 'cupy', 'pynvml', 'hpcray') if m in sys.modules))\n"
    )
    assert out == "[]"


class FakeNvml:
    """Stands in for libnvidia-ml.so.1: ctypes out-arguments are written through
    byref's _obj, string buffers directly."""

    def __init__(self, gpus, fail=None, mig=None):
        self.gpus = gpus  # [(uuid, name, total)]
        self.fail = fail or {}  # function name -> status
        self.mig = mig or {}  # gpu index -> [None or (uuid, name, total)] slots
        self.calls = []
        self.handles = {}

    def __getattr__(self, name):
        if not name.startswith("nvml"):
            raise AttributeError(name)
        impl = getattr(self, "_" + name, None)

        def call(*args):
            self.calls.append(name)
            if name in self.fail:
                return self.fail[name]
            return impl(*args) if impl else 0
        return call

    def _handle(self, ref, info):
        key = len(self.handles) + 1
        self.handles[key] = info
        ref._obj.value = key
        return 0

    def _nvmlDeviceGetCount_v2(self, count):
        count._obj.value = len(self.gpus)
        return 0

    def _nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        return self._handle(handle, ("gpu", index.value))

    def _info(self, handle):
        kind, where = self.handles[handle.value]
        if kind == "gpu":
            return self.gpus[where]
        return self.mig[where[0]][where[1]]

    def _nvmlDeviceGetName(self, handle, buf, size):
        buf.value = self._info(handle)[1].encode()
        return 0

    def _nvmlDeviceGetUUID(self, handle, buf, size):
        buf.value = self._info(handle)[0].encode()
        return 0

    def _nvmlDeviceGetMemoryInfo(self, handle, memory):
        memory._obj.total = self._info(handle)[2]
        return 0

    def _nvmlDeviceGetMigMode(self, handle, current, pending):
        _, index = self.handles[handle.value]
        if index not in self.mig:
            return 3  # NVML_ERROR_NOT_SUPPORTED, as on a non-MIG GPU
        current._obj.value = 1
        return 0

    def _nvmlDeviceGetMaxMigDeviceCount(self, handle, count):
        count._obj.value = len(self.mig[self.handles[handle.value][1]])
        return 0

    def _nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot, mig_handle):
        gpu = self.handles[handle.value][1]
        if self.mig[gpu][slot.value] is None:
            return 6  # NVML_ERROR_NOT_FOUND: an empty slot
        return self._handle(mig_handle, ("mig", (gpu, slot.value)))


class FakeNvmlUtilization(FakeNvml):
    """With what the report's GPU source reads: handles by UUID and utilization rates
    (status 3, NOT_SUPPORTED, for a GPU in `unreadable`, as NVML says of MIG)."""

    def __init__(self, gpus, busy, unreadable=()):
        super().__init__(gpus)
        self.busy = busy  # uuid -> percent
        self.unreadable = set(unreadable)

    def _nvmlDeviceGetHandleByUUID(self, uuid, handle):
        uuids = [gpu[0] for gpu in self.gpus]
        if uuid.decode() not in uuids:
            return 13  # NVML_ERROR_NOT_FOUND
        return self._handle(handle, ("gpu", uuids.index(uuid.decode())))

    def _nvmlDeviceGetUtilizationRates(self, handle, rates):
        uuid = self._info(handle)[0]
        if uuid in self.unreadable:
            return 3
        rates._obj.gpu = self.busy[uuid]
        return 0


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(fake):
        def cdll(name, *args, **kwargs):
            assert name == "libnvidia-ml.so.1"
            if isinstance(fake, Exception):
                raise fake
            return fake
        monkeypatch.setattr(resources.ctypes, "CDLL", cdll)
        return fake
    return install


def test_nvml_lists_devices(fake_nvml):
    nvml = fake_nvml(FakeNvml([(U0, "NVIDIA H100", 80 * GiB), (U1, "NVIDIA L4", 24 * GiB)]))
    assert resources.list_nvml_devices() == [
        GpuDevice(0, U0, "NVIDIA H100", 80 * GiB), GpuDevice(1, U1, "NVIDIA L4", 24 * GiB)]
    assert nvml.calls[0] == "nvmlInit_v2" and nvml.calls[-1] == "nvmlShutdown"


def test_nvml_replaces_a_mig_enabled_gpu_by_its_instances(fake_nvml):
    fake_nvml(FakeNvml(
        [(U0, "NVIDIA H100", 80 * GiB), (U1, "NVIDIA A100", 40 * GiB)],
        mig={1: [("MIG-aa", "A100 1g.5gb", 5 * GiB), None, ("MIG-bb", "A100 2g.10gb", 10 * GiB)]},
    ))
    assert resources.list_nvml_devices() == [
        GpuDevice(0, U0, "NVIDIA H100", 80 * GiB),
        GpuDevice(1, "MIG-aa", "A100 1g.5gb", 5 * GiB),
        GpuDevice(1, "MIG-bb", "A100 2g.10gb", 10 * GiB),
    ]


def test_nvml_missing_library_returns_empty(fake_nvml):
    fake_nvml(OSError("libnvidia-ml.so.1: cannot open shared object file"))
    assert resources.list_nvml_devices() == []


@pytest.mark.parametrize("function, status", [
    ("nvmlInit_v2", 9),  # driver not loaded
    ("nvmlDeviceGetCount_v2", 4),  # no permission
    ("nvmlDeviceGetHandleByIndex_v2", 4),
    ("nvmlDeviceGetName", 999),
    ("nvmlDeviceGetUUID", 999),
    ("nvmlDeviceGetMemoryInfo", 999),
])
def test_nvml_error_status_returns_empty_and_shuts_down(fake_nvml, function, status):
    nvml = fake_nvml(FakeNvml([(U0, "NVIDIA H100", 80 * GiB)], fail={function: status}))
    assert resources.list_nvml_devices() == []
    if function != "nvmlInit_v2":
        assert nvml.calls[-1] == "nvmlShutdown"


# -------------------------------------------------------- CUDA_VISIBLE_DEVICES rules


def parse(value, devices=DEVICES):
    return resources.parse_visible_devices(value, devices)


def test_visible_unset_is_all_and_empty_is_none():
    assert parse(None) == DEVICES
    assert parse(None) is not DEVICES
    assert parse("") == []
    assert parse("   ") == []


def test_visible_indices_in_list_order():
    assert parse("0") == [D0]
    assert parse("2,0") == [D2, D0]
    assert parse("3, 1 ,0") == [D3, D1, D0]


def test_visible_stops_at_first_invalid_entry():
    assert parse("0,2,-1,1") == [D0, D2]
    assert parse("1,x,2") == [D1]
    assert parse("1,,2") == [D1]
    assert parse("-1") == []
    assert parse("x,0") == []


def test_visible_index_out_of_range_stops():
    assert parse("1,7,2") == [D1]
    assert parse("4") == []
    assert parse("0", []) == []


def test_visible_index_read_like_strtoul():
    assert parse("1gpu,2ampere") == [D1, D2]
    assert parse("+2") == [D2]


def test_visible_full_uuids():
    assert parse(f"{U2},{U0}") == [D2, D0]


def test_visible_unique_uuid_prefixes():
    assert parse("GPU-1111,GPU-4444") == [D0, D3]
    assert parse("GPU-22222") == [D1]


def test_visible_ambiguous_or_unknown_prefix_stops():
    assert parse("GPU-2222") == []  # U1 and U2 both start with it
    assert parse("GPU-1111,GPU-2222,GPU-4444") == [D0]
    assert parse("GPU-9999,GPU-1111") == []
    assert parse("GPU-,GPU-1111") == []  # "GPU-" alone matches every device


def test_visible_kinds_do_not_mix():
    assert parse(f"{U1},0") == [D1]
    assert parse(f"0,{U1}") == [D0]


def test_visible_duplicates_leave_no_device():
    assert parse("0,1,0") == []
    assert parse("1,1") == []
    assert parse(f"GPU-1111,{U0}") == []  # a prefix and the full uuid name one device


def test_visible_duplicate_after_an_invalid_entry_is_never_read():
    assert parse("0,-1,0") == [D0]


def test_visible_mig_ids():
    assert parse(f"{M1}", MIG_DEVICES) == [MIG_DEVICES[2]]
    assert parse("MIG-bbbb,MIG-aaaa0", MIG_DEVICES) == [MIG_DEVICES[3], MIG_DEVICES[1]]
    assert parse("MIG-aaaa", MIG_DEVICES) == []  # ambiguous
    assert parse(f"{M0},{U0}", MIG_DEVICES) == [MIG_DEVICES[1]]  # no mixing
    assert parse(f"{M0},{M0}", MIG_DEVICES) == []
    assert parse("MIG-ffff", MIG_DEVICES) == []


def test_visible_index_of_a_mig_enabled_gpu_is_its_first_instance():
    assert parse("1,0", MIG_DEVICES) == [MIG_DEVICES[1], D0]


# ----------------------------------------------------------------------- detect_gpus


@pytest.fixture
def four_gpus(monkeypatch):
    monkeypatch.setattr(resources, "list_nvml_devices", lambda: list(DEVICES))


def test_detect_gpus_all_when_nothing_set(four_gpus):
    assert resources.detect_gpus({}) == DEVICES


def test_detect_gpus_follows_cuda_visible_devices(four_gpus):
    assert resources.detect_gpus({"CUDA_VISIBLE_DEVICES": "3,1"}) == [D3, D1]
    assert resources.detect_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_detect_gpus_cuda_visible_devices_wins_over_slurm(four_gpus):
    env = {"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "2,3", "SLURM_JOB_GPUS": "1"}
    assert resources.detect_gpus(env) == [D0]


def test_detect_gpus_slurm_step_then_job(four_gpus):
    assert resources.detect_gpus({"SLURM_JOB_GPUS": "1,3"}) == [D1, D3]
    assert resources.detect_gpus({"SLURM_STEP_GPUS": "2", "SLURM_JOB_GPUS": "1,3"}) == [D2]
    assert resources.detect_gpus({"SLURM_STEP_GPUS": "", "SLURM_JOB_GPUS": "0"}) == [D0]


def test_detect_gpus_slurm_under_device_cgroup(monkeypatch):
    # ConstrainDevices: NVML sees only the two allocated GPUs, renumbered 0 and 1,
    # while Slurm names them by their node-wide indices.
    monkeypatch.setattr(resources, "list_nvml_devices", lambda: [D0, D1])
    assert resources.detect_gpus({"SLURM_JOB_GPUS": "4,5"}) == [D0, D1]


def test_detect_gpus_no_driver(monkeypatch):
    monkeypatch.setattr(resources, "list_nvml_devices", list)
    assert resources.detect_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == []
    assert resources.detect_gpus({"SLURM_JOB_GPUS": "0"}) == []


def test_gpu_visible_devices_value_is_uuids():
    assert resources.gpu_visible_devices_value([D2, D0]) == f"{U2},{U0}"
    assert resources.gpu_visible_devices_value([]) == ""
    assert parse(resources.gpu_visible_devices_value([D3, D1])) == [D3, D1]


# ------------------------------------------------------------------ node resources


def test_detect_node_resources_defaults(four_gpus):
    node = resources.detect_node_resources(environ={})
    assert node.num_cpus == len(os.sched_getaffinity(0))
    assert node.num_gpus == 4 and node.gpus == DEVICES
    assert node.memory == resources.detect_memory_bytes()
    assert node.custom == {}
    assert node.as_dict() == {"CPU": float(node.num_cpus), "GPU": 4.0,
                              "memory": float(node.memory)}


def test_detect_node_resources_without_gpus_omits_gpu_key(monkeypatch):
    monkeypatch.setattr(resources, "list_nvml_devices", list)
    node = resources.detect_node_resources(environ={})
    assert node.num_gpus == 0 and node.gpus == []
    assert "GPU" not in node.as_dict()
    assert set(node.as_dict()) == {"CPU", "memory"}


def test_detect_node_resources_overrides(four_gpus):
    node = resources.detect_node_resources(num_cpus=64, num_gpus=2, resources={"ssd": 1.5},
                                           environ={"SLURM_CPUS_PER_TASK": "1"})
    assert node.num_cpus == 64.0
    assert node.num_gpus == 2.0 and node.gpus == [D0, D1]
    assert node.as_dict()["ssd"] == 1.5
    assert resources.detect_node_resources(num_cpus=0, environ={}).num_cpus == 0.0


def test_detect_node_resources_zero_gpus(four_gpus):
    node = resources.detect_node_resources(num_gpus=0, environ={})
    assert node.num_gpus == 0 and node.gpus == []
    assert "GPU" not in node.as_dict()


def test_detect_node_resources_more_gpus_than_devices(four_gpus):
    node = resources.detect_node_resources(num_gpus=6, environ={"CUDA_VISIBLE_DEVICES": "1"})
    assert node.num_gpus == 6.0 and node.gpus == [D1]
    assert node.as_dict()["GPU"] == 6.0


def test_detect_node_resources_fractional_gpus(four_gpus):
    node = resources.detect_node_resources(num_gpus=1.5, environ={})
    assert node.num_gpus == 1.5 and node.gpus == [D0, D1]


def test_detect_node_resources_slurm_cpus(four_gpus):
    node = resources.detect_node_resources(environ={"SLURM_CPUS_PER_TASK": "1"})
    assert node.num_cpus == 1.0


@pytest.mark.parametrize("environ, share", [
    ({}, (0, 1)),
    ({"MPI_LOCALRANKID": "2", "MPI_LOCALNRANKS": "4"}, (2, 4)),
    ({"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (1, 2)),
    # srun: 3 nodes with 2 tasks, then one with 1; this task is on the fourth node
    ({"SLURM_LOCALID": "0", "SLURM_NODEID": "3", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
     (0, 1)),
    ({"SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1"},
     (1, 2)),
    ({"SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "bad"}, (0, 1)),
])
def test_host_share_from_the_launcher(environ, share):
    assert resources.host_share(environ) == share


def test_ranks_sharing_a_host_split_it(four_gpus):
    alone = resources.detect_node_resources(environ={})
    shares = [resources.detect_node_resources(
        environ={"MPI_LOCALRANKID": str(i), "MPI_LOCALNRANKS": "2"}) for i in range(2)]
    assert all(node.memory == alone.memory // 2 for node in shares)
    assert all(node.num_cpus == max(1, alone.num_cpus // 2) for node in shares)
    explicit = resources.detect_node_resources(
        num_cpus=3, environ={"MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"})
    assert explicit.num_cpus == 3.0
    capped = resources.detect_node_resources(environ={
        "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "SLURM_CPUS_PER_TASK": "1"})
    assert capped.num_cpus == 1.0


def test_a_rank_keeps_only_the_gpus_dealt_to_it(four_gpus):
    node = resources.detect_node_resources(environ={}, gpu_uuids=[U3, U1])
    assert node.gpus == [D1, D3] and node.num_gpus == 2  # in detection order
    none = resources.detect_node_resources(environ={}, gpu_uuids=[])
    assert none.gpus == [] and none.num_gpus == 0
    visible = resources.detect_node_resources(environ={"CUDA_VISIBLE_DEVICES": "2"},
                                              gpu_uuids=[U2, U3])
    assert visible.gpus == [D2]


@pytest.mark.parametrize("views, dealt", [
    # every rank of the host sees all four (srun --gpus-per-node, or no binding)
    ([("a", [U0, U1, U2, U3])] * 2, [[U0, U2], [U1, U3]]),
    # more ranks than GPUs: surplus ranks get none, no GPU is counted twice
    ([("a", [U0])] * 3, [[U0], [], []]),
    # the launcher bound one GPU to each rank: they keep it
    ([("a", [U2]), ("a", [U0]), ("a", [U3])], [[U2], [U0], [U3]]),
    # two hosts whose GPUs have the same UUIDs in this table are still two hosts
    ([("a", [U0, U1]), ("b", [U0, U1]), ("a", [U0, U1]), ("b", [U0, U1])],
     [[U0], [U0], [U1], [U1]]),
    # overlapping views: a GPU goes to whichever rank seeing it holds fewest
    ([("a", [U0, U1]), ("a", [U1, U2])], [[U0], [U1, U2]]),
    ([("a", []), ("a", [U0])], [[], [U0]]),
])
def test_deal_host_gpus(views, dealt):
    assert resources.deal_host_gpus(views) == dealt


@pytest.mark.parametrize("kwargs, message", [
    ({"num_cpus": -1}, "num_cpus must not be negative"),
    ({"num_gpus": -0.5}, "num_gpus must not be negative"),
    ({"num_cpus": "4"}, "num_cpus must be a number"),
    ({"num_gpus": True}, "num_gpus must be a number"),
    ({"num_cpus": float("nan")}, "finite"),
    ({"resources": {"ssd": -1}}, "must not be negative"),
    ({"resources": {"ssd": "lots"}}, "must be a number"),
    ({"resources": {"ssd": None}}, "must be a number"),
    ({"resources": {"CPU": 4}}, "use num_cpus=/num_gpus="),
    ({"resources": {"GPU": 1}}, "use num_cpus=/num_gpus="),
    ({"resources": {"memory": 1}}, "use num_cpus=/num_gpus="),
    ({"resources": {"": 1}}, "non-empty strings"),
    ({"resources": [("ssd", 1)]}, "must be a dict"),
])
def test_detect_node_resources_errors(four_gpus, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resources.detect_node_resources(environ={}, **kwargs)


def test_hpcray_resources_env(four_gpus):
    env = {"HPCRAY_RESOURCES": json.dumps({"special": 2, "ssd": 1})}
    node = resources.detect_node_resources(environ=env)
    assert node.custom == {"special": 2.0, "ssd": 1.0}
    assert node.as_dict()["special"] == 2.0


def test_hpcray_resources_env_merged_under_explicit(four_gpus):
    env = {"HPCRAY_RESOURCES": '{"special": 2, "ssd": 1}'}
    node = resources.detect_node_resources(resources={"special": 5, "fpga": 1}, environ=env)
    assert node.custom == {"special": 5.0, "ssd": 1.0, "fpga": 1.0}


def test_hpcray_resources_env_read_from_process_environment(four_gpus, monkeypatch):
    monkeypatch.setenv("HPCRAY_RESOURCES", '{"special": 3}')
    assert resources.detect_node_resources().custom == {"special": 3.0}


@pytest.mark.parametrize("value, message", [
    ("{special: 2}", "HPCRAY_RESOURCES is not valid JSON"),
    ("[1, 2]", "HPCRAY_RESOURCES must be a JSON object"),
    ('{"special": -2}', "must not be negative"),
    ('{"special": "two"}', "must be a number"),
    ('{"CPU": 2}', "use num_cpus=/num_gpus="),
])
def test_hpcray_resources_env_errors(four_gpus, value, message):
    with pytest.raises(ValueError, match=message):
        resources.detect_node_resources(environ={"HPCRAY_RESOURCES": value})


def test_hpcray_resources_env_empty_is_none(four_gpus):
    assert resources.detect_node_resources(environ={"HPCRAY_RESOURCES": ""}).custom == {}


def test_module_imports_only_the_standard_library():
    out = run_isolated("print(sorted(m for m in sys.modules if m.split('.')[0] in "
                       "('hpcray', 'numpy', 'torch', 'cupy')))")
    assert out == "[]"


def test_report_gpu_source_reads_nvml_utilization(fake_nvml):
    from hpcray.runtime import sampler
    nvml = fake_nvml(FakeNvmlUtilization(
        [(U0, "A", GiB), (U1, "B", GiB), (U2, "C", GiB)], {U0: 37, U1: 100, U2: 5},
        unreadable=[U2]))
    source = sampler.gpu_utilization([U1, U0, U2, U3])  # U3: not on this host
    assert source.read() == (1.0, 0.37, None)  # in the order asked, unreadable as None
    source.close()
    assert nvml.calls[0] == "nvmlInit_v2" and nvml.calls[-1] == "nvmlShutdown"
    assert sampler.gpu_utilization([]) is None


def test_report_gpu_source_is_absent_without_a_driver(fake_nvml):
    from hpcray.runtime import sampler
    fake_nvml(OSError("libnvidia-ml.so.1: cannot open shared object file"))
    assert sampler.gpu_utilization([U0]) is None
    nvml = fake_nvml(FakeNvmlUtilization([(U0, "A", GiB)], {U0: 1}))
    nvml.fail["nvmlInit_v2"] = 9  # NVML_ERROR_DRIVER_NOT_LOADED
    assert sampler.gpu_utilization([U0]) is None
    nvml = fake_nvml(FakeNvmlUtilization([(U0, "A", GiB)], {U0: 1}))
    assert sampler.gpu_utilization([U3]) is None  # none of its GPUs found
    assert nvml.calls[-1] == "nvmlShutdown"
