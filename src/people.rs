//! People who use the admin API, and how a bearer token maps to one.
//!
//! Tokens are random and long, so a plain SHA-256 of the token is what is stored (as for API
//! keys): a leaked config does not reveal tokens, and lookup is one hash, compared in constant time.

use std::collections::BTreeSet;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{PersonConfig, Role};

/// An authenticated caller of the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub person: String,
    pub roles: BTreeSet<Role>,
    pub groups: BTreeSet<String>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role) || self.roles.contains(&Role::Admin)
    }

    pub fn can_approve(&self) -> bool {
        self.has(Role::Approver)
    }

    /// Sees every grant and session (not only their own).
    pub fn can_read_all(&self) -> bool {
        self.has(Role::Approver) || self.has(Role::Auditor)
    }
}

struct Entry {
    token_sha256: [u8; 32],
    principal: Principal,
}

/// Token → person.
#[derive(Default)]
pub struct People {
    entries: Vec<Entry>,
}

impl People {
    pub fn from_config(people: &std::collections::BTreeMap<String, PersonConfig>) -> Self {
        let mut out = People::default();
        for (name, p) in people {
            let mut hash = [0u8; 32];
            for (i, byte) in hash.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&p.token_sha256[2 * i..2 * i + 2], 16).unwrap_or(0);
            }
            out.entries.push(Entry {
                token_sha256: hash,
                principal: Principal { person: name.clone(), roles: p.roles.iter().copied().collect(), groups: p.groups.iter().cloned().collect() },
            });
        }
        out
    }

    /// Adds a person with an already-known token (the demo, tests).
    pub fn add(&mut self, person: &str, roles: &[Role], groups: &[&str], token: &str) {
        self.entries.push(Entry {
            token_sha256: Sha256::digest(token.as_bytes()).into(),
            principal: Principal { person: person.to_owned(), roles: roles.iter().copied().collect(), groups: groups.iter().map(|g| g.to_string()).collect() },
        });
    }

    /// The person a bearer token belongs to. Every entry is compared, in constant time.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.token_sha256.ct_eq(&hash)) {
                found = Some(e.principal.clone());
            }
        }
        found
    }

    /// The person named `person`, as the config has them now.
    pub fn principal(&self, person: &str) -> Option<Principal> {
        self.entries.iter().find(|e| e.principal.person == person).map(|e| e.principal.clone())
    }

    pub fn exists(&self, person: &str) -> bool {
        self.entries.iter().any(|e| e.principal.person == person)
    }
}

/// A new random token and its SHA-256 (hex), for `pglease token new`.
pub fn new_token() -> (String, String) {
    let mut raw = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let token = format!("plt_{}", hex(&raw));
    let hash = hex(&Sha256::digest(token.as_bytes()));
    (token, hash)
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xf) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_map_to_people_by_hash() {
        let (token, hash) = new_token();
        let mut people = std::collections::BTreeMap::new();
        people.insert("bob".to_owned(), PersonConfig { roles: vec![Role::Approver], groups: vec!["dba".into()], token_sha256: hash });
        let people = People::from_config(&people);
        let p = people.authenticate(&token).unwrap();
        assert_eq!(p.person, "bob");
        assert!(p.can_approve() && p.groups.contains("dba"));
        assert!(people.authenticate("plt_wrong").is_none());
        assert!(people.authenticate("").is_none());
    }
}
