//! Subnet pools: where the private networks of instances come from.
//!
//! # Syntax
//!
//! A pool is a list of entries (a TOML array, or one string with entries separated by commas,
//! as Kisara's `network_cidrs` was written). An entry is
//!
//! * `A.B.C.D/P` — a pattern and a prefix. Each octet is a number or an inclusive range
//!   `[a-b]`; every combination of the ranges is one subnet of size `/P`. Kisara's syntax
//!   `10.[200-255].[0-255].0/24` is this form (14,336 subnets); a plain CIDR such as
//!   `10.200.0.0/16` is the same form without ranges and means exactly one subnet, that /16.
//! * `A.B.C.D/P/S` — the same, with every subnet of the pattern carved into subnets of size
//!   `/S`: `10.200.0.0/16/24` is the 256 /24s of 10.200.0.0/16. This is how a plain CIDR becomes
//!   a pool of many networks without the bracket syntax.
//!
//! # Rules
//!
//! * The size of handed-out subnets (`S`, or `P` without carving) is /8 to /30; so is `P`.
//! * No pattern may set host bits: `10.200.[0-255].0/16` is an error, not a surprise.
//! * Every address must be private (RFC 1918: 10/8, 172.16/12, 192.168/16) unless
//!   `allow_public` is set. Loopback, `0/8`, link-local `169.254/16` and 224/3 (multicast,
//!   reserved) are refused even then. Kisara's own default `172.[128-255]...` is public space,
//!   which is why ours is [`DEFAULT_POOL`].
//! * Entries may not overlap each other, so no subnet is handed out twice through two entries.
//!
//! The pool is never materialized: a /8 carved into /30s is four million subnets, so
//! [`SubnetPool::iter`] walks it lazily, in ascending address order within each entry and in
//! entry order across entries.

use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::{CoreError, Result};

/// The pool used when the configuration names none: 14,336 /24s in 10/8.
pub const DEFAULT_POOL: &str = "10.[200-255].[0-255].0/24";

/// A validated set of subnets to allocate from. See the [module docs](self) for the syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetPool {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The entry as written, for messages and display.
    text: String,
    /// Inclusive value range of each octet of the pattern.
    octets: [(u8, u8); 4],
    /// Prefix of the pattern's subnets.
    base_prefix: u8,
    /// Prefix of the subnets handed out (≥ `base_prefix`).
    prefix: u8,
}

impl SubnetPool {
    /// Parses and validates a pool. Each string may hold several comma-separated entries.
    pub fn parse(entries: &[String], allow_public: bool) -> Result<SubnetPool> {
        let mut parsed: Vec<Entry> = Vec::new();
        for text in entries.iter().flat_map(|s| s.split(',')) {
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let entry = Entry::parse(text)?;
            entry.check_address_space(allow_public)?;
            if let Some(other) = parsed.iter().find(|other| other.overlaps(&entry)) {
                return Err(CoreError::invalid(format!(
                    "subnet pool entries {:?} and {:?} overlap",
                    other.text, entry.text
                )));
            }
            parsed.push(entry);
        }
        if parsed.is_empty() {
            return Err(CoreError::invalid("the subnet pool is empty"));
        }
        Ok(SubnetPool { entries: parsed })
    }

