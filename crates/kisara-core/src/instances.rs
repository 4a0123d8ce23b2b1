//! Instance lifetimes and admission limits, pure: what a launch's expiry is, what a renewal
//! makes of it, and the limits the store checks in the launch's transaction.

use serde::Deserialize;

use crate::{CoreError, Result};

/// `[instances]` of the configuration file. Every limit is off (0 / false) unless set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesSection {
    /// Lifetime of an instance whose request names none (0 = no lifetime).
    pub default_ttl_secs: Option<u64>,
    /// The longest lifetime a request or a renewal may give (0 = no maximum).
    pub max_ttl_secs: Option<u64>,
    /// How much one renewal extends the expiry (default: the default TTL, else 3600).
    pub renew_secs: Option<u64>,
    /// Renewals allowed per instance (absent = unlimited).
    pub max_renewals: Option<u32>,
    /// No instance outlives its launch by more than this, renewed or not (0 = none).
    pub hard_deadline_secs: Option<u64>,
    /// Live instances one owner may have at once (0 = unlimited).
    pub quota_per_owner: Option<u32>,
    /// At most one live instance per (owner, challenge).
    pub one_per_challenge: Option<bool>,
    /// Live instances in the whole cluster (0 = unlimited).
    pub global_cap: Option<u32>,
}

/// Resolved lifetime and admission rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstanceSettings {
    pub default_ttl_secs: Option<u64>,
    pub max_ttl_secs: Option<u64>,
    pub renew_secs: u64,
    pub max_renewals: Option<u32>,
    pub hard_deadline_secs: Option<u64>,
    pub limits: AdmissionLimits,
}

/// Limits checked when an instance is admitted, in the same store transaction as its row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub quota_per_owner: Option<u32>,
    pub one_per_challenge: bool,
    pub global_cap: Option<u32>,
}

fn nonzero<T: PartialEq + Default>(v: Option<T>) -> Option<T> {
    v.filter(|v| *v != T::default())
}

impl InstancesSection {
    pub fn resolve(&self) -> Result<InstanceSettings> {
        let default_ttl_secs = nonzero(self.default_ttl_secs);
        let max_ttl_secs = nonzero(self.max_ttl_secs);
        if let (Some(d), Some(m)) = (default_ttl_secs, max_ttl_secs) {
            if d > m {
                return Err(CoreError::invalid(
                    "instances.default_ttl_secs must not exceed instances.max_ttl_secs",
                ));
            }
        }
        let renew_secs = match self.renew_secs {
            Some(0) => {
                return Err(CoreError::invalid(
                    "instances.renew_secs must be at least 1",
                ))
            }
            Some(n) => n,
            None => default_ttl_secs.unwrap_or(3600),
        };
        Ok(InstanceSettings {
            default_ttl_secs,
            max_ttl_secs,
            renew_secs,
            max_renewals: self.max_renewals,
            hard_deadline_secs: nonzero(self.hard_deadline_secs),
            limits: AdmissionLimits {
                quota_per_owner: nonzero(self.quota_per_owner),
                one_per_challenge: self.one_per_challenge.unwrap_or(false),
                global_cap: nonzero(self.global_cap),
            },
        })
    }
}

/// An instance's lifetime at launch: its expiry and hard deadline (unix seconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    pub expires_at: Option<i64>,
    pub deadline_at: Option<i64>,
}

fn add(now: i64, secs: u64) -> i64 {
    now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX))
}

impl InstanceSettings {
    /// The lifetime of a launch at `now` asking for `ttl_secs` (`Some(0)`: none asked).
    pub fn lifetime(&self, ttl_secs: Option<u64>, now: i64) -> Result<Lifetime> {
        let ttl = match ttl_secs {
            Some(0) => None,
            Some(t) => Some(t),
            None => self.default_ttl_secs,
        };
        if let (Some(t), Some(max)) = (ttl, self.max_ttl_secs) {
            if t > max {
                return Err(CoreError::invalid(format!(
                    "ttl_secs {t} exceeds the server's maximum of {max}"
                )));
            }
        }
        // With a maximum lifetime configured, nothing lives forever.
        let ttl = ttl.or(self.max_ttl_secs);
        let deadline_at = self.hard_deadline_secs.map(|d| add(now, d));
        let expires_at = match (ttl.map(|t| add(now, t)), deadline_at) {
            (Some(e), Some(d)) => Some(e.min(d)),
            (e, d) => e.or(d),
        };
        Ok(Lifetime {
            expires_at,
            deadline_at,
        })
    }

