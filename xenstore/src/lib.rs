//! Xenstore client and the xenbus layer.
#![deny(missing_docs)]