    /// Every subnet of the pool, lazily, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        self.entries.iter().flat_map(Entry::iter)
    }

    /// Whether `net` is one of the pool's subnets (same address and size, not merely inside).
    pub fn contains(&self, net: &Ipv4Net) -> bool {
        *net == net.trunc() && self.entries.iter().any(|e| e.contains(net))
    }

    /// Number of subnets in the pool.
    pub fn len(&self) -> u64 {
        self.entries.iter().map(Entry::len).sum()
    }

    /// Never true: parsing refuses an empty pool. Present for API symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first subnet, in [`iter`](Self::iter) order, for which `taken` is false. `taken`
    /// should answer by overlap, not equality (see [`TakenSet`]), so that a /16 in use outside
    /// the pool also rules out the pool's /24s inside it.
    pub fn next_free(&self, taken: &dyn Fn(&Ipv4Net) -> bool) -> Option<Ipv4Net> {
        self.iter().find(|net| !taken(net))
    }

    /// The subnet at `index` in [`iter`](Self::iter) order, in O(entries): allocators keep a
    /// position instead of walking the pool from its start on every allocation.
    pub fn nth(&self, mut index: u64) -> Option<Ipv4Net> {
        for e in &self.entries {
            let len = e.len();
            if index < len {
                return Some(e.nth(index));
            }
            index -= len;
        }
        None
    }

    /// The index of `net` in [`iter`](Self::iter) order, if it is one of the pool's subnets.
    pub fn position(&self, net: &Ipv4Net) -> Option<u64> {
        let mut before = 0;
        for e in &self.entries {
            if e.contains(net) {
                // Within an entry the order is ascending by address: binary search.
                let (mut lo, mut hi) = (0, e.len());
                let want = u32::from(net.network());
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    if u32::from(e.nth(mid).network()) < want {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                return Some(before + lo);
            }
            before += e.len();
        }
        None
    }

    /// The entries as written.
    pub fn entries(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.text.as_str())
    }
}

impl Default for SubnetPool {
    fn default() -> Self {
        SubnetPool::parse(&[DEFAULT_POOL.to_string()], false)
            .expect("DEFAULT_POOL is valid (tested)")
    }
}

impl fmt::Display for SubnetPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let texts: Vec<&str> = self.entries().collect();
        f.write_str(&texts.join(","))
    }
}

/// Whether two networks share any address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// A set of networks in use, answering "does this network overlap any of them" in O(log n).
/// Built once per allocation from the allocated and externally used subnets.
#[derive(Debug, Clone, Default)]
pub struct TakenSet {
    /// First addresses, ascending.
    starts: Vec<u32>,
    /// `max_end[i]` = highest last address among the first `i + 1` networks.
    max_end: Vec<u32>,
}

impl TakenSet {
    pub fn new(nets: impl IntoIterator<Item = Ipv4Net>) -> TakenSet {
        let mut ranges: Vec<(u32, u32)> = nets
            .into_iter()
            .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
            .collect();
        ranges.sort_unstable();
        let mut max_end = Vec::with_capacity(ranges.len());
        let mut running = 0u32;
        for (i, &(_, end)) in ranges.iter().enumerate() {
            running = if i == 0 { end } else { running.max(end) };
            max_end.push(running);
        }
        TakenSet {
            starts: ranges.into_iter().map(|(start, _)| start).collect(),
            max_end,
        }
    }

    /// Whether `net` overlaps any network of the set.
    pub fn overlaps(&self, net: &Ipv4Net) -> bool {
        let (start, end) = (u32::from(net.network()), u32::from(net.broadcast()));
        // Networks starting at or before `end` are the candidates; one of them overlaps iff
        // the furthest-reaching one reaches `start`.
        let candidates = self.starts.partition_point(|&s| s <= end);
        candidates > 0 && self.max_end[candidates - 1] >= start
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }
}

/// A set of byte values, for reasoning about an entry one octet at a time.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ByteSet([u64; 4]);

impl ByteSet {
    fn from_fn(f: impl Fn(u8) -> bool) -> ByteSet {
        let mut bits = [0u64; 4];
        for v in 0..=255u8 {
            if f(v) {
                bits[usize::from(v / 64)] |= 1 << (v % 64);
            }
        }
        ByteSet(bits)
    }

    fn has(&self, v: u8) -> bool {
        self.0[usize::from(v / 64)] & (1 << (v % 64)) != 0
    }

    fn intersects(&self, other: &ByteSet) -> bool {
        self.0.iter().zip(other.0.iter()).any(|(a, b)| a & b != 0)
    }

    fn is_subset_of(&self, other: &ByteSet) -> bool {
        self.0.iter().zip(other.0.iter()).all(|(a, b)| a & !b == 0)
    }
}

