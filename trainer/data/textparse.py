"""Fast, strict reader for delimited event files (MovieLens ``::``/``,``/tab, Amazon ``,``).

The file is read in newline-aligned byte chunks. Each chunk first goes through a vectorised numpy path
(structure + character-class checks, then ``np.fromstring`` or a digit loop); anything unusual (non-ASCII,
blank lines, wrong field count, bad characters, out-of-range values) sends *that chunk* to a precise per-line
Python pass, which either parses it (e.g. blank lines, UTF-8 string ids) or raises :class:`DataError` naming the
file, the 1-based line, the field and the value. Both passes accept exactly the same grammar:

- int: ``[0-9]{1,18}``; decimal: ``[0-9]+(.[0-9]*)?`` or ``.[0-9]+``; str: non-empty UTF-8 without control chars.
- ``\\r\\n`` line ends are accepted; blank lines are skipped; the last line may lack its newline; a UTF-8 byte-order
  mark at the start of the file is skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from hstu.trainer.data.errors import DataError

CHUNK_BYTES = 32 << 20
_INT_RE = re.compile(rb"[0-9]{1,18}")
_DEC_RE = re.compile(rb"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
UTF8_BOM = b"\xef\xbb\xbf"
_ALT_SEP = 0x1F  # ASCII unit separator: stands in for multi-byte separators such as "::" in the fast path


@dataclass(frozen=True)
class Field:
    """One column: kind is "int" (-> int64), "decimal" (-> float64) or "str" (-> bytes array 'S<w>')."""

    name: str
    kind: str
    min_value: Optional[float] = None
    max_value: Optional[float] = None
    step: Optional[float] = None  # decimals: values must be multiples of step (e.g. 0.5 for half stars)


@dataclass(frozen=True)
class TableFormat:
    sep: bytes
    fields: Tuple[Field, ...]
    header: Optional[Tuple[str, ...]] = None  # exact header names when the file starts with a header line


def read_table(
    path: "str | Path", fmt: TableFormat, *, progress: bool = True, chunk_bytes: int = CHUNK_BYTES
) -> Dict[str, np.ndarray]:
    """Parse a whole file -> {field name: [N] array}. Raises DataError (missing file, bad header, bad row)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path=str(path))
    parts: List[Dict[str, np.ndarray]] = []
    line_no = 1
    with open(path, "rb") as f, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"parse {path.name}", disable=not progress
    ) as bar:
        if f.read(len(UTF8_BOM)) == UTF8_BOM:  # a UTF-8 byte-order mark (editors on Windows) is not data
            bar.update(len(UTF8_BOM))
        else:
            f.seek(0)
        if fmt.header is not None:
            first = f.readline()
            bar.update(len(first))
            _check_header(first, fmt, str(path))
            line_no = 2
        carry = b""
        while True:
            block = f.read(chunk_bytes)
            bar.update(len(block))
            if not block:
                if carry:
                    parts.append(_parse_chunk(carry + b"\n", line_no, fmt, str(path)))
                break
            buf = carry + block
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                carry = buf
                continue
            chunk, carry = buf[:cut], buf[cut:]
            parts.append(_parse_chunk(chunk, line_no, fmt, str(path)))
            line_no += chunk.count(b"\n")
    return _concat(parts, fmt)


def _check_header(first: bytes, fmt: TableFormat, path: str) -> None:
    text = first.rstrip(b"\r\n").decode("utf-8", errors="replace").lstrip("\ufeff")
    expected = fmt.sep.decode().join(fmt.header or ())
    if text != expected:
        raise DataError(f"bad header, expected {expected!r}", path=path, line=1, field="header", value=text)


def _concat(parts: List[Dict[str, np.ndarray]], fmt: TableFormat) -> Dict[str, np.ndarray]:
    out = {}
    for fld in fmt.fields:
        arrs = [p[fld.name] for p in parts]
        if not arrs:
            empty_dtype = {"int": np.int64, "decimal": np.float64, "str": "S1"}[fld.kind]
            out[fld.name] = np.zeros(0, dtype=empty_dtype)
        else:
            out[fld.name] = np.concatenate(arrs) if len(arrs) > 1 else arrs[0]
    return out


