"""File formats: turn the bytes of a .jsonl, .json, .csv or .parquet file into numbered rows.

Readers know nothing about question layouts; they only split a file into records and say where each one
came from. A row that cannot be parsed (bad UTF-8, broken JSON, a CSV line with the wrong number of
fields) comes back with an error instead of a record, so one bad line never costs the rest of the file.
Problems with the file as a whole (not JSON at all, not Parquet) raise ValueError; the caller adds the
file name and what to do.

Row numbers: the physical 1-based line number for line-oriented formats (.jsonl; .csv, where the header is
line 1 and a quoted multi-line row is numbered by its first line), the 0-based index for formats without
lines (.json arrays, .parquet, hub datasets), so a number can be looked up in an editor or with `df.iloc`.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

_BOM = b"\xef\xbb\xbf"
# Byte-order marks, longest first: UTF-32 LE starts with the UTF-16 LE mark.
_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"), (_BOM, "utf-8-sig"),
)
_MULTIBYTE_UTF8 = re.compile(rb"[\xc2-\xf4][\x80-\xbf]+")


class EncodingError(ValueError):
    """A file whose bytes are not text in the encoding it was read with; the message says which codec to
    name (the caller names the setting or option that takes it, since it knows where the encoding came from)."""


def to_utf8(data: bytes, encoding: str = "auto") -> tuple[bytes, str]:
    """The file's bytes as UTF-8 without a BOM, and the encoding they were read in (for the summary).

    auto: a byte-order mark decides (UTF-8, UTF-16, UTF-32: what spreadsheet programs save); else valid
    UTF-8 without NUL bytes stays as it is; a file that is UTF-8 except for some broken lines also stays
    (those lines are rejected one by one); UTF-16/32 without a BOM is read as charset-normalizer finds
    it; a file with no UTF-8 multi-byte character that charset-normalizer reads as a Latin-script code
    page is read as cp1252 (Latin-1 when a byte is undefined in cp1252).
    Any other encoding is named in an EncodingError with the setting to use. A named `encoding` is used
    as given. Raises EncodingError (a ValueError) when the bytes are not valid in the encoding used.
    """
    if encoding != "auto":
        if codecs.lookup(encoding).name == "utf-8":  # as named: broken lines are rejected one by one
            return data.removeprefix(_BOM), encoding
        return _recode(data, encoding), encoding
    for bom, codec in _BOMS:
        if data.startswith(bom):
            name = {"utf-8-sig": "utf-8 with BOM"}.get(codec, f"{codec} with BOM")
            return _recode(data, codec), name
    # NUL bytes are valid UTF-8, but text has none: a file full of them is UTF-16/32 without a BOM.
    has_nul = b"\x00" in data
    try:
        data.decode("utf-8")
        if not has_nul:
            return data, "utf-8"
        first_bad = data.index(b"\x00")
    except UnicodeDecodeError as e:
        first_bad = e.start
    if _MULTIBYTE_UTF8.search(data) and not has_nul:
        return data, "utf-8 (some lines invalid)"
    from charset_normalizer import from_bytes  # only needed for files that are not UTF-8

    matches = from_bytes(data)
    best = matches.best()
    found = best.encoding if best is not None else None
    if found is not None and found.startswith(("utf_16", "utf_32")):
        return _recode(data, found), f"{found} (detected, no BOM)"
    # Short samples of Western text fit a dozen Latin code pages equally well (cp1250, hp_roman8 ...):
    # when cp1252, what Windows programs write, fits as well as the best guess and reads as Latin
    # script, the file is read as cp1252.
    western = [m for m in matches if m.encoding in ("cp1252", "latin_1", "iso8859_15")]
    plausible = best is not None and (
        _latin(str(best)) or any(m.percent_chaos <= best.percent_chaos and _latin(str(m)) for m in western)
    )
    if plausible:
        for codec in ("cp1252", "latin-1"):
            try:
                return data.decode(codec).encode("utf-8"), f"{codec} (detected: not UTF-8)"
            except UnicodeDecodeError:
                continue
    looks = f"it looks like {found}" if found else "its encoding could not be recognised"
    raise EncodingError(
        f"is not UTF-8 (invalid byte at offset {first_bad}); {looks}: name the encoding "
        f"({found or 'a Python codec'}) to read it as that, or re-save the file as UTF-8"
    )


def _latin(text: str) -> bool:
    """Whether every non-ASCII character is a Latin letter, punctuation, a symbol or a digit."""
    return all(
        ord(c) < 128 or "LATIN" in unicodedata.name(c, "") or unicodedata.category(c)[0] in "PSNZ"
        for c in set(text)
    )


def _recode(data: bytes, codec: str) -> bytes:
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        raise EncodingError(
            f"is not valid {codec} (byte {e.start}: {e.reason}); name the file's encoding, or re-save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff").encode("utf-8", "surrogatepass")


@dataclass(slots=True)
class Row:
    """One input row: a parsed record, or the reason it could not be parsed."""

    number: int
    record: dict[str, Any] | None
    raw: str | None = None
    error: str | None = None

    def text(self) -> str:
        """The row as it appears in the source; rows read without text (only rejected ones need it) as JSON."""
        return self.raw if self.raw is not None else _dumps(self.record)


def _dumps(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    try:
        text.encode()
    except UnicodeEncodeError:  # an unpaired surrogate from a JSON escape: keep it escaped
        return json.dumps(value, default=str)
    return text


def _decode(line: bytes) -> tuple[str, str | None]:
    """Decode one line on its own, so invalid UTF-8 spoils that line only."""
    try:
        return line.decode("utf-8"), None
    except UnicodeDecodeError as e:
        reason = f"bad_encoding: invalid UTF-8 at byte {e.start + 1} of the line"
        return line.decode("utf-8", "backslashreplace"), reason


def _object_row(number: int, value: Any, raw: str | None) -> Row:
    if isinstance(value, dict):
        return Row(number, value, raw)
    return Row(number, None, raw if raw is not None else _dumps(value),
               f"not_an_object: the row is a JSON {type(value).__name__}, not an object")


def read_jsonl(data: bytes) -> list[Row]:
    """JSON Lines: one object per line; blank lines are skipped."""
    rows = []
    for number, line in enumerate(data.removeprefix(_BOM).split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        text, error = _decode(line)
        if error is not None:
            rows.append(Row(number, None, text, error))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(Row(number, None, text, f"malformed_json: {e.msg} at column {e.colno}"))
            continue
        rows.append(_object_row(number, value, text))
    return rows


def _looks_like_jsonl(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _records_of(document: Any) -> list[Any]:
    """The rows of a JSON document: an array, a {"data": [...]}-style wrapper, or an object of columns."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        wrapped = [v for v in document.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
        if len(wrapped) == 1:
            return wrapped[0]
        lengths = {len(v) if isinstance(v, list) else -1 for v in document.values()}
        if document and len(lengths) == 1 and -1 not in lengths:
            columns = list(document)
            return [dict(zip(columns, values)) for values in zip(*document.values())]
        keys = ", ".join(list(document)[:10])
        raise ValueError(
            f"holds a JSON object with keys {keys}; expected an array of objects, an object with one array of "
            "objects (such as {\"data\": [...]}) or an object of equal-length column arrays"
        )
    raise ValueError(f"holds a single JSON {type(document).__name__}; expected an array of objects")


