"""The slurm marker, registered here so these tests run under --strict-markers before
pyproject.toml lists it (registering it twice is harmless)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: tests that start a one-machine Slurm (slurm/local-cluster.sh)"
    )
