//! Secrets in connection strings: [`redact`] masks passwords before a URL
//! is shown in a diagnostic or a log, and tells the parsers whether a URL
//! written in the pipeline file holds one.

/// Whether a connection string carries a password: `user:password@` in a
/// URL, a `password=` query parameter, or a `password=` key-value pair.
pub(super) fn has_password(url: &str) -> bool {
    redact(url) != url
}

/// Keys whose values are secrets, in URL queries and key-value connection
/// strings (`host=db password=…`).
const SECRET_KEYS: [&str; 2] = ["password", "sslpassword"];

/// A connection string as it may be shown: the password of
/// `scheme://user:password@host`, and the value of every `password=` (or
/// `sslpassword=`) query parameter or key-value pair, become `***`.
pub fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (before_query, query) = match rest.split_once('?') {
                Some((b, q)) => (b, Some(q)),
                None => (rest, None),
            };
            let mut out = format!("{scheme}://");
            match before_query.rsplit_once('@') {
                Some((userinfo, host)) => match userinfo.split_once(':') {
                    Some((user, _)) => out.push_str(&format!("{user}:***@{host}")),
                    None => out.push_str(before_query),
                },
                None => out.push_str(before_query),
            }
            if let Some(q) = query {
                out.push('?');
                let pairs: Vec<String> = q
                    .split('&')
                    .map(|pair| match pair.split_once('=') {
                        Some((k, _)) if SECRET_KEYS.contains(&k.to_ascii_lowercase().as_str()) => {
                            format!("{k}=***")
                        }
                        _ => pair.to_owned(),
                    })
                    .collect();
                out.push_str(&pairs.join("&"));
            }
            out
        }
        None => redact_key_values(url),
    }
}

/// `key=value key='quoted value'`, with secret values replaced.
fn redact_key_values(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for part in key_values(s) {
        match part {
            KeyValuePart::Pair { key, value, text } => {
                if SECRET_KEYS.contains(&key.to_ascii_lowercase().as_str()) {
                    out.push_str(&text[..text.len() - value.len()]);
                    out.push_str("***");
                } else {
                    out.push_str(text);
                }
            }
            KeyValuePart::Other(text) => out.push_str(text),
        }
    }
    out
}

/// A piece of a key-value connection string (libpq's
/// `host=db password='a b'`), in order, so that the pieces put back
/// together are the string.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyValuePart<'a> {
    /// `key = value` as written (`text`); `value` as written, quotes and
    /// escapes included, at the end of `text`.
    Pair {
        key: &'a str,
        value: &'a str,
        text: &'a str,
    },
    /// Spaces between pairs, or trailing text that is not a pair.
    Other(&'a str),
}

/// Splits a key-value connection string into its pieces.
pub fn key_values(s: &str) -> Vec<KeyValuePart<'_>> {
    let mut parts = Vec::new();
    let mut rest = s;
    loop {
        let trimmed = rest.trim_start();
        if trimmed.len() < rest.len() {
            parts.push(KeyValuePart::Other(&rest[..rest.len() - trimmed.len()]));
        }
        rest = trimmed;
        if rest.is_empty() {
            return parts;
        }
        let Some(eq) = rest.find('=') else {
            parts.push(KeyValuePart::Other(rest));
            return parts;
        };
        let key = rest[..eq].trim();
        let after = &rest[eq + 1..];
        let value_at = eq + 1 + (after.len() - after.trim_start().len());
        let value = &rest[value_at..];
        // The value: quoted (with `\'` and `\\` escapes) or up to a space.
        let len = if value.starts_with('\'') {
            let mut escaped = false;
            let mut end = value.len();
            for (i, c) in value.char_indices().skip(1) {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        let end = value_at + len;
        parts.push(KeyValuePart::Pair {
            key,
            value: &rest[value_at..end],
            text: &rest[..end],
        });
        rest = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::{has_password, redact};

    #[test]
    fn every_form_of_password_is_redacted() {
        let cases = [
            (
                "postgres://ada:s3cret@db:5432/shop",
                "postgres://ada:***@db:5432/shop",
            ),
            (
                "postgres://ada@db/shop?password=s3cret&sslmode=require",
                "postgres://ada@db/shop?password=***&sslmode=require",
            ),
            (
                "postgresql://db/shop?sslmode=require&PASSWORD=s3cret",
                "postgresql://db/shop?sslmode=require&PASSWORD=***",
            ),
            (
                "host=db user=ada password=s3cret dbname=shop",
                "host=db user=ada password=*** dbname=shop",
            ),
            (
                "host=db password = 's3cret \\' with a quote' dbname=shop",
                "host=db password = *** dbname=shop",
            ),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
        ];
        for (given, shown) in cases {
            assert_eq!(redact(given), shown, "{given}");
            assert!(!redact(given).contains("s3cret"));
            assert!(has_password(given), "{given}");
        }
        for plain in [
            "postgres://db/shop?sslmode=require",
            "host=db dbname=shop",
            "amqp://127.0.0.1",
        ] {
            assert_eq!(redact(plain), plain);
            assert!(!has_password(plain));
        }
    }
}
