//! HTTP origins a plugin may call (`grants.http`): a scheme, a host (or
//! every subdomain of one) and a port, nothing more.

use std::fmt;

/// `http` or `https`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// One origin of a plugin's `http` grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub scheme: Scheme,
    /// Lower case; an IPv6 address without its brackets.
    host: String,
    /// `*.example.com`: any name below `host`, never `host` itself.
    subdomains: bool,
    pub port: u16,
}

/// The longest origin accepted (a DNS name is at most 253 bytes).
const MAX_ORIGIN: usize = 300;

impl Origin {
    /// Reads `https://api.example.com`, `http://127.0.0.1:8081`,
    /// `https://*.example.com:8443` or `http://[::1]:8080`. A path other
    /// than `/`, a query, user information or a wildcard anywhere but the
    /// whole first label is refused, with the reason.
    pub fn parse(text: &str) -> Result<Origin, String> {
        if text.len() > MAX_ORIGIN {
            return Err(format!("an origin is at most {MAX_ORIGIN} bytes"));
        }
        let (scheme, rest) = if let Some(rest) = text.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = text.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else {
            return Err("an origin starts with `http://` or `https://`".into());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(
                "an origin has no path or query: write only the scheme, host and port".into(),
            );
        }
        if rest.contains('@') {
            return Err("an origin has no user name or password".into());
        }
        let (host, port) = split_host_port(rest)?;
        let port = match port {
            None => scheme.default_port(),
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{p}` is not a port (1 to 65535)"))?,
        };
        let (subdomains, host) = match host.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host),
        };
        if host.is_empty() {
            return Err("the origin names no host".into());
        }
        if host.contains('*') {
            return Err(
                "a wildcard stands only for the whole first label, as in `https://*.example.com`"
                    .into(),
            );
        }
        let ip = host.parse::<std::net::IpAddr>().is_ok();
        if subdomains && ip {
            return Err("an IP address has no subdomains".into());
        }
        if !ip && !host.split('.').all(is_label) {
            return Err(format!("`{host}` is not a host name"));
        }
        // A name's last label is never all digits: `*.0.1` would stand for
        // IP addresses such as 127.0.0.1.
        if !ip
            && host
                .rsplit('.')
                .next()
                .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(format!(
                "`{host}` is neither a host name nor an IP address (a name's last label has a letter)"
            ));
        }
        if subdomains && !host.contains('.') {
            return Err(format!(
                "`*.{host}` would allow every name under a top-level domain: name the domain"
            ));
        }
        Ok(Origin {
            scheme,
            host: host.to_ascii_lowercase(),
            subdomains,
            port,
        })
    }

    /// Whether a request to `scheme://host:port` is to this origin. `host`
    /// is compared without case; an IPv6 address comes without brackets.
    pub fn allows(&self, scheme: Scheme, host: &str, port: u16) -> bool {
        if scheme != self.scheme || port != self.port {
            return false;
        }
        let host = host.strip_suffix('.').unwrap_or(host);
        if self.subdomains {
            // Compared as bytes: no slicing inside a character.
            let (host, own) = (host.as_bytes(), self.host.as_bytes());
            host.len() > own.len() + 1
                && host[host.len() - own.len()..].eq_ignore_ascii_case(own)
                && host[host.len() - own.len() - 1] == b'.'
        } else {
            host.eq_ignore_ascii_case(&self.host)
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme.as_str())?;
        if self.subdomains {
            f.write_str("*.")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if self.port != self.scheme.default_port() {
            write!(f, ":{}", self.port)?;
        }
        Ok(())
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(s: &str) -> Result<(&str, Option<&str>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address in brackets lacks its `]`")?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("`{host}` is not an IPv6 address"));
        }
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, Some(port))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("`{after}` after the address is not a port")),
        };
    }
    Ok(match s.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    })
}

/// A DNS label: letters, digits and inner hyphens, 1 to 63 bytes.
fn is_label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Origin {
        Origin::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn origins_are_read_with_their_default_ports() {
        let o = ok("https://API.Example.com/");
        assert_eq!((o.scheme, o.port), (Scheme::Https, 443));
        assert_eq!(o.to_string(), "https://api.example.com");
        assert_eq!(ok("http://127.0.0.1:8081").port, 8081);
        assert_eq!(ok("http://[::1]:8080").to_string(), "http://[::1]:8080");
        assert_eq!(
            ok("https://*.example.com:8443").to_string(),
            "https://*.example.com:8443"
        );
    }

    #[test]
    fn what_is_not_an_origin_is_refused_with_the_reason() {
        for (text, says) in [
            ("ftp://example.com", "starts with"),
            ("https://example.com/pay", "no path"),
            ("https://example.com?x=1", "no path"),
            ("https://user:pw@example.com", "user name"),
            ("https://example.com:0", "not a port"),
            ("https://example.com:99999", "not a port"),
            ("https://", "no host"),
            ("https://a.*.example.com", "first label"),
            ("https://*example.com", "first label"),
            ("https://*.com", "top-level"),
            ("https://*.10.0.0.1", "no subdomains"),
            ("https://*.0.1", "neither a host name nor an IP"),
            ("http://10.0.1", "neither a host name nor an IP"),
            ("https://exa mple.com", "not a host name"),
            ("http://[::1", "lacks"),
            ("http://[nope]:80", "not an IPv6"),
        ] {
            let err = Origin::parse(text).expect_err(text);
            assert!(err.contains(says), "{text}: {err}");
        }
        assert!(Origin::parse(&format!("https://{}.com", "a".repeat(400))).is_err());
    }

    #[test]
    fn a_request_is_allowed_only_at_its_exact_scheme_host_and_port() {
        let exact = ok("https://api.example.com");
        assert!(exact.allows(Scheme::Https, "API.example.com", 443));
        assert!(exact.allows(Scheme::Https, "api.example.com.", 443));
        assert!(!exact.allows(Scheme::Http, "api.example.com", 443));
        assert!(!exact.allows(Scheme::Https, "api.example.com", 8443));
        assert!(!exact.allows(Scheme::Https, "evil-api.example.com", 443));
        assert!(!exact.allows(Scheme::Https, "api.example.com.evil.net", 443));

        let wild = ok("https://*.example.com");
        assert!(wild.allows(Scheme::Https, "a.example.com", 443));
        assert!(wild.allows(Scheme::Https, "a.b.example.com", 443));
        assert!(!wild.allows(Scheme::Https, "example.com", 443));
        assert!(!wild.allows(Scheme::Https, "badexample.com", 443));
        assert!(!wild.allows(Scheme::Https, ".example.com", 443));

        let v6 = ok("http://[::1]:8080");
        assert!(v6.allows(Scheme::Http, "::1", 8080));
    }
}
