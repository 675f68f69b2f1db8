"""verl-mtp: joint RL training of Multi-Token Prediction heads in verl's Megatron backend, with OCC.

The integration with verl is installed by :mod:`verl_mtp.plugin`, which verl imports itself (entry point group
``verl.plugins``) in the driver and in every Ray worker. verl is imported first here: its plugin loading imports
this package's engine, which imports the rest of the package, so it must run before any of this package's
modules starts; every import order then ends with the same, fully registered engine.
"""

import verl  # noqa: F401  (runs verl's plugin loading before any verl_mtp module body, see above)

__version__ = "0.1.0"