def read_json(data: bytes) -> list[Row]:
    """One JSON document. Files named .json that are really JSON Lines are read as such (a common mix-up)."""
    try:
        text = data.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"is not valid UTF-8 (byte {e.start + 1}); re-encode it as UTF-8") from e
    try:
        document = json.loads(text)
    except json.JSONDecodeError as e:
        if _looks_like_jsonl(text):
            return read_jsonl(data)
        raise ValueError(
            f"is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}; fix or re-export the file"
        ) from e
    return [_object_row(i, value, None) for i, value in enumerate(_records_of(document))]


def read_csv(data: bytes) -> list[Row]:
    """CSV with a header line; every value stays a string.

    The stdlib reader is used instead of pyarrow's because it is fed line by line: each row keeps its
    physical line number and raw text, and a line with bad bytes or a wrong field count becomes one rejected
    row instead of failing the whole file.
    """
    lines = data.removeprefix(_BOM).splitlines(keepends=True)
    decoded = [_decode(line) for line in lines]
    consumed = 0

    def feed() -> Iterator[str]:
        nonlocal consumed
        for text, _ in decoded:
            consumed += 1
            yield text

    reader = csv.reader(feed())
    header = next(reader, None)
    if header is None:
        return []
    rows = []
    start = consumed
    while True:
        try:
            fields = next(reader)
            error = None
        except StopIteration:
            break
        except csv.Error as e:
            fields, error = None, f"malformed_csv: {e}"
        span = decoded[start:consumed]
        number, start = start + 1, consumed
        if fields == []:
            continue
        raw = "".join(text for text, _ in span).rstrip("\r\n")
        error = error or next((bad for _, bad in span if bad is not None), None)
        if error is None and len(fields) != len(header):
            error = f"malformed_csv: {len(fields)} fields but the header has {len(header)}"
        rows.append(Row(number, None, raw, error) if error else Row(number, dict(zip(header, fields)), raw))
    return rows


def read_parquet(data: bytes) -> list[Row]:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"is not a readable Parquet file ({e}); re-export it or check the download completed") from e
    return [Row(i, record) for i, record in enumerate(table.to_pylist())]


def rows_from_records(records: Iterable[dict[str, Any]]) -> list[Row]:
    """Rows of an in-memory dataset (a Hugging Face split), numbered by index."""
    return [Row(i, record) for i, record in enumerate(records)]


READERS: dict[str, Callable[[bytes], list[Row]]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".parquet": read_parquet,
}
"""File extension -> reader."""
