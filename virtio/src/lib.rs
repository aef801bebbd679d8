//! Virtio wire formats shared by both ends of xenvirtio.
#![deny(missing_docs)]
