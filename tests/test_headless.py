"""Rule 1: core is headless; the CLI stays light for --help."""

import json
import subprocess
import sys

import pytest

UI = ("textual", "typer", "rich", "click")
HEAVY = ("torch", "transformers", "datasets")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_core_imports_no_ui_library():
    import pkgutil

    import core

    names = ["core"] + [f"core.{m.name}" for m in pkgutil.walk_packages(core.__path__, "")]
    code = "\n".join(f"import {n}" for n in names)
    loaded = _modules_after(code)
    bad = [m for m in loaded if m.split(".")[0] in UI]
    assert not bad, f"core imported UI libraries: {sorted(bad)[:10]}"


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_cli_help_is_light(argv):
    loaded = _modules_after(f"import sys\nsys.argv=['eagle', *{argv!r}]\n"
                            "from eagle_tui.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass")
    heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
    assert not heavy, f"eagle {' '.join(argv)} imported {sorted(heavy)[:10]}"


@pytest.mark.slow
def test_every_subcommand_help_is_light():
    from eagle_tui.cli import app
    import typer.main

    group = typer.main.get_group(app)
    paths = []
    for name, cmd in group.commands.items():
        paths.append([name])
        for sub in getattr(cmd, "commands", {}) or {}:
            paths.append([name, sub])
    for p in paths:
        loaded = _modules_after(f"import sys\nsys.argv=['eagle', *{p!r}, '--help']\n"
                                "from eagle_tui.cli import main\nimport contextlib, io\n"
                                "with contextlib.redirect_stdout(io.StringIO()):\n    main()")
        heavy = [m for m in loaded if m.split(".")[0] in HEAVY]
        assert not heavy, f"eagle {' '.join(p)} --help imported {sorted(heavy)[:10]}"


@pytest.mark.parametrize("argv, says", [(["cache", "--bogus"], "No such option: --bogus"),
                                        (["train", "--lr", "abc"], "Invalid value for '--lr'"),
                                        (["nosuch"], "No such command 'nosuch'"),
                                        (["cache"], "Missing option")])
def test_command_line_mistakes_exit_2_with_clicks_message(argv, says, capsys):
    """Typer vendors click: its usage errors are not `click`'s classes, yet must stay exit 2."""
    from eagle_tui.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and "NoSuchOption" not in err
