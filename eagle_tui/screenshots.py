"""`python -m eagle_tui.screenshots [--update]`: screenshots/*.png from the TUI snapshot tests' SVGs.

--update first re-takes the snapshots (pytest tests/test_tui_snapshots.py --snapshot-update), so one
command refreshes both after an intended change of the look. Conversion uses `rsvg-convert` when it
is installed (Debian librsvg2-bin), else CairoSVG (pip install cairosvg; needs the cairo library).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = REPO / "tests" / "__snapshots__" / "test_tui_snapshots"
OUT = REPO / "screenshots"
WIDTH = 1600


def _has_font(family: str) -> bool:
    exe = shutil.which("fc-list")
    if exe is None:
        return False
    out = subprocess.run([exe, family], capture_output=True, text=True).stdout
    return bool(out.strip())


def monospace_svg(text: str) -> str:
    """Textual's SVGs ask for Fira Code; without it fontconfig substitutes a proportional font and
    columns drift, so fall back to the system's monospace font (DejaVu Sans Mono here)."""
    if _has_font("Fira Code"):
        return text
    return text.replace('font-family: "Fira Code"', "font-family: monospace").replace(
        "font-family: Fira Code, monospace", "font-family: monospace")


def convert(svg: Path, png: Path, width: int = WIDTH) -> str:
    """Render one SVG to PNG; returns the converter used."""
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.name}.tmp")
    src = png.with_name(f".{png.stem}.svg.tmp")
    src.write_text(monospace_svg(svg.read_text()))
    try:
        exe = shutil.which("rsvg-convert")
        if exe:
            subprocess.run([exe, "-w", str(width), str(src), "-o", str(tmp)], check=True)
            used = "rsvg-convert"
        else:
            try:
                import cairosvg
            except (ImportError, OSError) as e:
                raise SystemExit(f"error: no SVG converter: install librsvg2-bin (rsvg-convert) or "
                                 f"`pip install cairosvg` ({e})") from None
            cairosvg.svg2png(url=str(src), write_to=str(tmp), output_width=width)
            used = "cairosvg"
        tmp.replace(png)  # never leave a half-written PNG under its final name
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eagle_tui.screenshots", description=__doc__.split("\n")[0])
    parser.add_argument("--update", action="store_true", help="re-take the snapshot SVGs first")
    parser.add_argument("--width", type=int, default=WIDTH, help="PNG width in pixels")
    args = parser.parse_args(argv)
    if args.update:
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(REPO / "tests" / "test_tui_snapshots.py"), "--snapshot-update"],
                            cwd=REPO).returncode
        if rc != 0:
            print("error: the snapshot tests failed; screenshots not refreshed", file=sys.stderr)
            return 1
    svgs = sorted(SNAPSHOTS.glob("*.svg"))
    if not svgs:
        print(f"error: no snapshots in {SNAPSHOTS}: run with --update", file=sys.stderr)
        return 2
    wanted = set()
    for svg in svgs:
        name = svg.stem.removeprefix("test_") + ".png"
        wanted.add(name)
        used = convert(svg, OUT / name, args.width)
        print(f"{OUT.relative_to(REPO) / name}  ({used})")
    for stale in OUT.glob("*.png"):  # a snapshot that no longer exists
        if stale.name not in wanted:
            stale.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
