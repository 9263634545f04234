//! A streaming decoder for `Transfer-Encoding: chunked` (RFC 9112 §7.1).
//!
//! It is fed bytes as they arrive, in pieces of any size, and either copies the payload out
//! (request bodies, which the proxy re-sends with a length) or only finds where the message ends
//! (responses passed through to the client as they are). Chunk extensions and trailers are
//! accepted and dropped. Sizes are bounded so a hostile peer cannot overflow a counter.

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of a chunk size.
    Size {
        digits: u8,
    },
    /// After the size: optional whitespace and `;ext` up to CR.
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerLine,
    TrailerLf,
    EndLf,
    Done,
}

/// Longest chunk-size line, extensions included, and longest trailer section.
const MAX_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes of the current chunk still to come (or the size being parsed).
    remaining: u64,
    line: usize,
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder::new()
    }
}

fn malformed(what: &str) -> Error {
    Error::bad_request(format!("malformed chunked body: {what}"))
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size { digits: 0 },
            remaining: 0,
            line: 0,
            trailers: 0,
        }
    }

    /// The final chunk and trailers have been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consume `input`; append the payload to `out` when given. Returns how many bytes of
    /// `input` belong to this message (less than `input.len()` only once it is done).
    pub fn feed(&mut self, input: &[u8], mut out: Option<&mut Vec<u8>>) -> Result<usize, Error> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if self.state == State::Data {
                let take =
                    (input.len() - i).min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
                if let Some(out) = out.as_deref_mut() {
                    out.extend_from_slice(&input[i..i + take]);
                }
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = self.step(b)?;
        }
        Ok(i)
    }

    fn step(&mut self, b: u8) -> Result<State, Error> {
        Ok(match self.state {
            State::Size { digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits >= 15 {
                        return Err(malformed("chunk size too large"));
                    }
                    let v = (b as char).to_digit(16).expect("hex digit") as u64;
                    self.remaining = self.remaining * 16 + v;
                    State::Size { digits: digits + 1 }
                }
                _ if digits == 0 => return Err(malformed("missing chunk size")),
                b'\r' => State::SizeLf,
                b';' | b' ' | b'\t' => {
                    self.line = 0;
                    State::Ext
                }
                _ => return Err(malformed("bad chunk size")),
            },
            State::Ext => {
                self.line += 1;
                if self.line > MAX_LINE {
                    return Err(malformed("chunk extension too long"));
                }
                match b {
                    b'\r' => State::SizeLf,
                    b'\n' => return Err(malformed("bare LF")),
                    _ => State::Ext,
                }
            }
            State::SizeLf => {
                if b != b'\n' {
                    return Err(malformed("expected LF after chunk size"));
                }
                if self.remaining == 0 {
                    State::TrailerStart
                } else {
                    State::Data
                }
            }
            State::Data => unreachable!("data is consumed in bulk"),
            State::DataCr => match b {
                b'\r' => State::DataLf,
                _ => return Err(malformed("expected CRLF after chunk data")),
            },
            State::DataLf => match b {
                b'\n' => {
                    self.remaining = 0;
                    State::Size { digits: 0 }
                }
                _ => return Err(malformed("expected LF after chunk data")),
            },
            State::TrailerStart => match b {
                b'\r' => State::EndLf,
                _ => self.trailer_byte()?,
            },
            State::TrailerLine => match b {
                b'\r' => State::TrailerLf,
                _ => self.trailer_byte()?,
            },
            State::TrailerLf => match b {
                b'\n' => State::TrailerStart,
                _ => return Err(malformed("expected LF after trailer")),
            },
            State::EndLf => match b {
                b'\n' => State::Done,
                _ => return Err(malformed("expected final LF")),
            },
            State::Done => State::Done,
        })
    }

    fn trailer_byte(&mut self) -> Result<State, Error> {
        self.trailers += 1;
        if self.trailers > MAX_TRAILERS {
            return Err(malformed("trailers too long"));
        }
        Ok(State::TrailerLine)
    }
}

/// Frame `data` as one chunk (`{hex}\r\n{data}\r\n`), for bodies re-encoded by the proxy.
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Result<(Vec<u8>, usize), Error> {
        let mut d = ChunkedDecoder::new();
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(piece) {
            used += d.feed(part, Some(&mut out))?;
            if d.is_done() {
                break;
            }
        }
        assert!(d.is_done(), "not done");
        Ok((out, used))
    }

    #[test]
    fn decodes_in_any_split() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        for piece in 1..body.len() {
            let (out, used) = decode_in_pieces(body, piece).unwrap();
            assert_eq!(out, b"hello world");
            assert_eq!(used, body.len() - 4, "piece {piece}");
        }
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            &b"x\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"fffffffffffffffff\r\n",
            b"5\nhello",
        ] {
            let mut d = ChunkedDecoder::new();
            assert!(
                d.feed(bad, None).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn encode_roundtrip() {
        let mut wire = Vec::new();
        encode_chunk(&mut wire, b"abc");
        encode_chunk(&mut wire, b"");
        wire.extend_from_slice(LAST_CHUNK);
        let (out, _) = decode_in_pieces(&wire, 3).unwrap();
        assert_eq!(out, b"abc");
    }
}
