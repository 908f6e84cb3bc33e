"""One parser over any byte source: a memory map, positioned reads, and a
Python file object give the same entries, sections and vmdesc for every real
QEMU stream; reads through a directory touch only the tail, the directory
and the headers, in few calls."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, List

import pytest

import savedir

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pc-i440fx.sav"


class Counting(io.BytesIO):
    """A file object that counts its reads and the bytes they return."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads = 0
        self.bytes_read = 0
        self.ranges: List[tuple[int, int]] = []

    def read(self, n: Any = -1) -> bytes:  # type: ignore[override]
        at = self.tell()
        b = super().read(n)
        self.reads += 1
        self.bytes_read += len(b)
        self.ranges.append((at, len(b)))
        return b


def facts(f: savedir.SaveFile) -> dict[str, Any]:
    return {
        "entries": [e.to_dict() for e in f.entries],
        "indexed": f.indexed,
        "stream": (f.stream_start, f.stream_end, f.eof),
        "machine_type": f.machine_type,
        "footers": f.footers,
        "vmdesc": f.vmdesc,
        "sections": [(s.name, s.instance_id, s.read()) for s in f.sections() if not s.live][:8],
    }


@pytest.mark.parametrize("indexed", [False, True])
def test_every_source_gives_the_same_file(qemu_streams, tmp_path: Path, indexed: bool) -> None:
    for s in qemu_streams:
        p = s.copy_to(tmp_path / s.name)
        if indexed:
            savedir.index(p)
        with savedir.open(p) as f:
            assert f.mapped
            want = facts(f)
        with savedir.open(p, mmap=False) as f:
            assert not f.mapped
            assert facts(f) == want, s.name
        data = p.read_bytes()
        with savedir.open(io.BytesIO(data)) as f:
            assert not f.mapped and f.path == "<BytesIO>"
            assert facts(f) == want, s.name
            # Section bytes are copies, equal to the mapped views.
            for e in f.entries[:20]:
                assert bytes(e.data) == data[e.offset : e.end]
        with open(p, "rb") as fh, savedir.open(fh) as f:
            assert f.path == str(p)
            assert facts(f) == want, s.name
            assert f.verify(deep=True).ok == indexed


def test_reads_through_the_directory_are_few_and_small(qemu_streams, tmp_path: Path) -> None:
    counts = {}
    for s in qemu_streams:
        p = s.copy_to(tmp_path / s.name)
        savedir.index(p)
        data = p.read_bytes()
        src = Counting(data)
        with savedir.open(src) as f:
            assert f.indexed
            n = len(f.entries)
            r = f.verify()
            assert r.ok, r.message
            ram = sum(e.size for e in f.entries if e.name == "ram")
        counts[s.name] = (n, src.reads, src.bytes_read, len(data))
        # The tail, the vmdesc and the directory, the stream header, and the
        # headers read together in groups: a handful of calls, not one per entry.
        assert src.reads <= 5, (s.name, src.ranges)
        # Only the tail and the headers: never the RAM pages.
        assert src.bytes_read < len(data) - ram // 2, (s.name, src.bytes_read, len(data), ram)
    print("entries, read calls, bytes read, file size:", counts)


def test_a_large_directory_is_read_in_few_calls(tmp_path: Path) -> None:
    import synthetic

    p = tmp_path / "big.sav"
    synthetic.write_stream(str(p), 64 << 20, pages_per_part=16)  # ~1000 RAM parts
    savedir.index(p)
    data = p.read_bytes()
    src = Counting(data)
    with savedir.open(src) as f:
        entries = len(f.entries)
        assert f.verify().ok
    assert entries > 900
    assert src.reads <= 80, (entries, src.reads)
    print(f"{entries} entries: {src.reads} read calls, {src.bytes_read} of {len(data)} bytes")


def test_reads_through_the_directory_skip_the_ram_pages(tmp_path: Path) -> None:
    import synthetic

    p = tmp_path / "parts.sav"
    synthetic.write_stream(str(p), 256 << 20, pages_per_part=4096)  # 16 MiB parts
    savedir.index(p)
    data = p.read_bytes()
    src = Counting(data)
    with savedir.open(src) as f:
        assert f.verify().ok
        parts = sum(1 for e in f.entries if e.kind == "part")
    # The tail and, per RAM part, the footer and header around its pointer
    # with at most the 1 MiB a file object's reads are coalesced over.
    assert parts >= 15
    assert src.bytes_read <= (parts + 4) * (1 << 20) + 65536, (src.bytes_read, parts)
    assert src.bytes_read < len(data) // 8


def test_a_file_object_that_fails_is_an_os_error(tmp_path: Path) -> None:
    class Broken(io.BytesIO):
        def read(self, n: Any = -1) -> bytes:  # type: ignore[override]
            if self.tell() + n > 4096:
                raise OSError("the network went away")
            return super().read(n)

    with pytest.raises(OSError) as info:
        savedir.open(Broken(EXAMPLE.read_bytes()))
    assert "the network went away" in str(info.value)
    assert not isinstance(info.value, savedir.SavedirError)


def test_a_file_object_that_is_not_a_stream() -> None:
    with pytest.raises(savedir.NotAStreamError) as info:
        savedir.open(io.BytesIO(b"hello world" * 100))
    assert "not a QEMU migration stream" in str(info.value)
    assert "<BytesIO>" in str(info.value)
