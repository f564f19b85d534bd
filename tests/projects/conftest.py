"""Shared fixtures for the tests of the scripts in projects/SparseDETR/ (they are files, not an importable package)."""
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[2] / "projects" / "SparseDETR"


@pytest.fixture(scope="session")
def load_tool() -> Callable[[str], ModuleType]:
    """Import projects/SparseDETR/<name>.py as a module."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models on a shared 2-core machine: a second thread only waits for the first
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
