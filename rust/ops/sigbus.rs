//! Survive files that shrink under a memory map.
//!
//! Reading a mapped page that lies past the end of a file that another
//! program truncated raises SIGBUS, which kills the process (Python
//! included). savedir registers each of its mappings here; a SIGBUS handler
//! maps a page of zeros over the faulting page of a registered mapping and
//! marks it, so the read goes on (seeing zeros) and the operation then
//! reports that the file changed. Faults anywhere else go to the handler
//! that was there before (or to the default action, which ends the process).

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
            TABLE[i].start.store(0, Ordering::SeqCst);
            TABLE[i].end.store(0, Ordering::SeqCst);
            TABLE[i].hit.store(false, Ordering::SeqCst);
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
            // with zeros; mmap is a plain system call.
            let r = unsafe {
                libc::mmap(
                    at as *mut c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
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
        // Past the new end: would be SIGBUS.
        let x = unsafe { std::ptr::read_volatile(&m[512 * 1024]) };
        assert_eq!(x, 0);
        assert!(g.hit());
        assert_eq!(m[100], 0xab);
        drop(g);
    }
}
