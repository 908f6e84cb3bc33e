//! Keeps the `savedir` command executable, and does nothing else.
//!
//! The command is `wheel-data/scripts/savedir`, which maturin puts in the
//! wheel with the mode it has on disk (see pyproject.toml for why it is not
//! an entry point). A git checkout has it executable; maturin's sdist stores
//! every file without its executable bit, so a wheel built from an sdist
//! would install a command that cannot run. Cargo runs this before maturin
//! assembles the wheel.

fn main() {
    println!("cargo:rerun-if-changed=wheel-data/scripts/savedir");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default();
        let script = std::path::Path::new(&dir).join("wheel-data").join("scripts").join("savedir");
        if let Ok(md) = std::fs::metadata(&script) {
            let mode = md.permissions().mode();
            if mode & 0o111 != 0o111 {
                // A read-only tree keeps its modes: nothing to be done there.
                let _ = std::fs::set_permissions(&script, std::fs::Permissions::from_mode(mode | 0o111));
            }
        }
    }
}
