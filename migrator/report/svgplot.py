"""Small charts written straight as SVG: the report's plots without a plotting library.

::

    chart = Chart(7.2, 4.6, rows=3)                 # inches, as a figure's size
    top = chart.panels[0]
    top.line(ts, remaining, color="#1f77b4", label="RAM remaining", gid="mig-remaining")
    top.ylabel = "remaining\\nMiB"
    chart.mark(1.25, "COMPLETED")                   # a dashed line across every panel
    svg = chart.svg("mig1 vm1 hostA->hostB")        # one <svg> element, for a page

What it draws: stacked panels sharing one x axis (lines, with a dot per sample if asked;
markers; a right-hand axis of its own; notes at a point), or one panel of categories (bars,
medians with min-max bars, labels rotated); axes with round ticks, light grid lines, axis
labels, legends inside a panel or beside it, vertical marks with their names. Text stays
``<text>`` (searchable, small); sizes are points, as a browser lays out SVG; series keep the
ids they are given (a test or a stylesheet finds them). Text widths are estimated from
DejaVu Sans' advances (no font is read): a label may sit a little off in another font,
never off the chart.

It draws in microseconds per point, with the standard library only: a run's page never
waits for a plotting library's import (seconds of CPU on a busy lab) or its layout.

What can go wrong: a value that is not a finite number raises ValueError (naming it);
the caller decides (the report leaves that plot out and says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

#: points per inch (sizes are given in inches, drawn in points)
PT = 72.0
TICK = 3.5              # tick length, pt
FONT = 8.0              # tick labels and axis labels
SMALL = 7.0             # legends, notes, mark names
PAD = 4.0               # around the chart
GAP = FONT * 1.25        # between stacked panels: a tick label at the edge of each fits
INK, MUTED, GRID = "#262626", "#595959", "#e6e6e6"
TURN = 30.0             # degrees: category labels too wide to stand level

# DejaVu Sans advance widths, in ems (the glyphs a report's labels use; others 0.62)
_ADVANCE = {**dict.fromkeys("0123456789", 0.636), **dict.fromkeys(" .,:;!|'", 0.318),
            **dict.fromkeys("ilj", 0.278), **dict.fromkeys("ft", 0.37), "r": 0.411,
            **dict.fromkeys("()[]-", 0.39), "%": 0.95, "m": 0.974, "w": 0.818, "s": 0.521,
            "c": 0.55, "z": 0.525, "I": 0.295, "J": 0.295, "M": 0.863, "W": 0.989,
            **dict.fromkeys("ABCDEFGHKLNOPQRSTUVXYZ", 0.70), "_": 0.5, "=": 0.838,
            ">": 0.838, "<": 0.838, "/": 0.337, "\u2013": 0.5}


def text_width(text: str, size: float) -> float:
    """``text``'s width in points at ``size`` (estimated: see the module's docstring)."""
    return size * sum(_ADVANCE.get(c, 0.62 if c.islower() else 0.7) for c in text)


def nice_ticks(lo: float, hi: float, most: int = 6) -> list[float]:
    """Round values (1, 2, 2.5 or 5 times a power of ten apart) from ``lo`` to ``hi``, at
    most ``most`` + 1 of them."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / most
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag * (1 + 1e-9))
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    return [k * step for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    """``value`` with as many decimals as ``step`` needs (no "-0")."""
    decimals = 0
    while decimals < 6 and abs(round(step, decimals) - step) > abs(step) * 1e-6:
        decimals += 1
    text = f"{value:.{decimals}f}"
    return "0" if float(text) == 0 else text


def labelled_ticks(lo: float, hi: float, most: int = 6) -> list[tuple[float, str]]:
    """:func:`nice_ticks` from ``lo`` to ``hi``, each with its :func:`tick_label`."""
    values = nice_ticks(lo, hi, most)
    step = values[1] - values[0] if len(values) > 1 else 1.0
    return [(v, tick_label(v, step)) for v in values]


def _num(v: float) -> str:
    """A coordinate to 0.1 pt."""
    text = f"{v:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _finite(values, what: str) -> list[float]:
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}: a value that is not a finite number")
    return out


