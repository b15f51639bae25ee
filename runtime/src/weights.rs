//! The packed weights file: a small header, then each weight 64-byte aligned, memory-mapped.
//!
//! Layout: `GRIFFINW` (8 bytes), header length (u64 LE), header JSON `{"hash": ...}`, zero
//! padding to 64 bytes, then the weights at the offsets the plan gives (from the data start).

use std::fs::File;
use std::io::Write;
use std::path::Path;

use memmap2::Mmap;

use crate::RuntimeError;

pub const MAGIC: &[u8; 8] = b"GRIFFINW";
pub const ALIGN: u64 = 64;

pub fn align(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

fn data_start(header_len: u64) -> u64 {
    align(16 + header_len)
}

/// Writes `data` (already laid out at aligned offsets) with its hash; through a temporary
/// file, so a failure leaves nothing behind.
pub fn write(path: &Path, hash: &str, data: &[u8]) -> Result<(), RuntimeError> {
    let header = format!("{{\"hash\":\"{hash}\",\"bytes\":{}}}", data.len());
    let start = data_start(header.len() as u64);
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(MAGIC)?;
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        f.write_all(&vec![0u8; (start - 16 - header.len() as u64) as usize])?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        RuntimeError::Weights(format!("{}: cannot write: {e}", path.display()))
    })
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u8; 64]);

enum Backing {
    Mapped {
        map: Mmap,
        start: usize,
    },
    /// Packed in memory (in-process runs): 64-byte aligned like the file's data.
    Owned {
        lines: Vec<Line>,
        len: usize,
    },
    /// Linked into the executable (64-byte aligned by the assembler).
    Static(&'static [u8]),
}

/// Packed weights: a mapped file checked against the hash the plan expects, or bytes in memory.
pub struct Weights {
    backing: Backing,
}

impl Weights {
    pub fn open(path: &Path, expected_hash: &str) -> Result<Weights, RuntimeError> {
        let bad = |m: String| RuntimeError::Weights(format!("{}: {m}", path.display()));
        let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("cannot map: {e}")))?;
        if map.len() < 16 || &map[..8] != MAGIC {
            return Err(bad("not a griffinc weights file".into()));
        }
        let header_len = u64::from_le_bytes(map[8..16].try_into().expect("8 bytes"));
        if 16 + header_len > map.len() as u64 {
            return Err(bad("truncated header".into()));
        }
        let header = std::str::from_utf8(&map[16..16 + header_len as usize])
            .map_err(|_| bad("header is not UTF-8".into()))?;
        let value: serde_json::Value =
            serde_json::from_str(header).map_err(|e| bad(format!("bad header: {e}")))?;
        let hash = value["hash"].as_str().unwrap_or_default();
        if hash != expected_hash {
            return Err(bad(format!(
                "weights were packed for another build (hash {hash}, this build expects {expected_hash})"
            )));
        }
        let bytes = value["bytes"].as_u64().unwrap_or(u64::MAX);
        let start = data_start(header_len);
        if start + bytes != map.len() as u64 {
            return Err(bad(format!(
                "truncated: {} bytes of weights, the header says {bytes}",
                (map.len() as u64).saturating_sub(start)
            )));
        }
        Ok(Weights {
            backing: Backing::Mapped {
                map,
                start: start as usize,
            },
        })
    }

    /// Weights packed in memory, laid out as in the file's data section.
    pub fn from_bytes(data: &[u8]) -> Weights {
        let mut lines = vec![Line([0; 64]); data.len().div_ceil(64)];
        for (line, chunk) in lines.iter_mut().zip(data.chunks(64)) {
            line.0[..chunk.len()].copy_from_slice(chunk);
        }
        Weights {
            backing: Backing::Owned {
                lines,
                len: data.len(),
            },
        }
    }

    /// Weights linked into the executable itself.
    pub fn from_static(data: &'static [u8]) -> Weights {
        Weights {
            backing: Backing::Static(data),
        }
    }

    /// All packed bytes (a GPU uploads them in one copy).
    pub fn bytes(&self) -> &[u8] {
        self.data()
    }

    fn data(&self) -> &[u8] {
        match &self.backing {
            Backing::Static(data) => data,
            Backing::Mapped { map, start } => &map[*start..],
            Backing::Owned { lines, len } => {
                // SAFETY: `Line` is 64 plain bytes; the vector holds at least `len` of them.
                unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u8, *len) }
            }
        }
    }

    /// The bytes of one weight; `None` if the range lies outside the data.
    pub fn slice(&self, offset: u64, bytes: u64) -> Option<&[u8]> {
        let a = offset as usize;
        self.data().get(a..a.checked_add(bytes as usize)?)
    }
}
