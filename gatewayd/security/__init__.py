"""TLS contexts, peer identities and authorization policy for MSGin5G-2/-4."""
