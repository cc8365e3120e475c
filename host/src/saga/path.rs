//! The JSON paths a saga's instance keys are written in: `$` followed by
//! `.name`, `["name"]` and `[index]` steps, e.g. `$.order.id` or
//! `$.lines[0]["sku code"]`. No wildcards or filters: a path names one
//! value.

use serde_json::Value;

/// A parsed path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath {
    text: String,
    steps: Vec<PathStep>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathStep {
    Field(String),
    Index(usize),
}

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("`{text}` is not a JSON path: {why}"));
        let Some(mut rest) = text.strip_prefix('$') else {
            return bad("it must start with `$`, e.g. `$.order_id`, or be `correlation-id`");
        };
        let mut steps = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let name = &after[..end];
                if name.is_empty() {
                    return bad("a `.` must be followed by a field name");
                }
                steps.push(PathStep::Field(name.to_owned()));
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix("[\"") {
                let Some(end) = after.find("\"]") else {
                    return bad("a `[\"` must be closed by `\"]`");
                };
                steps.push(PathStep::Field(after[..end].to_owned()));
                rest = &after[end + 2..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let Some(end) = after.find(']') else {
                    return bad("a `[` must be closed by `]`");
                };
                match after[..end].parse::<usize>() {
                    Ok(i) => steps.push(PathStep::Index(i)),
                    Err(_) => return bad("an index must be a number, e.g. `[0]`"),
                }
                rest = &after[end + 1..];
            } else {
                return bad("after `$`, each step is `.name`, `[\"name\"]` or `[index]`");
            }
        }
        if steps.is_empty() {
            return bad("it names the whole payload, not a property of it");
        }
        Ok(JsonPath {
            text: text.to_owned(),
            steps,
        })
    }

    /// The value the path names, as an instance id: a string as it is, a
    /// number or a boolean as its JSON text.
    pub fn resolve(&self, value: &Value) -> Result<String, String> {
        let mut at = value;
        for step in &self.steps {
            let next = match step {
                PathStep::Field(name) => at.get(name.as_str()),
                PathStep::Index(i) => at.get(*i),
            };
            at = next.ok_or_else(|| {
                format!(
                    "{} does not resolve in the payload: it has no such property",
                    self.text
                )
            })?;
        }
        match at {
            Value::String(s) => Ok(s.clone()),
            // Integers only: a float could name two ids as one (and 17.0
            // and 17 as two).
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
            Value::Number(n) => Err(format!(
                "{} is {n} in the payload, which is not an integer",
                self.text
            )),
            Value::Bool(b) => Ok(b.to_string()),
            Value::Null => Err(format!("{} is null in the payload", self.text)),
            Value::Array(_) | Value::Object(_) => Err(format!(
                "{} names an {} in the payload, not a string or number",
                self.text,
                if at.is_array() { "array" } else { "object" }
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_name_one_value() {
        let v = json!({"order": {"id": "A-1", "lines": [{"sku code": "X"}]}, "n": 3});
        let get = |p: &str| JsonPath::parse(p).unwrap().resolve(&v);
        assert_eq!(get("$.order.id").unwrap(), "A-1");
        assert_eq!(get("$.order.lines[0][\"sku code\"]").unwrap(), "X");
        assert_eq!(get("$[\"n\"]").unwrap(), "3");
        assert!(get("$.order").unwrap_err().contains("object"));
        assert!(
            get("$.order.lines[3]")
                .unwrap_err()
                .contains("does not resolve")
        );
    }

    #[test]
    fn malformed_paths_are_refused() {
        for p in [
            "order.id", "$", "$.", "$..a", "$[x]", "$[\"a\"", "$[0", "$a",
        ] {
            assert!(JsonPath::parse(p).is_err(), "{p}");
        }
    }
}
