//! A checkpoint folder: config, memory-mapped safetensors (one file or shards), validated
//! against the config before anything is traced.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use griffin_ir::{DType, ValueType};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::Config;
use crate::error::ModelError;

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor's bytes lie.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: DType,
    pub shape: Vec<usize>,
    file: usize,
    /// Byte range within the file's mapping.
    start: usize,
    end: usize,
}

struct WeightFile {
    name: String,
    map: Mmap,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    files: Vec<WeightFile>,
    tensors: BTreeMap<String, TensorEntry>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

fn map_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// A tensor as a file header lists it: name, dtype, shape, byte range in the file.
type HeaderEntry = (String, Dtype, Vec<usize>, usize, usize);

/// Maps one safetensors file and reads its header; the header is checked against the file's
/// length, so a truncated file or an oversized header length is caught here.
fn open_safetensors(path: &Path) -> Result<(Mmap, Vec<HeaderEntry>), ModelError> {
    let bad = |message: String| ModelError::BadSafetensors {
        file: path.to_path_buf(),
        message,
    };
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if len < 8 {
        return Err(bad(format!(
            "{len} bytes is shorter than the 8-byte header length"
        )));
    }
    // SAFETY: the mapping is read-only; a checkpoint modified while it is mapped is outside
    // what we support, as for every engine that maps its weights.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let declared = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    if declared > len - 8 {
        return Err(bad(format!(
            "header length {declared} is larger than the {} bytes after it (truncated file?)",
            len - 8
        )));
    }
    let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
        bad(match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                "tensor data does not match the file length (truncated file?)".to_string()
            }
            other => format!("{other:?}"),
        })
    })?;
    let data_start = 8 + header_len;
    let mut tensors: Vec<_> = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let (s, e) = info.data_offsets;
            (
                name,
                info.dtype,
                info.shape.clone(),
                data_start + s,
                data_start + e,
            )
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((map, tensors))
}

impl Checkpoint {
    /// Opens and validates a checkpoint folder.
    pub fn open(dir: &Path) -> Result<Checkpoint, ModelError> {
        let config = Config::load(dir)?;
        let mut checkpoint = Checkpoint {
            dir: dir.to_path_buf(),
            config,
            files: Vec::new(),
            tensors: BTreeMap::new(),
        };
        let index_path = dir.join(INDEX_FILE);
        if index_path.is_file() {
            checkpoint.load_sharded(&index_path)?;
        } else if dir.join(SINGLE_FILE).is_file() {
            checkpoint.load_file(SINGLE_FILE, None)?;
        } else {
            return Err(ModelError::NoWeights(dir.to_path_buf()));
        }
        checkpoint.validate()?;
        Ok(checkpoint)
    }

