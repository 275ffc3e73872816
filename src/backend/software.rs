//! The software key store (in progress).
