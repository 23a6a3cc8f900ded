"""Running it: the composition root (ControlPlane), the control process, embedded
servers, process supervision for `toolplane up`, and the demo."""

__all__: list[str] = []
