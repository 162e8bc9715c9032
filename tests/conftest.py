"""Shared fixtures: tiny random models of all five architectures (session-scoped) and the shared data folder.

The suite never touches the network: the Hugging Face libraries are put offline here, before any of them is
imported (they read these variables at import), so a test that would reach the hub fails at once instead of
retrying. Tests of the online path mock it (see tests/test_hub.py).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
import warnings
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

import kvpress_ext  # noqa: F401  (registers the pipeline)
from kvpress_ext.testing import ARCHITECTURES, tiny_model, tiny_tokenizer

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KVPRESS_EXT_SHARED", REPO.parent / "shared"))
STORIES260K = SHARED / "models" / "stories260k"


def shared_path(*parts) -> Path:
    """A path under ../shared; in CI its absence is an error, elsewhere the test is skipped with the reason."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI"):
            raise FileNotFoundError(f"{path} is missing; CI must have ../shared beside the checkout")
        pytest.skip(f"shared data not found at {path} (set KVPRESS_EXT_SHARED)")
    return path


@pytest.fixture(scope="session")
def tiny_models():
    return {arch: tiny_model(arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session", params=ARCHITECTURES)
def arch_model(request, tiny_models):
    return request.param, tiny_models[request.param]


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def stories260k():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_path("models", "stories260k")
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(autouse=True)
def _library_logging_after_commands():
    """Commands run in-process (``main(argv)``) quiet kvpress's repeated log lines for the rest of the process;
    put the library default back after each test, so the next one sees every record kvpress emits."""
    yield
    from kvpress_ext.core.apply import quiet_repeated_kvpress_logs

    quiet_repeated_kvpress_logs(enable=False)
@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct by its short name: converted once per machine into $KVPRESS_EXT_CACHE (default
    ~/.cache/kvpress_ext), then reloaded from there. In CI a missing model package is an error; elsewhere the tests
    are skipped with the command that installs it."""
    from kvpress_ext.runtime.builtin_models import smollm2_gguf
    from kvpress_ext.runtime.models import ModelLoadError, load_model

    try:
        smollm2_gguf()
    except ModelLoadError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture
def one_thread():
    """Tiny matmuls are dominated by OpenMP thread start-up when the machine is shared: one thread, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def two_threads():
    """The 135M model is worth both cores of a 2-core runner (the tiny models run single-threaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)
