from .mtp import MTP_LOSS_TYPES, OCC_SCOPES, MtpRLConfig, OCCConfig

__all__ = ["MTP_LOSS_TYPES", "OCC_SCOPES", "MtpRLConfig", "OCCConfig"]
