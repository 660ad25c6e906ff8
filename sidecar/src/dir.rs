//! The optional certificate directory (`--cert-dir`): `tls.crt` and `tls.key`, swapped
//! atomically the way the kubelet updates Secret volumes.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::error::{Error, Result};

const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";

/// Writes `tls.crt` and `tls.key` into `dir` so that readers never see half a pair.
///
/// Like the kubelet's Secret volumes: the pair goes into a fresh `..<version>` directory,
/// the `..data` symlink is swapped to it with one rename, and `tls.crt`/`tls.key` are
/// symlinks through `..data`. Readers that open `..data/tls.crt` and `..data/tls.key` (or
/// the top-level links, in quick succession) see one consistent pair.
pub async fn write_dir(dir: &Path, chain_pem: &str, key_pem: &str) -> Result<()> {
    let dir = dir.to_owned();
    let (chain, key) = (chain_pem.to_owned(), key_pem.to_owned());
    tokio::task::spawn_blocking(move || write_dir_blocking(&dir, &chain, &key))
        .await
        .map_err(|e| Error::http_from("writer task", e))?
}

fn write_dir_blocking(dir: &Path, chain: &str, key: &str) -> Result<()> {
    use std::{fs, os::unix::fs::symlink};
    let io = |p: &Path, e| Error::io(p.display(), e);
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let version = format!("..{nanos}-{}", std::process::id());
    let vdir = dir.join(&version);
    fs::create_dir(&vdir).map_err(|e| io(&vdir, e))?;
    write_file(&vdir.join(TLS_CRT), chain.as_bytes(), 0o644)?;
    write_file(&vdir.join(TLS_KEY), key.as_bytes(), 0o600)?;
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&version, &tmp).map_err(|e| io(&tmp, e))?;
    let data = dir.join("..data");
    let old = fs::read_link(&data).ok();
    fs::rename(&tmp, &data).map_err(|e| io(&data, e))?;
    for name in [TLS_CRT, TLS_KEY] {
        let link = dir.join(name);
        let target = PathBuf::from("..data").join(name);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let tmp = dir.join(format!("..{name}_tmp"));
            let _ = fs::remove_file(&tmp);
            symlink(&target, &tmp).map_err(|e| io(&tmp, e))?;
            fs::rename(&tmp, &link).map_err(|e| io(&link, e))?;
        }
    }
    if let Some(old) = old
        && old != Path::new(&version)
    {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn dir_swap_keeps_one_version() {
        let dir = std::env::temp_dir().join(format!("sidecert-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_dir(&dir, "C1", "K1").await.unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("tls.crt")).unwrap(), "C1");
        write_dir(&dir, "C2", "K2").await.unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("tls.crt")).unwrap(), "C2");
        assert_eq!(std::fs::read_to_string(dir.join("..data/tls.key")).unwrap(), "K2");
        let versions = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("..") && n.as_bytes().get(2).is_some_and(u8::is_ascii_digit)
            })
            .count();
        assert_eq!(versions, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
