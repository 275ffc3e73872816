//! pkcs11 (in progress).
