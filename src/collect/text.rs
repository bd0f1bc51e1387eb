//! Calibration text as a token stream: files read in bounded chunks cut at line (else whitespace, else
//! character) boundaries and tokenized chunk by chunk, restartable at a recorded [`TextPos`].

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// Bytes of text read (at most) per tokenizer call.
pub const DEFAULT_CHUNK_BYTES: usize = 256 * 1024;

/// A place in the concatenated calibration text where the token stream can restart: the chunk of file `source`
/// that starts at byte `offset`, after its first `skip` tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TextPos {
    pub source: usize,
    pub offset: u64,
    pub skip: usize,
}

/// Check a text file exists, is not empty, and starts as UTF-8 text (no NUL bytes); return its size.
pub(super) fn sniff_text(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(path, "not a regular file"));
    }
    if meta.len() == 0 {
        return Err(Error::format(path, "empty text file (0 bytes)"));
    }
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = read_full(&mut f, &mut buf).map_err(|e| Error::io(path, e))?;
    check_text(path, &buf[..n], 0, n < buf.len())?;
    Ok(meta.len())
}

/// `bytes` (read from `offset`) must hold no NUL and be valid UTF-8, except for a character cut at the end when
/// the file goes on.
fn check_text(path: &Path, bytes: &[u8], offset: u64, at_eof: bool) -> Result<()> {
    if let Some(i) = bytes.iter().position(|&b| b == 0) {
        return Err(Error::format(path, format!("binary file, not text (NUL byte at offset {})", offset + i as u64)));
    }
    if let Err(e) = std::str::from_utf8(bytes) {
        let cut_char = e.error_len().is_none() && !at_eof;
        if !cut_char {
            return Err(Error::format(
                path,
                format!("not UTF-8 text (invalid byte at offset {})", offset + e.valid_up_to() as u64),
            ));
        }
    }
    Ok(())
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Tokens of the concatenated text files, read and tokenized a chunk at a time. Chunk boundaries depend only on
/// the file's bytes from the chunk's start, so restarting at a recorded [`TextPos`] yields the same tokens.
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    sources: Vec<PathBuf>,
    chunk_bytes: usize,
    /// Start of the current chunk; `skip` is the index of the next token in `buf`.
    pos: TextPos,
    buf: Vec<u32>,
    next_offset: u64,
    loaded: bool,
}

impl<'a> TokenStream<'a> {
    pub fn new(tok: &'a Tokenizer, sources: Vec<PathBuf>, chunk_bytes: usize, start: TextPos) -> Result<Self> {
        Ok(TokenStream { tok, sources, chunk_bytes: chunk_bytes.max(16), pos: start, buf: Vec::new(), next_offset: 0, loaded: false })
    }

    /// Where the next token comes from.
    pub fn pos(&self) -> TextPos {
        self.pos
    }

    pub fn next_token(&mut self) -> Result<Option<u32>> {
        loop {
            if self.pos.source >= self.sources.len() {
                return Ok(None);
            }
            if !self.loaded {
                self.load_chunk()?;
            }
            if self.pos.skip < self.buf.len() {
                let t = self.buf[self.pos.skip];
                self.pos.skip += 1;
                return Ok(Some(t));
            }
            // Chunk used up: move to the next one (or the next file).
            let path = &self.sources[self.pos.source];
            let len = std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
            if self.next_offset >= len {
                self.pos = TextPos { source: self.pos.source + 1, offset: 0, skip: 0 };
            } else {
                self.pos = TextPos { source: self.pos.source, offset: self.next_offset, skip: 0 };
            }
            self.loaded = false;
        }
    }

    fn load_chunk(&mut self) -> Result<()> {
        let path = self.sources[self.pos.source].clone();
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        f.seek(SeekFrom::Start(self.pos.offset)).map_err(|e| Error::io(&path, e))?;
        let mut buf = vec![0u8; self.chunk_bytes];
        let n = read_full(&mut f, &mut buf).map_err(|e| Error::io(&path, e))?;
        buf.truncate(n);
        let at_eof = self.pos.offset + n as u64 >= len;
        check_text(&path, &buf, self.pos.offset, at_eof)?;
        let cut = if at_eof { n } else { cut_point(&buf) };
        let text = std::str::from_utf8(&buf[..cut]).map_err(|e| {
            Error::format(&path, format!("not UTF-8 text (invalid byte at offset {})", self.pos.offset + e.valid_up_to() as u64))
        })?;
        let enc = self
            .tok
            .encode(text, false)
            .map_err(|e| Error::format(&path, format!("tokenization failed at offset {}: {e}", self.pos.offset)))?;
        self.buf = enc.get_ids().to_vec();
        self.next_offset = self.pos.offset + cut as u64;
        self.loaded = true;
        Ok(())
    }
}

/// Where to cut a chunk that is not the end of the file: after its last newline, else after its last ASCII
/// whitespace, else at its last character boundary. Never 0 for a chunk of 16 bytes or more.
fn cut_point(buf: &[u8]) -> usize {
    if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
        if i > 0 {
            return i + 1;
        }
    }
    if let Some(i) = buf.iter().rposition(|b| b.is_ascii_whitespace()) {
        if i > 0 {
            return i + 1;
        }
    }
    match std::str::from_utf8(buf) {
        Ok(_) => buf.len(),
        Err(e) => e.valid_up_to().max(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_prefers_newline_then_space() {
        assert_eq!(cut_point(b"ab\ncd ef"), 3);
        assert_eq!(cut_point(b"abcd ef"), 5);
        assert_eq!(cut_point("abé".as_bytes()), 4);
        assert_eq!(cut_point(&"abé".as_bytes()[..3]), 2);
    }

    #[test]
    fn binary_and_bad_utf8_are_refused() {
        let p = Path::new("x.txt");
        assert!(check_text(p, b"ab\0c", 0, true).unwrap_err().to_string().contains("NUL byte at offset 2"));
        assert!(check_text(p, b"ab\xffc", 10, true).unwrap_err().to_string().contains("offset 12"));
        // A character cut by the chunk end is fine when the file goes on.
        assert!(check_text(p, &"é".as_bytes()[..1], 0, false).is_ok());
    }
}
