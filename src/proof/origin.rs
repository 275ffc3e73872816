//! The `targetOrigin` check: a small, strict origin parser (no URL crate needed).
//!
//! Accepted: `scheme "://" host [":" port] ["/"]`, nothing else: no user info, no path other than
//! `/`, no query, no fragment, no whitespace or backslashes. The scheme and host compare without
//! case. `https` may name a configured host or one of its subdomains, `localhost`, or a loopback
//! IP; `http` only `localhost` or a loopback IP.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The host part of an origin.
#[derive(Debug, PartialEq, Eq)]
enum Host {
    Domain(String),
    V4(Ipv4Addr),
    V6(Ipv6Addr),
}

/// True when `origin` may receive a signed proof under `allowed_hosts`.
pub fn is_allowed_origin(origin: &str, allowed_hosts: &[String]) -> bool {
    let Some((scheme, host)) = parse_origin(origin) else {
        return false;
    };
    match scheme.as_str() {
        "https" => is_loopback(&host) || is_allowed_backend_host(&host, allowed_hosts),
        "http" => is_loopback(&host),
        _ => false,
    }
}

fn is_loopback(host: &Host) -> bool {
    match host {
        Host::Domain(d) => d == "localhost",
        Host::V4(ip) => ip.is_loopback(),
        Host::V6(ip) => ip.is_loopback(),
    }
}

fn is_allowed_backend_host(host: &Host, allowed_hosts: &[String]) -> bool {
    let Host::Domain(host) = host else {
        return false;
    };
    allowed_hosts.iter().any(|allowed| {
        let allowed = allowed.to_ascii_lowercase();
        if allowed.is_empty() {
            return false;
        }
        host == &allowed
            || (host.len() > allowed.len() + 1
                && host.ends_with(allowed.as_str())
                && host.as_bytes()[host.len() - allowed.len() - 1] == b'.')
    })
}

fn parse_origin(origin: &str) -> Option<(String, Host)> {
    if !origin.bytes().all(|b| b.is_ascii_graphic() && b != b'\\') {
        return None;
    }
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = match rest.find('/') {
        Some(i) => {
            if &rest[i..] != "/" {
                return None;
            }
            &rest[..i]
        }
        None => rest,
    };
    if authority.contains(['?', '#', '@']) || authority.is_empty() {
        return None;
    }
    let (host, port) = if let Some(after) = authority.strip_prefix('[') {
        let (inner, tail) = after.split_once(']')?;
        let ip: Ipv6Addr = inner.parse().ok()?;
        let port = match tail {
            "" => None,
            t => Some(t.strip_prefix(':')?),
        };
        (Host::V6(ip), port)
    } else {
        let (name, port) = match authority.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (authority, None),
        };
        (parse_name(name)?, port)
    };
    if let Some(port) = port {
        if port.is_empty()
            || port.len() > 5
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u32>().ok()? > 65535
        {
            return None;
        }
    }
    Some((scheme, host))
}

fn parse_name(name: &str) -> Option<Host> {
    if name.is_empty() {
        return None;
    }
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // Only strict dotted-quad IPv4; other all-numeric forms ("127.1") are refused.
        return name.parse::<Ipv4Addr>().ok().map(Host::V4);
    }
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if !valid {
        return None;
    }
    Some(Host::Domain(name.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts() -> Vec<String> {
        vec!["chatgpt.com".into(), "chatgpt-staging.com".into()]
    }

    #[test]
    fn allowed_origins() {
        for o in [
            "https://chatgpt.com",
            "https://chatgpt.com/",
            "https://ab.chatgpt.com",
            "https://a.b.chatgpt-staging.com:8443",
            "https://CHATGPT.com",
            "HTTPS://chatgpt.com",
            "http://[::1]:8080",
            "https://[::1]",
            "http://localhost",
            "http://localhost:3000/",
            "https://localhost",
            "http://127.0.0.1",
            "http://127.9.8.7:1",
        ] {
            assert!(is_allowed_origin(o, &hosts()), "{o} should be allowed");
        }
    }

    #[test]
    fn rejected_origins() {
        for o in [
            "http://chatgpt.com",
            "https://chat.openai.com",
            "https://chatgpt.com.evil.com",
            "https://evilchatgpt.com",
            "https://foo.localhost",
            "https://192.168.1.2",
            "https://chatgpt.com/backend-api",
            "https://chatgpt.com?query=1",
            "https://chatgpt.com/?",
            "https://chatgpt.com#frag",
            "https://user@chatgpt.com",
            "https://chatgpt.com:",
            "https://chatgpt.com:99999",
            "https://chatgpt.com.",
            "https://.chatgpt.com",
            "https:chatgpt.com",
            "https:/chatgpt.com",
            "https://chatgpt.com\\",
            " https://chatgpt.com",
            "ftp://localhost",
            "http://127.1",
            "http://[::ffff:127.0.0.1]",
            "http://[::2]",
            "https://",
            "",
            "chatgpt.com",
            "https://chatgpt.com//",
        ] {
            assert!(!is_allowed_origin(o, &hosts()), "{o} should be rejected");
        }
    }

    #[test]
    fn configured_hosts_replace_defaults() {
        let hosts = vec!["example.org".to_string()];
        assert!(is_allowed_origin("https://api.example.org", &hosts));
        assert!(!is_allowed_origin("https://chatgpt.com", &hosts));
        assert!(is_allowed_origin("http://localhost", &hosts));
    }
}
