"""Where images come from: a folder (with optional imagefolder metadata) or a Hugging Face dataset.

Every source yields ``Entry`` objects one at a time, so nothing holds the whole
set. A folder is read file by file with ``scan_folder``; Hugging Face datasets
(a ``save_to_disk`` folder, or a hub name, streamed) have their image column
cast to undecoded bytes, so that each image goes through the same validation as
a file and a corrupt row is skipped with a reason instead of crashing the loader.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
from pathlib import Path
from typing import Callable, Iterator

from pixart_tune.data.masks import MaskSource, is_mask_name, mask_name_for, mask_source_for, orphan_reason
from pixart_tune.data.scan import Found, scan_folder
from pixart_tune.errors import UserError
from pixart_tune.fsutil import os_error_text, printable, read_regular

SOURCE_KINDS = ("auto", "folder", "saved", "hub")
CAPTION_COLUMNS = ("text", "caption", "prompt", "description", "captions", "sentence")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")


@dataclasses.dataclass
class Entry:
    source: str
    """How the report names this image: path relative to the source folder, or a dataset row."""
    name: str
    """File name, for captions made from it."""
    read: Callable[[], bytes] | None
    path: Path | None = None
    """The file on disk, for sidecar captions (folders only)."""
    metadata_caption: str | None = None
    metadata_captions: tuple[str, ...] = ()
    """Every caption of the metadata column, for caption variants: a list value gives all its strings."""
    skip: str | None = None
    rereadable: bool = True
    """``read`` can be called again later without this entry holding the bytes (files, saved datasets);
    streamed rows cannot, so they are always decoded at full size (see duplicates.py)."""
    mask: MaskSource | None = None
    """The image's loss mask (a ``NAME.mask.png`` file or a dataset column), if it has one."""


def detect_kind(source: str) -> str:
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved"
        return "folder"
    if path.exists():
        raise UserError(f"{source} is a file; give a folder of images, a save_to_disk folder or a Hugging Face dataset name")
    if source.count("/") <= 1 and not source.startswith((".", "/", "~")):
        return "hub"
    raise UserError(f"source {source} does not exist; give a folder of images, a save_to_disk folder or a Hugging Face dataset name")


def open_source(
    source: str, kind: str = "auto", split: str = "train", image_column: str | None = None, caption_column: str | None = None,
    unread: list[dict[str, str]] | None = None, mask_column: str | None = None, ignored: list[dict[str, str]] | None = None,
) -> tuple[Iterator[Entry], int | None]:
    """(entries, their number when known) for ``source``; metadata files that could not be read go into ``unread``,
    files found but not used (masks without an image) into ``ignored``."""
    kind = detect_kind(source) if kind == "auto" else kind
    if kind == "folder":
        # The whole tree is listed first (small records): its count is the progress bar's total, and every
        # file found is then accounted for, even when a folder vanishes while images are being encoded.
        found = list(scan_folder(source))
        return folder_entries(source, caption_column, unread, found, ignored), sum(not is_mask_name(f.path.name) for f in found)
    if kind == "saved":
        import datasets

        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UserError(f"{source} has splits {', '.join(data)}; choose one with --split")
            data = data[split]
    elif kind == "hub":
        import datasets

        try:
            data = datasets.load_dataset(source, split=split, streaming=True)
        except Exception as error:  # datasets raises many types for a missing or unreachable dataset
            raise UserError(
                f"{source} is not a folder here, and loading it as a Hugging Face dataset (split {split!r}) failed "
                f"({type(error).__name__}: {error}); check the path, the dataset name, --split and your connection"
            ) from None
    else:
        raise UserError(f"unknown source kind {kind!r}; use one of {', '.join(SOURCE_KINDS)}")
    return dataset_entries(data, split, image_column, caption_column, mask_column), getattr(data, "num_rows", None)


