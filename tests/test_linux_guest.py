"""The Linux guest fixture itself (tests/linux_guest.py): QEMU's dumps hold
the guest's whole fill, intact; QEMU loaded every save; the live saves are
what they claim to be. These hold whatever savedir does."""

from __future__ import annotations

import physmap
import savedir
from linux_guest import GuestSaves, check_pattern
from savedir import _core


def test_paused_dumps_hold_the_whole_fill(guest_saves: GuestSaves) -> None:
    per_load = {}
    for snap in guest_saves.snapshots:
        elf = physmap.Elf(snap.dump)
        assert elf.e_type == 4 and elf.loads, snap.dump  # ET_CORE
        counts = check_pattern(elf, snap.pages)
        assert counts["generations"] == 1  # a guest that only filled
        per_load[snap.name] = counts["per_load"]
        assert snap.save.stat().st_size > snap.pages * 4096  # QEMU wrote the pages
        assert snap.mapped.exists()
    # q35 with 3 GiB: 2 GiB below 4 GiB, the rest at 4 GiB, and the fill reaches it
    q35 = physmap.Elf(guest_saves.q35.dump)
    assert any(ld.paddr == 4 << 30 and ld.filesz == 1 << 30 for ld in q35.loads), q35.loads
    assert per_load["q35"].get(4 << 30, 0) > 200_000, per_load["q35"]  # most of that GiB
    assert guest_saves.pc.pages * 4096 > 150 << 20  # most of pc's 256 MiB


def test_a_reloaded_save_dumps_like_its_source(guest_saves: GuestSaves) -> None:
    """The oracle of the live saves (load, then dump) gives the source's dump
    for the paused pc save: QEMU's load is faithful."""
    src, again = physmap.Elf(guest_saves.pc.dump), physmap.Elf(guest_saves.pc.reload_dump)
    assert [(l.paddr, l.filesz) for l in src.loads] == [(l.paddr, l.filesz) for l in again.loads]
    for a, b in zip(src.loads, again.loads):
        for (ga, da), (gb, db) in zip(src.chunks(a), again.chunks(b)):
            assert ga == gb and da == db, f"differs in the load at {a.paddr:#x}"


def test_live_saves_sent_pages_again(guest_saves: GuestSaves) -> None:
    for kind, ls in guest_saves.live.items():
        ram = ls.query_migrate["ram"]
        assert ram["dirty-sync-count"] >= 4, (kind, ram)
        # more pages sent than the guest has: pages went more than once
        assert ram["normal"] > (int(ls.guest.mem) << 20) // 4096, (kind, ram)
        counts = check_pattern(physmap.Elf(ls.dump), ls.pages)
        assert counts["pages"] == ls.pages
    x = guest_saves.live["xbzrle"].query_migrate
    assert x["xbzrle-cache"]["pages"] > 0, x


def test_dump_loads_are_the_flat_views_ram_and_the_layout_rule(guest_saves: GuestSaves) -> None:
    """QEMU's dump (paging off) has one PT_LOAD per RAM/ROM range of the flat
    view of "memory", merged where contiguous in address, region and offset;
    the layout rule gives the same ranges from the save alone."""
    for snap in guest_saves.snapshots:
        loads = [(ld.paddr, ld.filesz) for ld in physmap.Elf(snap.dump).loads]
        view = physmap.memory_view(snap.mtree)
        assert loads == [(g, s) for g, s, _, _ in view], (snap.name, loads, view)
        for path, mapped in ((snap.save, False), (snap.mapped, True)):
            with savedir.open(path) as f:
                mt = f.machine_type
            assert mt is not None
            blocks = physmap.ram_blocks(path, mapped_ram=mapped)
            assert blocks == physmap.ram_blocks(snap.save)
            ranges, _ = _core._x86_layout(mt, blocks, save=path)
            assert [(g, s, physmap.leaf(b), o) for g, s, b, o in ranges] == view, (path, ranges, view)