def _text(x: float, y: float, text: str, size: float = FONT, anchor: str = "middle",
          color: str = INK, rotate: float = 0, baseline: str = "", cls: str = "") -> str:
    """One ``<text>``; ``text`` may hold line breaks (each line a ``<tspan>``, the lines
    stacked in the text's own direction); ``baseline`` "central" or "hanging" (default:
    the alphabetic baseline at ``y``); ``cls`` its class (what it is: tick, label, mark,
    legend, note, title)."""
    lines = text.split("\n")
    where = (f' transform="translate({_num(x)} {_num(y)}) rotate({_num(rotate)})"' if rotate
             else f' x="{_num(x)}" y="{_num(y)}"')
    attrs = ((f' class="{cls}"' if cls else "") + f'{where} font-size="{_num(size)}" fill="{color}"'
             + (f' text-anchor="{anchor}"' if anchor != "start" else "")
             + (f' dominant-baseline="{baseline}"' if baseline else ""))
    if len(lines) == 1:
        return f"<text{attrs}>{escape(text)}</text>"
    x0 = "0" if rotate else _num(x)
    spans = "".join(f'<tspan x="{x0}" dy="{"0" if i == 0 else "1.2em"}">{escape(line)}</tspan>'
                    for i, line in enumerate(lines))
    return f"<text{attrs}>{spans}</text>"


@dataclass
class _Item:
    kind: str                   # line, points, bars, errorbars, note
    xs: list[float]
    ys: list[float]
    color: str
    label: str | None = None
    gid: str | None = None
    width: float = 1.4          # line width; bar width (x units)
    dash: str | None = None
    dots: bool = False
    marker: str = "o"           # points: o, x, ^
    size: float = 4.0
    lo: list[float] = field(default_factory=list)       # errorbars' bars
    hi: list[float] = field(default_factory=list)
    text: str = ""              # a note's


class Panel:
    """One set of axes: what it draws, its labels, its y limits, its legend."""

    def __init__(self) -> None:
        self.items: list[_Item] = []
        self.ylabel = ""
        self.title = ""
        #: the y axis' limits: (0, None) is from 0 to the data's top (5% margin)
        self.ylim: tuple[float | None, float | None] = (0.0, None)
        #: "upper left", "upper right" (inside), "outside" (beside the panel), or None
        self.legend: str | None = None
        #: a second y axis on the right (its own items, limits and label): :meth:`twin`
        self.right: Panel | None = None

    def line(self, xs, ys, color: str, width: float = 1.4, dash: str | None = None,
             dots: bool = False, label: str | None = None, gid: str | None = None) -> None:
        """A polyline through the points (a dot on each if ``dots``)."""
        self.items.append(_Item("line", _finite(xs, label or gid or "line"),
                                _finite(ys, label or gid or "line"), color, label, gid,
                                width, dash, dots))

    def points(self, xs, ys, color: str, marker: str = "o", size: float = 4.0,
               label: str | None = None, gid: str | None = None) -> None:
        """A marker at each point (``o``, ``x`` or ``^``), no line."""
        self.items.append(_Item("points", _finite(xs, label or "points"),
                                _finite(ys, label or "points"), color, label, gid,
                                marker=marker, size=size))

    def bars(self, xs, heights, color: str, width: float = 0.7,
             label: str | None = None) -> None:
        """A bar from 0 to each height, centred on each x, ``width`` x units wide."""
        self.items.append(_Item("bars", _finite(xs, label or "bars"),
                                _finite(heights, label or "bars"), color, label,
                                width=width))

    def errorbars(self, xs, mid, lo, hi, color: str, bar_color: str = MUTED) -> None:
        """A dot at each ``mid``, a vertical bar from ``lo`` to ``hi`` with caps."""
        self.items.append(_Item("errorbars", _finite(xs, "errorbars"), _finite(mid, "median"),
                                color, dash=bar_color, lo=_finite(lo, "min"),
                                hi=_finite(hi, "max")))

    def note(self, x: float, y: float, text: str, color: str = MUTED) -> None:
        """``text`` written from the point (x, y)."""
        self.items.append(_Item("note", _finite([x], text), _finite([y], text), color,
                                text=text))

    def twin(self) -> "Panel":
        """The panel's right-hand y axis (made once)."""
        if self.right is None:
            self.right = Panel()
        return self.right

    # -- layout ----------------------------------------------------------------------------

    def y_range(self) -> tuple[float, float]:
        values = []
        for it in self.items:
            values += it.ys + it.hi
            if it.kind == "bars":
                values.append(0.0)
        lo, hi = self.ylim
        top = max(values, default=1.0)
        bottom = min(values, default=0.0)
        if hi is None:
            hi = top + 0.05 * (top - (lo if lo is not None else bottom)) if values else 1.0
        if lo is None:
            lo = bottom - 0.05 * (hi - bottom)
        if not hi > lo:
            hi = lo + 1.0
        return lo, hi

    def x_values(self) -> list[float]:
        out = []
        for it in self.items:
            if it.kind == "bars":
                out += [x - it.width / 2 for x in it.xs] + [x + it.width / 2 for x in it.xs]
            else:
                out += it.xs
        return out

    def legend_entries(self) -> list[_Item]:
        own = [it for it in self.items if it.label]
        return own + ([it for it in self.right.items if it.label] if self.right else [])


