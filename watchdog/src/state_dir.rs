//! The state directory is the watchdog's alone: 0700, and what it holds 0600 (files) or 0700
//! (directories). The registry names every job and process, the outbox and the progress log
//! carry migratekit's error messages; none of it is for other local users.
//!
//! The daemon runs with umask 0o077 and creates its files 0600, so what it makes is private
//! already. This fixes what it did not make so: a directory created by hand or by a package
//! with 0755, files written by an older watchdog that created them 0644.

use std::fs::Permissions;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// How deep below the state directory modes are checked: it holds files and the outbox's
/// directory, nothing deeper.
const MAX_DEPTH: usize = 3;

/// What the watchdog keeps in its state directory (names start with these): only these
/// are made private, should `--state-dir` name a directory that holds other things too.
const OWN: [&str; 4] = [
    crate::registry::FILE_NAME,
    crate::progress::LOG_FILE,
    crate::daemon::LEGACY_JOURNAL,
    crate::outbox::DIR_NAME,
];

/// Makes `dir` 0700 and the watchdog's files in it 0600 (its directories 0700), logging
/// each change (`state_dir_mode_fixed`). Symbolic links are left alone, and not followed: a
/// mode is never changed on something outside the directory. A directory with the sticky
/// bit (`/tmp`) is shared by design and refused. Returns how many modes were changed.
pub fn secure(dir: &Path) -> io::Result<usize> {
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.permissions().mode() & 0o1000 != 0 {
        return Err(io::Error::other(
            "it is a shared directory (sticky bit, like /tmp); give --state-dir a directory of the watchdog's own",
        ));
    }
    let mut fixed = fix(dir, MAX_DEPTH)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if OWN.iter().any(|own| name.starts_with(own)) {
            fixed += fix(&entry.path(), 1)?;
        }
    }
    Ok(fixed)
}

fn fix(path: &Path, depth: usize) -> io::Result<usize> {
    let meta = std::fs::symlink_metadata(path)?;
    let is_dir = meta.is_dir();
    if !is_dir && !meta.is_file() {
        return Ok(0);
    }
    let mode = meta.permissions().mode() & 0o7777;
    let wanted = if is_dir { 0o700 } else { mode & 0o700 };
    let mut fixed = 0;
    if mode != wanted {
        std::fs::set_permissions(path, Permissions::from_mode(wanted))?;
        tracing::warn!(event = "state_dir_mode_fixed", path = %path.display(),
            was = format!("{mode:04o}"), now = format!("{wanted:04o}"),
            "the watchdog's state was open to other users; made it private");
        fixed += 1;
    }
    // The state directory itself is called with `MAX_DEPTH`: its entries are chosen above.
    if is_dir && depth < MAX_DEPTH {
        for entry in std::fs::read_dir(path)? {
            fixed += fix(&entry?.path(), depth + 1)?;
        }
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn a_wide_state_dir_and_its_files_are_made_private_links_untouched() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("elsewhere");
        std::fs::write(&target, "x").unwrap();
        std::fs::set_permissions(&target, Permissions::from_mode(0o644)).unwrap();
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("state");
        std::fs::create_dir_all(dir.join("outbox")).unwrap();
        std::fs::write(dir.join("registry.json"), "{}").unwrap();
        std::fs::write(dir.join("outbox/events.jsonl"), "").unwrap();
        for (path, m) in [
            (dir.clone(), 0o755),
            (dir.join("outbox"), 0o777),
            (dir.join("registry.json"), 0o644),
            (dir.join("outbox/events.jsonl"), 0o666),
        ] {
            std::fs::set_permissions(path, Permissions::from_mode(m)).unwrap();
        }
        std::os::unix::fs::symlink(&target, dir.join("outbox.link")).unwrap();
        // Not the watchdog's: left as it is.
        std::fs::write(dir.join("other"), "x").unwrap();
        std::fs::set_permissions(dir.join("other"), Permissions::from_mode(0o644)).unwrap();
        assert_eq!(secure(&dir).unwrap(), 4);
        assert_eq!(mode(&dir.join("other")), 0o644);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("outbox")), 0o700);
        assert_eq!(mode(&dir.join("registry.json")), 0o600);
        assert_eq!(mode(&dir.join("outbox/events.jsonl")), 0o600);
        assert_eq!(mode(&target), 0o644, "a link's target is not ours");
        assert_eq!(secure(&dir).unwrap(), 0, "nothing left to fix");
        std::fs::set_permissions(&dir, Permissions::from_mode(0o1777)).unwrap();
        let err = secure(&dir).unwrap_err();
        assert!(err.to_string().contains("sticky"), "{err}");
    }
}
