//! Fixed-length token windows over streamed text (for calibration), built on collect's [`TokenStream`], which
//! reads files in bounded chunks cut at line ends and tokenizes chunk by chunk.

use std::path::PathBuf;

use tokenizers::Tokenizer;

use crate::collect::{TextPos, TokenStream, DEFAULT_CHUNK_BYTES};
use crate::error::Result;

pub struct TokenWindows<'t> {
    stream: TokenStream<'t>,
    seq_len: usize,
    remaining: usize,
}

impl<'t> TokenWindows<'t> {
    /// Windows of `seq_len` tokens (the last may be shorter) over `files` in order, `max_tokens` in all.
    pub fn new(tokenizer: &'t Tokenizer, files: &[PathBuf], seq_len: usize, max_tokens: usize) -> Result<Self> {
        let stream = TokenStream::new(tokenizer, files.to_vec(), DEFAULT_CHUNK_BYTES, TextPos::default())?;
        Ok(TokenWindows { stream, seq_len: seq_len.max(1), remaining: max_tokens })
    }

    /// The next window, `None` at the end of the text or once `max_tokens` were handed out.
    pub fn next_window(&mut self) -> Result<Option<Vec<u32>>> {
        let mut w = Vec::with_capacity(self.seq_len.min(self.remaining));
        while w.len() < self.seq_len && self.remaining > 0 {
            match self.stream.next_token()? {
                Some(t) => {
                    w.push(t);
                    self.remaining -= 1;
                }
                None => break,
            }
        }
        Ok((!w.is_empty()).then_some(w))
    }
}