def _parse_chunk(chunk: bytes, first_line: int, fmt: TableFormat, path: str) -> Dict[str, np.ndarray]:
    """Newline-terminated chunk whose first line is ``first_line`` -> columns."""
    fast = _parse_chunk_fast(chunk, fmt)
    return fast if fast is not None else _parse_chunk_slow(chunk, first_line, fmt, path)


# ----------------------------------------------------------------------------------------------------------
# fast vectorised path: returns None whenever anything looks unusual
# ----------------------------------------------------------------------------------------------------------


def _parse_chunk_fast(chunk: bytes, fmt: TableFormat) -> Optional[Dict[str, np.ndarray]]:
    if b"\r" in chunk:
        chunk = chunk.replace(b"\r\n", b"\n")
    if chunk.startswith(b"\n") or b"\n\n" in chunk:
        return None  # blank lines: the slow path skips them and keeps line numbers right
    sep = fmt.sep
    if len(sep) != 1:
        if bytes([_ALT_SEP]) in chunk:
            return None
        chunk, sep = chunk.replace(sep, bytes([_ALT_SEP])), bytes([_ALT_SEP])
    arr = np.frombuffer(chunk, dtype=np.uint8)
    if arr.max() >= 128:
        return None  # non-ASCII: let the slow path decode (or reject) it line by line
    nf = len(fmt.fields)
    is_nl = arr == 10
    delim = is_nl | (arr == sep[0])
    pos = np.flatnonzero(delim)
    if pos.size % nf:
        return None
    kinds = is_nl[pos].reshape(-1, nf)
    if kinds[:, :-1].any() or not kinds[:, -1].all():
        return None
    starts = np.empty_like(pos)
    starts[0] = 0
    starts[1:] = pos[:-1] + 1
    lens = pos - starts
    if not lens.all():
        return None  # empty field
    starts, lens = starts.reshape(-1, nf), lens.reshape(-1, nf)
    # character classes: digits anywhere; '.' only in decimal fields; anything printable in str fields
    odd = np.flatnonzero(~((arr >= 48) & (arr <= 57)) & ~delim)
    if odd.size:
        field_of = np.searchsorted(pos, odd) % nf
        for j, fld in enumerate(fmt.fields):
            chars = arr[odd[field_of == j]]
            if not chars.size:
                continue
            if fld.kind == "int" or (fld.kind == "decimal" and np.any(chars != 46)):
                return None
            if fld.kind == "str" and np.any(chars < 32):
                return None
    out: Dict[str, np.ndarray] = {}
    has_str = any(f.kind == "str" for f in fmt.fields)
    if not has_str:
        dtype = np.float64 if any(f.kind == "decimal" for f in fmt.fields) else np.int64
        if lens.max() > (15 if dtype is np.float64 else 18):
            return None
        try:
            flat = np.fromstring(chunk.replace(sep, b" "), dtype=dtype, sep=" ")  # noqa: NPY201 (text mode)
        except ValueError:
            return None
        if flat.size != lens.size:
            return None
        table = flat.reshape(-1, nf)
        for j, fld in enumerate(fmt.fields):
            col = table[:, j]
            out[fld.name] = col.astype(np.int64) if fld.kind == "int" else np.ascontiguousarray(col)
    else:
        for j, fld in enumerate(fmt.fields):
            if fld.kind == "str":
                out[fld.name] = _gather_strings(arr, starts[:, j], lens[:, j])
            else:
                col = _digits_to_numbers(arr, starts[:, j], lens[:, j], fld.kind == "decimal")
                if col is None:
                    return None
                out[fld.name] = col
    for fld in fmt.fields:
        col = out[fld.name]
        if fld.min_value is not None and col.size and col.min() < fld.min_value:
            return None
        if fld.max_value is not None and col.size and col.max() > fld.max_value:
            return None
        if fld.step is not None and np.any(col / fld.step != np.round(col / fld.step)):
            return None
    return out