def folder_entries(
    root: str | Path, caption_column: str | None = None, unread: list[dict[str, str]] | None = None, found: list[Found] | None = None,
    ignored: list[dict[str, str]] | None = None,
) -> Iterator[Entry]:
    """The images of a folder (``found``: its scan, when already made), each with its ``NAME.mask.png`` if there is one.

    Unreadable metadata files go into ``unread``; masks that belong to no image into ``ignored``.
    """
    root = Path(root)
    found = list(scan_folder(root)) if found is None else found
    masks = {f.source: f for f in found if is_mask_name(f.path.name)}
    claimed = {mask_source_for(f.source) for f in found if not is_mask_name(f.path.name)}
    if ignored is not None:
        ignored += [{"source": source, "reason": orphan_reason()} for source in sorted(set(masks) - claimed)]
    metadata = read_metadata(root, unread)
    for item in found:
        if is_mask_name(item.path.name):
            continue
        row = metadata.get(item.source, {})
        yield Entry(
            source=item.source,
            name=text_name(item.path.name),
            read=None if item.skip else functools.partial(read_regular, item.path),
            path=item.path,
            metadata_caption=pick_caption(row, caption_column),
            metadata_captions=pick_captions(row, caption_column),
            skip=item.skip,
            mask=_folder_mask(item, masks.get(mask_source_for(item.source))),
        )


def _folder_mask(image: Found, mask: Found | None) -> MaskSource | None:
    """The mask file found beside ``image``; also a folder in its place, which the scan does not list as a file."""
    if mask is not None:
        return MaskSource(printable(mask.path.name), None if mask.skip else functools.partial(read_regular, mask.path), mask.skip)
    path = image.path.with_name(mask_name_for(image.path.name))
    if path.is_dir():
        return MaskSource(printable(path.name), None, "a folder, not an image file")
    return None


def text_name(name: str) -> str:
    """A file name as text for a caption: undecodable bytes read as cp1252 (old Windows archives), else dropped."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("cp1252", "replace").replace("\ufffd", "")


def read_metadata(root: Path, unread: list[dict[str, str]] | None = None) -> dict[str, dict]:
    """Rows of every ``metadata.jsonl`` / ``metadata.csv`` under ``root``, by image path relative to root.

    This is the Hugging Face imagefolder convention: a ``file_name`` column holds the
    image's path relative to the metadata file's folder. Only regular files inside
    ``root`` are read (a FIFO would block forever); one that cannot be read is
    listed in ``unread`` with its reason, and its captions are not used. A file that
    reads but does not parse stops the run with the line to fix.
    """
    rows: dict[str, dict] = {}
    found = [f for f in scan_folder(root, select=lambda name: name in METADATA_FILES) if f.path.name in METADATA_FILES]
    for item in sorted(found, key=lambda f: (METADATA_FILES.index(f.path.name), f.path)):
        meta, name = item.path, item.path.name
        try:
            if item.skip:
                raise OSError(item.skip)
            data = read_regular(meta)
        except OSError as error:
            if unread is not None:
                unread.append({"source": item.source, "reason": f"metadata file not read ({os_error_text(error)}); its captions are not used"})
            continue
        base = meta.parent.relative_to(root.absolute())
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise UserError(f"{printable(str(meta))}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None
        if name.endswith(".jsonl"):
            records = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{printable(str(meta))}: line {number} is not valid JSON; fix or remove that line") from None
                if not isinstance(records[-1], dict):
                    raise UserError(f"{printable(str(meta))}: line {number} is not a JSON object; each line must be {{\"file_name\": ..., \"text\": ...}}")
        else:
            try:
                records = list(csv.DictReader(text.splitlines()))
            except csv.Error as error:
                raise UserError(f"{printable(str(meta))}: not a readable CSV file ({error}); fix it or remove it") from None
        for record in records:
            file_name = record.get("file_name")
            if not isinstance(file_name, str):
                raise UserError(f"{printable(str(meta))}: every row needs a 'file_name' column naming its image (Hugging Face imagefolder format)")
            rows[printable((base / file_name).as_posix().removeprefix("./"))] = record
    return rows


def pick_caption(row: dict, column: str | None) -> str | None:
    if column is not None:
        value = row.get(column)
    else:
        value = next((row[c] for c in CAPTION_COLUMNS if isinstance(row.get(c), str)), None)
    if isinstance(value, list):  # some datasets keep several captions per image: use the first
        value = next((v for v in value if isinstance(v, str)), None)
    return value if isinstance(value, str) else None


def pick_captions(row: dict, column: str | None) -> tuple[str, ...]:
    """Every caption of the row's caption column: a string gives one, a list its strings (caption variants).

    Unlike :func:`pick_caption`, the default column may hold a list (COCO-style
    ``captions``): with variants that is the point, without them the first-string
    rule of ``pick_caption`` stands unchanged.
    """
    def strings(value) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

    if column is not None:
        return strings(row.get(column))
    return next((found for c in CAPTION_COLUMNS if (found := strings(row.get(c)))), ())


MASK_COLUMN = "mask"
"""The dataset column read as each row's loss mask when it is there (an Image column) and no other is named."""