    /// The expiry after one renewal at `now` of an instance expiring at `expires_at` that was
    /// renewed `renewals` times. `Err(why)` when it may not be renewed.
    pub fn renew(
        &self,
        expires_at: Option<i64>,
        deadline_at: Option<i64>,
        renewals: u32,
        secs: Option<u64>,
        now: i64,
    ) -> std::result::Result<i64, RenewRefusal> {
        let Some(expires_at) = expires_at else {
            return Err(RenewRefusal::NoLifetime);
        };
        if let Some(max) = self.max_renewals {
            if renewals >= max {
                return Err(RenewRefusal::TooManyRenewals(max));
            }
        }
        let by = secs.unwrap_or(self.renew_secs);
        if by == 0 || by > self.renew_secs {
            return Err(RenewRefusal::BadExtension(self.renew_secs));
        }
        let mut next = add(expires_at.max(now), by);
        if let Some(max) = self.max_ttl_secs {
            next = next.min(add(now, max));
        }
        if let Some(d) = deadline_at {
            if expires_at >= d {
                return Err(RenewRefusal::DeadlineReached);
            }
            next = next.min(d);
        }
        Ok(next.max(expires_at))
    }
}

/// Why a renewal is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewRefusal {
    NoLifetime,
    TooManyRenewals(u32),
    DeadlineReached,
    BadExtension(u64),
}

impl std::fmt::Display for RenewRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RenewRefusal::NoLifetime => f.write_str("it has no lifetime to renew"),
            RenewRefusal::TooManyRenewals(n) => {
                write!(f, "it was renewed the maximum of {n} times")
            }
            RenewRefusal::DeadlineReached => f.write_str("it has reached its hard deadline"),
            RenewRefusal::BadExtension(max) => {
                write!(f, "a renewal extends by 1..={max} seconds")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> InstanceSettings {
        let s: InstancesSection = toml::from_str(toml_text).unwrap();
        s.resolve().unwrap()
    }

    #[test]
    fn lifetimes() {
        let none = settings("");
        assert_eq!(none.lifetime(None, 100).unwrap(), Lifetime::default());
        assert_eq!(none.lifetime(Some(10), 100).unwrap().expires_at, Some(110));

        let s = settings("default_ttl_secs = 60\nmax_ttl_secs = 120\nhard_deadline_secs = 100");
        let l = s.lifetime(None, 1000).unwrap();
        assert_eq!(l.expires_at, Some(1060));
        assert_eq!(l.deadline_at, Some(1100));
        let e = s.lifetime(Some(121), 1000).unwrap_err().to_string();
        assert!(e.contains("121") && e.contains("120"), "{e}");
        // The deadline cuts a long TTL short.
        assert_eq!(s.lifetime(Some(120), 1000).unwrap().expires_at, Some(1100));
        // Asking for no lifetime still gets the maximum when one is configured.
        assert_eq!(s.lifetime(Some(0), 1000).unwrap().expires_at, Some(1100));
        assert!(InstancesSection {
            default_ttl_secs: Some(10),
            max_ttl_secs: Some(5),
            ..Default::default()
        }
        .resolve()
        .is_err());
    }

    #[test]
    fn renewals() {
        let s = settings(
            "default_ttl_secs = 60\nrenew_secs = 30\nmax_renewals = 2\nmax_ttl_secs = 100",
        );
        // Extends from the current expiry.
        assert_eq!(s.renew(Some(1060), None, 0, None, 1000), Ok(1090));
        // Capped at now + max_ttl.
        assert_eq!(s.renew(Some(1090), None, 1, None, 1000), Ok(1100));
        assert_eq!(
            s.renew(Some(1100), None, 2, None, 1000),
            Err(RenewRefusal::TooManyRenewals(2))
        );
        assert_eq!(
            s.renew(None, None, 0, None, 1000),
            Err(RenewRefusal::NoLifetime)
        );
        assert_eq!(
            s.renew(Some(1060), None, 0, Some(31), 1000),
            Err(RenewRefusal::BadExtension(30))
        );
        assert_eq!(s.renew(Some(1060), Some(1070), 0, None, 1000), Ok(1070));
        assert_eq!(
            s.renew(Some(1070), Some(1070), 1, None, 1000),
            Err(RenewRefusal::DeadlineReached)
        );
    }

    #[test]
    fn limits_resolve() {
        let s = settings("quota_per_owner = 2\none_per_challenge = true\nglobal_cap = 0");
        assert_eq!(s.limits.quota_per_owner, Some(2));
        assert!(s.limits.one_per_challenge);
        assert_eq!(s.limits.global_cap, None);
    }
}
