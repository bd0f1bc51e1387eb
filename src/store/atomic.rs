//! Atomic writes (stage in `PATH.tmp`, fsync, rename over `PATH`, fsync the directory), so a reader or a resumed
//! run sees either the old file or the whole new one; files are created with mode 0644 (less whatever the umask
//! takes away). Also the free-space figure the disk checks compare against.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable that replaces the free-space figure (bytes) the disk checks use, so tests can play a
/// small disk. Not meant for users.
pub const FREE_BYTES_ENV: &str = "DEJAVU_ASSUME_FREE_BYTES";

/// Write `bytes` to `path` so that a reader (or a resumed run) sees either the old file or the whole new one:
/// write `path.tmp`, fsync it, rename over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    (|| {
        let mut f = create_0644(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .map_err(|e| Error::io(&tmp, e))?;
    commit_tmp(&tmp, path)
}

/// Create (truncate) `path` for writing, mode 0644 before the umask.
fn create_0644(path: &Path) -> std::io::Result<std::fs::File> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o644);
    o.open(path)
}

/// `path` with `.tmp` appended: where [`write_atomic`] stages a file.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// fsync `tmp`, rename it to `path`, fsync the directory holding them.
pub fn commit_tmp(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(|e| Error::io(tmp, e))?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(path, e))?;
    if let Some(dir) = path.parent() {
        // Directory fsync makes the rename durable; some filesystems refuse it, which is not worth failing for.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Serialize `value` as pretty JSON and write it atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::format(path, e.to_string()))?;
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Serialize `rows` as CSV (a header row from the field names, then one row each) in memory, then write it
/// atomically.
pub fn write_csv<T: serde::Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let bad = |e: String| Error::format(path, e);
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in rows {
        w.serialize(r).map_err(|e| bad(e.to_string()))?;
    }
    let bytes = w.into_inner().map_err(|e| bad(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Write a safetensors file atomically with `meta` in its header. safetensors stages through a `tempfile`
/// (mode 0600), so the mode is set back to 0644 before the rename.
pub fn write_safetensors<'a>(
    path: &Path,
    views: Vec<(String, safetensors::tensor::TensorView<'a>)>,
    meta: HashMap<String, String>,
) -> Result<()> {
    let tmp = tmp_path(path);
    safetensors::serialize_to_file(views, Some(meta), &tmp).map_err(|e| Error::format(&tmp, e.to_string()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644 & !umask())).map_err(|e| Error::io(&tmp, e))?;
    }
    commit_tmp(&tmp, path)
}

/// The process umask, read from `/proc/self/status` (setting it to read it back would race other threads);
/// 0o022 when that is not available.
#[cfg(unix)]
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Umask:").and_then(|v| u32::from_str_radix(v.trim(), 8).ok())))
        .unwrap_or(0o022)
}

/// Remove what killed writes left in `dir`: `*.tmp` (ours) and `.tmp*` (safetensors' own temp files). The
/// artifacts they were to become are written again.
pub fn remove_stale_tmp(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") || name.starts_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
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

    #[cfg(unix)]
    #[test]
    fn files_are_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let want = 0o644 & !umask();
        let p = dir.path().join("a.json");
        write_json(&p, &1).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, want);
        let st = dir.path().join("a.safetensors");
        let data = [0u8; 4];
        let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
        write_safetensors(&st, vec![("x".into(), v)], HashMap::new()).unwrap();
        assert_eq!(std::fs::metadata(&st).unwrap().permissions().mode() & 0o777, want);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "temp files left behind");
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
