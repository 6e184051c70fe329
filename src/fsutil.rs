//! Atomic writes of output folders: nothing half-written is ever visible, nothing the
//! crate did not write is ever deleted, and staging left by a crashed run is cleaned up.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Prefix of the staging entries this module creates: `{STAGING}{pid}-{n}-{name}`.
const STAGING: &str = ".modification-staging-";
/// Suffix of a replaced folder kept until its replacement is in place.
const OLD: &str = ".old";

/// A staging name unique to this process and call.
fn staging_name(name: &str) -> String {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{STAGING}{}-{n}-{name}", std::process::id())
}

/// Writes files into `dir` atomically, file by file: `write` fills a fresh staging folder
/// inside `dir`; each file is flushed to disk and then renamed over its namesake in `dir`.
/// Files of `dir` that `write` does not produce (a user's notes, a training state
/// subfolder) are left alone. When `write` fails, or a target is a folder, nothing in
/// `dir` changes, the staging folder is removed, and a `dir` this call created is removed
/// again. Each file is replaced atomically; a crash between two renames leaves some
/// files new and the others old (never a half-written file). `write` must create plain
/// files only.
///
/// Errors: those of `write`, and [`Error::Io`] for the folder operations.
pub fn write_files_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let created = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    remove_stale_staging(dir);
    let staging = dir.join(staging_name(""));
    let result = stage(&staging, write).and_then(|files| {
        // Every target must be replaceable before anything is renamed.
        if let Some(name) = files.iter().find(|name| dir.join(name).is_dir()) {
            let path = dir.join(name);
            return Err(Error::io(
                &path,
                std::io::Error::new(std::io::ErrorKind::IsADirectory, "a folder is in the way"),
            ));
        }
        for name in files {
            let to = dir.join(&name);
            std::fs::rename(staging.join(&name), &to).map_err(|e| Error::io(&to, e))?;
        }
        sync_dir(dir)
    });
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() && created {
        let _ = std::fs::remove_dir(dir);
    }
    result
}

/// Writes the folder `dir` atomically as a whole: `write` fills a fresh staging folder
/// beside `dir`, whose files are flushed to disk before it replaces `dir` by rename. Use
/// it only for a folder the crate owns entirely (a training state): an existing `dir` is
/// replaced with everything in it. On error `dir` is left as it was and the staging
/// folder is removed.
///
/// Errors: those of `write`, and [`Error::Io`] for the folder operations.
pub fn write_dir_atomically(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = dir
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{} names no folder", dir.display())))?
        .to_string_lossy()
        .into_owned();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    remove_stale_staging(&parent);
    let staging = parent.join(staging_name(&name));
    let old = parent.join(format!("{}{OLD}", staging_name(&name)));
    stage(&staging, write).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&staging);
    })?;
    let had_old = dir.exists();
    if had_old {
        std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    if let Err(e) = std::fs::rename(&staging, dir) {
        if had_old {
            let _ = std::fs::rename(&old, dir);
        }
        let _ = std::fs::remove_dir_all(&staging);
        return Err(Error::io(dir, e));
    }
    let _ = std::fs::remove_dir_all(&old);
    sync_dir(&parent)
}

/// Creates `staging`, runs `write` on it and flushes every file it wrote; returns their
/// names.
fn stage(staging: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<Vec<String>> {
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir(staging).map_err(|e| Error::io(staging, e))?;
    write(staging)?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(staging).map_err(|e| Error::io(staging, e))? {
        let path = entry.map_err(|e| Error::io(staging, e))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        names.push(
            path.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
        );
    }
    sync_dir(staging)?;
    Ok(names)
}

/// Flushes a folder's entries (the renames into it) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))?;
    Ok(())
}

/// Cleans up after writers of `dir` that no longer run (a run that crashed or was killed
/// mid-write): staging entries are removed; a replaced folder whose replacement never
/// arrived is put back. Best effort: failures are ignored.
fn remove_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(STAGING) else {
            continue;
        };
        // `{pid}-{n}-{name}`, `{name}` possibly with the `.old` suffix.
        let mut parts = rest.splitn(3, '-');
        let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_none_or(process_is_alive) {
            continue;
        }
        let original = parts.nth(1).and_then(|n| n.strip_suffix(OLD));
        match original.map(|n| dir.join(n)) {
            Some(target) if !target.exists() => {
                let _ = std::fs::rename(entry.path(), target);
            }
            _ => {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn process_is_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        // Without a cheap liveness check elsewhere, keep what may belong to a live run.
        true
    }
}
