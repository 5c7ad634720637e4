"""`read_corpus`: formats (JSON Lines, gzip, text, Parquet), globs and directories, and its errors."""

from __future__ import annotations

import pytest
from data_helpers import write_jsonl

from moai_lib.data import DataError, read_corpus

DOCS = [{"text": "hello world", "lang": "en", "source": "a"},
        {"text": "你好世界", "lang": "zh", "source": "b"},
        {"text": "   ", "lang": "en", "source": "c"},  # whitespace only: dropped
        {"text": "안녕하세요", "lang": "ko", "source": "d"}]


def test_jsonl_and_gzip_keep_text_and_lang(tmp_path, cache_dir):
    plain = write_jsonl(tmp_path / "a.jsonl", DOCS)
    packed = write_jsonl(tmp_path / "b.jsonl.gz", DOCS[:2], compress=True)
    ds = read_corpus([plain, packed], cache_dir=cache_dir)
    assert ds.column_names == ["text", "lang"]
    assert ds["text"] == ["hello world", "你好世界", "안녕하세요", "hello world", "你好世界"]
    assert ds["lang"] == ["en", "zh", "ko", "en", "zh"]


def test_text_units_and_mixed_formats_get_und(tmp_path, cache_dir):
    import pandas as pd

    (tmp_path / "notes.txt").write_text("first para\nstill first\n\nsecond para\n", encoding="utf-8")
    pd.DataFrame({"body": ["parquet doc"], "lang": ["ja"]}).to_parquet(tmp_path / "c.parquet")
    paragraphs = read_corpus(tmp_path / "notes.txt", cache_dir=cache_dir)["text"]
    assert [p.strip() for p in paragraphs] == ["first para\nstill first", "second para"]
    assert read_corpus(tmp_path / "notes.txt", text_unit="line", cache_dir=cache_dir)["text"] == [
        "first para", "still first", "second para"]
    assert read_corpus(tmp_path / "notes.txt", text_unit="document", cache_dir=cache_dir).num_rows == 1
    ds = read_corpus([tmp_path / "c.parquet", tmp_path / "notes.txt"], text_field="body", cache_dir=cache_dir)
    assert [t.strip() for t in ds["text"]] == ["parquet doc", "first para\nstill first", "second para"]
    assert ds["lang"] == ["ja", "und", "und"]


def test_globs_and_directories(tmp_path, cache_dir):
    sub = tmp_path / "corpus" / "part"
    sub.mkdir(parents=True)
    write_jsonl(sub / "x.jsonl", DOCS[:1])
    write_jsonl(tmp_path / "corpus" / "y.jsonl", DOCS[1:2])
    (tmp_path / "corpus" / "README.md").write_text("not a corpus file")
    assert sorted(read_corpus(str(tmp_path / "corpus" / "**" / "*.jsonl"), cache_dir=cache_dir)["text"]) == [
        "hello world", "你好世界"]
    assert read_corpus(tmp_path / "corpus", cache_dir=cache_dir).num_rows == 2


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("no_match", "matches no files"),
    ("empty_file", "is empty"),
    ("blank_docs", "the corpus is empty"),
    ("bad_utf8_jsonl", "bad.jsonl: not UTF-8"),
    ("bad_utf8_txt", "bad.txt: not UTF-8"),
    ("broken_json", "broken.jsonl: not valid JSON Lines"),
    ("no_text_field", "no field 'text'"),
    ("unsupported", "unsupported corpus file type '.csv'"),
])
def test_bad_corpus_fails_naming_the_file(case, needle, tmp_path, cache_dir):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    if case == "missing":
        paths = [good, tmp_path / "nope.jsonl"]
    elif case == "no_match":
        paths = [str(tmp_path / "nothing-*.jsonl")]
    elif case == "empty_file":
        (tmp_path / "empty.jsonl").write_bytes(b"")
        paths = [tmp_path / "empty.jsonl"]
    elif case == "blank_docs":
        paths = [write_jsonl(tmp_path / "blank.jsonl", [{"text": ""}, {"text": " \n "}])]
    elif case == "bad_utf8_jsonl":  # a second, good file first: the message must name the bad one
        (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
        paths = [good, tmp_path / "bad.jsonl"]
    elif case == "bad_utf8_txt":
        (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
        paths = [tmp_path / "bad.txt"]
    elif case == "broken_json":
        (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
        paths = [tmp_path / "broken.jsonl"]
    elif case == "no_text_field":
        paths = [write_jsonl(tmp_path / "other.jsonl", [{"body": "x"}])]
    else:
        (tmp_path / "table.csv").write_text("text\nx\n")
        paths = [tmp_path / "table.csv"]
    with pytest.raises(DataError) as err:
        read_corpus(paths, cache_dir=cache_dir)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)
