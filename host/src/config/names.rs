//! Validated names and quantities used in pipeline files.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = String;
            fn try_from(s: &str) -> Result<Self, String> {
                Self::check(s).map(|()| $name(Arc::from(s)))
            }
        }
    };
}

name_type! {
    /// A plugin's name in a pipeline: lowercase letters, digits and `-`/`_`,
    /// starting with a letter; at most 64 characters. It names the route,
    /// queues and log fields, so it must be safe everywhere.
    PluginName
}

name_type! {
    /// A message type such as `PlaceOrder` or `billing.InvoiceSent`: letters,
    /// digits, `_`, `-` and `.`, starting with a letter; at most 128
    /// characters.
    MessageType
}

impl PluginName {
    /// What [`PluginName::check`] accepts, as a regular expression (for the
    /// pipeline file's JSON Schema).
    pub const PATTERN: &'static str = "^[a-z][a-z0-9_-]{0,63}$";

    fn check(s: &str) -> Result<(), String> {
        let mut chars = s.chars();
        match chars.next() {
            None => return Err("a plugin name must not be empty".into()),
            Some(c) if !c.is_ascii_lowercase() => {
                return Err(format!(
                    "plugin name `{s}` must start with a lowercase letter"
                ));
            }
            _ => {}
        }
        if s.len() > 64 {
            return Err(format!("plugin name `{s}` is longer than 64 characters"));
        }
        if let Some(bad) = chars
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "plugin name `{s}` contains `{bad}`; use lowercase letters, digits, `-` and `_`"
            ));
        }
        Ok(())
    }
}

impl MessageType {
    /// What [`MessageType::check`] accepts, as a regular expression (for
    /// the pipeline file's JSON Schema).
    pub const PATTERN: &'static str = "^[A-Za-z][A-Za-z0-9_.-]{0,127}$";

    fn check(s: &str) -> Result<(), String> {
        let mut chars = s.chars();
        match chars.next() {
            None => return Err("a message type must not be empty".into()),
            Some(c) if !c.is_ascii_alphabetic() => {
                return Err(format!("message type `{s}` must start with a letter"));
            }
            _ => {}
        }
        if s.len() > 128 {
            return Err(format!("message type `{s}` is longer than 128 characters"));
        }
        if let Some(bad) =
            chars.find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(format!(
                "message type `{s}` contains `{bad}`; use letters, digits, `_`, `-` and `.`"
            ));
        }
        Ok(())
    }
}

/// Parses a size such as `64 MiB`, `512KiB`, `2GB` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write it like \"64 MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}`; use B, KiB, MiB, GiB, KB, MB or GB"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size `{s}` is too large"))
}

/// Parses a duration such as `500ms`, `2s` or `1m 30s`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|_| {
        format!("`{s}` is not a duration; write it like \"500ms\", \"2s\" or \"1m 30s\"")
    })
}

/// Formats a byte count the way users write it.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names() {
        assert!(PluginName::try_from("orders").is_ok());
        assert!(PluginName::try_from("orders-eu_2").is_ok());
        assert!(PluginName::try_from("Orders").is_err());
        assert!(PluginName::try_from("2fast").is_err());
        assert!(PluginName::try_from("a b").is_err());
        assert!(PluginName::try_from("").is_err());
    }

    #[test]
    fn message_types() {
        assert!(MessageType::try_from("PlaceOrder").is_ok());
        assert!(MessageType::try_from("billing.InvoiceSent-v2").is_ok());
        assert!(MessageType::try_from("Place Order").is_err());
        assert!(MessageType::try_from(".x").is_err());
    }

    /// The patterns the schema publishes say what `check` says, on names
    /// at and past every rule's edge.
    #[test]
    fn the_published_patterns_agree_with_the_checks() {
        fn agree(pattern: &str, check: fn(&str) -> bool, names: &[&str], longest: usize) {
            let long = |n: usize| format!("a{}", "b".repeat(n - 1));
            for s in names
                .iter()
                .map(|s| (*s).to_owned())
                .chain([long(longest), long(longest + 1)])
            {
                let matches = jsonschema::is_valid(
                    &serde_json::json!({ "pattern": pattern }),
                    &serde_json::json!(s),
                );
                assert_eq!(matches, check(&s), "{pattern} on {s:?}");
            }
        }
        let names = [
            "orders",
            "orders-eu_2",
            "a",
            "Orders",
            "2fast",
            "a b",
            "",
            "_a",
            "a.b",
            "é",
            "aé",
            "-a",
            "a\n",
        ];
        agree(
            PluginName::PATTERN,
            |s| PluginName::try_from(s).is_ok(),
            &names,
            64,
        );
        let types = [
            "PlaceOrder",
            "billing.InvoiceSent-v2",
            "a",
            "Place Order",
            ".x",
            "1x",
            "",
            "x_y",
            "x/y",
            "Ä",
            "xÄ",
            "x\n",
        ];
        agree(
            MessageType::PATTERN,
            |s| MessageType::try_from(s).is_ok(),
            &types,
            128,
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64 MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("64 MiBs").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999999 GiB").is_err());
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1000), "1000 B");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("soon").is_err());
    }
}