impl Entry {
    fn parse(text: &str) -> Result<Entry> {
        let bad =
            |why: &str| CoreError::invalid(format!("invalid subnet pool entry {text:?}: {why}"));
        let mut parts = text.split('/');
        let pattern = parts.next().unwrap_or_default();
        let base_prefix = match parts.next() {
            Some(p) => {
                parse_prefix(p).ok_or_else(|| bad("the prefix must be a number from 8 to 30"))?
            }
            None => return Err(bad("a prefix is required, e.g. 10.[200-255].[0-255].0/24")),
        };
        let prefix = match parts.next() {
            Some(p) => parse_prefix(p)
                .ok_or_else(|| bad("the carve size must be a number from 8 to 30"))?,
            None => base_prefix,
        };
        if parts.next().is_some() {
            return Err(bad("expected PATTERN/PREFIX or PATTERN/PREFIX/SIZE"));
        }
        if prefix < base_prefix {
            return Err(bad(&format!(
                "cannot carve a /{base_prefix} into larger /{prefix} subnets"
            )));
        }

        let fields: Vec<&str> = pattern.split('.').collect();
        if fields.len() != 4 {
            return Err(bad("the address needs four octets"));
        }
        let mut octets = [(0u8, 0u8); 4];
        for (i, field) in fields.iter().enumerate() {
            octets[i] = parse_octet(field.trim()).ok_or_else(|| {
                bad(&format!(
                    "octet {field:?} must be a number 0-255 or a range [a-b] with a <= b <= 255"
                ))
            })?;
        }

        let entry = Entry {
            text: text.to_string(),
            octets,
            base_prefix,
            prefix,
        };
        for (i, &(lo, hi)) in octets.iter().enumerate() {
            let host = !entry.mask(i);
            if let Some(v) = (lo..=hi).find(|v| v & host != 0) {
                return Err(bad(&format!(
                    "{v} in octet {} sets host bits of a /{base_prefix}",
                    i + 1
                )));
            }
        }
        Ok(entry)
    }

    /// Network-mask byte of octet `i` for the pattern's prefix.
    fn mask(&self, i: usize) -> u8 {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.base_prefix))
            .unwrap_or(0);
        mask.to_be_bytes()[i]
    }

    /// Every value octet `i` of an address inside this entry can take. Because host bits are
    /// masked per octet, an entry's addresses are exactly the product of these four sets,
    /// which makes overlap and containment checks a per-octet affair.
    fn address_set(&self, i: usize) -> ByteSet {
        let (lo, hi) = self.octets[i];
        let mask = self.mask(i);
        ByteSet::from_fn(|v| (lo..=hi).contains(&(v & mask)))
    }

    fn overlaps(&self, other: &Entry) -> bool {
        (0..4).all(|i| self.address_set(i).intersects(&other.address_set(i)))
    }

    fn check_address_space(&self, allow_public: bool) -> Result<()> {
        let first = self.address_set(0);
        let second = self.address_set(1);
        let never = ByteSet::from_fn(|v| v == 0 || v == 127 || v >= 224);
        if first.intersects(&never) || (first.has(169) && second.has(254)) {
            return Err(CoreError::invalid(format!(
                "subnet pool entry {:?} reaches into reserved address space \
                 (0/8, 127/8, 169.254/16 or 224/3)",
                self.text
            )));
        }
        if allow_public {
            return Ok(());
        }
        let private = first.is_subset_of(&ByteSet::from_fn(|v| v == 10 || v == 172 || v == 192))
            && (!first.has(172)
                || second.is_subset_of(&ByteSet::from_fn(|v| (16..=31).contains(&v))))
            && (!first.has(192) || second.is_subset_of(&ByteSet::from_fn(|v| v == 168)));
        if private {
            Ok(())
        } else {
            Err(CoreError::invalid(format!(
                "subnet pool entry {:?} is outside private address space \
                 (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16); set allow_public_subnets to use it",
                self.text
            )))
        }
    }

    fn iter(&self) -> impl Iterator<Item = Ipv4Net> + '_ {
        let [o0, o1, o2, o3] = self.octets;
        let prefix = self.prefix;
        let per_base = 1u32 << (prefix - self.base_prefix);
        let step = 1u32 << (32 - prefix);
        (o0.0..=o0.1).flat_map(move |a| {
            (o1.0..=o1.1).flat_map(move |b| {
                (o2.0..=o2.1).flat_map(move |c| {
                    (o3.0..=o3.1).flat_map(move |d| {
                        let base = u32::from_be_bytes([a, b, c, d]);
                        // Within the base network, so no overflow: k * step < 2^(32 - base).
                        (0..per_base).map(move |k| net(base + k * step, prefix))
                    })
                })
            })
        })
    }

    fn contains(&self, net: &Ipv4Net) -> bool {
        let octets = net.network().octets();
        net.prefix_len() == self.prefix
            && (0..4).all(|i| {
                let (lo, hi) = self.octets[i];
                (lo..=hi).contains(&(octets[i] & self.mask(i)))
            })
    }

    fn len(&self) -> u64 {
        let combos: u64 = self
            .octets
            .iter()
            .map(|&(lo, hi)| u64::from(hi - lo) + 1)
            .product();
        combos << (self.prefix - self.base_prefix)
    }

    /// The `index`-th subnet of [`Entry::iter`] (`index < len`), by mixed-radix arithmetic.
    fn nth(&self, index: u64) -> Ipv4Net {
        let per_base = 1u64 << (self.prefix - self.base_prefix);
        let step = 1u32 << (32 - self.prefix);
        let k = (index % per_base) as u32;
        let mut rest = index / per_base;
        let mut octets = [0u8; 4];
        for i in (0..4).rev() {
            let (lo, hi) = self.octets[i];
            let n = u64::from(hi - lo) + 1;
            octets[i] = lo + (rest % n) as u8;
            rest /= n;
        }
        net(u32::from_be_bytes(octets) + k * step, self.prefix)
    }
}

