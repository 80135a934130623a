//! The OpenAPI v2 document as gnostic's protobuf (`openapi.v2.Document`
//! of `openapiv2/OpenAPIv2.proto`), which client-go's discovery client
//! asks `/openapi/v2` for and kube-openapi reads. Only what a document of
//! definitions uses is written: the swagger version, info, and each
//! schema's fields, vendor extensions as `Any` with their YAML (JSON is
//! YAML) text.

use serde_json::Value;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        bytes(out, field, s.as_bytes());
    }
}

fn boolean(out: &mut Vec<u8>, field: u32, b: bool) {
    if b {
        key(out, field, 0);
        out.push(1);
    }
}

fn int64(out: &mut Vec<u8>, field: u32, n: i64) {
    if n != 0 {
        key(out, field, 0);
        varint(out, n as u64);
    }
}

fn double(out: &mut Vec<u8>, field: u32, d: f64) {
    if d != 0.0 {
        key(out, field, 1);
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// `Any { yaml = 2 }` holding `v`.
fn any(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, 2, &v.to_string());
    out
}

/// `NamedAny { name = 1, value = 2 }`.
fn named_any(name: &str, v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, 1, name);
    bytes(&mut out, 2, &any(v));
    out
}

/// `NamedSchema { name = 1, value = 2 }`.
fn named_schema(name: &str, s: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    string(&mut out, 1, name);
    bytes(&mut out, 2, &schema(s));
    out
}

/// `openapi.v2.Schema`.
fn schema(s: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    let str_of = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or_default();
    string(&mut out, 1, str_of("$ref"));
    string(&mut out, 2, str_of("format"));
    string(&mut out, 3, str_of("title"));
    string(&mut out, 4, str_of("description"));
    if let Some(d) = s.get("default") {
        bytes(&mut out, 5, &any(d));
    }
    let num = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let int = |k: &str| s.get(k).and_then(Value::as_i64).unwrap_or(0);
    let flag = |k: &str| s.get(k).and_then(Value::as_bool).unwrap_or(false);
    double(&mut out, 6, num("multipleOf"));
    double(&mut out, 7, num("maximum"));
    boolean(&mut out, 8, flag("exclusiveMaximum"));
    double(&mut out, 9, num("minimum"));
    boolean(&mut out, 10, flag("exclusiveMinimum"));
    int64(&mut out, 11, int("maxLength"));
    int64(&mut out, 12, int("minLength"));
    string(&mut out, 13, str_of("pattern"));
    int64(&mut out, 14, int("maxItems"));
    int64(&mut out, 15, int("minItems"));
    boolean(&mut out, 16, flag("uniqueItems"));
    int64(&mut out, 17, int("maxProperties"));
    int64(&mut out, 18, int("minProperties"));
    for r in s
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        string(&mut out, 19, r.as_str().unwrap_or_default());
    }
    for e in s
        .get("enum")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        bytes(&mut out, 20, &any(e));
    }
    match s.get("additionalProperties") {
        // AdditionalPropertiesItem { schema = 1 | boolean = 2 }
        Some(Value::Bool(b)) => {
            let mut item = Vec::new();
            key(&mut item, 2, 0);
            item.push(u8::from(*b));
            bytes(&mut out, 21, &item);
        }
        Some(a @ Value::Object(_)) => {
            let mut item = Vec::new();
            bytes(&mut item, 1, &schema(a));
            bytes(&mut out, 21, &item);
        }
        _ => {}
    }
    // TypeItem { repeated string value = 1 }
    let types: Vec<&str> = match s.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let mut item = Vec::new();
        for t in types {
            string(&mut item, 1, t);
        }
        bytes(&mut out, 22, &item);
    }
    // ItemsItem { repeated Schema schema = 1 }
    let items: Vec<&Value> = match s.get("items") {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(o @ Value::Object(_)) => vec![o],
        _ => Vec::new(),
    };
    if !items.is_empty() {
        let mut item = Vec::new();
        for i in items {
            bytes(&mut item, 1, &schema(i));
        }
        bytes(&mut out, 23, &item);
    }
    for a in s
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        bytes(&mut out, 24, &schema(a));
    }
    // Properties { repeated NamedSchema additional_properties = 1 }
    if let Some(props) = s.get("properties").and_then(Value::as_object) {
        let mut item = Vec::new();
        for (name, p) in props {
            bytes(&mut item, 1, &named_schema(name, p));
        }
        bytes(&mut out, 25, &item);
    }
    string(&mut out, 26, str_of("discriminator"));
    boolean(&mut out, 27, flag("readOnly"));
    if let Some(e) = s.get("example") {
        bytes(&mut out, 30, &any(e));
    }
    for (k, v) in s.as_object().into_iter().flatten() {
        if k.starts_with("x-") {
            bytes(&mut out, 31, &named_any(k, v));
        }
    }
    out
}

/// `openapi.v2.Document` with the swagger version, info and definitions.
pub fn document(doc: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    string(
        &mut out,
        1,
        doc.get("swagger").and_then(Value::as_str).unwrap_or("2.0"),
    );
    let mut info = Vec::new();
    string(
        &mut info,
        1,
        doc.pointer("/info/title")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    string(
        &mut info,
        2,
        doc.pointer("/info/version")
            .and_then(Value::as_str)
            .unwrap_or_default(),
    );
    bytes(&mut out, 2, &info);
    // Definitions { repeated NamedSchema additional_properties = 1 }
    let mut defs = Vec::new();
    for (name, s) in doc
        .get("definitions")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        bytes(&mut defs, 1, &named_schema(name, s));
    }
    bytes(&mut out, 9, &defs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemas_encode_as_gnostic_messages() {
        let s = serde_json::json!({"type": "object", "required": ["a"],
            "properties": {"a": {"type": "string"}}, "x-kubernetes-list-type": "map"});
        let b = schema(&s);
        // required "a" (19), type ["object"] (22), properties (25) and the
        // extension (31), in field order.
        assert_eq!(&b[..5], &[0x9a, 0x01, 1, b'a', 0xb2]);
        let ext = named_any("x-kubernetes-list-type", &serde_json::json!("map"));
        assert!(b.ends_with(&ext));
        assert!(ext.ends_with(b"\"map\""));
    }
}
