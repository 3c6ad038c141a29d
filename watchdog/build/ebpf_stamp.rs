//! Which eBPF sources an object was built from: `cargo xtask build-ebpf` writes the hash of
//! the sources next to the object (`watchdog-ebpf.stamp`), and `watchdog/build.rs` refuses to
//! embed an object whose stamp does not match the sources as they are now.
//!
//! A hash rather than modification times: git sets a file's time to the checkout's, so after a
//! checkout or a rebase times say nothing about which sources an object came from, and
//! `build-ebpf` leaves an object that came out identical untouched (its time stays old).
//!
//! This file is compiled twice, by `#[path]`: into `watchdog/build.rs` and into `xtask` (which
//! also runs its tests). It uses std only, since the build script has no dependencies.

use std::io;
use std::path::{Path, PathBuf};

/// What the object is built from, relative to the workspace root: the kernel programs' crate
/// and the shared `no_std` crate. Directories are walked for `.rs` files only, so an editor's
/// swap or backup file does not count as an edit.
pub const SOURCES: &[&str] = &[
    "watchdog-ebpf/Cargo.toml",
    "watchdog-ebpf/src",
    "common/Cargo.toml",
    "common/src",
];

/// What the stamp's line starts with, naming the hash, so that a change of hash reads as a
/// mismatch rather than as a different build.
const PREFIX: &str = "sources-fnv1a64:";

/// The stamp file of an object: the same path with the extension `stamp`.
pub fn stamp_path(object: &Path) -> PathBuf {
    object.with_extension("stamp")
}

/// The files [`SOURCES`] names, relative to `root`, in a fixed order.
pub fn source_files(root: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for source in SOURCES {
        let path = root.join(source);
        if path.is_dir() {
            walk(root, &path, &mut files)?;
        } else {
            // A named file that is missing is an error: the hash would not cover what builds
            // the object.
            std::fs::metadata(&path)?;
            files.push(PathBuf::from(source));
        }
    }
    files.sort();
    Ok(files)
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            walk(root, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let relative = path.strip_prefix(root).map_err(io::Error::other)?;
            files.push(relative.to_path_buf());
        }
    }
    Ok(())
}

/// The stamp line for the sources under `root` as they are now: each file's relative path and
/// contents, through 64-bit FNV-1a. It guards against a forgotten rebuild, not an adversary,
/// so a small hash with no dependencies is enough.
pub fn sources_stamp(root: &Path) -> io::Result<String> {
    let mut hash = Fnv::new();
    for file in source_files(root)? {
        let contents = std::fs::read(root.join(&file))?;
        // Path and length first, so that moving bytes from one file to the next changes it.
        hash.write(file.to_string_lossy().replace('\\', "/").as_bytes());
        hash.write(&[0]);
        hash.write(&(contents.len() as u64).to_le_bytes());
        hash.write(&contents);
    }
    Ok(format!("{PREFIX}{:016x}", hash.0))
}

/// How the object's stamp compares with the sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// Built from the sources as they are now.
    Fresh,
    /// The sources changed since (or the object predates stamps: `recorded` is `None`).
    Stale {
        /// The stamp's line, if there is a stamp.
        recorded: Option<String>,
        /// The line the sources give now.
        current: String,
    },
}

