"""One prepared model / data / SFT warm-up directory for every e2e test of a session: each file's runs use the
same settings, so the preparation (most of it the SFT warm-up) is built once, not once per file."""

import pytest


@pytest.fixture(scope="session")
def prep_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prep")
