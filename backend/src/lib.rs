//! The xenvirtio device side (filled by the backend issue).
#![deny(missing_docs)]