/// Compares the stamp next to `object` with the sources under `root`.
pub fn check(root: &Path, object: &Path) -> io::Result<Freshness> {
    let current = sources_stamp(root)?;
    let recorded = match std::fs::read_to_string(stamp_path(object)) {
        Ok(text) => Some(text.trim().to_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(if recorded.as_deref() == Some(current.as_str()) {
        Freshness::Fresh
    } else {
        Freshness::Stale { recorded, current }
    })
}

/// 64-bit FNV-1a.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A workspace with the four sources, and an object with a stamp written for them.
    fn workspace() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, text) in [
            ("watchdog-ebpf/Cargo.toml", "[package]\n"),
            ("watchdog-ebpf/src/main.rs", "mod programs;\n"),
            ("watchdog-ebpf/src/programs.rs", "// the programs\n"),
            ("common/Cargo.toml", "[package]\n"),
            ("common/src/lib.rs", "pub struct RawEvent;\n"),
        ] {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), text).unwrap();
        }
        let object = root.join("target/bpf/watchdog-ebpf.o");
        std::fs::create_dir_all(object.parent().unwrap()).unwrap();
        std::fs::write(&object, b"\x7fELF").unwrap();
        std::fs::write(stamp_path(&object), sources_stamp(root).unwrap() + "\n").unwrap();
        (dir, object)
    }

    fn is_stale(root: &Path, object: &Path) -> bool {
        matches!(check(root, object).unwrap(), Freshness::Stale { .. })
    }

    #[test]
    fn the_stamp_sits_next_to_the_object() {
        assert_eq!(
            stamp_path(Path::new("/w/target/bpf/watchdog-ebpf.o")),
            Path::new("/w/target/bpf/watchdog-ebpf.stamp")
        );
    }

    #[test]
    fn the_sources_it_was_built_from_are_fresh() {
        let (dir, object) = workspace();
        assert_eq!(check(dir.path(), &object).unwrap(), Freshness::Fresh);
        let files = source_files(dir.path()).unwrap();
        assert_eq!(files.len(), 5, "{files:?}");
    }

    #[test]
    fn an_edit_anywhere_in_the_sources_makes_it_stale() {
        for (path, text) in [
            ("watchdog-ebpf/src/programs.rs", "// the programs, edited\n"),
            ("watchdog-ebpf/Cargo.toml", "[package]\nname = \"x\"\n"),
            ("common/src/lib.rs", "pub struct RawEvent(u32);\n"),
            ("common/Cargo.toml", "[package]\n\n"),
            ("common/src/new_module.rs", "\n"),
            ("watchdog-ebpf/src/deep/er.rs", "\n"),
        ] {
            let (dir, object) = workspace();
            let file = dir.path().join(path);
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(file, text).unwrap();
            assert!(is_stale(dir.path(), &object), "{path}");
        }
        let (dir, object) = workspace();
        std::fs::remove_file(dir.path().join("watchdog-ebpf/src/programs.rs")).unwrap();
        assert!(is_stale(dir.path(), &object), "a removed file");
    }

    #[test]
    fn times_and_other_files_do_not_count() {
        let (dir, object) = workspace();
        let root = dir.path();
        // Rewriting a file with the same bytes (a checkout) changes its time, not the stamp.
        std::fs::write(root.join("common/src/lib.rs"), "pub struct RawEvent;\n").unwrap();
        std::fs::write(root.join("watchdog-ebpf/src/.programs.rs.swp"), "x").unwrap();
        std::fs::write(root.join("watchdog-ebpf/README.md"), "x").unwrap();
        assert_eq!(check(root, &object).unwrap(), Freshness::Fresh);
    }

    #[test]
    fn an_object_without_a_stamp_is_stale_and_says_so() {
        let (dir, object) = workspace();
        std::fs::remove_file(stamp_path(&object)).unwrap();
        let Freshness::Stale { recorded, current } = check(dir.path(), &object).unwrap() else {
            panic!("fresh without a stamp");
        };
        assert_eq!(recorded, None);
        assert!(current.starts_with(PREFIX) && current.len() == PREFIX.len() + 16);
    }

    #[test]
    fn moving_bytes_between_files_changes_the_stamp() {
        let (dir, _) = workspace();
        let root = dir.path();
        let (main, lib) = (
            root.join("watchdog-ebpf/src/main.rs"),
            root.join("common/src/lib.rs"),
        );
        std::fs::write(&lib, "ab").unwrap();
        std::fs::write(&main, "c").unwrap();
        let before = sources_stamp(root).unwrap();
        std::fs::write(&lib, "a").unwrap();
        std::fs::write(&main, "bc").unwrap();
        assert_ne!(before, sources_stamp(root).unwrap());
    }
}
