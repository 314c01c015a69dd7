//! Who may write, and how a write proves it was meant (the security argument is in the crate
//! docs).

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::header::{AUTHORIZATION, COOKIE, HOST, ORIGIN};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

/// The session cookie's name.
pub(crate) const COOKIE_NAME: &str = "outbox_console";
/// A login lasts this long.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions kept at most; a new login beyond it ends the oldest.
const MAX_SESSIONS: usize = 64;

/// The secret that authorises write actions. `Debug` and `Display` never show it.
#[derive(Clone)]
pub struct Token(String);

/// A token too short to withstand guessing.
#[derive(Debug, thiserror::Error)]
#[error("the console token must have at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 32`)")]
#[non_exhaustive]
pub struct ShortToken;

/// The shortest token accepted.
pub const MIN_TOKEN_CHARS: usize = 16;

impl Token {
    /// The token; refused when shorter than [`MIN_TOKEN_CHARS`] (surrounding spaces ignored).
    pub fn new(token: impl Into<String>) -> Result<Self, ShortToken> {
        let token = token.into().trim().to_owned();
        if token.chars().count() < MIN_TOKEN_CHARS {
            return Err(ShortToken);
        }
        Ok(Token(token))
    }

    /// Whether `given` is this token, in time independent of where they differ.
    pub(crate) fn matches(&self, given: &str) -> bool {
        same(self.0.as_bytes(), given.trim().as_bytes())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(********)")
    }
}

/// Compares the SHA-256 digests, with no early exit: the time taken tells nothing about the
/// secret (a timing difference could only reveal digest bytes, which do not lead back to it),
/// and the lengths are not compared apart.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// 32 random bytes from the thread's CSPRNG, as hex.
fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A logged-in browser.
#[derive(Clone)]
pub(crate) struct Session {
    /// The synchronizer token its write forms carry.
    pub(crate) csrf: String,
    /// What the log calls it: a digest prefix of its id, never the id.
    pub(crate) label: String,
    started: Instant,
}

/// The server-side sessions, by id. In memory: a restart logs everyone out.
#[derive(Default)]
pub(crate) struct Sessions(Mutex<HashMap<String, Session>>);

impl Sessions {
    /// A new session; returns its id (the cookie's value) and the session.
    pub(crate) fn start(&self) -> (String, Session) {
        let id = random_hex();
        let label = Sha256::digest(id.as_bytes())[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let session = Session {
            csrf: random_hex(),
            label,
            started: Instant::now(),
        };
        let mut sessions = self.0.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.started.elapsed() < SESSION_TTL);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.started)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    /// The unexpired session whose id is in the request's cookie.
    pub(crate) fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = cookie(headers, COOKIE_NAME)?;
        let sessions = self.0.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(id)
            .filter(|s| s.started.elapsed() < SESSION_TTL)
            .cloned()
    }

    /// Ends the request's session.
    pub(crate) fn end(&self, headers: &HeaderMap) {
        if let Some(id) = cookie(headers, COOKIE_NAME) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
        }
    }
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// The token of an `Authorization: Bearer` header (the scheme in any case). Another scheme (a
/// proxy's Basic credentials, which browsers send on every request) is not the console's:
/// `None`, and the session decides.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

/// Why a request is refused for its `Host`: a name that is not `localhost` nor in `hosts`.
/// A page of another site whose name was rebound to the console's address (DNS rebinding)
/// reaches the console as same-origin, with that site's name as its `Host`: only the name
/// tells it apart. An address (`10.0.0.5:9001`, `[::1]:9001`) cannot be rebound.
pub(crate) fn foreign_host(headers: &HeaderMap, hosts: &[String]) -> Option<String> {
    let host = headers.get(HOST)?;
    let Ok(host) = host.to_str() else {
        return Some("Host is not text".into());
    };
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let allowed = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name) || h.eq_ignore_ascii_case(host));
    (!allowed)
        .then(|| format!("Host {host:?} is not this console's (add its name to console.hosts)"))
}

