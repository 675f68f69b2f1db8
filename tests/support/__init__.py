"""Test-support helpers (import as ``support.<module>``; see ``support.tiny_mcore`` for why not ``tests.``)."""
