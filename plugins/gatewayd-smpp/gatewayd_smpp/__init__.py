"""gatewayd-smpp: SMS devices behind an SMSC, reached over SMPP 3.4 (the L3G role)."""
