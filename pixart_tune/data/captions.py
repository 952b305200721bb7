"""Where a caption comes from, how it is read, and what is added to it.

Order (the first that gives a non-empty caption wins; ``caption_order`` changes it):

1. ``sidecar``: ``photo.txt`` or ``photo.caption`` beside ``photo.jpg``.
2. ``metadata``: a column of ``metadata.jsonl`` / ``metadata.csv`` (Hugging Face
   imagefolder), or of the dataset's rows.
3. ``filename``: the file name made readable (``red_fox-2.jpg`` -> "red fox"); names
   with no words in them (``IMG_0042``, ``DSC01234``, hashes) give nothing.
4. ``captioner``: a vision-language model, when one is named.

Then a trigger word is put first (unless the caption already has it), and a
prefix and a suffix are added verbatim, as kohya-ss does with its caption_prefix /
caption_suffix: include your own spaces or commas.

With caption variants on, an image may have several captions: one per non-empty
line of its sidecar, or one per string of a list-valued metadata column. Each is
composed the same way, and training draws one of them each time it sees the image.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pixart_tune.fsutil import os_error_text, printable, read_regular

CAPTION_SOURCES = ("sidecar", "metadata", "filename", "captioner")
SIDECAR_SUFFIXES = (".txt", ".caption")

# Camera and phone names carry no meaning: IMG_1234, DSC01234, PXL_2023..., Screenshot...
_CAMERA_WORDS = {"img", "image", "dsc", "dscn", "dscf", "dcim", "pxl", "mvimg", "photo", "pic", "screenshot", "scan", "frame", "copy", "edited", "final"}


def decode_text(data: bytes) -> str:
    """Text of a caption file: UTF-8 (with or without BOM), UTF-16 with BOM, else the best guess.

    Windows tools still write cp1252 or UTF-16; a caption file is never rejected for
    its encoding, the last resort is latin-1, which maps every byte.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        # A UTF-16 file cut short ends in half a character (an odd byte count): drop that
        # half; a lone surrogate left by a careless tool becomes U+FFFD, then nothing.
        return data[: len(data) - len(data) % 2].decode("utf-16", "replace").replace("\ufffd", "")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    best = from_bytes(data).best()
    return str(best) if best is not None else data.decode("latin-1")


def clean(text: str) -> str:
    """Whitespace trimmed, and inner runs (newlines, tabs) made one space."""
    return " ".join(text.split())


def distinct(captions: list[str]) -> list[str]:
    """Non-empty captions, each once, in their first order."""
    return list(dict.fromkeys(c for c in captions if c))


def split_variants(text: str) -> list[str]:
    """Each non-empty line of a caption file as one caption (caption variants); repeated lines once."""
    return distinct([clean(line) for line in text.splitlines()])


def sidecar_text(image_path: Path, root: Path | None = None, unread: list[dict[str, str]] | None = None, name: str | None = None) -> str | None:
    """Text of the first ``.txt`` / ``.caption`` file beside ``image_path`` that is not blank (a blank ``.txt`` lets a ``.caption`` speak).

    With ``root``, a sidecar that is a symlink leading outside ``root`` is ignored, as
    images are: prepare reads nothing outside the source folder. Only regular files
    are opened (a FIFO would block); a sidecar that exists but cannot be read is
    listed in ``unread`` (named ``name`` plus its suffix) and the next source speaks.
    """
    real_root = root.resolve() if root is not None else None
    for suffix in SIDECAR_SUFFIXES:
        sidecar = image_path.with_suffix(suffix)
        try:
            if real_root is not None and sidecar.is_symlink():
                target = sidecar.resolve()
                if target != real_root and real_root not in target.parents:
                    continue
            if not os.path.lexists(sidecar):
                continue
            text = decode_text(read_regular(sidecar))
        except (OSError, RuntimeError) as error:  # RuntimeError: Python 3.11's "Symlink loop" from resolve
            if unread is not None:
                shown = str(Path(name).with_suffix(suffix)) if name else printable(str(sidecar))
                why = os_error_text(error) if isinstance(error, OSError) else "symlink loop"
                unread.append({"source": shown, "reason": f"caption file not read ({why}); the next caption source is used"})
            continue
        if text.strip():
            return text
    return None


def filename_caption(name: str) -> str | None:
    """Words of a file name, or None when it has none (camera numbers, hashes)."""
    stem = Path(name).stem
    words = [w for w in re.split(r"[\s_\-.,+()\[\]]+", stem) if w]
    kept = []
    for word in words:
        letters = re.sub(r"[^A-Za-z\u00C0-\uFFFF]", "", word)
        if len(letters) < 2 or letters.lower() in _CAMERA_WORDS:
            continue
        if re.fullmatch(r"[0-9a-fA-F]{8,}", word):  # hashes and uuids
            continue
        kept.append(word if letters == word else letters)
    return " ".join(kept) if kept else None


def compose(caption: str, trigger: str = "", prefix: str = "", suffix: str = "") -> str:
    """The caption as trained: trigger word first (once), then prefix + caption + suffix."""
    text = f"{prefix}{caption}{suffix}"
    if trigger and not re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", text):
        text = f"{trigger}, {text}" if text else trigger
    return clean(text)
