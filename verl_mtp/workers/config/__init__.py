from .mtp import (
    MTP_REGIME_REGISTRY,
    OCC_SCOPES,
    MtpRegime,
    MtpRLConfig,
    OCCConfig,
    get_mtp_regime,
    register_mtp_regime,
)

__all__ = [
    "MTP_REGIME_REGISTRY",
    "OCC_SCOPES",
    "MtpRegime",
    "MtpRLConfig",
    "OCCConfig",
    "get_mtp_regime",
    "register_mtp_regime",
]
