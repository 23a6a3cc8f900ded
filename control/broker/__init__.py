"""The broker, as the control sees it: per-process Redis ACL users, the screen on what
workers push onto `results`, and Flower's app."""

__all__: list[str] = []
