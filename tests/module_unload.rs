//! The module stays mapped after a consumer unloads it: its fork handler and any helper thread
//! that outlives C_Finalize must never run in unmapped code.

use std::path::Path;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};

/// True when `/proc/self/maps` maps a file whose path is `path`.
fn mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let path = path.canonicalize().expect("module path");
    let path = path.to_string_lossy();
    maps.lines().any(|l| l.ends_with(path.as_ref()))
}

#[test]
fn the_module_is_linked_nodelete() {
    let out = std::process::Command::new("readelf")
        .arg("-d")
        .arg(testkit::module_path())
        .output()
        .expect("run readelf (binutils)");
    assert!(out.status.success());
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic
            .lines()
            .any(|l| l.contains("FLAGS_1") && l.contains("NODELETE")),
        "the module's FLAGS_1 lacks NODELETE:\n{dynamic}"
    );
}

#[test]
fn the_module_stays_mapped_after_dlclose_and_a_fork_after_it_is_safe() {
    let module = testkit::module_path();
    let _env = testkit::lock();
    let root = tempfile::tempdir().expect("temp dir");
    testkit::use_config(&testkit::write_config(root.path()));
    {
        let ctx = Pkcs11::new(&module).expect("load the module");
        ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .expect("C_Initialize");
        assert!(mapped(&module), "the module is mapped while loaded");
        ctx.finalize().expect("C_Finalize");
    } // dropping the context dlcloses the library
    assert!(
        mapped(&module),
        "dlclose unmapped the module; it must be linked -z nodelete"
    );
    // The module registered a fork handler; a fork after dlclose runs it.
    let status = std::process::Command::new("true")
        .status()
        .expect("fork and exec after dlclose");
    assert!(status.success());
}
