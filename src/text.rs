//! Streaming text → token windows: files are read in bounded chunks cut at line ends, tokenized chunk by chunk
//! and packed into fixed-length windows, so a corpus is never held in memory whole.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

/// Bytes of text tokenized at a time.
const CHUNK_BYTES: usize = 256 * 1024;

pub struct TokenWindows<'t> {
    tokenizer: &'t Tokenizer,
    files: Vec<PathBuf>,
    file_idx: usize,
    reader: Option<BufReader<std::fs::File>>,
    pending: Vec<u32>,
    seq_len: usize,
    remaining: usize,
}

impl<'t> TokenWindows<'t> {
    /// Windows of `seq_len` tokens (the last may be shorter) over `files` in order, `max_tokens` in all.
    pub fn new(tokenizer: &'t Tokenizer, files: &[PathBuf], seq_len: usize, max_tokens: usize) -> Self {
        TokenWindows {
            tokenizer,
            files: files.to_vec(),
            file_idx: 0,
            reader: None,
            pending: Vec::new(),
            seq_len: seq_len.max(1),
            remaining: max_tokens,
        }
    }

    /// Read and tokenize the next chunk; `Ok(false)` when every file is exhausted.
    fn refill(&mut self) -> anyhow::Result<bool> {
        loop {
            if self.reader.is_none() {
                let Some(path) = self.files.get(self.file_idx) else { return Ok(false) };
                let f = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                self.reader = Some(BufReader::new(f));
            }
            let path = self.files[self.file_idx].clone();
            let mut chunk = Vec::with_capacity(CHUNK_BYTES + 1024);
            if let Some(r) = self.reader.as_mut() {
                while chunk.len() < CHUNK_BYTES {
                    let n = r.read_until(b'\n', &mut chunk).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                }
            }
            if chunk.is_empty() {
                self.reader = None;
                self.file_idx += 1;
                continue;
            }
            let text = decode_utf8(&chunk, &path)?;
            let enc = self
                .tokenizer
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", path.display()))?;
            self.pending.extend_from_slice(enc.get_ids());
            return Ok(true);
        }
    }

    /// The next window, `None` at the end of the text or once `max_tokens` were handed out.
    pub fn next_window(&mut self) -> anyhow::Result<Option<Vec<u32>>> {
        while self.remaining > 0 && self.pending.len() < self.seq_len.min(self.remaining) {
            if !self.refill()? {
                break;
            }
        }
        let n = self.pending.len().min(self.seq_len).min(self.remaining);
        if n == 0 {
            return Ok(None);
        }
        self.remaining -= n;
        Ok(Some(self.pending.drain(..n).collect()))
    }
}

fn decode_utf8<'a>(bytes: &'a [u8], path: &Path) -> anyhow::Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (invalid byte near offset {} of a chunk)", path.display(), e.valid_up_to()))
}
