//! The PKCS#11 client layer: how this crate uses *other* modules (and its own, from the server and
//! the CLI) through `cryptoki`.
//!
//! * [`registry`]: one initialized context per module per process (`CKR_CRYPTOKI_ALREADY_INITIALIZED`
//!   counts as success), fork-aware by process id; the only place that loads a module.
//! * [`token`]: tokens by label.
//! * [`pin`]: the user PIN from an environment variable or a file, never logged.
//! * [`pool`]: a token's logged-in session pool, with the one reconnect-and-retry rule.
//! * [`lock`]: the cross-process write lock of a token (key generation, object creation and
//!   deletion; never signing).
//! * [`error`]: the one error type, the one CK_RV formatter (`C_Sign returned CKR_...`) and the
//!   one classification of what a client recovers from.
//!
//! Its users: the pkcs11 key store (`backend::pkcs11`), `devicekey serve` (`rpc::client`), the
//! key tools (`cli`) and the benchmark.

pub mod error;
pub mod lock;
pub mod pin;
pub mod pool;
pub mod registry;
pub mod token;

pub use error::{describe, rv_name, Error, Kind, OpError, Recovery};
pub use pin::Pin;
pub use pool::{Conn, Token, TokenSpec};
pub use registry::{our_module_path, ModuleClient};
