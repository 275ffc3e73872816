//! The program that loaded the module, where it changes what the token shows.
//!
//! p11-kit's RPC (`p11-kit server`, `p11-kit remote`, and `remote:` lines of p11-kit module
//! files) serves the module from its `p11-kit-remote` program, and it cannot carry the answer to a
//! length query (`pValue` NULL) of a CK_MECHANISM_TYPE-array attribute: the server side writes the
//! element count and no elements, and the client side reads that many elements anyway, runs past
//! the attribute, and reports `CKR_DEVICE_ERROR` (p11-kit 0.24 to 0.26, `rpc-message.c`). Every
//! reader that asks for the size first (pkcs11-tool, p11tool) then fails on
//! CKA_ALLOWED_MECHANISMS. Inside that program the key objects therefore have no
//! CKA_ALLOWED_MECHANISMS (`CKR_ATTRIBUTE_TYPE_INVALID`, which p11-kit carries and readers accept);
//! everywhere else they have it. What a key may do is enforced at C_SignInit either way.

use std::ffi::OsStr;
use std::sync::OnceLock;

/// The executables of p11-kit's RPC server side.
const P11_KIT_RPC_PROGRAMS: &[&str] = &["p11-kit-remote", "p11-kit-server"];

/// True when `name` (an executable's file name) is p11-kit's RPC server side.
pub fn is_p11_kit_rpc_program(name: &OsStr) -> bool {
    P11_KIT_RPC_PROGRAMS.iter().any(|p| name == OsStr::new(p))
}

/// True when this process is p11-kit's RPC server side (decided once per process).
pub fn hosted_by_p11_kit_rpc() -> bool {
    static HOSTED: OnceLock<bool> = OnceLock::new();
    *HOSTED.get_or_init(|| {
        let hosted = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.file_name().map(is_p11_kit_rpc_program))
            .unwrap_or(false);
        if hosted {
            log::info!(
                "served through p11-kit's RPC: key objects carry no CKA_ALLOWED_MECHANISMS (p11-kit cannot carry its length query)"
            );
        }
        hosted
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_p11_kit_rpc_programs_count() {
        assert!(is_p11_kit_rpc_program(OsStr::new("p11-kit-remote")));
        assert!(is_p11_kit_rpc_program(OsStr::new("p11-kit-server")));
        for other in [
            "p11-kit",
            "pkcs11-tool",
            "p11-kit-remote.sh",
            "ssh-pkcs11-helper",
            "",
        ] {
            assert!(!is_p11_kit_rpc_program(OsStr::new(other)), "{other}");
        }
    }

    #[test]
    fn the_test_runner_is_not_a_p11_kit_host() {
        assert!(!hosted_by_p11_kit_rpc());
    }
}
