import os
import sys

# Library warnings (no TE/Apex) are expected on CPU; keep test logs readable.
os.environ.setdefault("PYTHONWARNINGS", "ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny finished training run (checkpoints at 2 and 4) shared by the reliability and checksum tests."""
    from tests.support.runs import trained_run

    return trained_run(str(tmp_path_factory.mktemp("trained")))
