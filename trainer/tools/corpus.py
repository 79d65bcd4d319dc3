"""`python -m trainer corpus austen OUT_DIR [--deb FILE]`: a held-out English corpus from a package.

Jane Austen's six novels (public domain) ship in Debian's `r-cran-janeaustenr` package as R data:
`data/Rdata.rdb` holds one compressed, serialized character vector per novel, a line per element.
This reads the `.deb` (an `ar` archive around `data.tar.xz`) with the standard library alone, so
neither R nor dpkg is needed, and writes each chapter as a file, `OUT_DIR/<novel>/chapter_NNN.txt`:
`data.dataset=files data.path=OUT_DIR` then holds out whole chapters (by a hash of their names)
from every novel. Without `--deb` the package is fetched with `apt-get download` (Debian and
Ubuntu); any machine that has the `.deb` can pass it instead.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_RDB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
# a chapter starts at a line "CHAPTER I", "Chapter 1" or "CHAPTER XLI." (the novels differ)
CHAPTER_LINE = re.compile(r"^\s*chapter\s+([0-9]+|[ivxlcdm]+)\b", re.IGNORECASE)

# R's serialization (XDR, big-endian): a SEXP's flags word carries its type in the low byte
R_STRSXP, R_CHARSXP = 16, 9


class CorpusError(ValueError):
    """A package that cannot be fetched or read; one line naming it."""


def deb_member(deb: Path, member_path: str) -> bytes:
    """One file of a .deb's data archive: the .deb is an `ar` archive whose `data.tar.*` member
    is a tar of the installed files."""
    blob = deb.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise CorpusError(f"corpus: {deb} is not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(blob):
        name, size = blob[pos:pos + 16].decode().strip().rstrip("/"), int(blob[pos + 48:pos + 58].decode().strip())
        body = blob[pos + 60:pos + 60 + size]
        if name.startswith("data.tar"):
            try:
                with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                    for info in tar.getmembers():
                        if info.name.lstrip("./") == member_path:
                            return tar.extractfile(info).read()
            except (tarfile.TarError, EOFError, OSError) as e:
                raise CorpusError(f"corpus: {deb}: its {name} cannot be read ({e})") from None
            raise CorpusError(f"corpus: {deb} has no {member_path}; is it {AUSTEN_PACKAGE}?")
        pos += 60 + size + size % 2  # members are padded to an even offset
    raise CorpusError(f"corpus: {deb} has no data.tar member")


def rdb_objects(rdb: bytes) -> list[bytes]:
    """The serialized objects of an R lazy-load database, in file order: each is a 4-byte
    big-endian length, then a zlib stream."""
    objects, pos = [], 0
    while pos < len(rdb):
        stream = zlib.decompressobj()
        try:
            objects.append(stream.decompress(rdb[pos + 4:]))
        except zlib.error as e:
            raise CorpusError(f"corpus: {AUSTEN_RDB}: object at byte {pos} is not zlib data ({e})") from None
        pos = len(rdb) - len(stream.unused_data)
    return objects


def r_character_vector(serialized: bytes) -> list[str]:
    """The strings of a serialized R character vector (format 'X', version 3); NA is ''."""
    if serialized[:2] != b"X\n":
        raise CorpusError("corpus: an R object is not in XDR serialization")
    version = struct.unpack(">i", serialized[2:6])[0]
    pos = 14  # 'X\n', then the format version and two R versions
    if version == 3:  # then the native encoding's name
        pos += 4 + struct.unpack(">i", serialized[pos:pos + 4])[0]
    flags, count = struct.unpack(">ii", serialized[pos:pos + 8])
    if flags & 0xFF != R_STRSXP:
        raise CorpusError(f"corpus: an R object is of type {flags & 0xFF}, not a character vector")
    pos += 8
    strings = []
    for _ in range(count):
        flags, length = struct.unpack(">ii", serialized[pos:pos + 8])
        if flags & 0xFF != R_CHARSXP:
            raise CorpusError(f"corpus: an element of an R character vector is of type {flags & 0xFF}")
        pos += 8
        if length < 0:  # NA_character_
            strings.append("")
            continue
        strings.append(serialized[pos:pos + length].decode("utf-8"))
        pos += length
    return strings


def chapters(lines: list[str]) -> list[str]:
    """A novel's text split before each chapter heading; the title page goes with chapter one."""
    starts = [i for i, line in enumerate(lines) if CHAPTER_LINE.match(line)]
    if not starts:
        return ["\n".join(lines).strip() + "\n"]
    bounds = [0, *starts[1:], len(lines)]
    return ["\n".join(lines[a:b]).strip() + "\n" for a, b in zip(bounds, bounds[1:])]


def slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def fetch_deb(package: str, into: Path) -> Path:
    """`apt-get download PACKAGE` into `into`; a one-line error says what to do without apt."""
    if shutil.which("apt-get") is None:
        raise CorpusError(f"corpus: apt-get is not on this machine; download the {package} .deb elsewhere and pass "
                          "--deb FILE")
    done = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        last = ([line for line in done.stderr.splitlines() if line.startswith("E:")] or ["(no output)"])[-1]
        raise CorpusError(f"corpus: apt-get download {package} failed ({last}); download the .deb elsewhere and pass "
                          "--deb FILE")
    return debs[0]


def write_austen(out_dir: str | Path, deb: str | Path | None = None) -> dict[str, int]:
    """Write each novel's chapters under `out_dir`; returns {novel: chapters}. `out_dir` must not
    hold files already (an earlier extraction is refused, not mixed with)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CorpusError(f"corpus: {out} is not empty; pass a new directory")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(deb) if deb else fetch_deb(AUSTEN_PACKAGE, Path(scratch))
        if not path.is_file():
            raise CorpusError(f"corpus: --deb {path} is not a file")
        novels = [r_character_vector(obj) for obj in rdb_objects(deb_member(path, AUSTEN_RDB))]
    written = {}
    for lines in novels:
        title = slug(next(line for line in lines if line.strip()))
        parts = chapters(lines)
        (out / title).mkdir(parents=True)
        for number, text in enumerate(parts, 1):
            (out / title / f"chapter_{number:03d}.txt").write_text(text)
        written[title] = len(parts)
    return written
