"""The control's HTTP API: FastAPI routes, wire models, problem details, event streams.

Import ``control.api.app.build_app`` in a control process; clients import only
``control.api.models`` (pydantic, no server code).
"""

__all__: list[str] = []
