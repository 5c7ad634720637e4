"""Writers of small corpus files for the data tests (imported by name: conftest modules are not importable)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def write_jsonl(path: Path, records: list[dict], compress: bool = False) -> Path:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path
