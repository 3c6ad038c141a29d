//! Small crash-safe file primitives shared by the outbox, the progress store, the registry and
//! the launcher's job logs. A leaf module: it knows files, not what they hold.
//!
//! The outbox and the progress store keep JSON-lines files: appends go to the end of a file,
//! and a whole file is only ever replaced atomically (temp file, fsync, rename, directory
//! fsync), so after a crash a file is either the old version or the new one, plus at most one
//! torn last line. The registry's file is only ever replaced whole, the same way.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

/// Opens `path` for appending, creating it (mode 0600) when missing.
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Fsyncs a directory, so that a rename or a file creation inside it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `contents` atomically: after a crash, `path` holds either the old
/// contents or the new ones, never a mix. The file is created anew with mode 0600, whatever
/// a leftover temporary file's mode was.
pub(crate) fn replace_atomically(path: &Path, contents: &[u8]) -> io::Result<()> {
    replace_keep_open(path, contents)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Writes `contents` to a temporary file, fsyncs it and renames it over `path`, and returns
/// an append handle on the new file. The handle is opened before the rename, so it follows
/// the new file: the caller never ends up appending to a replaced (unlinked) file, whatever
/// fails. The caller installs the handle, then calls [`sync_dir`] to make the rename durable.
pub(crate) fn replace_keep_open(path: &Path, contents: &[u8]) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A leftover from a crash is removed first: `create_new` then guarantees a fresh file,
    // opened in append mode so that every later write lands at its end.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(file)
}

/// What reading a JSON-lines file found besides its good lines.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct LineDamage {
    /// The last line had no newline and did not parse: a write torn by a crash.
    pub torn_tail: bool,
    /// Lines before the last that did not parse (1-based line numbers): real corruption.
    pub corrupt_lines: Vec<usize>,
}

/// Reads every line of a JSON-lines file that parses as `T`. A missing file reads as empty.
///
/// A last line without its newline that does not parse is a write torn by a crash and is
/// reported as `torn_tail`; any other unparsable line is reported in `corrupt_lines`.
/// Neither stops the read: the caller logs them and keeps everything that is intact.
pub(crate) fn read_json_lines<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> io::Result<(Vec<T>, LineDamage)> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok((Vec::new(), LineDamage::default()));
        }
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut items = Vec::new();
    let mut damage = LineDamage::default();
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        let complete = line.last() == Some(&b'\n');
        let text = if complete {
            &line[..line.len() - 1]
        } else {
            &line[..]
        };
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<T>(text) {
            Ok(item) => items.push(item),
            Err(_) if !complete => damage.torn_tail = true,
            Err(_) => damage.corrupt_lines.push(number),
        }
    }
    Ok((items, damage))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tail_and_corrupt_lines_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        std::fs::write(&path, b"1\nnot json\n2\n{\"torn").unwrap();
        let (items, damage) = read_json_lines::<u32>(&path).unwrap();
        assert_eq!(items, vec![1, 2]);
        assert!(damage.torn_tail);
        assert_eq!(damage.corrupt_lines, vec![2]);
    }

    #[test]
    fn replace_is_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.jsonl");
        replace_atomically(&path, b"a\n").unwrap();
        replace_atomically(&path, b"b\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"b\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
