//! The module served through p11-kit's RPC: `p11-kit server --provider <module>` on a Unix socket,
//! and p11-kit's own client module (`p11-kit-client.so`) loaded here through `cryptoki`.
//!
//! p11-kit's RPC cannot carry the answer to a length query of CKA_ALLOWED_MECHANISMS (it sends the
//! count without the elements and then reads the elements anyway): the client got
//! `CKR_DEVICE_ERROR` for every key. Served by p11-kit the module leaves that attribute out, so
//! every attribute read through the client succeeds; loaded directly, the keys keep it.

use testkit as common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{gen_p256, module_path, public_point, sha256, verify_prehash, Token, TOKEN_LABEL};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType};

/// Where Debian and Ubuntu install p11-kit's client module.
const CLIENT_MODULES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib64/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
];

fn client_module() -> PathBuf {
    CLIENT_MODULES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect(
            "p11-kit-client.so not found (apt-get install p11-kit; scripts/setup.sh installs it)",
        )
}

/// `p11-kit server` in the foreground, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(root: &Path, config: &Path, socket: &Path) -> Server {
    let child = Command::new("p11-kit")
        .args(["server", "-f", "-n"])
        .arg(socket)
        .arg("--provider")
        .arg(module_path())
        .arg(format!("pkcs11:token={TOKEN_LABEL}"))
        .env("DEVICEKEY_CONFIG", config)
        .env("XDG_DATA_HOME", root.join("xdg-data"))
        .env("XDG_CONFIG_HOME", root.join("xdg-config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("p11-kit server (apt-get install p11-kit)");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "p11-kit server made no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

#[test]
fn allowed_mechanisms_direct_lists_the_signing_mechanisms() {
    let t = Token::new();
    let s = t.session();
    let (public, private) = gen_p256(&s, "direct", false);
    for (h, want) in [
        (private, MechanismType::ECDSA),
        (public, MechanismType::ECDSA),
    ] {
        let attrs = s
            .get_attributes(h, &[AttributeType::AllowedMechanisms])
            .expect("C_GetAttributeValue(CKA_ALLOWED_MECHANISMS)");
        match attrs.as_slice() {
            [Attribute::AllowedMechanisms(list)] => assert!(list.contains(&want), "{list:?}"),
            other => panic!("CKA_ALLOWED_MECHANISMS: {other:?}"),
        }
    }
}

#[test]
fn through_p11_kit_server_every_attribute_read_succeeds_and_signing_works() {
    let _guard = common::lock();
    let dir = tempfile::Builder::new()
        .prefix("devicekey-remoting-")
        .tempdir()
        .expect("tempdir");
    let config = common::write_config(dir.path());
    let socket = dir.path().join("p11-kit.sock");
    let _server = start_server(dir.path(), &config, &socket);

    // p11-kit-client.so reads the server's address from the environment at C_Initialize; no
    // other test here loads it.
    std::env::set_var(
        "P11_KIT_SERVER_ADDRESS",
        format!("unix:path={}", socket.display()),
    );
    let ctx = Pkcs11::new(client_module()).expect("load p11-kit-client.so");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("C_Initialize through the client");
    let slot = ctx
        .get_slots_with_token()
        .expect("C_GetSlotList through the client")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label() == TOKEN_LABEL)
                .unwrap_or(false)
        })
        .expect("our token, served by p11-kit");
    let s = ctx.open_rw_session(slot).expect("C_OpenSession");
    let (public, private) = gen_p256(&s, "remote", false);

    for h in [private, public] {
        // The length query alone: what pkcs11-tool -O and p11tool ask first.
        let info = s
            .get_attribute_info(h, &[AttributeType::AllowedMechanisms])
            .expect("length query of CKA_ALLOWED_MECHANISMS through p11-kit");
        assert!(
            matches!(info.as_slice(), [AttributeInfo::TypeInvalid]),
            "{info:?}"
        );
        // Everything pkcs11-tool -O reads, in one call.
        let attrs = s
            .get_attributes(
                h,
                &[
                    AttributeType::Class,
                    AttributeType::Label,
                    AttributeType::Id,
                    AttributeType::EcParams,
                    AttributeType::AllowedMechanisms,
                    AttributeType::UniqueId,
                ],
            )
            .expect("C_GetAttributeValue through p11-kit");
        assert!(
            attrs.contains(&Attribute::Label(b"remote".to_vec())),
            "{attrs:?}"
        );
        assert!(
            !attrs
                .iter()
                .any(|a| matches!(a, Attribute::AllowedMechanisms(_))),
            "{attrs:?}"
        );
    }

    let digest = sha256(b"signed through p11-kit's RPC");
    let sig = s
        .sign(&Mechanism::Ecdsa, private, &digest)
        .expect("C_Sign through p11-kit");
    assert!(verify_prehash(&public_point(&s, public), &digest, &sig));
    drop(s);
    ctx.finalize().expect("C_Finalize through the client");
}
