//! The pipeline file's JSON Schema, for editors (taplo, Even Better TOML)
//! and other tools, generated from the reader itself: the documents given
//! are parsed with [`reader::record_shapes`] on, and every table the reader
//! entered and every key it asked for, with the shape it read, becomes the
//! schema. A key the reader learns is in the schema the next time it is
//! generated; the tests compare it with the published one.
//!
//! The reader's own choices, ranges and name patterns are in it; what a
//! schema cannot say stays with `switchyard validate`: which keys go with
//! which transport kind, sizes and durations written as text, and the
//! rules that span plugins.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use super::reader::{self, Shape, TableShape};

/// The schema of the pipeline files, from what the reader asks of
/// `documents`. Together they must contain every table the reader knows
/// (each transport kind's, each optional section, a plugin with every
/// sub-table); a table the reader asked for that none of them has is an
/// error naming it.
pub fn generate(documents: &[&str]) -> Result<Value, String> {
    let mut shapes: BTreeMap<String, TableShape> = BTreeMap::new();
    for text in documents {
        let recorded = reader::record_shapes(|| {
            let _ = super::parse(text, Path::new("/pipeline.toml"));
        });
        for (path, table) in recorded {
            let into = shapes.entry(path).or_default();
            for (key, found) in table.keys {
                into.keys.entry(key).or_default().extend(found);
            }
            into.required.extend(table.required);
            into.entries |= table.entries;
            into.names = into.names.or(table.names);
            into.strings |= table.strings;
        }
    }
    if !shapes.contains_key("") {
        return Err("no document was read".into());
    }
    let mut root = table(&shapes, "")?;
    if let Value::Object(o) = &mut root {
        let mut head = Map::new();
        head.insert(
            "$schema".into(),
            json!("http://json-schema.org/draft-07/schema#"),
        );
        head.insert("title".into(), json!("Switchyard pipeline"));
        head.insert(
            "description".into(),
            json!(
                "A Switchyard pipeline file. Generated from the host's pipeline reader; every key is described in docs/pipelines.md. `switchyard validate` checks what a schema cannot: which keys go with which transport kind, sizes and durations written as text, and the rules that span plugins."
            ),
        );
        head.extend(std::mem::take(o));
        *o = head;
    }
    Ok(root)
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// The schema of the table at `path`.
fn table(shapes: &BTreeMap<String, TableShape>, path: &str) -> Result<Value, String> {
    let Some(shape) = shapes.get(path) else {
        return Err(format!(
            "the reader knows the table `{path}`, but no document given has it: add it to one"
        ));
    };
    if shape.entries {
        let mut out = json!({
            "type": "object",
            "additionalProperties": table(shapes, &child(path, "*"))?,
        });
        if let Some(pattern) = shape.names {
            out["propertyNames"] = json!({ "pattern": pattern });
        }
        return Ok(out);
    }
    if shape.strings {
        return Ok(json!({
            "type": "object",
            "additionalProperties": { "type": "string" },
        }));
    }
    let mut properties = Map::new();
    for (key, found) in &shape.keys {
        let mut options = Vec::new();
        for s in found {
            options.push(match s {
                Shape::String => json!({ "type": "string" }),
                Shape::Bool => json!({ "type": "boolean" }),
                Shape::Count => json!({ "type": "integer", "minimum": 0 }),
                Shape::CountIn(min, max) => {
                    json!({ "type": "integer", "minimum": min, "maximum": max })
                }
                Shape::OneOf(allowed) => json!({ "type": "string", "enum": allowed }),
                Shape::StringsMatching(pattern) => json!({
                    "type": "array",
                    "items": { "type": "string", "pattern": pattern },
                }),
                Shape::Number => json!({ "type": "number" }),
                Shape::StringOrInt => json!({ "type": ["string", "integer"] }),
                Shape::Strings => json!({ "type": "array", "items": { "type": "string" } }),
                Shape::Table => table(shapes, &child(path, key))?,
                Shape::Tables => json!({
                    "type": "array",
                    "items": table(shapes, &format!("{}[]", child(path, key)))?,
                }),
            });
        }
        let schema = match options.len() {
            1 => options.remove(0),
            _ => json!({ "anyOf": options }),
        };
        properties.insert((*key).to_owned(), schema);
    }
    let mut out = Map::new();
    out.insert("type".into(), json!("object"));
    out.insert("properties".into(), Value::Object(properties));
    if !shape.required.is_empty() {
        out.insert("required".into(), json!(shape.required));
    }
    out.insert("additionalProperties".into(), json!(false));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_nobody_wrote_is_named() {
        // No [admin] table: its keys would be missing from the schema.
        let doc = "[plugins.a]\nwasm = \"a.wasm\"\ncommands = [\"A\"]\n";
        let err = generate(&[doc]).unwrap_err();
        assert!(
            err.contains("`admin`") && err.contains("no document given has it"),
            "{err}"
        );
    }

    #[test]
    fn keys_tables_and_named_entries_become_the_schema() {
        let doc = r#"
            [pipeline]
            name = "p"
            [plugins.a]
            wasm = "a.wasm"
            commands = ["A"]
            retry = { immediate = 1 }
            grants = { env = { K = "v" }, dirs = [{ host = "h", guest = "/g" }] }
            saga = { starts = ["A"], instance_key = "$.id", instance_keys = { A = "$.id" } }
        "#;
        let shapes = reader::record_shapes(|| {
            let _ = crate::config::parse(doc, Path::new("/p.toml"));
        });
        let schema = table(&shapes, "").unwrap_err();
        assert!(schema.contains("`admin`"), "{schema}");
        let plugin = table(&shapes, "plugins").unwrap();
        let plugin = &plugin["additionalProperties"];
        assert_eq!(plugin["required"], json!(["wasm"]));
        assert_eq!(plugin["additionalProperties"], json!(false));
        assert_eq!(
            plugin["properties"]["commands"],
            json!({
                "type": "array",
                "items": { "type": "string", "pattern": crate::config::MessageType::PATTERN },
            })
        );
        assert_eq!(
            plugin["properties"]["grants"]["properties"]["env"]["additionalProperties"],
            json!({ "type": "string" })
        );
        assert_eq!(
            plugin["properties"]["grants"]["properties"]["dirs"]["items"]["properties"]["guest"],
            json!({ "type": "string" })
        );
        assert_eq!(
            table(&shapes, "pipeline").unwrap()["properties"]["name"]["type"],
            "string"
        );
    }
}
