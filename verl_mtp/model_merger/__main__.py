"""``python -m verl_mtp.model_merger``: see :mod:`verl_mtp.model_merger.hf_export`."""

import sys

from verl_mtp.model_merger.hf_export import main

sys.exit(main())
