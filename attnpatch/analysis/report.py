"""One self-contained HTML page from PNG figures, text and tables (images embedded as base64), and a headless
Chromium screenshot of it for checking the page renders."""

from __future__ import annotations

import base64
import html
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-bottom: .2em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0; }
td, th { border: 1px solid #ddd; padding: .2em .6em; text-align: right; } th { background: #f4f4f4; }
.meta td { text-align: left; }
"""


@dataclass
class Section:
    """A heading, a paragraph of plain text, PNG figures (path, caption) and tables (title, rows of dicts)."""

    title: str
    text: str = ""
    figures: list[tuple[Path, str]] = field(default_factory=list)
    tables: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(title: str, rows: Sequence[dict[str, Any]], css: str = "") -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    caption = f"<caption>{html.escape(title)}</caption>" if title else ""
    return f'<table class="{css}">{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _image(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    alt = html.escape(Path(path).stem)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_html(title: str, sections: Sequence[Section], meta: dict[str, Any] | None = None) -> str:
    """The page as a string: title, a table of `meta`, then each section."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    if meta:
        parts.append(_table("", [{"": k, "value": v} for k, v in meta.items()], "meta"))
    for section in sections:
        parts.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        parts.extend(_image(path, caption) for path, caption in section.figures)
        parts.extend(_table(name, rows) for name, rows in section.tables)
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(path: str | Path, title: str, sections: Sequence[Section], meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.write_text(render_html(title, sections, meta), encoding="utf-8")
    return path


def compact_png(path: str | Path, colors: int = 256) -> Path:
    """Rewrite a PNG with an adaptive palette of `colors` colours (plots and screenshots shrink 2-4x)."""
    from PIL import Image  # a matplotlib dependency

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=colors, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)
    return Path(path)


def find_chromium() -> str | None:
    """Path of a Chromium / Chrome executable on PATH, or None."""
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def screenshot(
    page: str | Path, png: str | Path, *, width: int = 1280, height: int = 4000, timeout: float = 120.0
) -> Path:
    """Render `page` in headless Chromium and save a PNG screenshot of the top `width` x `height` pixels."""
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium executable on PATH (Debian: apt-get install chromium)")
    png = Path(png).resolve()
    png.unlink(missing_ok=True)
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--screenshot={png}",
        Path(page).resolve().as_uri(),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not png.exists():
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr[-2000:]}")
    return compact_png(png)
