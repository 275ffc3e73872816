/* devicekey.h: vendor-defined PKCS#11 attributes and constants of libdevicekey_pkcs11.so.
 *
 * Every key object answers CKA_DEVICEKEY_PROTECTION_CLASS and CKA_DEVICEKEY_PURPOSE; keys in
 * a TPM also answer CKA_DEVICEKEY_TPM_PUBLIC_AREA.
 * The token's model string (CK_TOKEN_INFO.model) names the protection class of the slot.
 */
#ifndef DEVICEKEY_H
#define DEVICEKEY_H

/* CK_ULONG, read-only: how the key is protected. */
#define CKA_DEVICEKEY_PROTECTION_CLASS (CKA_VENDOR_DEFINED | 0x444B0001UL)
/* CK_ULONG, set in C_GenerateKeyPair's private-key template, fixed afterwards. */
#define CKA_DEVICEKEY_PURPOSE (CKA_VENDOR_DEFINED | 0x444B0002UL)
/* Byte array, read-only, on both halves of a key in a TPM (absent on other keys:
 * CKR_ATTRIBUTE_TYPE_INVALID): the key's marshalled TPMT_PUBLIC, without the TPM2B size. */
#define CKA_DEVICEKEY_TPM_PUBLIC_AREA (CKA_VENDOR_DEFINED | 0x444B0003UL)

#define DEVICEKEY_CLASS_HARDWARE_TPM 1UL
#define DEVICEKEY_CLASS_HARDWARE_SECURE_ENCLAVE 2UL
#define DEVICEKEY_CLASS_OS_PROTECTED_NONEXTRACTABLE 3UL

/* general: signs anything. proof: signs only canonical device-key proof payloads,
 * with CKM_ECDSA_SHA256; every other mechanism or input is refused. */
#define DEVICEKEY_PURPOSE_GENERAL 1UL
#define DEVICEKEY_PURPOSE_PROOF 2UL

/* CK_TOKEN_INFO.model, blank-padded to 16 characters. */
#define DEVICEKEY_MODEL_HARDWARE_TPM "hardware_tpm"
#define DEVICEKEY_MODEL_HARDWARE_SECURE_ENCLAVE "hardware_se"
#define DEVICEKEY_MODEL_OS_PROTECTED_NONEXTRACTABLE "os_protected"

#define DEVICEKEY_MANUFACTURER "devicekey"

#endif /* DEVICEKEY_H */
