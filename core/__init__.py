"""eagle-tui headless core: every pipeline stage, importable without textual, typer or rich."""

__version__ = "0.1.0"
