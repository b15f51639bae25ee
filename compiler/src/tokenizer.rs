//! Text to token ids and back, with `tokenizer.json` from the model folder.

use std::path::Path;

use crate::error::ModelError;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json`; `bos` is the model's BOS id.
    pub fn load(dir: &Path, bos: u32) -> Result<TextTokenizer, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(ModelError::Tokenizer {
                path,
                message: "no such file (pass token ids with --ids instead)".into(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.clone(),
            message: e.to_string().replace('\n', " "),
        })?;
        Ok(TextTokenizer { inner, bos })
    }

    /// Token ids of `text` with BOS first, as the reference tokenizer produces them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self.inner.encode(text, true).map_err(|e| e.to_string())?;
        let mut ids = encoding.get_ids().to_vec();
        // Tokenizers whose post-processor does not add BOS still get it: the model was
        // trained with it in front of every document.
        if ids.first() != Some(&self.bos) {
            ids.insert(0, self.bos);
        }
        Ok(ids)
    }

    /// Token ids of a text that continues a document: no BOS.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, String> {
        let encoding = self.inner.encode(text, false).map_err(|e| e.to_string())?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The id of a token written as text (`<end_of_turn>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Text of `ids`, with BOS, EOS and padding left out. Other special tokens stay: Gemma-style
    /// tokenizers mark the byte-fallback pieces `<0x..>` special, and they are text.
    pub fn decode(&self, ids: &[u32], control: &[u32]) -> Result<String, String> {
        let kept: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|id| !control.contains(id))
            .collect();
        self.inner.decode(&kept, false).map_err(|e| e.to_string())
    }
}
