"""Read a raw text corpus (JSON Lines, plain text, Parquet; local paths, directories or globs) with `datasets`.

The result is a `datasets.Dataset` with a string column ``text`` and, when every source has one, a string
column ``lang`` (files without it get ``"und"``, BCP-47 "undetermined"). Rows whose text is empty or only
whitespace are dropped. Every failure names the file it comes from.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import MoaiError

logger = logging.getLogger(__name__)

UNDETERMINED_LANG = "und"

# Suffix (after stripping a compression suffix) → `datasets` packaged builder.
_BUILDERS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".text": "text",
             ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
TEXT_UNITS = ("line", "paragraph", "document")


class DataError(MoaiError, ValueError):
    """Bad corpus, tokenizer or shard input; the message names the file or parameter and what would be valid."""


def _builder_for(path: str) -> str:
    name = path.lower()
    compressed = name.endswith(_COMPRESSION)
    if compressed:
        name = os.path.splitext(name)[0]
    ext = os.path.splitext(name)[1]
    if ext not in _BUILDERS or (compressed and _BUILDERS[ext] == "parquet"):
        raise DataError(f"{path}: unsupported corpus file type {ext or '(no extension)'!r}; supported: "
                        f"{', '.join(sorted(_BUILDERS))}, optionally compressed ({', '.join(_COMPRESSION)})")
    return _BUILDERS[ext]


def resolve_corpus_files(paths_or_globs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Expand paths, directories (every supported file below them) and globs into a sorted list of files."""
    if isinstance(paths_or_globs, str | os.PathLike):
        paths_or_globs = [paths_or_globs]
    if not paths_or_globs:
        raise DataError("no corpus given: pass at least one file, directory or glob")
    files: list[str] = []
    for item in paths_or_globs:
        pattern = os.fspath(item)
        if os.path.isdir(pattern):
            found = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and not p.name.startswith("."))
            found = [f for f in found if _has_supported_suffix(f)]
            if not found:
                raise DataError(f"corpus directory {pattern!r} holds no supported files "
                                f"({', '.join(sorted(_BUILDERS))})")
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"corpus glob {pattern!r} matches no files")
        elif os.path.isfile(pattern):
            found = [pattern]
        else:
            raise DataError(f"corpus file {pattern!r} does not exist")
        files += [os.path.abspath(f) for f in found]
    return list(dict.fromkeys(files))  # de-duplicated, order kept


def _has_supported_suffix(path: str) -> bool:
    try:
        _builder_for(path)
    except DataError:
        return False
    return True


def read_corpus(
    paths_or_globs: str | os.PathLike | Sequence[str | os.PathLike],
    text_field: str = "text",
    lang_field: str = "lang",
    text_unit: str = "paragraph",
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
):
    """Load a corpus into a `datasets.Dataset` with columns ``text`` (and ``lang`` when the files have one).

    Args:
        paths_or_globs: files, directories or glob patterns (``**`` allowed). Formats by extension:
            ``.jsonl``/``.json``/``.ndjson`` (one JSON object per line), ``.txt``, ``.parquet``; JSON and text
            may be compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``).
        text_field: the column holding the document text (JSON Lines and Parquet).
        lang_field: the column holding the language code, if any; kept as ``lang``.
        text_unit: how plain-text files are cut into documents: ``line``, ``paragraph`` (blank-line separated,
            the default: a document keeps its inner newlines) or ``document`` (one per file).
        cache_dir: the `datasets` cache (default: ``HF_DATASETS_CACHE``).
        num_proc: processes for parsing (None: one).

    Raises:
        DataError: no files match, a file type is unsupported, a file is not UTF-8 or not valid JSON Lines
            (naming the file), the text field is missing or not a string, or no document has any text.
    """
    import datasets

    if text_unit not in TEXT_UNITS:
        raise DataError(f"text_unit must be one of {', '.join(TEXT_UNITS)}, got {text_unit!r}")
    files = resolve_corpus_files(paths_or_globs)
    by_builder: dict[str, list[str]] = {}
    for f in files:
        by_builder.setdefault(_builder_for(f), []).append(f)
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"corpus file {f!r} is empty")

    parts = []
    for builder, group in by_builder.items():
        kwargs = {"sample_by": text_unit} if builder == "text" else {}
        try:
            part = datasets.load_dataset(builder, data_files=group, split="train", cache_dir=cache_dir,
                                         num_proc=num_proc, **kwargs)
        except Exception as exc:  # datasets wraps parser errors without the file name: find the file
            raise _diagnose(builder, group, exc, cache_dir, kwargs) from None
        if builder != "text" and not _valid_utf8(part):
            # pyarrow's JSON and Parquet readers do not check UTF-8; a bad byte would surface later, deep in `map`.
            raise _diagnose(builder, group, UnicodeError("invalid UTF-8"), cache_dir, kwargs)
        parts.append(_normalise_columns(part, builder, group, text_field, lang_field))

    has_lang = [("lang" in p.column_names) for p in parts]
    if any(has_lang) and not all(has_lang):
        parts = [p if "lang" in p.column_names else p.add_column("lang", [UNDETERMINED_LANG] * len(p))
                 for p in parts]
    if len(parts) > 1:  # e.g. Parquet written by pandas holds large_string: align to the first part
        parts = [parts[0]] + [p if p.features == parts[0].features else p.cast(parts[0].features) for p in parts[1:]]
    corpus = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    total = len(corpus)
    corpus = corpus.filter(_has_text, batched=True, input_columns=["text"], desc="dropping empty documents")
    if len(corpus) == 0:
        raise DataError(f"the corpus is empty: {total} record(s) in {len(files)} file(s) "
                        f"({_short_list(files)}) and none has any text in {text_field!r}")
    logger.info("read %d documents from %d file(s) (%d empty dropped)", len(corpus), len(files), total - len(corpus))
    return corpus


