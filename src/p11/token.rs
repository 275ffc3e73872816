//! Tokens of a module: listing them with their info, and finding one by label (never by slot id,
//! which may change between runs).

use cryptoki::slot::{Slot, TokenInfo};

use super::error::{describe, Error, Kind};
use super::registry::ModuleClient;

/// One token found in a module.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// The slot holding it (valid in this process, for now).
    pub slot: Slot,
    /// CK_TOKEN_INFO.label, trimmed.
    pub label: String,
    /// The whole CK_TOKEN_INFO.
    pub info: TokenInfo,
}

/// Every initialized token of the module; a token whose info cannot be read is skipped with a
/// log line.
pub fn tokens(client: &ModuleClient) -> Result<Vec<TokenEntry>, Error> {
    let module = client.path().display().to_string();
    let slots = client
        .context()
        .get_slots_with_initialized_token()
        .map_err(|e| Error::from_ck(&e, &format!("C_GetSlotList of {module}")))?;
    let mut out = Vec::new();
    for slot in slots {
        match client.context().get_token_info(slot) {
            Ok(info) => out.push(TokenEntry {
                slot,
                label: info.label().trim_end().to_string(),
                info,
            }),
            Err(e) => log::warn!(
                "{module}: token info of slot {}: {}",
                slot.id(),
                describe(&e)
            ),
        }
    }
    Ok(out)
}

/// The slot holding the one token labelled `want`, and its info.
///
/// Errors: `NotFound` when no token has that label (the message lists the labels there),
/// `Unusable` when several do, or the module's own error from C_GetSlotList.
pub fn find_by_label(client: &ModuleClient, want: &str) -> Result<(Slot, TokenInfo), Error> {
    let module = client.path().display().to_string();
    let slots = client.context().get_slots_with_token().map_err(|e| {
        Error::from_ck(&e, &format!("C_GetSlotList of {module}"))
            .with_fix("check that the device behind the module is connected and reachable")
    })?;
    let mut found = Vec::new();
    let mut labels = Vec::new();
    for slot in slots {
        match client.context().get_token_info(slot) {
            Ok(info) => {
                let label = info.label().trim_end().to_string();
                if label == want {
                    found.push((slot, info));
                } else if !label.is_empty() {
                    labels.push(label);
                }
            }
            Err(e) => log::debug!("slot {} of {module}: {}", slot.id(), describe(&e)),
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::new(
            Kind::NotFound,
            format!(
                "no token labelled '{want}' in {module} (tokens there: {})",
                if labels.is_empty() { "none".to_string() } else { labels.join(", ") }
            ),
            format!(
                "correct `token` in the slot, or create the token (SoftHSM: softhsm2-util --init-token --free --label {want})"
            ),
        )),
        n => Err(Error::new(
            Kind::Unusable,
            format!("{n} tokens labelled '{want}' in {module}; refusing to guess"),
            "give each token a unique label",
        )),
    }
}
