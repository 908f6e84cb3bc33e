//! Survive files that shrink under a memory map.
//!
//! Reading a mapped page that lies past the end of a file that another
//! program truncated raises SIGBUS, which kills the process (Python
//! included). savedir registers each of its mappings here; a SIGBUS handler
//! maps a page of zeros over the faulting page of a registered mapping and
//! marks it, so the read goes on (seeing zeros) and the operation then
//! reports that the file changed. Faults anywhere else go to the handler
//! that was there before (or to the default action, which ends the process).
//!
//! # Why the handler is sound (on Linux)
//!
//! - *mmap in a signal handler.* mmap is not on POSIX's list of
//!   async-signal-safe functions, but on Linux glibc's `mmap` is a plain
//!   wrapper around the system call: it takes no userspace lock and touches
//!   no allocator state, so it cannot deadlock on or corrupt state that the
//!   interrupted code was in the middle of changing. The handler calls
//!   nothing else but atomics (and `sigaction` on the default-action path,
//!   which is async-signal-safe).
//! - *errno.* The interrupted code may be between a system call and its read
//!   of `errno`; the handler saves `errno` before its mmap and restores it.
//! - *MAP_FIXED over our own mapping.* `mmap(MAP_FIXED | MAP_PRIVATE |
//!   MAP_ANONYMOUS, PROT_READ)` replaces the page range atomically: there is
//!   no moment where the range is unmapped and could be taken by another
//!   thread's mmap. The page lies inside a read-only mapping of the whole
//!   file that savedir made and still owns (checked against the table), so
//!   nothing else is overwritten. That the bytes under a `&[u8]` change is
//!   the caveat of every shared file mapping (memmap2's `unsafe`), which
//!   savedir accepts anyway: readers treat the bytes as untrusted input and
//!   ask [`Map::changed`](super::Map::changed) before trusting a result.
//! - *The faulting load.* Returning from the handler restarts the faulting
//!   instruction, which now reads zeros from the anonymous page. The
//!   operation then sees `hit` (or a smaller file size) and reports
//!   [`Error::Changed`](super::Error::Changed) instead of what it read.
//! - *The table.* Slots hold only atomics. A mapping is registered right
//!   after it is made and before any byte of it is read, and its slot is
//!   cleared before it is unmapped (the guard is the first field of
//!   [`Map`](super::Map), dropped before the mapping), so the handler never
//!   replaces a page of a range that savedir no longer owns. The handler
//!   reads the table without a lock: a slot is claimed by its `start` and
//!   gets its `end` after, and is cleared `end` first and freed by `start`
//!   last, so a slot being filled or cleared concurrently only makes the
//!   handler miss a range that no fault can be in.
//! - *Faults outside our mappings* (a bug elsewhere, another library's
//!   mapping, a truncated file that is not ours) are not touched: the handler
//!   calls the previous handler, or restores the default action and returns,
//!   so that the fault happens again and ends the process as it would have.
//! - *SA_NODEFER* keeps SIGBUS unblocked inside the handler: a previous
//!   handler we chain to that re-raises the signal (Python's faulthandler
//!   does) has it delivered at once, as without us, and a fault inside the
//!   handler re-enters it (it is re-entrant: atomics only) instead of
//!   meeting a blocked synchronous signal, which the kernel answers by
//!   killing the process.
//! - *Chaining.* The action installed before ours is kept and called for
//!   faults that are not ours. Ours is installed again only when it is not
//!   the current one, so a handler put on top of ours later (faulthandler)
//!   stays in charge; one that chains, as faulthandler does after printing
//!   its report, still reaches ours.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

const SLOTS: usize = 256;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    hit: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot { start: AtomicUsize::new(0), end: AtomicUsize::new(0), hit: AtomicBool::new(false) };
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Mutex<()> = Mutex::new(());
/// The action that was installed before ours (read only in the handler).
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A registered mapping; unregisters itself when dropped.
#[derive(Debug)]
pub struct Guard {
    slot: Option<usize>,
}

