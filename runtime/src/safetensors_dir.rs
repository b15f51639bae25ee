//! Reading tensors from a checkpoint folder (`model.safetensors`, or shards listed by
//! `model.safetensors.index.json`), for executables that pack their own weights.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::pack::{SourceDtype, TensorSource};

pub struct SafetensorsDir {
    maps: Vec<Mmap>,
    /// tensor name -> file index
    index: HashMap<String, usize>,
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<SafetensorsDir, String> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<String> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| format!("{}: {e}", index_path.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| format!("{}: {e}", index_path.display()))?;
            let map = json["weight_map"]
                .as_object()
                .ok_or_else(|| format!("{}: no weight_map", index_path.display()))?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            files.sort();
            files.dedup();
            files
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut maps = Vec::new();
        let mut index = HashMap::new();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(name);
            let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            // SAFETY: read-only mapping of a checkpoint file we do not modify.
            let map =
                unsafe { Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))?;
            let st = SafeTensors::deserialize(&map)
                .map_err(|e| format!("{}: not a valid safetensors file: {e:?}", path.display()))?;
            for n in st.names() {
                index.insert(n.to_string(), i);
            }
            maps.push(map);
        }
        Ok(SafetensorsDir { maps, index })
    }
}

impl TensorSource for SafetensorsDir {
    fn tensor_raw(&self, name: &str) -> Option<(SourceDtype, &[u8])> {
        let &i = self.index.get(name)?;
        let st = SafeTensors::deserialize(&self.maps[i]).ok()?;
        let t = st.tensor(name).ok()?;
        let dtype = match t.dtype() {
            Dtype::F32 => SourceDtype::F32,
            Dtype::BF16 => SourceDtype::Bf16,
            Dtype::F16 => SourceDtype::F16,
            _ => return None,
        };
        Some((dtype, t.data()))
    }

    fn tensor_f32(&self, name: &str) -> Result<Vec<f32>, String> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| format!("the checkpoint has no tensor `{name}`"))?;
        let st = SafeTensors::deserialize(&self.maps[i]).map_err(|e| format!("{e:?}"))?;
        let t = st.tensor(name).map_err(|e| format!("{e:?}"))?;
        let b = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => {
                return Err(format!(
                    "tensor `{name}` has dtype {other:?}, expected F32, BF16 or F16"
                ))
            }
        })
    }
}