/// The networks in use, kept up to date one insert or removal at a time, answering "does this
/// network overlap any of them" in O(prefix lengths × log n). An allocator keeps one across
/// allocations instead of rebuilding a [`TakenSet`] from every row each time.
#[derive(Debug, Clone, Default)]
pub struct TakenIndex {
    /// By prefix length: first addresses of the networks of that size (with multiplicity).
    by_prefix: Vec<std::collections::BTreeMap<u32, u32>>,
    len: usize,
}

impl TakenIndex {
    pub fn new(nets: impl IntoIterator<Item = Ipv4Net>) -> TakenIndex {
        let mut t = TakenIndex::default();
        for n in nets {
            t.insert(&n);
        }
        t
    }

    pub fn insert(&mut self, net: &Ipv4Net) {
        if self.by_prefix.is_empty() {
            self.by_prefix = vec![Default::default(); 33];
        }
        let net = net.trunc();
        *self.by_prefix[net.prefix_len() as usize]
            .entry(u32::from(net.network()))
            .or_default() += 1;
        self.len += 1;
    }

    /// Removes one occurrence of `net`; returns whether it was there.
    pub fn remove(&mut self, net: &Ipv4Net) -> bool {
        let net = net.trunc();
        let Some(set) = self.by_prefix.get_mut(net.prefix_len() as usize) else {
            return false;
        };
        let key = u32::from(net.network());
        match set.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                set.remove(&key);
            }
            None => return false,
        }
        self.len -= 1;
        true
    }

    /// Whether `net` overlaps any network of the index.
    pub fn overlaps(&self, net: &Ipv4Net) -> bool {
        let (start, end) = (u32::from(net.network()), u32::from(net.broadcast()));
        let q = net.prefix_len() as usize;
        self.by_prefix.iter().enumerate().any(|(p, set)| {
            if set.is_empty() {
                false
            } else if p <= q {
                // Only the one network of size /p that contains `net` can overlap it.
                let mask = u32::MAX.checked_shl(32 - p as u32).unwrap_or(0);
                set.contains_key(&(start & mask))
            } else {
                set.range(start..=end).next().is_some()
            }
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn net(addr: u32, prefix: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::from(addr), prefix).expect("prefix validated to be at most 30")
}

fn parse_prefix(text: &str) -> Option<u8> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|p| (8..=30).contains(p))
}

