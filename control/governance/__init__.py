"""Who may do what: tokens and principals, approvals, entitlements, the freeze,
the environment and classification of a call, and the keys' lifecycle."""

__all__: list[str] = []
