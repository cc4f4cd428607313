"""Host tools: checkpoint readers, the canonical model, conversion, the CLI."""

__version__ = "0.1.0"
