"""A state machine as a small inline SVG, drawn on the server with the current state marked:
no JavaScript and no network, so the page works offline and the picture is the same in
every browser. States are laid out in columns by their distance from the initial state."""

from __future__ import annotations

from collections import deque
from html import escape

from ironflow_celery.model.views import StateMachineDefinition

__all__ = ["state_machine_svg"]

BOX_W, BOX_H = 150, 40
COL_W, ROW_H = 230, 90
MARGIN = 30
LABEL = 22
"""Characters of a state or input name drawn (the full name is the element's title)."""


def _short(name: str) -> str:
    return name if len(name) <= LABEL else name[: LABEL - 1] + "…"


def _columns(definition: StateMachineDefinition) -> dict[str, tuple[int, int]]:
    """Each state's (column, row): breadth-first from the initial state; unreachable
    states go in a last column."""
    depth: dict[str, int] = {definition.initial_state: 0}
    queue = deque([definition.initial_state])
    while queue:
        name = queue.popleft()
        for t in definition.transitions_from(name):
            if t.to_state not in depth:
                depth[t.to_state] = depth[name] + 1
                queue.append(t.to_state)
    last = max(depth.values(), default=0) + 1
    rows: dict[int, int] = {}
    place: dict[str, tuple[int, int]] = {}
    for state in definition.states:
        column = depth.get(state.name, last)
        place[state.name] = (column, rows.get(column, 0))
        rows[column] = rows.get(column, 0) + 1
    return place


def state_machine_svg(definition: StateMachineDefinition, current: str | None) -> str:
    """`definition` as an SVG element (a string of markup, every name escaped); `current`
    (a state name, or None when the instance does not report one) is filled and labelled."""
    place = _columns(definition)

    def box(name: str) -> tuple[float, float]:
        column, row = place[name]
        return MARGIN + column * COL_W, MARGIN + row * ROW_H

    width = MARGIN * 2 + max(c for c, _ in place.values()) * COL_W + BOX_W
    height = MARGIN * 2 + max(r for _, r in place.values()) * ROW_H + BOX_H + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="machine" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        "<title>state machine</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#555"/></marker></defs>',
    ]
    for t in definition.transitions:
        (x1, y1), (x2, y2) = box(t.from_state), box(t.to_state)
        label = escape(_short(t.input))
        title = f"<title>{escape(t.from_state)} → {escape(t.to_state)} on {escape(t.input)}</title>"
        if t.from_state == t.to_state:  # a loop above the box
            cx = x1 + BOX_W / 2
            path = f"M{cx - 20},{y1} C{cx - 30},{y1 - 30} {cx + 30},{y1 - 30} {cx + 20},{y1}"
            lx, ly = cx, y1 - 26
        elif x2 > x1:  # forward: right edge to left edge
            sx, sy, ex, ey = x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2
            path = f"M{sx},{sy} L{ex},{ey}"
            lx, ly = (sx + ex) / 2, (sy + ey) / 2 - 6
        else:  # backward or same column: a curve below the boxes
            sx, sy = x1 + BOX_W / 2, y1 + BOX_H
            ex, ey = x2 + BOX_W / 2, y2 + BOX_H
            dip = max(sy, ey) + 35
            path = f"M{sx},{sy} C{sx},{dip} {ex},{dip} {ex},{ey}"
            lx, ly = (sx + ex) / 2, dip - 4
        parts.append(
            f'<g class="edge">{title}<path d="{path}" fill="none" stroke="#555" '
            f'marker-end="url(#arrow)"/><text x="{lx}" y="{ly}" text-anchor="middle" '
            f'font-size="11" fill="#333">{label}</text></g>'
        )
    for state in definition.states:
        x, y = box(state.name)
        now = state.name == current
        classes = "state" + (" current" if now else "") + (" terminal" if state.is_terminal else "")
        fill = "#ffd54f" if now else "#f5f5f5"
        stroke = "#e65100" if now else "#777"
        width_px = 3 if now else 1
        name = escape(state.name)
        shape = (
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="8" fill="{fill}" '
            f'stroke="{stroke}" stroke-width="{width_px}"/>'
        )
        if state.is_terminal:  # a double border, as in UML's final state
            shape += (
                f'<rect x="{x + 3}" y="{y + 3}" width="{BOX_W - 6}" height="{BOX_H - 6}" rx="6" '
                f'fill="none" stroke="{stroke}"/>'
            )
        marker = (
            f'<text x="{x + BOX_W / 2}" y="{y + BOX_H + 14}" text-anchor="middle" '
            f'font-size="11" font-weight="bold" fill="#e65100">▲ current</text>'
            if now
            else ""
        )
        parts.append(
            f'<g class="{classes}" data-state="{name}"><title>{name}</title>{shape}'
            f'<text x="{x + BOX_W / 2}" y="{y + BOX_H / 2 + 4}" text-anchor="middle" '
            f'font-size="13">{escape(_short(state.name))}</text>{marker}</g>'
        )
    if definition.initial_state in place:
        x, y = box(definition.initial_state)
        parts.append(
            f'<g class="initial"><circle cx="{x - 18}" cy="{y + BOX_H / 2}" r="6" fill="#333"/>'
            f'<path d="M{x - 12},{y + BOX_H / 2} L{x},{y + BOX_H / 2}" stroke="#333" '
            f'marker-end="url(#arrow)"/></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
