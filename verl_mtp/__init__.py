"""verl-mtp: joint RL training of Multi-Token Prediction heads in verl's Megatron backend, with OCC.

The integration with verl is installed by :mod:`verl_mtp.plugin`, which verl imports itself (entry point group
``verl.plugins``) in the driver and in every Ray worker. verl is imported first here so that importing any
``verl_mtp`` module on its own runs verl's initialisation (and that plugin) before this package's modules,
which themselves import verl: the other order is a circular import that leaves the plugin unregistered.
"""

import verl  # noqa: F401  (see the docstring: import order)

__version__ = "0.1.0"
