//! Our vendor-defined PKCS#11 attributes and constants; mirrored in `pkcs11-headers/devicekey.h`.

/// `CKA_VENDOR_DEFINED | 0x444B0001`: the protection class of a key (CK_ULONG, read-only).
pub const CKA_DEVICEKEY_PROTECTION_CLASS: u64 = 0x8000_0000 | 0x444B_0001;
/// `CKA_VENDOR_DEFINED | 0x444B0002`: the purpose of a key (CK_ULONG, fixed at creation).
pub const CKA_DEVICEKEY_PURPOSE: u64 = 0x8000_0000 | 0x444B_0002;
/// `CKA_VENDOR_DEFINED | 0x444B0003`: the TPM public area of a key in a TPM (byte array: the
/// marshalled TPMT_PUBLIC, no size prefix; read-only; absent on other keys).
pub const CKA_DEVICEKEY_TPM_PUBLIC_AREA: u64 = 0x8000_0000 | 0x444B_0003;

/// Protection class `hardware_tpm`.
pub const DEVICEKEY_CLASS_HARDWARE_TPM: u64 = 1;
/// Protection class `hardware_secure_enclave`.
pub const DEVICEKEY_CLASS_HARDWARE_SECURE_ENCLAVE: u64 = 2;
/// Protection class `os_protected_nonextractable`.
pub const DEVICEKEY_CLASS_OS_PROTECTED_NONEXTRACTABLE: u64 = 3;

/// Purpose `general`: signs anything.
pub const DEVICEKEY_PURPOSE_GENERAL: u64 = 1;
/// Purpose `proof`: signs only canonical device-key proof payloads with CKM_ECDSA_SHA256.
pub const DEVICEKEY_PURPOSE_PROOF: u64 = 2;

/// Token model string of a `hardware_tpm` slot.
pub const DEVICEKEY_MODEL_HARDWARE_TPM: &str = "hardware_tpm";
/// Token model string of a `hardware_secure_enclave` slot.
pub const DEVICEKEY_MODEL_HARDWARE_SECURE_ENCLAVE: &str = "hardware_se";
/// Token model string of an `os_protected_nonextractable` slot.
pub const DEVICEKEY_MODEL_OS_PROTECTED_NONEXTRACTABLE: &str = "os_protected";

/// Token manufacturer string of every devicekey token.
pub const DEVICEKEY_MANUFACTURER: &str = "devicekey";
