//! The image → local binary table (`e2e/images.txt`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// Maps image repositories (no tag, no digest) to local binaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageTable {
    entries: BTreeMap<String, PathBuf>,
}

impl ImageTable {
    /// Parses `<image-repo> <binary path>` lines; `#` starts a comment. Relative binary paths
    /// are taken relative to `base` (the repo root).
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let (Some(image), Some(binary), None) = (words.next(), words.next(), words.next()) else {
                return Err(Error::invalid(
                    "image table",
                    format!(
                        "line {}: expected `<image-repo> <binary path>`, got {raw:?}",
                        n + 1
                    ),
                ));
            };
            entries.insert(image_repository(image).to_owned(), base.join(binary));
        }
        Ok(Self { entries })
    }

    /// Reads and parses the table file.
    pub async fn load(path: &Path, base: &Path) -> Result<Self> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| Error::io(path, e))?;
        Self::parse(&text, base)
    }

    /// The local binary for a container image, if the table has one.
    pub fn binary_for(&self, image: &str) -> Option<&Path> {
        self.entries.get(image_repository(image)).map(PathBuf::as_path)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The repository part of an image reference: without `@digest` and without `:tag` (a
/// colon in the registry host, as in `localhost:5000/app`, is kept).
pub fn image_repository(image: &str) -> &str {
    let image = image.trim();
    let image = image.split('@').next().unwrap_or(image);
    let name_start = image.rfind('/').map_or(0, |i| i + 1);
    match image[name_start..].find(':') {
        Some(colon) => &image[..name_start + colon],
        None => image,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn repository_strips_tag_and_digest() {
        assert_eq!(
            image_repository("ghcr.io/sidecert/sidecar:v1"),
            "ghcr.io/sidecert/sidecar"
        );
        assert_eq!(
            image_repository("ghcr.io/sidecert/sidecar"),
            "ghcr.io/sidecert/sidecar"
        );
        assert_eq!(image_repository("app@sha256:abcd"), "app");
        assert_eq!(image_repository("a/b:1@sha256:abcd"), "a/b");
        assert_eq!(image_repository("localhost:5000/app"), "localhost:5000/app");
        assert_eq!(image_repository("localhost:5000/app:2"), "localhost:5000/app");
    }

    #[test]
    fn parses_table_with_comments() {
        let text = "# comment\n\nghcr.io/sidecert/sidecar target/debug/sidecert-sidecar\n\
                    ghcr.io/sidecert/webhook:latest  /abs/webhook # trailing\n";
        let t = ImageTable::parse(text, Path::new("/repo")).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.binary_for("ghcr.io/sidecert/sidecar:0.1.0"),
            Some(Path::new("/repo/target/debug/sidecert-sidecar"))
        );
        assert_eq!(
            t.binary_for("ghcr.io/sidecert/webhook"),
            Some(Path::new("/abs/webhook"))
        );
        assert_eq!(t.binary_for("example/app"), None);
    }

    #[test]
    fn rejects_malformed_lines() {
        assert!(ImageTable::parse("only-one-word\n", Path::new("/")).is_err());
        assert!(ImageTable::parse("a b c\n", Path::new("/")).is_err());
    }

    #[test]
    fn shipped_table_parses() {
        let text = include_str!("../../images.txt");
        let t = ImageTable::parse(text, Path::new("/r")).unwrap();
        assert!(t.binary_for("ghcr.io/sidecert/sidecar:dev").is_some());
        assert!(t.binary_for("ghcr.io/sidecert/webhook:dev").is_some());
    }
}
