"""verl-mtp: joint RL training of Multi-Token Prediction heads in verl's Megatron backend, with OCC.

Importing this package is cheap; the integration with verl is installed by :mod:`verl_mtp.plugin`, which
verl imports itself (entry point group ``verl.plugins``) in the driver and in every Ray worker.
"""

__version__ = "0.1.0"
