//! Base64 (RFC 4648, standard alphabet, padded), as busybox's `base64` writes and reads it:
//! the command channel carries commands and output as base64 in xenstore values.
//!
//! Decoding skips whitespace (a wrapped `base64` output decodes) and refuses anything else that
//! is not of the alphabet, or a bad length or padding.

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Encodes `data`, padded, on one line.
pub fn encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Why a text is not base64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not base64: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn value(c: u8) -> Option<u32> {
    ALPHABET.iter().position(|&a| a == c).map(|v| v as u32)
}

/// Decodes `text`, skipping whitespace.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let symbols: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if symbols.len() % 4 != 0 {
        return Err(DecodeError(format!(
            "{} symbols, not a multiple of 4",
            symbols.len()
        )));
    }
    let mut out = Vec::with_capacity(symbols.len() / 4 * 3);
    let quads = symbols.len() / 4;
    for (q, quad) in symbols.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return Err(DecodeError(format!("misplaced padding in group {q}")));
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            let v = value(c)
                .ok_or_else(|| DecodeError(format!("byte {c:#04x} is not in the alphabet")))?;
            n = (n << 6) | v;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vectors of RFC 4648, section 10.
    #[test]
    fn rfc4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(encode(plain.as_bytes()), coded);
            assert_eq!(decode(coded.as_bytes()).unwrap(), plain.as_bytes());
        }
    }

    #[test]
    fn every_byte_round_trips_and_wrapped_text_decodes() {
        let all: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
        for n in 0..all.len() {
            assert_eq!(decode(encode(&all[..n]).as_bytes()).unwrap(), &all[..n]);
        }
        let wrapped = "Zm9v\nYmFy\n";
        assert_eq!(decode(wrapped.as_bytes()).unwrap(), b"foobar");
    }

    #[test]
    fn bad_text_is_refused() {
        assert!(decode(b"Zm9").is_err());
        assert!(decode(b"Zm=v").is_err());
        assert!(decode(b"Zg==Zm9v").is_err());
        assert!(decode(b"Zm9*").is_err());
        assert!(decode(b"Z===").is_err());
    }
}
