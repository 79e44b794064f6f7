"""A local Ray for the loop's tests: started once per test module, shut down after it."""
import pytest


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
