"""The launcher's ``--mode`` choices: verl-mtp's regimes, plus the two modes that exist in this example only.

A mode is what the trainer gets under ``actor_rollout_ref.model.mtp``. Every regime verl-mtp lists (its registry,
``MTP_REGIME_REGISTRY``, reads them from ``verl_mtp/workers/config/mtp_regimes.yaml``: ``detach``, ``ce``,
``rl``) is the mode of the same name with OCC off, so a regime added there is a mode here (and a column of the
study) with no edit. The example adds, declared here and nowhere else:

* ``<regime>_occ`` for each regime whose heads the policy loss trains (``rl_occ``): the same regime with OCC
  setting the coefficient, one switch instead of an override;
* ``frozen``: the MTP layers loaded and saved but never run or trained (verl's ``enable_train=False``), the
  reference for "detach leaves the trunk alone".

The list is read from verl-mtp's file rather than from its registry because importing verl-mtp imports verl
(seconds, and its start-up warnings), which the launcher's up-front checks do without.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml

MTP = "actor_rollout_ref.model.mtp"


@dataclass(frozen=True)
class Regime:
    """A regime as verl-mtp lists it (the fields of its ``MtpRegime``)."""

    name: str
    detach_encoder: bool
    policy_loss: bool


def product_regimes() -> list[Regime]:
    """verl-mtp's regimes, from the file its registry reads (found without importing the package)."""
    package = Path(importlib.util.find_spec("verl_mtp").origin).parent
    listed = yaml.safe_load((package / "workers" / "config" / "mtp_regimes.yaml").read_text())
    return [Regime(name, **fields) for name, fields in listed.items()]


@dataclass(frozen=True)
class Mode:
    """One ``--mode``: a regime of verl-mtp (``None``: the heads are not trained) and whether OCC is on."""

    name: str
    regime: Optional[Regime]
    occ: bool = False

    @property
    def settings(self) -> dict[str, Any]:
        """The trainer keys the mode sets, ``{dotted key: value}``; the contradiction checks read them too."""
        return {
            f"{MTP}.enable": True,
            f"{MTP}.enable_train": self.regime is not None,
            f"{MTP}.detach_encoder": self.regime is not None and self.regime.detach_encoder,
            f"{MTP}.mtp_loss_type": None if self.regime is None else self.regime.name,
            f"{MTP}.occ.enable": self.occ,
        }

    def overrides(self) -> list[str]:
        """:attr:`settings` as Hydra overrides."""
        return [f"{key}={'null' if value is None else value}" for key, value in self.settings.items()]

    @property
    def policy_loss(self) -> bool:
        """Whether the heads get the policy loss (the regimes OCC and its diagnostics apply to)."""
        return self.regime is not None and self.regime.policy_loss

    @property
    def fixed_coefficient(self) -> bool:
        """Whether the MTP loss has a coefficient the user sets (``mtp_loss_scaling_factor``, ``--mtp-coef``)."""
        return self.regime is not None and not self.occ


def _modes() -> Iterator[Mode]:
    regimes = product_regimes()
    yield from (Mode(regime.name, regime) for regime in regimes)
    yield from (Mode(f"{regime.name}_occ", regime, occ=True) for regime in regimes if regime.policy_loss)
    yield Mode("frozen", None)


MODES: dict[str, Mode] = {mode.name: mode for mode in _modes()}
