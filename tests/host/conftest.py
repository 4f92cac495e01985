"""Fixtures the host tests of both systems share."""
import pytest

from sefi_testkit import pva


@pytest.fixture(scope="module")
def pva_files(host):
    """A random iresnet r18 (as InsightFace's .pth state dict and as .safetensors), a random encoder, two photos:
    (recognizer, encoder)."""
    return pva.write_pva_files(host)
