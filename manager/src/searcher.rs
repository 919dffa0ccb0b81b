//! Searcher: which scheduler cluster serves a host.
//!
//! A cluster's [`Scopes`] are compared with the host's IP, IDC, location and hostname; the
//! ranking is lexicographic, in this order of importance:
//!
//! 1. CIDR: the host's IP is in one of the cluster's networks (a longer prefix wins);
//! 2. IDC: the host's IDC is one of the cluster's `|`-separated IDCs;
//! 3. location: how many leading `|`-separated elements the locations share;
//! 4. hostname: one of the cluster's regular expressions matches the whole hostname;
//! 5. the default cluster before others; then the lower id.
//!
//! Only clusters with at least one active scheduler are candidates (the caller filters), so a
//! daemon is sent to a cluster that can serve it. Pure functions: no store, no clock.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Cluster, Scopes};

/// What the searcher knows about a daemon's host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostQuery {
    /// Hostname.
    pub hostname: String,
    /// IP address (unparseable: no CIDR match).
    pub ip: String,
    /// Data center.
    pub idc: String,
    /// Location, `|`-separated from wide to narrow.
    pub location: String,
}

/// How well a cluster matches a host; greater is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MatchScore {
    /// Longest matching CIDR prefix plus one; 0 when no CIDR matches.
    pub cidr: u16,
    /// The host's IDC is one of the cluster's.
    pub idc: bool,
    /// Shared leading location elements.
    pub location: usize,
    /// A hostname rule matches.
    pub hostname: bool,
    /// The cluster is the default one.
    pub is_default: bool,
}

impl MatchScore {
    /// Whether anything but the default flag matched.
    pub fn matched(&self) -> bool {
        self.cidr > 0 || self.idc || self.location > 0 || self.hostname
    }
}

/// Scores one cluster for a host. Invalid CIDRs or regular expressions in the scopes never
/// match (the REST API refuses them, see [`validate_scopes`]).
pub fn score(cluster: &Cluster, host: &HostQuery) -> MatchScore {
    let scopes = &cluster.scopes;
    MatchScore {
        cidr: cidr_score(scopes, &host.ip),
        idc: idc_matches(&scopes.idc, &host.idc),
        location: location_prefix(&scopes.location, &host.location),
        hostname: hostname_matches(&scopes.hostnames, &host.hostname),
        is_default: cluster.is_default,
    }
}

/// The best cluster for a host among `candidates`, or `None` when there are none.
pub fn best<'a>(candidates: &'a [Cluster], host: &HostQuery) -> Option<&'a Cluster> {
    candidates.iter().max_by(|a, b| {
        score(a, host)
            .cmp(&score(b, host))
            // Lower id wins a tie: reverse so that max_by prefers it.
            .then_with(|| b.id.cmp(&a.id))
    })
}

/// Checks that every CIDR parses and every hostname rule compiles.
pub fn validate_scopes(scopes: &Scopes) -> Result<(), String> {
    for c in &scopes.cidrs {
        c.parse::<IpNet>()
            .map_err(|e| format!("bad CIDR {c:?} in scopes: {e}"))?;
    }
    for h in &scopes.hostnames {
        regex::Regex::new(&format!("^(?:{h})$"))
            .map_err(|e| format!("bad hostname rule {h:?} in scopes: {e}"))?;
    }
    Ok(())
}

fn cidr_score(scopes: &Scopes, ip: &str) -> u16 {
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return 0;
    };
    scopes
        .cidrs
        .iter()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .filter(|net| net.contains(&ip))
        .map(|net| u16::from(net.prefix_len()) + 1)
        .max()
        .unwrap_or(0)
}

fn idc_matches(scope: &str, idc: &str) -> bool {
    !idc.is_empty() && scope.split('|').any(|s| s.trim() == idc)
}