fn parse_octet(text: &str) -> Option<(u8, u8)> {
    fn number(text: &str) -> Option<u8> {
        let text = text.trim();
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }
    match text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
        Some(range) => {
            let (lo, hi) = range.split_once('-')?;
            let (lo, hi) = (number(lo)?, number(hi)?);
            (lo <= hi).then_some((lo, hi))
        }
        None => number(text).map(|v| (v, v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pool(entries: &[&str]) -> Result<SubnetPool> {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        SubnetPool::parse(&entries, false)
    }

    fn n(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn default_pool() {
        let p = SubnetPool::default();
        assert_eq!(p.len(), 56 * 256);
        assert_eq!(p.iter().next(), Some(n("10.200.0.0/24")));
        assert_eq!(p.iter().nth(256), Some(n("10.201.0.0/24")));
        assert_eq!(p.iter().last(), Some(n("10.255.255.0/24")));
        assert_eq!(p.iter().count() as u64, p.len());
        assert!(p.contains(&n("10.230.7.0/24")));
        assert!(!p.contains(&n("10.199.7.0/24")));
        assert!(!p.contains(&n("10.230.7.0/25")));
        assert!(!p.contains(&n("10.230.0.0/16")));
        assert_eq!(p.to_string(), DEFAULT_POOL);
    }

    #[test]
    fn parses_forms() {
        let cases: &[(&[&str], u64, &str, &str)] = &[
            (&["10.200.0.0/16"], 1, "10.200.0.0/16", "10.200.0.0/16"),
            (
                &["10.200.0.0/16/24"],
                256,
                "10.200.0.0/24",
                "10.200.255.0/24",
            ),
            (&["10.0.0.0/8/16"], 256, "10.0.0.0/16", "10.255.0.0/16"),
            (
                &["192.168.[0-3].0/24"],
                4,
                "192.168.0.0/24",
                "192.168.3.0/24",
            ),
            (
                &["172.[16-17].0.0/16/30"],
                2 << 14,
                "172.16.0.0/30",
                "172.17.255.252/30",
            ),
            (
                &["10.1.0.0/24, 10.2.[0-1].0/24"],
                3,
                "10.1.0.0/24",
                "10.2.1.0/24",
            ),
            (
                &[" 10.1.0.0/24 ", "10.3.0.0/20/22"],
                5,
                "10.1.0.0/24",
                "10.3.12.0/22",
            ),
            (&["10.[1-2].[0-255].[0-255]/30"], 0, "", ""),
        ];
        for &(entries, len, first, last) in cases {
            let p = match pool(entries) {
                Ok(p) => p,
                Err(e) if len == 0 => {
                    assert!(e.to_string().contains("host bits"), "{e}");
                    continue;
                }
                Err(e) => panic!("{entries:?}: {e}"),
            };
            assert_eq!(p.len(), len, "{entries:?}");
            assert_eq!(p.iter().count() as u64, len, "{entries:?}");
            assert_eq!(p.iter().next(), Some(n(first)), "{entries:?}");
            assert_eq!(p.iter().last(), Some(n(last)), "{entries:?}");
        }
        // A /30 pattern whose last octet steps by 4 is fine.
        assert!(pool(&["10.1.1.[4-4]/30"]).is_ok());
    }

    #[test]
    fn rejects_bad_entries_naming_them() {
        let cases: &[(&str, &str)] = &[
            ("10.200.0.0", "prefix is required"),
            ("10.200.0.0/", "prefix"),
            ("10.200.0.0/31", "prefix"),
            ("10.0.0.0/7", "prefix"),
            ("10.200.0.0/16/8", "carve"),
            ("10.200.0.0/16/24/28", "PATTERN"),
            ("10.200.0/24", "four octets"),
            ("10.256.0.0/24", "\"256\""),
            ("10.[255-200].0.0/24", "[255-200]"),
            ("10.[200-256].0.0/24", "[200-256]"),
            ("10.[a-b].0.0/24", "[a-b]"),
            ("10.200.0.1/24", "host bits"),
            ("10.200.[0-255].0/16", "host bits"),
            ("172.[128-255].[0-255].0/24", "private"),
            ("172.0.0.0/11", "private"),
            ("192.169.0.0/24", "private"),
            ("8.8.8.0/24", "private"),
            ("127.0.0.0/24", "reserved"),
            ("[169-170].254.0.0/16", "reserved"),
            ("", "empty"),
            (" , ", "empty"),
        ];
        for &(entry, needle) in cases {
            let err = pool(&[entry]).expect_err(entry).to_string();
            assert!(err.contains(needle), "{entry:?}: {err}");
            if !entry.trim().trim_matches(',').trim().is_empty() {
                assert!(
                    err.contains(&format!("{:?}", entry.trim())),
                    "{entry:?}: {err}"
                );
            }
        }
    }

    #[test]
    fn public_space_needs_allow_public() {
        let kisara_default = vec!["172.[128-255].[0-255].0/24".to_string()];
        assert!(SubnetPool::parse(&kisara_default, false).is_err());
        let p = SubnetPool::parse(&kisara_default, true).unwrap();
        assert_eq!(p.len(), 128 * 256);
        // Reserved space stays refused.
        assert!(SubnetPool::parse(&["224.0.0.0/24".into()], true).is_err());
        assert!(SubnetPool::parse(&["169.254.0.0/16/24".into()], true).is_err());
    }

    #[test]
    fn rejects_overlapping_entries() {
        let err = pool(&["10.0.0.0/16/24", "10.0.1.0/24"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("overlap") && err.contains("10.0.1.0/24"),
            "{err}"
        );
        assert!(pool(&["10.[1-3].0.0/24", "10.2.[0-1].0/24"]).is_err());
        // Interleaved patterns that share no address are fine.
        assert!(pool(&["10.[1-3].0.0/24", "10.2.[1-2].0/24"]).is_ok());
        assert!(pool(&["10.0.0.0/25", "10.0.0.128/25"]).is_ok());
    }

    #[test]
    fn huge_pools_stay_lazy() {
        let p = pool(&["10.0.0.0/8/30"]).unwrap();
        assert_eq!(p.len(), 1 << 22);
        assert_eq!(p.iter().nth(1), Some(n("10.0.0.4/30")));
        let taken = TakenSet::new([n("10.0.0.0/16")]);
        assert_eq!(
            p.next_free(&|net| taken.overlaps(net)),
            Some(n("10.1.0.0/30"))
        );
    }

    #[test]
    fn next_free_skips_overlaps() {
        let p = pool(&["10.9.[0-3].0/24"]).unwrap();
        let taken = TakenSet::new([n("10.9.0.128/25"), n("10.9.1.0/24"), n("10.9.2.7/32")]);
        assert_eq!(
            p.next_free(&|net| taken.overlaps(net)),
            Some(n("10.9.3.0/24"))
        );
        let all = TakenSet::new([n("10.9.0.0/22")]);
        assert_eq!(p.next_free(&|net| all.overlaps(net)), None);
    }

    #[test]
    fn overlap_helper() {
        assert!(overlaps(&n("10.0.0.0/8"), &n("10.1.2.0/24")));
        assert!(overlaps(&n("10.1.2.0/24"), &n("10.0.0.0/8")));
        assert!(overlaps(&n("10.1.2.0/24"), &n("10.1.2.0/24")));
        assert!(!overlaps(&n("10.1.2.0/24"), &n("10.1.3.0/24")));
        assert!(!TakenSet::default().overlaps(&n("10.0.0.0/8")));
    }

    fn entry_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u8..=250, 0u8..=5, 0u8..=250, 0u8..=3).prop_map(|(b, bw, c, cw)| format!(
                "10.[{b}-{}].[{c}-{}].0/24",
                b + bw,
                c + cw
            )),
            (0u8..=255, 24u8..=28).prop_map(|(b, size)| format!("10.{b}.0.0/22/{size}")),
            (0u8..=255, 0u8..=63).prop_map(|(c, d)| format!("192.168.{c}.{}/30", d * 4)),
            (16u8..=31, 0u8..=255).prop_map(|(b, c)| format!("172.{b}.{c}.0/24/26")),
        ]
    }

    fn net_strategy() -> impl Strategy<Value = Ipv4Net> {
        (any::<u32>(), 8u8..=30).prop_map(|(addr, prefix)| net(addr, prefix).trunc())
    }

    proptest! {
        /// `nth` and `position` agree with the iteration order.
        #[test]
        fn nth_and_position_follow_iter(entry in entry_strategy()) {
            let p = SubnetPool::parse(&[entry], true).unwrap();
            for (i, n) in p.iter().take(300).enumerate() {
                prop_assert_eq!(p.nth(i as u64), Some(n));
                prop_assert_eq!(p.position(&n), Some(i as u64));
            }
            prop_assert_eq!(p.nth(p.len()), None);
        }

        /// The incremental index answers overlap like the brute-force definition.
        #[test]
        fn taken_index_matches_brute_force(
            nets in prop::collection::vec(net_strategy(), 0..30),
            removed in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            probes in prop::collection::vec(net_strategy(), 1..30),
        ) {
            let mut live = nets.clone();
            let mut idx = TakenIndex::new(nets.iter().copied());
            for r in removed {
                if !live.is_empty() {
                    let n = live.remove(r.index(live.len()));
                    prop_assert!(idx.remove(&n));
                }
            }
            prop_assert_eq!(idx.len(), live.len());
            for p in probes {
                let want = live.iter().any(|l| overlaps(l, &p));
                prop_assert_eq!(idx.overlaps(&p), want, "{}", p);
            }
        }

        #[test]
        fn pools_yield_private_distinct_members(entries in prop::collection::vec(entry_strategy(), 1..4)) {
            let parsed = SubnetPool::parse(&entries, false);
            // Random entries may overlap; then the parse must have said so.
            prop_assume!(parsed.is_ok());
            let p = parsed.unwrap();
            let mut nets: Vec<Ipv4Net> = p.iter().collect();
            prop_assert_eq!(nets.len() as u64, p.len());
            let private = [n("10.0.0.0/8"), n("172.16.0.0/12"), n("192.168.0.0/16")];
            for net in &nets {
                prop_assert!(private.iter().any(|b| b.contains(net)), "{} not private", net);
                prop_assert!(p.contains(net), "{} not in pool", net);
            }
            nets.sort();
            for pair in nets.windows(2) {
                prop_assert!(!overlaps(&pair[0], &pair[1]), "{} overlaps {}", pair[0], pair[1]);
            }
        }

        #[test]
        fn next_free_never_overlaps_taken(
            entries in prop::collection::vec(entry_strategy(), 1..3),
            taken in prop::collection::vec(net_strategy(), 0..20),
            inside in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        ) {
            let parsed = SubnetPool::parse(&entries, false);
            prop_assume!(parsed.is_ok());
            let p = parsed.unwrap();
            // Also take some of the pool's own subnets, or the random ones rarely hit it.
            let members: Vec<Ipv4Net> = p.iter().collect();
            let mut taken = taken;
            taken.extend(inside.iter().map(|i| members[i.index(members.len())]));
            let set = TakenSet::new(taken.iter().copied());
            match p.next_free(&|net| set.overlaps(net)) {
                Some(free) => {
                    prop_assert!(p.contains(&free));
                    for t in &taken {
                        prop_assert!(!overlaps(&free, t), "{} overlaps taken {}", free, t);
                    }
                }
                None => {
                    for m in &members {
                        prop_assert!(taken.iter().any(|t| overlaps(m, t)), "{} was free", m);
                    }
                }
            }
        }

        #[test]
        fn taken_set_agrees_with_linear_scan(
            taken in prop::collection::vec(net_strategy(), 0..30),
            probe in net_strategy(),
        ) {
            let set = TakenSet::new(taken.iter().copied());
            prop_assert_eq!(set.overlaps(&probe), taken.iter().any(|t| overlaps(t, &probe)));
        }
    }
}
