"""The two faces over `core`: the `eagle` CLI (Typer) and the `eagle-tui` wizard (Textual)."""