class Chart:
    """Panels stacked on one x axis (``rows``), ``width`` x ``height`` inches."""

    def __init__(self, width: float, height: float, rows: int = 1) -> None:
        self.width, self.height = width * PT, height * PT
        self.panels = [Panel() for _ in range(rows)]
        self.xlabel = ""
        #: the x axis' limits; None: the data's, with a 5% margin on each side
        self.xlim: tuple[float, float] | None = None
        #: category names under the x axis, at 0, 1, 2 ... (instead of numbered ticks)
        self.categories: list[str] | None = None
        #: the categories' labels turned by this many degrees (anchored at their end); 0:
        #: level, unless one is wider than its share of the axis (then :data:`TURN`)
        self.rotation = 0.0
        self.marks: list[tuple[float, str]] = []

    def mark(self, x: float, name: str) -> None:
        """A dashed vertical line at ``x`` across every panel, ``name`` along it, at the top."""
        self.marks.append((_finite([x], name)[0], name))

    def _x_range(self) -> tuple[float, float]:
        if self.xlim is not None:
            return self.xlim
        xs = [x for p in self.panels for x in p.x_values()]
        xs += [x for p in self.panels if p.right for x in p.right.x_values()]
        xs += [x for x, _name in self.marks]
        if not xs:
            return 0.0, 1.0
        lo, hi = min(xs), max(xs)
        if not hi > lo:
            return lo - 0.5, hi + 0.5
        margin = 0.05 * (hi - lo)
        return lo - margin, hi + margin

    def svg(self, title: str) -> str:
        """The chart as one ``<svg>`` element (no XML prolog: for a page), ``title`` its
        ``<title>``.

        :raise ValueError: a value is not a finite number.
        """
        x0, x1 = self._x_range()
        rotation = self.rotation
        if self.categories is not None:
            xticks = [(float(i), name) for i, name in enumerate(self.categories)
                      if x0 - 1e-9 <= i <= x1 + 1e-9]
            share = (self.width - 2 * PAD - 60) / max(1.0, x1 - x0)     # pt per category
            if not rotation and any(text_width(t, FONT) > 0.9 * share for _v, t in xticks):
                rotation = TURN
        else:
            xticks = labelled_ticks(x0, x1)
        yticks = []
        for p in self.panels:
            lo, hi = p.y_range()
            right = None
            if p.right is not None:
                rlo, rhi = p.right.y_range()
                right = ((rlo, rhi), labelled_ticks(rlo, rhi, most=4))
            yticks.append(((lo, hi), labelled_ticks(lo, hi, most=4), right))

        # margins: what each side's labels take
        def label_block(text: str) -> float:
            return len(text.split("\n")) * FONT * 1.2 if text else 0.0

        left = PAD + max(label_block(p.ylabel) + (2 if p.ylabel else 0)
                         + max((text_width(t, FONT) for _v, t in ticks), default=0)
                         for p, (_r, ticks, _rt) in zip(self.panels, yticks)) + TICK + 3
        right = PAD + max([0.0] + [label_block(p.right.ylabel) + 2 + TICK + 3
                                   + max((text_width(t, FONT) for _v, t in rt[1]), default=0)
                                   for p, (_r, _t, rt) in zip(self.panels, yticks) if rt])
        outside = [p for p in self.panels if p.legend == "outside" and p.legend_entries()]
        if outside:
            right = max(right, PAD + 8 + max(self._legend_size(p)[0] for p in outside))
        right = max(right, PAD + text_width(xticks[-1][1], FONT) / 2 if xticks
                    and not rotation else PAD)
        if rotation:                    # turned labels end at their tick: they reach left
            reach = max((text_width(t, FONT) for _v, t in xticks), default=0)
            left = max(left, PAD + reach * math.cos(math.radians(rotation)))
        top = PAD + max((FONT * 1.6 if p.title else 0) for p in self.panels[:1])
        if rotation:
            angle = math.radians(rotation)
            under = max((text_width(t, FONT) for _v, t in xticks), default=0) * math.sin(angle)
            under += FONT * math.cos(angle)
        else:
            under = FONT
        bottom = PAD + TICK + 3 + under + (label_block(self.xlabel) + 2 if self.xlabel else 0)
        rows = len(self.panels)
        panel_h = (self.height - top - bottom - GAP * (rows - 1)) / rows
        plot_w = self.width - left - right
        if panel_h < 20 or plot_w < 40:
            raise ValueError(f"{title}: labels leave no room to draw in "
                             f"{self.width:.0f}x{self.height:.0f} pt")

        def sx(x: float) -> float:
            return left + (x - x0) / (x1 - x0) * plot_w

        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(self.width)}pt" '
               f'height="{_num(self.height)}pt" viewBox="0 0 {_num(self.width)} '
               f'{_num(self.height)}" font-family="DejaVu Sans, Verdana, sans-serif">'
               f"<title>{escape(title)}</title>"]
        for row, (p, ((lo, hi), ticks, rticks)) in enumerate(zip(self.panels, yticks)):
            ptop = top + row * (panel_h + GAP)
            pbot = ptop + panel_h

            def sy(y: float, lo=lo, hi=hi, ptop=ptop) -> float:
                return ptop + (hi - y) / (hi - lo) * panel_h

            last = row == rows - 1
            out.append(self._axes(p, ticks, sy, left, plot_w, ptop, pbot))
            if last:
                out.append(self._x_axis(xticks, sx, pbot, rotation))
            out += [self._item(it, sx, sy, left + plot_w / 2) for it in p.items]
            if p.right is not None and rticks is not None:
                (rlo, rhi), rt = rticks

                def rsy(y: float, rlo=rlo, rhi=rhi, ptop=ptop) -> float:
                    return ptop + (rhi - y) / (rhi - rlo) * panel_h

                out.append(self._right_axis(p.right, rt, rsy, left + plot_w, ptop, pbot))
                out += [self._item(it, sx, rsy, left + plot_w / 2)
                        for it in p.right.items]
            for x, _name in self.marks:
                out.append(f'<path d="M{_num(sx(x))} {_num(ptop)}V{_num(pbot)}" '
                           f'stroke="#8c8c8c" stroke-width="0.8" stroke-dasharray="3.7 1.6"/>')
            if row == 0:
                out += [_text(sx(x) - 2, ptop + 2, name, SMALL, "end", MUTED, rotate=-90,
                                  cls="mark")
                        for x, name in self.marks]
            if p.title:
                out.append(_text(left + plot_w / 2, ptop - FONT * 0.6, p.title, FONT + 1,
                                 cls="title"))
            if p.legend and p.legend_entries():
                out.append(self._legend(p, left, plot_w, ptop))
        if self.xlabel:
            out.append(_text(left + plot_w / 2, self.height - PAD - FONT * 0.25, self.xlabel,
                             cls="label"))
        out.append("</svg>")
        return "".join(out)

    # -- pieces ----------------------------------------------------------------------------

    @staticmethod
    def _axes(p: Panel, ticks, sy, left: float, plot_w: float, ptop: float,
              pbot: float) -> str:
        parts = []
        for v, text in ticks:
            y = sy(v)
            if ptop - 0.5 <= y <= pbot + 0.5:
                if abs(y - pbot) > 0.5:
                    parts.append(f'<path d="M{_num(left)} {_num(y)}H{_num(left + plot_w)}" '
                                 f'stroke="{GRID}" stroke-width="0.6"/>')
                parts.append(f'<path d="M{_num(left - TICK)} {_num(y)}H{_num(left)}" '
                             f'stroke="{INK}" stroke-width="0.8"/>')
                parts.append(_text(left - TICK - 2, y, text, anchor="end", baseline="central",
                                   cls="tick"))
        parts.append(f'<path d="M{_num(left)} {_num(ptop)}V{_num(pbot)}H{_num(left + plot_w)}"'
                     f' fill="none" stroke="{INK}" stroke-width="0.8"/>')
        if p.ylabel:
            widest = max((text_width(t, FONT) for _v, t in ticks), default=0)
            lines = len(p.ylabel.split("\n"))
            x = left - TICK - 4 - widest - (lines - 1) * FONT * 1.2 - FONT * 0.3
            parts.append(_text(x, (ptop + pbot) / 2, p.ylabel, rotate=-90, cls="label"))
        return "".join(parts)

    @staticmethod
    def _right_axis(p: Panel, ticks, sy, x: float, ptop: float, pbot: float) -> str:
        parts = [f'<path d="M{_num(x)} {_num(ptop)}V{_num(pbot)}" stroke="{INK}" '
                 f'stroke-width="0.8"/>']
        widest = 0.0
        for v, text in ticks:
            y = sy(v)
            if ptop - 0.5 <= y <= pbot + 0.5:
                parts.append(f'<path d="M{_num(x)} {_num(y)}h{_num(TICK)}" stroke="{INK}" '
                             f'stroke-width="0.8"/>')
                parts.append(_text(x + TICK + 2, y, text, anchor="start", baseline="central",
                                   cls="tick"))
                widest = max(widest, text_width(text, FONT))
        if p.ylabel:
            parts.append(_text(x + TICK + 4 + widest + FONT * 1.1, (ptop + pbot) / 2,
                               p.ylabel, rotate=-90, cls="label"))
        return "".join(parts)

    def _x_axis(self, xticks, sx, pbot: float, rotation: float) -> str:
        parts = []
        for v, text in xticks:
            x = sx(v)
            parts.append(f'<path d="M{_num(x)} {_num(pbot)}v{_num(TICK)}" stroke="{INK}" '
                         f'stroke-width="0.8"/>')
            if not text:
                continue
            if rotation:
                parts.append(_text(x + FONT * 0.3, pbot + TICK + 3, text, anchor="end",
                                   rotate=-rotation, baseline="hanging", cls="tick"))
            else:
                parts.append(_text(x, pbot + TICK + 2, text, baseline="hanging", cls="tick"))
        return "".join(parts)

    @staticmethod
    def _item(it: _Item, sx, sy, middle: float) -> str:
        gid = f' id="{escape(it.gid)}"' if it.gid else ""
        if it.kind == "line":
            pts = [(sx(x), sy(y)) for x, y in zip(it.xs, it.ys)]
            d = "".join(f"{'M' if i == 0 else 'L'}{_num(x)} {_num(y)}"
                        for i, (x, y) in enumerate(pts))
            dash = f' stroke-dasharray="{it.dash}"' if it.dash else ""
            dots = "".join(f'<circle cx="{_num(x)}" cy="{_num(y)}" r="1.5" fill="{it.color}"/>'
                           for x, y in pts) if it.dots else ""
            return (f'<g{gid}><path d="{d}" fill="none" stroke="{it.color}" '
                    f'stroke-width="{_num(it.width)}" stroke-linejoin="round" '
                    f'stroke-linecap="square"{dash}/>{dots}</g>')
        if it.kind == "points":
            return (f"<g{gid}>" + "".join(_marker(it.marker, sx(x), sy(y), it.size, it.color)
                                          for x, y in zip(it.xs, it.ys)) + "</g>")
        if it.kind == "bars":
            parts = []
            for x, h in zip(it.xs, it.ys):
                left, right = sx(x - it.width / 2), sx(x + it.width / 2)
                top, base = sy(max(h, 0.0)), sy(min(h, 0.0))
                parts.append(f'<rect x="{_num(left)}" y="{_num(top)}" '
                             f'width="{_num(right - left)}" height="{_num(base - top)}" '
                             f'fill="{it.color}"/>')
            return f"<g{gid}>" + "".join(parts) + "</g>"
        if it.kind == "errorbars":
            parts = []
            for x, m, lo, hi in zip(it.xs, it.ys, it.lo, it.hi):
                cx = sx(x)
                parts.append(f'<path d="M{_num(cx)} {_num(sy(lo))}V{_num(sy(hi))}'
                             f'M{_num(cx - 4)} {_num(sy(lo))}h8M{_num(cx - 4)} '
                             f'{_num(sy(hi))}h8" stroke="{it.dash}" stroke-width="1"/>')
                parts.append(f'<circle cx="{_num(cx)}" cy="{_num(sy(m))}" r="2.5" '
                             f'fill="{it.color}"/>')
            return f"<g{gid}>" + "".join(parts) + "</g>"
        x = sx(it.xs[0])              # written away from the nearer side's edge
        return _text(x - 3 if x > middle else x + 3, sy(it.ys[0]) - 3, it.text, SMALL,
                     "end" if x > middle else "start", it.color, cls="note")

    @staticmethod
    def _legend_size(p: Panel) -> tuple[float, float]:
        entries = p.legend_entries()
        width = 22 + max(text_width(it.label or "", SMALL) for it in entries)
        return width, len(entries) * SMALL * 1.45

    def _legend(self, p: Panel, left: float, plot_w: float, ptop: float) -> str:
        width, height = self._legend_size(p)
        x = {"upper left": left + 6, "upper right": left + plot_w - width - 2,
             "outside": left + plot_w + 8}.get(p.legend, left + 6)
        # inside the panel, over the data: on a veil that keeps both readable
        parts = [] if p.legend == "outside" else [
            f'<rect x="{_num(x - 3)}" y="{_num(ptop + 2)}" width="{_num(width + 4)}" '
            f'height="{_num(height + 4)}" fill="#fff" fill-opacity="0.75"/>']
        for i, it in enumerate(p.legend_entries()):
            y = ptop + 4 + SMALL * 0.7 + i * SMALL * 1.45
            if it.kind == "line":
                dash = f' stroke-dasharray="{it.dash}"' if it.dash else ""
                parts.append(f'<path d="M{_num(x)} {_num(y)}h14" stroke="{it.color}" '
                             f'stroke-width="{_num(it.width)}"{dash}/>')
            elif it.kind == "bars":
                parts.append(f'<rect x="{_num(x + 2)}" y="{_num(y - 3.5)}" width="10" '
                             f'height="7" fill="{it.color}"/>')
            else:
                parts.append(_marker(it.marker, x + 7, y, it.size, it.color))
            parts.append(_text(x + 20, y, it.label or "", SMALL, "start", INK, cls="legend",
                               baseline="central"))
        return "".join(parts)


def _marker(kind: str, x: float, y: float, size: float, color: str) -> str:
    r = size / 2
    if kind == "x":
        return (f'<path d="M{_num(x - r)} {_num(y - r)}l{_num(size)} {_num(size)}'
                f'M{_num(x - r)} {_num(y + r)}l{_num(size)} {_num(-size)}" stroke="{color}" '
                f'stroke-width="1"/>')
    if kind == "^":
        return (f'<path d="M{_num(x)} {_num(y - r)}L{_num(x + r)} {_num(y + r)}'
                f'H{_num(x - r)}Z" fill="{color}"/>')
    return f'<circle cx="{_num(x)}" cy="{_num(y)}" r="{_num(r)}" fill="{color}"/>'


__all__ = ["Chart", "Panel", "nice_ticks", "text_width", "tick_label"]
