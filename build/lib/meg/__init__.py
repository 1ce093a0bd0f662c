"""meg: massive knowledge editing for language models by dynamic weight generation (MeG)."""

__version__ = "0.1.0"
