"""What a file is, from its first bytes: the one place that knows the file signatures.

Used where a file turns out not to be what was asked for, so the message can say what it is
instead ("'labels.csv' is a Photoshop file (PSD), not a label sheet"; "this is not an image
(it looks like a PDF document)"). Only signatures are read, never the rest of the file.
"""

from __future__ import annotations

__all__ = ["binary_kind"]

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


def binary_kind(data: bytes) -> str | None:
    """The kind of binary file ``data`` (its first 64 bytes or more) starts like, in words
    ("a photo (JPEG image)", "a PDF document", "a ZIP archive or an Office document"), or None
    when it starts like none of them (text, or a format not known here)."""
    head = data[:16]
    brand = data[8:12] if data[4:8] == b"ftyp" else b""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "a photo (PNG image)"
    if head.startswith(b"\xff\xd8\xff"):
        return "a photo (JPEG image)"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "an image (GIF)"
    if head.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "a photo (WebP image)"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a photo (TIFF image)"
    if brand in _HEIF_BRANDS:
        return "a photo (HEIC/AVIF image)"
    if head.startswith(b"BM") and len(data) > 26 and b"\x00" in data[:64]:  # not a text line that starts "BM"
        return "an image (BMP)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "a ZIP archive or an Office document"
    if head.startswith(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"):
        return "an Office document (Word, Excel or PowerPoint)"
    binary = b"\x00" in data[:64]  # for signatures a line of text could also start with
    if head.startswith(b"8BPS") and binary:
        return "a Photoshop file (PSD)"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        return "a PostScript/EPS file"
    if brand:
        return "a QuickTime video" if brand == b"qt  " else "a video or audio file (MP4)"
    if head.startswith(b"RIFF") and binary:
        return "a video or audio file"
    if head.startswith((b"\x1f\x8b", b"Rar!\x1a", b"7z\xbc\xaf\x27\x1c")) or (
            head.startswith(b"BZh") and data[4:10] == b"1AY&SY"):
        return "a compressed archive"
    if head.startswith(b"MZ") and binary:
        return "a program (EXE)"
    return None