/// Why a read is refused as another site's: a request of another site's page that is not a
/// navigation (an image, a script's fetch), which could make the console count a large table,
/// or read a page into another site. Links from other sites (a runbook, an alert) still open.
pub(crate) fn cross_site_read(headers: &HeaderMap) -> Option<String> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let site = header("sec-fetch-site")?;
    if matches!(site, "same-origin" | "none") || header("sec-fetch-mode") == Some("navigate") {
        return None;
    }
    Some(format!("Sec-Fetch-Site is {site:?}, not a navigation"))
}

/// Why a request that says where it comes from is refused as another site's: `Sec-Fetch-Site`
/// other than same-origin or none (typed by the user), or an `Origin` whose host is not the
/// request's `Host`. Requests without either (scripts, old browsers) pass; they still need
/// the token or a session and its CSRF token.
pub(crate) fn cross_site(headers: &HeaderMap) -> Option<String> {
    let header = |name| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("(not text)"))
    };
    if let Some(site) = header("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return Some(format!("Sec-Fetch-Site is {site:?}"));
        }
    }
    if let Some(origin) = header(ORIGIN.as_str()) {
        let host = origin.split_once("://").map(|(_, host)| host);
        if host.is_none() || host != header(HOST.as_str()) {
            return Some(format!("Origin {origin:?} is not this host"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_compared_whole_and_never_shown() {
        let token = Token::new("correct horse battery").unwrap();
        assert!(token.matches("correct horse battery"));
        assert!(!token.matches("correct horse batter"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("horse"));
        assert!(Token::new("short").is_err());
    }

    #[test]
    fn other_sites_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().unwrap());
            }
            map
        };
        let host = ("host", "127.0.0.1:9000");
        assert!(cross_site(&headers(&[host])).is_none());
        assert!(cross_site(&headers(&[host, ("origin", "http://127.0.0.1:9000")])).is_none());
        assert!(cross_site(&headers(&[host, ("origin", "http://evil.example")])).is_some());
        assert!(cross_site(&headers(&[host, ("origin", "null")])).is_some());
        assert!(cross_site(&headers(&[host, ("sec-fetch-site", "same-site")])).is_some());
        assert!(cross_site(&headers(&[host, ("sec-fetch-site", "same-origin")])).is_none());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn only_addresses_localhost_and_listed_names_are_this_consoles_hosts() {
        let hosts = ["console.example.com".to_owned()];
        for ok in [
            "127.0.0.1:9000",
            "10.1.2.3",
            "[::1]:9000",
            "localhost:9000",
            "LOCALHOST",
            "console.example.com",
            "Console.Example.com:8443",
        ] {
            assert_eq!(
                foreign_host(&headers(&[("host", ok)]), &hosts),
                None,
                "{ok}"
            );
        }
        for rebound in [
            "attacker.example:9000",
            "attacker.example",
            "console.example.com.evil",
        ] {
            assert!(
                foreign_host(&headers(&[("host", rebound)]), &hosts).is_some(),
                "{rebound}"
            );
        }
        assert_eq!(foreign_host(&HeaderMap::new(), &hosts), None);
    }

    #[test]
    fn only_bearer_credentials_are_the_consoles() {
        assert_eq!(
            bearer(&headers(&[("authorization", "Bearer abc")])),
            Some("abc")
        );
        assert_eq!(
            bearer(&headers(&[("authorization", "BEARER abc")])),
            Some("abc")
        );
        assert_eq!(bearer(&headers(&[("authorization", "Bearer")])), Some(""));
        assert_eq!(
            bearer(&headers(&[("authorization", "Basic dXNlcjpwdw==")])),
            None
        );
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[test]
    fn other_sites_may_link_to_pages_but_not_embed_or_fetch_them() {
        let read = |pairs| cross_site_read(&headers(pairs));
        assert!(read(&[]).is_none());
        assert!(read(&[
            ("sec-fetch-site", "same-origin"),
            ("sec-fetch-mode", "cors")
        ])
        .is_none());
        assert!(read(&[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "navigate")
        ])
        .is_none());
        assert!(read(&[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "no-cors")
        ])
        .is_some());
        assert!(read(&[("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors")]).is_some());
    }
}
