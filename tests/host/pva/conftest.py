"""Fixtures of PVA's host tests."""
import pytest

from sefi_testkit import pva


@pytest.fixture(scope="module")
def dataset(host, pva_files):
    """input/pva_dataset: three people of three photos each (crops of the test photos), one with a face mask."""
    return pva.write_dataset(host)
