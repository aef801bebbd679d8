//! The xenvirtio driver side (filled by the frontend issue).
#![deny(missing_docs)]