def dataset_entries(data, split: str, image_column: str | None, caption_column: str | None, mask_column: str | None = None) -> Iterator[Entry]:
    import datasets

    features = data.features or {}
    mask_column = _mask_column(features, mask_column)
    if image_column is None:
        image_column = next((name for name, feature in features.items() if isinstance(feature, datasets.Image) and name != mask_column), None)
    if image_column is None or image_column not in features:
        raise UserError(f"no image column found (columns: {', '.join(features)}); name it with --image-column")
    for column in (image_column, mask_column):
        if column is not None and isinstance(features[column], datasets.Image):
            data = data.cast_column(column, datasets.Image(decode=False))
    random_access = isinstance(data, datasets.Dataset)  # a save_to_disk dataset: rows are memory-mapped
    for index, row in enumerate(data):
        value = row[image_column]
        path = value.get("path") if isinstance(value, dict) else None
        source = f"{split}/{index}" + (f":{Path(path).name}" if path else "")
        name = Path(path).name if path else ""
        read, rereadable = _cell_reader(data, index, image_column, random_access, value)
        if read is None:
            yield Entry(source, name, None, skip="row has no image bytes")
            continue
        mask = None
        if mask_column is not None and row[mask_column] is not None:
            mask_read, _ = _cell_reader(data, index, mask_column, random_access, row[mask_column])
            mask = MaskSource(f"the mask in column {mask_column!r}", mask_read, None if mask_read else "the mask cell holds no image bytes")
        yield Entry(source, name, read, metadata_caption=pick_caption(row, caption_column),
                    metadata_captions=pick_captions(row, caption_column), rereadable=rereadable, mask=mask)


def _mask_column(features: dict, mask_column: str | None) -> str | None:
    """The column holding loss masks: the one named, else ``mask`` when it is an Image column, else none."""
    import datasets

    if mask_column is None:
        return MASK_COLUMN if isinstance(features.get(MASK_COLUMN), datasets.Image) else None
    if mask_column not in features:
        raise UserError(f"no column {mask_column!r} for masks (columns: {', '.join(features)}); check --mask-column")
    return mask_column


def _cell_reader(data, index: int, column: str, random_access: bool, value) -> tuple[Callable[[], bytes] | None, bool]:
    """(a reader of the image bytes in cell ``value``, whether it can be called again without holding them); None: no bytes."""
    data_bytes, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if data_bytes is None and path and Path(path).is_file():
        return functools.partial(read_regular, path), True
    if isinstance(data_bytes, (bytes, bytearray)):
        if random_access:  # fetch the row again when asked rather than holding its bytes
            return (lambda: _image_bytes(data[index][column])), True
        return (lambda b=bytes(data_bytes): b), False
    return None, True


def _image_bytes(value) -> bytes:
    return bytes(value["bytes"] if isinstance(value, dict) else value)
