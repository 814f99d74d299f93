//! The policy's JSON Schema (`lifeboat policy schema`, for editors) and its Markdown reference
//! (policies/README.md), both made from the raw types and their doc comments, so neither can drift
//! from what the parser accepts: a test fails when policies/README.md is not what this produces.

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use super::raw::*;

/// The JSON Schema of a policy file (draft 2020-12).
pub fn schema() -> Value {
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    let sub = |v: schemars::Schema| serde_json::to_value(v).unwrap_or(Value::Null);
    let repository = sub(generator.subschema_for::<RawRepository>());
    let encryption = sub(generator.subschema_for::<RawEncryption>());
    let signing = sub(generator.subschema_for::<RawSigning>());
    let agent = sub(generator.subschema_for::<RawAgent>());
    let defaults = sub(generator.subschema_for::<RawDefaults>());
    let kinds = crate::source::Kind::raw_schemas(&mut generator);
    let notify = sub(generator.subschema_for::<RawNotify>());
    let _ = generator.subschema_for::<RawCopy>();
    let mut defs = generator.take_definitions(true);
    let copies = copy_schema(&defs);
    let mut one_of = Vec::new();
    for (kind, def, schema) in kinds {
        let kind = kind.name();
        one_of.push(sub(schema));
        if let Some(props) = defs
            .get_mut(&def)
            .and_then(|d| d.get_mut("properties"))
            .and_then(Value::as_object_mut)
        {
            props.insert(
                "kind".into(),
                json!({ "const": kind, "description": format!("Always `{kind}` here.") }),
            );
        }
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lifeboat policy",
        "description": "A lifeboat policy file (TOML). `${VAR}` in any string is replaced from the environment.",
        "type": "object",
        "additionalProperties": false,
        "required": ["repository", "encryption", "sources"],
        "properties": {
            "repository": repository,
            "encryption": encryption,
            "signing": signing,
            "agent": agent,
            "defaults": defaults,
            "sources": { "type": "array", "minItems": 1, "items": { "oneOf": one_of } },
            "notify": { "type": "array", "items": notify },
            "copies": { "type": "array", "items": copies },
        },
        "$defs": Value::Object(defs),
    })
}

/// A `[[copies]]` table: the copy's own keys and every `[repository]` key, in one object (the
/// parser splits them; a schema with two closed objects could accept neither).
fn copy_schema(defs: &Map<String, Value>) -> Value {
    let mut props = Map::new();
    for def in ["RawCopy", "RawRepository"] {
        if let Some(p) = defs[def]["properties"].as_object() {
            props.extend(p.clone());
        }
    }
    json!({
        "type": "object",
        "description": defs["RawCopy"]["description"],
        "additionalProperties": false,
        "required": ["name", "url"],
        "properties": props,
    })
}

/// The sections of the reference, in order: heading, definition name, how it is written. Each
/// kind's `[[sources]]` table comes after `objectives`, in the table of kinds' order.
fn sections() -> Vec<(String, String, &'static str)> {
    let fixed = |h: &str, d: &str, f: &'static str| (h.to_string(), d.to_string(), f);
    let mut out = vec![
        fixed("[repository]", "RawRepository", "table"),
        fixed("repository.object_lock", "RawObjectLock", "inline table"),
        fixed("[encryption]", "RawEncryption", "table"),
        fixed("[signing]", "RawSigning", "table"),
        fixed("[agent]", "RawAgent", "table"),
        fixed("[defaults]", "RawDefaults", "table"),
        fixed(
            "compression",
            "RawCompression",
            "inline table, in [defaults] or a source",
        ),
        fixed(
            "retention",
            "RawRetention",
            "inline table, in [defaults] or a source",
        ),
        fixed(
            "objectives",
            "RawObjectives",
            "inline table, in [defaults] or a source",
        ),
    ];
    let mut generator = SchemaSettings::draft2020_12().into_generator();
    for (kind, def, _) in crate::source::Kind::raw_schemas(&mut generator) {
        out.push((
            format!("[[sources]] kind = \"{kind}\""),
            def,
            "array of tables",
        ));
    }
    out.extend([
        fixed("[sources.verify]", "RawVerify", "table under a source"),
        fixed("verify.checks", "RawCheck", "array of inline tables"),
        fixed("[[notify]]", "RawNotify", "array of tables"),
        fixed("[[copies]]", "RawCopy", "array of tables"),
    ]);
    out
}