def _has_text(texts: list) -> list[bool]:
    return [t is not None and bool(t.strip()) for t in texts]


def _short_list(files: list[str], limit: int = 3) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f", … ({len(files)} files)" if len(files) > limit else "")


def _normalise_columns(part, builder: str, files: list[str], text_field: str, lang_field: str):
    import datasets

    source_field = "text" if builder == "text" else text_field
    if source_field not in part.column_names:
        raise DataError(f"{_short_list(files)}: no field {text_field!r} in the records "
                        f"(fields: {', '.join(part.column_names)}); set text_field to the column with the text")
    feature = part.features[source_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(f"{_short_list(files)}: field {text_field!r} holds {feature}, not strings")
    keep = {source_field: "text"}
    if builder != "text" and lang_field in part.column_names:
        keep[lang_field] = "lang"
    part = part.select_columns(list(keep))
    renames = {k: v for k, v in keep.items() if k != v}
    if renames:
        part = part.rename_columns(renames)
    if "lang" in part.column_names and part.features["lang"] != datasets.Value("string"):
        part = part.cast_column("lang", datasets.Value("string"))
    return part


def _diagnose(builder: str, files: list[str], exc: Exception, cache_dir, kwargs) -> DataError:
    """Load the files one at a time to name the one that fails, and describe the failure in one line."""
    import datasets

    culprit = files[0] if len(files) == 1 else None
    if culprit is None:
        for f in files:
            try:
                one = datasets.load_dataset(builder, data_files=[f], split="train", cache_dir=cache_dir, **kwargs)
            except Exception as file_exc:
                culprit, exc = f, file_exc
                break
            if not _valid_utf8(one):
                culprit = f
                break
    reason = _root_reason(exc, builder)
    where = culprit if culprit is not None else _short_list(files)
    return DataError(f"cannot read corpus file {where}: {reason}")


def _valid_utf8(part) -> bool:
    import pyarrow as pa

    try:
        part.data.table.validate(full=True)  # full validation checks every string is UTF-8
    except pa.ArrowInvalid:
        return False
    return True


def _root_reason(exc: BaseException, builder: str) -> str:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for e in chain:
        if isinstance(e, UnicodeError):
            return "not UTF-8 text; re-encode the file as UTF-8"

    for e in chain:
        name = type(e).__name__
        if name in ("ArrowInvalid", "JSONDecodeError") or "JSON" in str(e):
            kind = "JSON Lines (one JSON object per line)" if builder == "json" else builder
            return f"not valid {kind}: {str(e).splitlines()[0]}"
        if name in ("ArrowTypeError", "ArrowNotImplementedError"):
            return f"inconsistent records: {str(e).splitlines()[0]}"
    last = chain[-1]
    return f"{type(last).__name__}: {str(last).splitlines()[0] if str(last) else ''}".rstrip(": ")
