"""``toolplane``: the command line. User commands are HTTP clients of the API
(TOOLPLANE_URL and TOOLPLANE_TOKEN, nothing else); operator commands act on the control
host with the control's settings."""

from control.cli.app import app, main

__all__ = ["app", "main"]
