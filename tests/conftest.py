import os

import pytest


@pytest.fixture(scope="session")
def phantom_home(tmp_path_factory):
    """One phantom data folder for the whole session (phantom tasks synthesise into it on first use)."""
    home = tmp_path_factory.mktemp("sslbench-data")
    old = os.environ.get("SSLBENCH_DATA")
    os.environ["SSLBENCH_DATA"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SSLBENCH_DATA", None)
    else:
        os.environ["SSLBENCH_DATA"] = old
