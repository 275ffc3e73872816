//! token (in progress).