impl Guard {
    /// True when a page of this mapping was found missing from the file.
    pub fn hit(&self) -> bool {
        self.slot.is_some_and(|i| TABLE[i].hit.load(Ordering::SeqCst))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // `start` last: it frees the slot, which `register` may then
            // claim at once and fill; clearing after it would undo that.
            TABLE[i].end.store(0, Ordering::SeqCst);
            TABLE[i].hit.store(false, Ordering::SeqCst);
            TABLE[i].start.store(0, Ordering::SeqCst);
        }
    }
}

/// Registers `[ptr, ptr + len)`. With no free slot the mapping is simply
/// unprotected (as any mapping is without this module).
pub fn register(ptr: *const u8, len: usize) -> Guard {
    if len == 0 {
        return Guard { slot: None };
    }
    install();
    let start = ptr as usize;
    for (i, s) in TABLE.iter().enumerate() {
        if s.start.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            s.hit.store(false, Ordering::SeqCst);
            s.end.store(start + len, Ordering::SeqCst);
            return Guard { slot: Some(i) };
        }
    }
    Guard { slot: None }
}

/// Installs the handler unless it is the current one (another library, such
/// as Python's faulthandler, may have put its own on top since).
fn install() {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: plain libc calls on properly initialised structures; PREVIOUS
    // is written only here, under the lock, before our handler can run
    // with the new value.
    unsafe {
        let mut cur: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut cur) != 0 {
            return;
        }
        if cur.sa_sigaction == handler as *const () as usize {
            return;
        }
        let page = libc::sysconf(libc::_SC_PAGESIZE);
        if page > 0 {
            PAGE.store(page as usize, Ordering::SeqCst);
        }
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut act.sa_mask);
        PREVIOUS = Some(cur);
        libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut());
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: called by the kernel with a valid siginfo for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    for s in TABLE.iter() {
        let start = s.start.load(Ordering::SeqCst);
        let end = s.end.load(Ordering::SeqCst);
        if start != 0 && addr >= start && addr < end {
            let at = addr & !(page - 1);
            // SAFETY: replaces one page inside a read-only mapping of ours
            // with zeros; mmap is a plain system call (see the module doc).
            // errno belongs to the interrupted code: kept as it was.
            let r = unsafe {
                let errno = libc::__errno_location();
                let saved = *errno;
                let r = libc::mmap(
                    at as *mut c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                );
                *errno = saved;
                r
            };
            if r != libc::MAP_FAILED {
                s.hit.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
    // Not ours: hand over to what was there before.
    // SAFETY: PREVIOUS was set before this handler was installed.
    unsafe {
        let prev = std::ptr::addr_of!(PREVIOUS).read();
        match prev {
            Some(p) if p.sa_flags & libc::SA_SIGINFO != 0 && p.sa_sigaction > 1 => {
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) =
                    std::mem::transmute(p.sa_sigaction);
                f(sig, info, ctx);
            }
            Some(p) if p.sa_sigaction > 1 => {
                let f: extern "C" fn(libc::c_int) = std::mem::transmute(p.sa_sigaction);
                f(sig);
            }
            _ => {
                // Default action: restore it; the fault happens again and ends the process.
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &dfl, std::ptr::null_mut());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_truncated_mapping_reads_zeros_and_says_so() {
        let dir = std::env::temp_dir().join(format!("savedir-sigbus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&vec![0xabu8; 1 << 20]).unwrap();
        drop(f);
        let f = std::fs::File::open(&p).unwrap();
        let m = unsafe { memmap2::Mmap::map(&f).unwrap() };
        let g = register(m.as_ptr(), m.len());
        assert_eq!(m[100], 0xab);
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(4096).unwrap();
        // Past the new end: would be SIGBUS. The handler leaves errno alone.
        unsafe { *libc::__errno_location() = libc::EINTR };
        let x = unsafe { std::ptr::read_volatile(&m[512 * 1024]) };
        assert_eq!(unsafe { *libc::__errno_location() }, libc::EINTR);
        assert_eq!(x, 0);
        assert!(g.hit());
        assert_eq!(m[100], 0xab);
        drop(g);
    }
}