def _gather_strings(arr: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Tokens -> fixed-width bytes array [N] 'S<max len>'."""
    width = int(lens.max())
    cols = np.arange(width)
    idx = np.minimum(starts[:, None] + cols, arr.size - 1)
    grid = np.where(cols < lens[:, None], arr[idx], 0).astype(np.uint8)
    return np.ascontiguousarray(grid).view(f"S{width}").ravel()


def _digits_to_numbers(arr: np.ndarray, starts: np.ndarray, lens: np.ndarray, decimal: bool) -> Optional[np.ndarray]:
    """Digit tokens (and at most one '.' for decimals) -> int64 / float64 [N]; None when malformed."""
    if lens.max() > 18:
        return None
    value = np.zeros(starts.size, dtype=np.int64)
    frac_digits = np.zeros(starts.size, dtype=np.int64)
    seen_dot = np.zeros(starts.size, dtype=bool)
    for k in range(int(lens.max())):
        inside = k < lens
        ch = arr[np.minimum(starts + k, arr.size - 1)].astype(np.int64)
        dot = inside & (ch == 46)
        if np.any(dot & seen_dot):
            return None
        digit = inside & ~dot
        value = np.where(digit, value * 10 + (ch - 48), value)
        frac_digits += digit & seen_dot
        seen_dot |= dot
    if not decimal:
        return value
    if np.any(lens - seen_dot == 0):
        return None  # a lone "."
    return value / np.power(10.0, frac_digits)


# ----------------------------------------------------------------------------------------------------------
# precise per-line path
# ----------------------------------------------------------------------------------------------------------


def _parse_chunk_slow(chunk: bytes, first_line: int, fmt: TableFormat, path: str) -> Dict[str, np.ndarray]:
    nf = len(fmt.fields)
    columns: List[List] = [[] for _ in range(nf)]
    lines = chunk.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines):
        line_no = first_line + i
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue
        tokens = raw.split(fmt.sep)
        if len(tokens) > nf:
            raise DataError(
                f"expected {nf} fields ({', '.join(f.name for f in fmt.fields)}), got {len(tokens)}",
                path=path, line=line_no, field=f"#{nf + 1} (extra)", value=_show(tokens[nf]),
            )
        for j, fld in enumerate(fmt.fields):
            if j >= len(tokens):
                raise DataError(
                    f"missing field (line has {len(tokens)} of {nf} fields)",
                    path=path, line=line_no, field=fld.name, value=_show(raw),
                )
            columns[j].append(_parse_token(tokens[j], fld, path, line_no))
    out = {}
    for fld, col in zip(fmt.fields, columns):
        if fld.kind == "str":
            out[fld.name] = np.array(col, dtype="S") if col else np.zeros(0, dtype="S1")
        else:
            out[fld.name] = np.array(col, dtype=np.int64 if fld.kind == "int" else np.float64)
    return out


def _show(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def _parse_token(tok: bytes, fld: Field, path: str, line_no: int):
    try:
        text = tok.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"invalid UTF-8 ({e.reason} at byte {e.start})", path=path, line=line_no,
                        field=fld.name, value=_show(tok)) from None
    if fld.kind == "str":
        if not text or any(ord(c) < 32 for c in text):
            raise DataError("empty id or control character", path=path, line=line_no, field=fld.name, value=text)
        return tok
    if fld.kind == "int":
        if not _INT_RE.fullmatch(tok):
            raise DataError("not a non-negative integer", path=path, line=line_no, field=fld.name, value=text)
        value = int(tok)
    else:
        if not _DEC_RE.fullmatch(tok):
            raise DataError("not a non-negative decimal number", path=path, line=line_no, field=fld.name,
                            value=text)
        value = float(tok)
    if (fld.min_value is not None and value < fld.min_value) or (fld.max_value is not None and value > fld.max_value):
        raise DataError(f"out of range [{fld.min_value}, {fld.max_value}]", path=path, line=line_no,
                        field=fld.name, value=text)
    if fld.step is not None and value / fld.step != round(value / fld.step):
        raise DataError(f"not a multiple of {fld.step}", path=path, line=line_no, field=fld.name, value=text)
    return value
