"""Shipping labels for verified boards: a QR code with the device id and the certificate's
SHA-256 fingerprint, as PNG (Pillow) and PDF (WeasyPrint), named by the device id.

The QR payload is one line a scanner or a script can split::

    STATION-LABEL/1;device=<device id>;sha256=<fingerprint hex>

(device ids are letters, digits and ``. _ : -``, so neither ``;`` nor ``=`` appears
in them). The fingerprint is AWS IoT's certificateId, so a scanned label finds
the board's certificate in AWS IoT and in the ledger.

A label is 62 x 29 mm (a common thermal-label size): QR on the left, the
device id, the batch and the start of the fingerprint on the right.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import segno

from station.ledger import Ledger

LABEL_VERSION = 1
WIDTH_MM, HEIGHT_MM = 62, 29
DPI = 300
_FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
_FONT_MONO = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"


@dataclass(frozen=True, slots=True)
class Label:
    device_id: str
    batch: str
    serial: str
    fingerprint: str

    @property
    def payload(self) -> str:
        return f"STATION-LABEL/{LABEL_VERSION};device={self.device_id};sha256={self.fingerprint}"


def _qr(label: Label) -> segno.QRCode:
    return segno.make_qr(label.payload, error="m")


def write_png(label: Label, path: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    w, h = round(WIDTH_MM / 25.4 * DPI), round(HEIGHT_MM / 25.4 * DPI)
    image = Image.new("L", (w, h), 255)
    qr = _qr(label)
    size = h - 40
    modules = int(qr.symbol_size(border=2)[0])
    scale = max(1, size // modules)
    matrix = list(qr.matrix_iter(border=2))
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            if dark:
                x0, y0 = 20 + x * scale, 20 + y * scale
                image.paste(0, (x0, y0, x0 + scale, y0 + scale))
    draw = ImageDraw.Draw(image)
    left = 40 + modules * scale
    room = w - left - 16
    small = ImageFont.truetype(_FONT, 26)
    mono = ImageFont.truetype(_FONT_MONO, 24)
    # The id whole on one line: the largest size that fits (a 64-character id at 14 px
    # still does); never cut.
    for points in range(40, 9, -2):
        big = ImageFont.truetype(_FONT, points)
        if draw.textlength(label.device_id, font=big) <= room:
            break
    draw.text((left, 40), label.device_id, font=big, fill=0)
    draw.text((left, 100), f"batch {label.batch}", font=small, fill=0)
    fp = label.fingerprint
    draw.text((left, 150), f"sha256 {fp[:16]}", font=mono, fill=0)
    draw.text((left, 182), f"       {fp[16:32]}", font=mono, fill=0)
    image.save(path, format="PNG", dpi=(DPI, DPI))


def label_html(label: Label) -> str:
    e = html.escape
    svg = _qr(label).svg_inline(scale=1, border=2, omitsize=True)
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
@page {{ size: {WIDTH_MM}mm {HEIGHT_MM}mm; margin: 0 }}
body {{ margin: 0; font-family: "DejaVu Sans", sans-serif; }}
.l {{ display: flex; height: {HEIGHT_MM}mm; align-items: center; padding: 0 2mm; }}
.q svg {{ width: 25mm; height: 25mm; display: block; }}
.t {{ margin-left: 2mm; min-width: 0; }}
.id {{ font-size: 9pt; font-weight: bold; overflow-wrap: anywhere; }}
.b {{ font-size: 6.5pt; }}
.f {{ font-family: "DejaVu Sans Mono", monospace; font-size: 5.5pt; overflow-wrap: anywhere; }}
</style></head><body><div class="l"><div class="q">{svg}</div><div class="t">
<div class="id">{e(label.device_id)}</div><div class="b">batch {e(label.batch)}</div>
<div class="f">sha256 {e(label.fingerprint)}</div></div></div></body></html>"""


def write_pdf(label: Label, path: Path) -> None:
    import weasyprint

    weasyprint.HTML(string=label_html(label)).write_pdf(path)


def write_label(label: Label, out_dir: Path) -> tuple[Path, Path]:
    """``<device id>.png`` and ``<device id>.pdf`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{label.device_id}.png", out_dir / f"{label.device_id}.pdf"
    write_png(label, png)
    write_pdf(label, pdf)
    return png, pdf


def batch_labels(ledger: Ledger, batch: str) -> Iterator[Label]:
    """A label for every verified, unrevoked board of the batch (its whitelist entry)."""
    ledger.get_batch(batch)  # unknown-batch, with the ledger's own error
    for entry in ledger.whitelist(batch):
        yield Label(entry.device_id, entry.batch, entry.serial, entry.fingerprint)


def write_batch(ledger: Ledger, batch: str, out_dir: Path, only: set[str] | None = None) -> int:
    """Labels of the batch's verified boards (or of ``only`` those), and ``labels.csv``
    listing each board with its label files. Returns the number written."""
    rows = []
    for label in batch_labels(ledger, batch):
        if only is not None and label.device_id not in only:
            continue
        png, pdf = write_label(label, out_dir)
        rows.append((label.device_id, label.serial, label.fingerprint, png.name, pdf.name))
    with (out_dir / "labels.csv").open("a" if only is not None else "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if fh.tell() == 0:
            writer.writerow(["device_id", "serial", "fingerprint", "png", "pdf"])
        writer.writerows(rows)
    return len(rows)