/// policies/README.md: every key of every section, with its type and doc comment.
pub fn reference() -> String {
    let schema = schema();
    let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
    let mut out = String::from(
        "# Policy reference\n\n\
         Generated from the code's doc comments by `cargo test` (set `UPDATE_POLICY_REFERENCE=1` to\n\
         rewrite it); `lifeboat policy schema` prints the same as a JSON Schema for editors.\n\
         Unknown keys are errors. Any string may hold `${VAR}`, replaced from the environment (a\n\
         missing variable is an error). Durations are written like `30s`, `15m`, `2h`, `14d`; sizes\n\
         like `16MiB`. `lifeboat policy check FILE` validates a file and names every problem's field.\n\
         Examples: dev.toml, staging.toml, production.toml in this directory.\n",
    );
    for (heading, def, form) in sections() {
        let Some(d) = defs.get(&def) else { continue };
        out.push_str(&format!("\n## `{heading}`\n\n"));
        if let Some(desc) = d.get("description").and_then(Value::as_str) {
            out.push_str(&format!("{} ({form})\n\n", one_line(desc)));
        }
        out.push_str("| key | type | required | meaning |\n|---|---|---|---|\n");
        let required: Vec<&str> = d["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let empty = Map::new();
        let props = d["properties"].as_object().unwrap_or(&empty);
        for (key, p) in props {
            let desc = match p["const"].as_str() {
                Some(kind) if key == "kind" => format!("Always `{kind}`."),
                _ => p["description"].as_str().map(one_line).unwrap_or_default(),
            };
            out.push_str(&format!(
                "| `{key}` | {} | {} | {} |\n",
                type_of(p, &defs),
                if required.contains(&key.as_str()) {
                    "yes"
                } else {
                    ""
                },
                desc.replace('|', "\\|")
            ));
        }
    }
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A short type name for a property schema.
fn type_of(p: &Value, defs: &Map<String, Value>) -> String {
    if let Some(r) = p.get("$ref").and_then(Value::as_str) {
        let name = r.rsplit('/').next().unwrap_or(r);
        return match defs.get(name) {
            Some(d) if d.get("enum").is_some() || d.get("oneOf").is_some() => enum_values(d),
            _ => format!("table ({})", name.trim_start_matches("Raw").to_lowercase()),
        };
    }
    if let Some(any) = p.get("anyOf").and_then(Value::as_array) {
        let parts: Vec<String> = any
            .iter()
            .filter(|v| v.get("type").and_then(Value::as_str) != Some("null"))
            .map(|v| type_of(v, defs))
            .collect();
        return parts.join(" or ");
    }
    match &p["type"] {
        Value::String(t) if t == "array" => format!("array of {}", type_of(&p["items"], defs)),
        Value::String(t) => match t.as_str() {
            "integer" => "integer".into(),
            "boolean" => "boolean".into(),
            "string" => "string".into(),
            other => other.into(),
        },
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "value".into(),
    }
}

fn enum_values(d: &Value) -> String {
    let mut values: Vec<String> = Vec::new();
    if let Some(e) = d.get("enum").and_then(Value::as_array) {
        values.extend(
            e.iter()
                .filter_map(Value::as_str)
                .map(|v| format!("`\"{v}\"`")),
        );
    }
    if let Some(one) = d.get("oneOf").and_then(Value::as_array) {
        for v in one {
            if let Some(c) = v.get("const").and_then(Value::as_str) {
                values.push(format!("`\"{c}\"`"));
            }
            if let Some(e) = v.get("enum").and_then(Value::as_array) {
                values.extend(
                    e.iter()
                        .filter_map(Value::as_str)
                        .map(|x| format!("`\"{x}\"`")),
                );
            }
        }
    }
    values.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_knows_every_section_and_kind() {
        let s = schema();
        for key in TOP_LEVEL_KEYS {
            assert!(s["properties"].get(*key).is_some(), "{key} missing");
        }
        assert_eq!(
            s["$defs"]["RawRedisSource"]["properties"]["kind"]["const"],
            "redis"
        );
        assert_eq!(s["$defs"]["RawRedisSource"]["additionalProperties"], false);
    }

    #[test]
    fn policies_readme_is_the_generated_reference() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/README.md");
        let want = reference();
        if std::env::var_os("UPDATE_POLICY_REFERENCE").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "policies/README.md is out of date: run UPDATE_POLICY_REFERENCE=1 cargo test -p lifeboat --lib schema"
        );
    }
}
