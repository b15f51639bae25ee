//! Streaming decoded text as tokens come: pieces are held back until they decode to whole
//! characters (byte-fallback tokens), and each piece is decoded after the last one printed, so
//! decoders that treat the start of a text specially (a leading space stripped) give the same
//! text as one decode of everything.

use tokenizers::Tokenizer;

pub struct TextStream<'t> {
    tokenizer: &'t Tokenizer,
    /// BOS, EOS, padding: never printed.
    control: Vec<u32>,
    pending: Vec<u32>,
    context: Option<u32>,
}

/// Pieces that still do not form whole characters after this many tokens are printed anyway.
const MAX_PENDING: usize = 8;

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t Tokenizer, control: &[u32]) -> TextStream<'t> {
        TextStream {
            tokenizer,
            control: control.to_vec(),
            pending: Vec::with_capacity(MAX_PENDING),
            context: None,
        }
    }

    fn decode(&self) -> Result<String, String> {
        let decode = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, false)
                .map_err(|e| format!("cannot decode: {e}"))
        };
        match self.context {
            None => decode(&self.pending),
            Some(c) => {
                let mut with = Vec::with_capacity(self.pending.len() + 1);
                with.push(c);
                with.extend_from_slice(&self.pending);
                let (full, before) = (decode(&with)?, decode(&[c])?);
                Ok(match full.strip_prefix(before.as_str()) {
                    Some(rest) => rest.to_string(),
                    None => full,
                })
            }
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String, String> {
        if self.control.contains(&id) {
            return Ok(String::new());
        }
        self.pending.push(id);
        let text = self.decode()?;
        if text.ends_with('\u{FFFD}') && self.pending.len() < MAX_PENDING {
            return Ok(String::new());
        }
        self.context = self.pending.last().copied();
        self.pending.clear();
        Ok(text)
    }

    /// Whatever is still held back.
    pub fn finish(&mut self) -> Result<String, String> {
        if self.pending.is_empty() {
            return Ok(String::new());
        }
        let text = self.decode()?;
        self.context = self.pending.last().copied();
        self.pending.clear();
        Ok(text)
    }
}

/// Cuts streamed text at the first stop string: text that could be the start of a stop string
/// is held back until it is known not to be.
pub struct StopScanner {
    stops: Vec<String>,
    held: String,
    longest: usize,
}

impl StopScanner {
    pub fn new(stops: &[String]) -> StopScanner {
        StopScanner {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
            longest: stops.iter().map(|s| s.len()).max().unwrap_or(0),
        }
    }

    /// Adds text; returns what can be printed now, and whether a stop string was reached (the
    /// text is then cut before it).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the last `longest - 1` bytes (on a character boundary): a stop may start there.
        let mut keep_from = self
            .held
            .len()
            .saturating_sub(self.longest.saturating_sub(1));
        while !self.held.is_char_boundary(keep_from) {
            keep_from -= 1;
        }
        let out = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        (out, false)
    }

    /// What is still held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::StopScanner;

    #[test]
    fn stops_across_pieces_and_holds_back_only_what_may_start_a_stop() {
        let mut s = StopScanner::new(&["<end>".to_string()]);
        assert_eq!(s.push("hello wor"), ("hello".to_string(), false));
        assert_eq!(s.push("ld <e"), (" worl".to_string(), false));
        assert_eq!(s.push("nd> more"), ("d ".to_string(), true));
        let mut none = StopScanner::new(&[]);
        assert_eq!(none.push("abc"), ("abc".to_string(), false));
        let mut wide = StopScanner::new(&["zz".to_string()]);
        assert_eq!(wide.push("aé"), ("a".to_string(), false));
        assert_eq!(wide.finish(), "é");
    }
}
