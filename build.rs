//! Link flags of the PKCS#11 module.
//!
//! On ELF targets the module is linked `-z nodelete`: a `dlclose` by a consumer leaves it mapped.
//! The module starts threads that can outlive C_Finalize (a wait for another process's token lock
//! ends on its own, up to 10 s later) and registers a fork handler; unmapping the code under
//! either would crash the consumer. p11-kit, NSS and OpenSSL all dlclose modules they are done with.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" || os == "freebsd" {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
}
