//! Run-directory helpers shared by the stages that write artifacts: atomic file writes (tmp + fsync + rename),
//! JSON manifests, and the free-space figure the disk checks compare against.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Environment variable that replaces the free-space figure (bytes) the disk checks use, so tests can play a
/// small disk. Not meant for users.
pub const FREE_BYTES_ENV: &str = "DEJAVU_ASSUME_FREE_BYTES";

/// The crate version written into every manifest.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Write `bytes` to `path` so that a reader (or a resumed run) sees either the old file or the whole new one:
/// write `path.tmp`, fsync it, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    commit_tmp(&tmp, path)
}

/// `path` with `.tmp` appended: where [`write_atomic`] stages a file.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// fsync `tmp`, rename it to `path`, fsync the directory holding them.
pub fn commit_tmp(tmp: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::File::open(tmp)?.sync_all()?;
    std::fs::rename(tmp, path)?;
    if let Some(dir) = path.parent() {
        // Directory fsync makes the rename durable; some filesystems refuse it, which is not worth failing for.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Serialize `value` as pretty JSON and write it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Bytes available to an unprivileged writer on the filesystem holding `path` (the nearest existing ancestor),
/// or the value of [`FREE_BYTES_ENV`] when set.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    if let Some(v) = std::env::var_os(FREE_BYTES_ENV) {
        let s = v.to_string_lossy();
        return s
            .trim()
            .parse::<u64>()
            .map_err(|_| std::io::Error::other(format!("{FREE_BYTES_ENV}={s}: not a byte count")));
    }
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            p = PathBuf::from(".");
            break;
        }
    }
    if p.as_os_str().is_empty() {
        p = PathBuf::from(".");
    }
    statvfs_free(&p)
}

#[cfg(unix)]
fn statvfs_free(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(not(unix))]
fn statvfs_free(_path: &Path) -> std::io::Result<u64> {
    Ok(u64::MAX)
}

/// Human-readable byte count (`1.5 GB`), decimal units as `df -H` prints them.
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1000.0 && u + 1 < units.len() {
        x /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", units[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        write_json(&p, &serde_json::json!({"a": 1})).unwrap();
        write_json(&p, &serde_json::json!({"a": 2})).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["a"], 2);
        assert!(!tmp_path(&p).exists());
    }

    #[test]
    fn free_bytes_of_missing_dir_uses_ancestor() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(&dir.path().join("a/b/c")).unwrap() > 0);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(25_400_000_000), "25.4 GB");
    }
}