fn location_prefix(scope: &str, location: &str) -> usize {
    if scope.is_empty() || location.is_empty() {
        return 0;
    }
    scope
        .split('|')
        .zip(location.split('|'))
        .take_while(|(a, b)| a.trim() == b.trim() && !a.trim().is_empty())
        .count()
}

fn hostname_matches(rules: &[String], hostname: &str) -> bool {
    !hostname.is_empty()
        && rules.iter().any(|r| {
            regex::Regex::new(&format!("^(?:{r})$"))
                .map(|re| re.is_match(hostname))
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ClusterConfig, Timestamp};

    fn cluster(id: u64, is_default: bool, scopes: Scopes) -> Cluster {
        Cluster {
            id,
            name: format!("c{id}"),
            is_default,
            scopes,
            config: ClusterConfig::default(),
            config_version: 1,
            created_at: Timestamp(0),
            updated_at: Timestamp(0),
        }
    }

    fn host(ip: &str, idc: &str, location: &str, hostname: &str) -> HostQuery {
        HostQuery {
            hostname: hostname.into(),
            ip: ip.into(),
            idc: idc.into(),
            location: location.into(),
        }
    }

    fn clusters() -> Vec<Cluster> {
        vec![
            cluster(1, true, Scopes::default()),
            cluster(
                2,
                false,
                Scopes {
                    cidrs: vec!["10.0.0.0/8".into()],
                    ..Scopes::default()
                },
            ),
            cluster(
                3,
                false,
                Scopes {
                    cidrs: vec!["10.1.0.0/16".into()],
                    idc: "idc-b".into(),
                    ..Scopes::default()
                },
            ),
            cluster(
                4,
                false,
                Scopes {
                    idc: "idc-a|idc-c".into(),
                    location: "cn|hz".into(),
                    ..Scopes::default()
                },
            ),
            cluster(
                5,
                false,
                Scopes {
                    location: "cn|sh".into(),
                    hostnames: vec!["build-.*".into()],
                    ..Scopes::default()
                },
            ),
        ]
    }

    fn pick(h: HostQuery) -> u64 {
        best(&clusters(), &h).map(|c| c.id).unwrap_or(0)
    }

    #[test]
    fn cidr_beats_idc_and_longest_prefix_wins() {
        assert_eq!(pick(host("10.2.3.4", "idc-a", "cn|hz", "")), 2);
        assert_eq!(pick(host("10.1.3.4", "", "", "")), 3);
    }

    #[test]
    fn idc_then_location_then_hostname() {
        assert_eq!(pick(host("192.168.0.1", "idc-c", "cn|sh", "build-1")), 4);
        assert_eq!(pick(host("192.168.0.1", "", "cn|sh|pd", "web-1")), 5);
        assert_eq!(pick(host("192.168.0.1", "", "cn|hz|xh", "build-1")), 4);
        assert_eq!(pick(host("192.168.0.1", "", "us", "build-7")), 5);
    }

    #[test]
    fn nothing_matches_gives_the_default() {
        assert_eq!(pick(host("192.168.0.1", "x", "us", "web")), 1);
        assert_eq!(pick(host("garbage", "", "", "")), 1);
        assert!(!score(&clusters()[0], &host("1.1.1.1", "", "", "")).matched());
    }

    #[test]
    fn hostname_rules_match_the_whole_name() {
        assert!(hostname_matches(&["build-.*".into()], "build-3"));
        assert!(!hostname_matches(&["build".into()], "mybuild-3"));
        assert!(!hostname_matches(&["(".into()], "("));
    }

    #[test]
    fn validation_rejects_bad_scopes() {
        assert!(validate_scopes(&Scopes {
            cidrs: vec!["10.0.0.0/33".into()],
            ..Scopes::default()
        })
        .is_err());
        assert!(validate_scopes(&Scopes {
            hostnames: vec!["(".into()],
            ..Scopes::default()
        })
        .is_err());
        assert!(validate_scopes(&clusters()[4].scopes).is_ok());
    }
}