    fn load_sharded(&mut self, index_path: &Path) -> Result<(), ModelError> {
        let text = std::fs::read_to_string(index_path).map_err(|source| ModelError::Io {
            path: index_path.to_path_buf(),
            source,
        })?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::BadIndex(format!("invalid JSON: {e}")))?;
        let Some(map) = index.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(ModelError::BadIndex("no `weight_map` object".into()));
        };
        let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, file) in map {
            let Some(file) = file.as_str() else {
                return Err(ModelError::BadIndex(format!(
                    "`{name}` maps to {file}, not a file name"
                )));
            };
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(ModelError::BadIndex(format!(
                    "shard name {file:?} is not a plain file name"
                )));
            }
            by_file
                .entry(file.to_string())
                .or_default()
                .push(name.clone());
        }
        for (file, names) in by_file {
            if !self.dir.join(&file).is_file() {
                return Err(ModelError::MissingShard(self.dir.join(&file)));
            }
            self.load_file(&file, Some(&names))?;
        }
        Ok(())
    }

    /// Maps `file` and records its tensors; with `indexed`, each of those names must be in it.
    fn load_file(&mut self, file: &str, indexed: Option<&[String]>) -> Result<(), ModelError> {
        let (map, entries) = open_safetensors(&self.dir.join(file))?;
        let file_index = self.files.len();
        for (name, dtype, shape, start, end) in entries {
            let Some(dtype) = map_dtype(dtype) else {
                return Err(ModelError::WrongDtype {
                    name,
                    found: format!("{dtype:?}"),
                });
            };
            if let Some(previous) = self.tensors.get(&name) {
                return Err(ModelError::DuplicateTensor {
                    name,
                    first: self.files[previous.file].name.clone(),
                    second: file.to_string(),
                });
            }
            self.tensors.insert(
                name,
                TensorEntry {
                    dtype,
                    shape,
                    file: file_index,
                    start,
                    end,
                },
            );
        }
        if let Some(names) = indexed {
            for name in names {
                if self.tensors.get(name).map(|t| t.file) != Some(file_index) {
                    return Err(ModelError::NotInShard {
                        name: name.clone(),
                        file: file.to_string(),
                    });
                }
            }
        }
        self.files.push(WeightFile {
            name: file.to_string(),
            map,
        });
        Ok(())
    }

    /// Every expected tensor present with its shape; nothing else present.
    fn validate(&self) -> Result<(), ModelError> {
        let expected = self.config.expected_tensors();
        for (name, shape) in &expected {
            let Some(entry) = self.tensors.get(name) else {
                return Err(ModelError::MissingTensor(name.clone()));
            };
            if entry.shape != *shape {
                return Err(ModelError::WrongShape {
                    name: name.clone(),
                    found: entry.shape.clone(),
                    expected: shape.clone(),
                });
            }
        }
        let expected: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        if let Some((name, entry)) = self
            .tensors
            .iter()
            .find(|(n, _)| !expected.contains(n.as_str()))
        {
            return Err(ModelError::UnexpectedTensor {
                name: name.clone(),
                file: self
                    .files
                    .get(entry.file)
                    .map_or_else(|| "?".into(), |f| f.name.clone()),
            });
        }
        Ok(())
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// The IR type of a stored tensor.
    pub fn value_type(&self, name: &str) -> Option<ValueType> {
        self.tensors.get(name).map(|e| {
            ValueType::new(
                e.dtype,
                e.shape.iter().map(|&n| n.into()).collect::<Vec<_>>(),
            )
        })
    }

    /// The raw little-endian bytes of a tensor, straight from the mapping.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let e = self.tensors.get(name)?;
        Some(&self.files[e.file].map[e.start..e.end])
    }

    /// A tensor widened to f32 (exact for every supported dtype).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let entry = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor(name.to_string()))?;
        let bytes = &self.files[entry.file].map[entry.start..entry.end];
        Ok(widen_to_f32(entry.dtype, bytes))
    }
}

/// Little-endian f32, bf16 or f16 bytes as f32 values.
pub fn widen_to_f32(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        other => unreachable!("checkpoints hold only float tensors, not {other}"),
    }
}

impl griffin_runtime::pack::TensorSource for Checkpoint {
    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, String> {
        Checkpoint::tensor_f32(self, name).map_err(|e| e.to_string())
    }

    fn tensor_raw(&self, name: &str) -> Option<(griffin_runtime::pack::SourceDtype, &[u8])> {
        use griffin_runtime::pack::SourceDtype;
        let entry = self.tensors.get(name)?;
        let dtype = match entry.dtype {
            DType::F32 => SourceDtype::F32,
            DType::BF16 => SourceDtype::Bf16,
            DType::F16 => SourceDtype::F16,
            _ => return None,
        };
        Some((dtype, &self.files[entry.file].map[entry.start..entry.end]))
    }
}
/// Writes `config_json` and a `model.safetensors` of bf16 zeros for it into `dir`, as a
/// header followed by a hole as long as the weights (no disk, no time): a checkpoint of a
/// published shape for shape tests and estimates, where no weights come with the config.
/// Returns the weights' bytes.
pub fn write_zero_checkpoint(dir: &Path, config_json: &str) -> Result<u64, ModelError> {
    use std::io::Write;
    let config = Config::from_json(config_json)?;
    let io = |path: PathBuf| move |source| ModelError::Io { path, source };
    std::fs::write(dir.join("config.json"), config_json).map_err(io(dir.join("config.json")))?;
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in config.expected_tensors() {
        let bytes = 2 * shape.iter().product::<usize>() as u64;
        let entry = serde_json::json!({
            "dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes],
        });
        header.insert(name, entry);
        offset += bytes;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut f = File::create(&path).map_err(io(path.clone()))?;
    f.write_all(&(text.len() as u64).to_le_bytes())
        .and_then(|()| f.write_all(text.as_bytes()))
        .and_then(|()| f.set_len(8 + text.len() as u64 + offset))
        .map_err(io(path))?;
    Ok(offset)
}
