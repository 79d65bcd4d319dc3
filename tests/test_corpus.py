"""`python -m trainer corpus austen`: a Debian package of R data read with the standard library.

No network here, so the test builds a package the way Debian and R lay one out (an `ar` archive
around `data.tar.xz`; a lazy-load database of zlib streams of XDR-serialized character vectors,
NA included) and checks that the CLI writes every chapter of every novel as a file."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import pytest

from trainer.tools.corpus import AUSTEN_RDB, CorpusError, r_character_vector, write_austen

from .cli import run_cli

NOVELS = {
    "pride_and_prejudice": ["PRIDE AND PREJUDICE", "", "By Jane Austen", "", "Chapter 1", "",
                            "It is a truth universally acknowledged.", None, "Chapter 2", "", "Mr. Bennet was among"],
    "persuasion": ["Persuasion", "", "", "Chapter 1", "", "Sir Walter Elliot, of Kellynch Hall,", "Chapter 2",
                   "Mr Shepherd, a civil, cautious lawyer,", "CHAPTER III.", "\u201cI must take leave to observe\u201d"],
}


def r_serialized(lines: list) -> bytes:
    """A character vector as R's serialize(version = 3) writes it; None is NA."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040200, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(lines))
    for line in lines:
        if line is None:
            out += struct.pack(">ii", 9, -1)
        else:
            data = line.encode("utf-8")
            out += struct.pack(">ii", 0x8009, len(data)) + data  # 0x8000: the UTF-8 mark
    return out


def rdb(objects: list[bytes]) -> bytes:
    return b"".join(struct.pack(">I", len(o)) + zlib.compress(o) for o in objects)


def ar_member(name: str, body: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode()
    return header + body + b"\n" * (len(body) % 2)


def fake_deb(path, rdb_bytes: bytes, member: str = AUSTEN_RDB) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        info = tarfile.TarInfo("./" + member)
        info.size = len(rdb_bytes)
        tar.addfile(info, io.BytesIO(rdb_bytes))
    path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("control.tar.xz", b"x")
                     + ar_member("data.tar.xz", data.getvalue()))


def test_na_and_utf8_strings_decode():
    assert r_character_vector(r_serialized(["a", None, "\u201cb\u201d"])) == ["a", "", "\u201cb\u201d"]


def test_the_cli_writes_every_chapter_of_every_novel(tmp_path):
    deb, out = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb", tmp_path / "austen"
    fake_deb(deb, rdb([r_serialized(lines) for lines in NOVELS.values()]))
    done = run_cli(["corpus", "austen", str(out), "--deb", str(deb)], timeout=60)
    assert done.returncode == 0, done.stderr
    assert "wrote 5 chapters of 2 novels" in done.stdout
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.txt")) == [
        "persuasion/chapter_001.txt", "persuasion/chapter_002.txt", "persuasion/chapter_003.txt",
        "pride_and_prejudice/chapter_001.txt", "pride_and_prejudice/chapter_002.txt"]
    first = (out / "pride_and_prejudice" / "chapter_001.txt").read_text()
    assert first.startswith("PRIDE AND PREJUDICE") and "universally acknowledged" in first  # the title page joins it
    assert (out / "persuasion" / "chapter_003.txt").read_text() == "CHAPTER III.\n\u201cI must take leave to observe\u201d\n"

    again = run_cli(["corpus", "austen", str(out), "--deb", str(deb)], timeout=60)
    assert again.returncode == 2 and again.stderr.strip() == f"error: corpus: {out} is not empty; pass a new directory"


def test_a_package_without_the_novels_is_named(tmp_path):
    deb = tmp_path / "other.deb"
    fake_deb(deb, b"", member="usr/lib/R/site-library/other/data/Rdata.rdb")
    with pytest.raises(CorpusError, match=f"other.deb has no {AUSTEN_RDB}"):
        write_austen(tmp_path / "out", deb)
    (tmp_path / "plain.deb").write_text("hello")
    with pytest.raises(CorpusError, match="plain.deb is not a Debian package"):
        write_austen(tmp_path / "out", tmp_path / "plain.deb")
