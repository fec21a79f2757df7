"""Shared fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_dir():
    """The converted embedded SmolLM2-135M-Instruct, in $TUNE_HOME (default ~/.cache/tune) so the
    one-time conversion is reused across test runs."""
    from compiler.gguf import ensure_embedded_model

    return ensure_embedded_model()


@pytest.fixture(scope="session")
def smollm2_gguf():
    """(directory, file name) of the embedded GGUF, as transformers' gguf_file loading wants them."""
    from compiler.gguf import embedded_gguf_path

    path = embedded_gguf_path()
    return str(path.parent), path.name
