//! A `[[slot]]` with an option of another backend, seen through the module: `C_Initialize`
//! succeeds, that slot has no token (`CKR_TOKEN_NOT_PRESENT`) and the module logs the option and
//! the backend it belongs to; the other slot of the same config works.

use testkit as common;

use common::{gen_p256, Token};
use cryptoki::error::{Error, RvError};

#[test]
fn a_software_slot_with_tcti_has_no_token_and_the_log_names_tcti() {
    let mut t = Token::uninitialized();
    let root = t.root().to_path_buf();
    let log = root.join("module.log");
    // The module reads these once, at its first C_Initialize in this process (this test's).
    std::env::set_var("DEVICEKEY_LOG_FILE", &log);
    std::env::set_var("DEVICEKEY_LOG", "warn");
    std::fs::write(
        &t.config,
        format!(
            "[[slot]]\nlabel = \"soft\"\nbackend = \"software\"\ndir = \"{0}/a\"\ntcti = \"device:/dev/tpmrm0\"\n\n\
             [[slot]]\nlabel = \"good\"\nbackend = \"software\"\ndir = \"{0}/b\"\n",
            root.display()
        ),
    )
    .expect("config");
    t.initialize();

    let all = t.ctx.get_all_slots().expect("C_GetSlotList");
    assert_eq!(all.len(), 2, "both configured slots are listed");
    let description = t.ctx.get_slot_info(all[0]).expect("C_GetSlotInfo");
    assert!(
        description
            .slot_description()
            .contains("software slot soft"),
        "{}",
        description.slot_description()
    );
    match t.ctx.get_token_info(all[0]) {
        Err(Error::Pkcs11(RvError::TokenNotPresent, _)) => {}
        other => panic!("the broken slot answered {other:?}"),
    }
    assert_eq!(
        t.ctx.get_slots_with_token().expect("C_GetSlotList"),
        vec![all[1]],
        "only the good slot has a token"
    );
    assert!(
        !root.join("a").exists(),
        "the broken slot created its directory"
    );

    // The good slot works.
    let s = t.ctx.open_rw_session(all[1]).expect("C_OpenSession");
    gen_p256(&s, "works", true);
    drop(s);
    t.finalize();

    let text = std::fs::read_to_string(&log).expect("the module logged");
    let line = text
        .lines()
        .find(|l| l.contains("\"soft\""))
        .unwrap_or_else(|| panic!("no line about slot soft in:\n{text}"));
    assert!(line.contains("`tcti`"), "{line}");
    assert!(line.contains("backend = \"tpm\""), "{line}");
}
