//! Files in memory, for tests and benchmarks of the sans-IO layers: the
//! endpoint opens them as it would the root, with nothing on disk.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use super::{OpenError, Sink, Source};
use crate::proto::Mode;

/// Named contents, served as they are in either mode; read-only (a write
/// request is refused as by a server without uploads).
#[derive(Debug, Default, Clone)]
pub struct MemFiles {
    pub files: HashMap<Vec<u8>, Arc<Vec<u8>>>,
    /// Every name opened, in order (how tests see the open cache work).
    pub opens: Vec<Vec<u8>>,
}

impl MemFiles {
    /// Adds (or replaces) `name`; returns the shared content.
    pub fn insert(&mut self, name: &str, content: Vec<u8>) -> Arc<Vec<u8>> {
        let content = Arc::new(content);
        self.files
            .insert(name.as_bytes().to_vec(), Arc::clone(&content));
        content
    }
}

impl Source for MemFiles {
    type Handle = Arc<Vec<u8>>;

    fn open_read(&mut self, name: &[u8], _mode: Mode) -> Result<(Self::Handle, u64), OpenError> {
        self.opens.push(name.to_vec());
        let content = self.files.get(name).ok_or(OpenError::NotFound)?;
        Ok((Arc::clone(content), content.len() as u64))
    }
}

impl Sink for MemFiles {}
