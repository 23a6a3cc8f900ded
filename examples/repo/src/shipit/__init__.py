"""shipit: read a release manifest and deploy it."""

__all__ = ["manifest", "deploy"]
