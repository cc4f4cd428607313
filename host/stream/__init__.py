"""The stream writer side: layout before the data, bytes on demand, file writer, validate."""
from .layout import StreamLayout
from .virtual import VirtualStream

__all__ = ["StreamLayout", "VirtualStream"]
