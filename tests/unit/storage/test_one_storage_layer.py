"""One place lists, stats and opens source data: the storage layer (DESIGN.md, issue 10).

Grep ``src/`` for the calls that would go around it. Files that only touch neurocube's own
outputs (writers, generators, the gzip-index and Zarr caches) are allowed, each with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "src" / "neurocube"

FORBIDDEN = re.compile(
    r"os\.stat\(|os\.lstat\(|os\.scandir\(|os\.walk\(|os\.listdir\(|os\.path\.(exists|isfile|isdir"
    r"|getsize|getmtime)\(|\.resolve\(\)|(?<![\w.])(?<!def )open\(|"
    # Path methods (not neurocube's own storage-backed helpers of the same names)
    r"(?<!storage)(?<!self)(?<!tree)(?<!catalog)\.(exists|is_file|is_dir|iterdir|glob|rglob|stat)\("
)

#: path prefix (relative to src/neurocube) -> why it may touch files directly
ALLOWED = {
    "storage/": "the storage layer itself",
    "sources/gzindex.py": "its own seek-index files in the cache folder",
    "sources/gzidx_format.py": "reads and writes the seek-index files gzindex keeps in the cache",
    "sources/gzindex_store.py": "names, checks, writes and deletes those index files and sidecars",
    "io/": "writers write their own outputs (temporary sibling, then rename)",
    "synthetic/": "generators of test and demo data write their own files",
    "caching/": "the Zarr cache manages its own entries (a local store folder)",
    "config.py": "the cache folder itself",
    "traces.py": "the trace-cache editors write their own outputs",
    "demo.py": "the demo reports the size of the file it generated",
}


def offending_lines() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if any(rel.startswith(prefix) for prefix in ALLOWED):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if FORBIDDEN.search(code) and '"""' not in code and "``" not in code:
                found.append(f"{rel}:{number}: {line.strip()}")
    return found


def test_no_reader_or_catalog_goes_around_the_storage_layer():
    assert offending_lines() == []


def test_the_grep_would_catch_a_stat():
    assert FORBIDDEN.search("size = os.stat(path).st_size")
    assert FORBIDDEN.search("if Path(p).exists():")
    assert FORBIDDEN.search("with open(path) as fh:")
    assert not FORBIDDEN.search("storage.exists(path, opts)")
    assert not FORBIDDEN.search("storage.open_file(path)")
