"""Test set-up: 8 CPU devices, quiet TensorFlow, and the optional larger offline datasets.

XLA_FLAGS must be set before jax is imported anywhere, hence here, at the top of conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# The larger prepared TFDS sets (cifar10_jpeg, caltech101_jpeg, imagewoof320_sample) live
# outside the repository; tests that need them skip unless this points at them.
SHARED_TFDS_ENV = "BT_JAX_TFDS_DIR"


@pytest.fixture(scope="session")
def shared_tfds_dir():
    path = os.environ.get(SHARED_TFDS_ENV)
    if not path or not os.path.isdir(path):
        pytest.skip(
            f"needs the offline TFDS sets: set {SHARED_TFDS_ENV} to the folder holding "
            "cifar10_jpeg, caltech101_jpeg and imagewoof320_sample"
        )
    return path


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """One persistent XLA compilation cache for the job processes a test module starts."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        yield
