from eagle_tui.cli import entry

entry()
