"""The workbench's analysis library: pure Python, no streamlit. See ../README.md and shared DESIGN.md."""
from .errors import WorkbenchError
from .models import DEFAULT_MODEL, ModelHandle, load_model

__all__ = ["WorkbenchError", "DEFAULT_MODEL", "ModelHandle", "load_model"]
