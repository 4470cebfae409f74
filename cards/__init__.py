"""Dataset cards: the Jinja2 templates (``*.md.j2``, read with importlib.resources) and the code
that renders them (``render.py``).

Why the code lives here and not in ``lora_zoo/cards.py``: setuptools installs this folder as the
package ``lora_zoo.cards`` (``package-dir`` in pyproject.toml), and a package shadows a module
of the same name, so a ``lora_zoo/cards.py`` would be unreachable in an installed wheel.
"""

from __future__ import annotations

from lora_zoo.cards.render import (
    card_context,
    card_header,
    label_stats,
    provenance_rows,
    render_card,
    write_card,
)

__all__ = [
    "card_context",
    "card_header",
    "label_stats",
    "provenance_rows",
    "render_card",
    "write_card",
]
