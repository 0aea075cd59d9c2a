import os
import sys
import tempfile
from pathlib import Path

# Before anything imports triton: the whole test process runs Triton's interpreter (tests/interpret),
# with Triton's and sparsec's caches in fresh temporary folders. AOT compilation (tests/aot) runs in
# subprocesses without TRITON_INTERPRET.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsec-test-triton-")
os.environ["SPARSEC_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsec-test-cache-")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
