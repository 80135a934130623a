//! Request bodies in Kubernetes' protobuf encoding, turned into the JSON
//! the rest of the apiserver works on.
//!
//! client-go's typed clients (`kubectl create deployment`, `kubectl create
//! namespace`, `kubectl drain`'s evictions, controllers built on
//! client-go) send `application/vnd.kubernetes.protobuf`: the magic
//! `k8s\0`, then a `runtime.Unknown` holding the apiVersion, the kind and
//! the object's own message. The object is decoded field by field against
//! `schema.txt` (field numbers and JSON names, written by `cargo xtask
//! gen-protobuf-schema`), with the JSON forms Kubernetes gives its special
//! types: Time, MicroTime, Duration, Quantity, IntOrString, RawExtension,
//! FieldsV1. Responses stay JSON, which client-go also accepts.

use std::collections::HashMap;
use std::sync::OnceLock;

use base64::Engine;
use serde_json::{Map, Number, Value};

const MAGIC: &[u8] = b"k8s\0";
const SCHEMA: &str = include_str!("schema.txt");

/// Go's zero time.Time (0001-01-01T00:00:00Z) in Unix seconds: what
/// client-go writes for an unset non-pointer Time; JSON has it as null.
const GO_ZERO_TIME: i64 = -62_135_596_800;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("the body does not start with the Kubernetes protobuf magic k8s\\0")]
    Magic,
    #[error("truncated or malformed protobuf at byte {0}")]
    Malformed(usize),
    #[error("protobuf bodies of kind {kind:?} in {api_version:?} are not served")]
    UnknownKind { api_version: String, kind: String },
    #[error("field {field} of {message}: {reason}")]
    Field {
        message: String,
        field: String,
        reason: String,
    },
    #[error("wire type {0:?} where the schema has {1:?}")]
    WireType(Wire, Wire),
    #[error("content encoding {0:?} is not supported")]
    Encoding(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Card {
    One,
    Many,
    Map,
    Inline,
}

#[derive(Debug)]
struct Field {
    json: String,
    card: Card,
    ty: String,
}

type Schema = HashMap<String, HashMap<u32, Field>>;

fn schema() -> &'static Schema {
    static S: OnceLock<Schema> = OnceLock::new();
    S.get_or_init(|| parse_schema(SCHEMA))
}

fn parse_schema(text: &str) -> Schema {
    let mut out: Schema = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if let Some(name) = line.strip_prefix('@') {
            out.entry(name.to_string()).or_default();
            current = Some(name.to_string());
            continue;
        }
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), [tag, json, card, ty]) = (&current, parts.as_slice()) else {
            continue;
        };
        let Ok(tag) = tag.parse::<u32>() else {
            continue;
        };
        let card = match *card {
            "1" => Card::One,
            "*" => Card::Many,
            "map" => Card::Map,
            _ => Card::Inline,
        };
        if let Some(m) = out.get_mut(name) {
            m.insert(
                tag,
                Field {
                    json: json.to_string(),
                    card,
                    ty: ty.to_string(),
                },
            );
        }
    }
    out
}

/// The protobuf package of a served API group version.
fn package(api_version: &str) -> String {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let short = match group {
        "" => "core",
        "meta.k8s.io" => return format!("apimachinery.pkg.apis.meta.{version}"),
        // The package is the group's first label: `rbac` for
        // rbac.authorization.k8s.io, `coordination` for coordination.k8s.io.
        g => g.split('.').next().unwrap_or(g),
    };
    format!("api.{short}.{version}")
}

/// Decodes a `application/vnd.kubernetes.protobuf` body into the object's
/// JSON, with `apiVersion` and `kind` set from the envelope.
pub fn decode(body: &[u8]) -> Result<Value, DecodeError> {
    let rest = body.strip_prefix(MAGIC).ok_or(DecodeError::Magic)?;
    let mut api_version = String::new();
    let mut kind = String::new();
    let mut raw: &[u8] = &[];
    let mut encoding = String::new();
    let mut r = Reader::new(rest, MAGIC.len());
    while let Some((tag, wire)) = r.key()? {
        match (tag, wire) {
            (1, Wire::Len) => {
                let tm = r.bytes()?;
                let mut t = Reader::new(tm, 0);
                while let Some((tag, wire)) = t.key()? {
                    match (tag, wire) {
                        (1, Wire::Len) => api_version = t.string()?,
                        (2, Wire::Len) => kind = t.string()?,
                        (_, w) => t.skip(w)?,
                    }
                }
            }
            (2, Wire::Len) => raw = r.bytes()?,
            (3, Wire::Len) => encoding = r.string()?,
            (_, w) => r.skip(w)?,
        }
    }
    if !encoding.is_empty() {
        return Err(DecodeError::Encoding(encoding));
    }
    let schema = schema();
    // Options types (DeleteOptions) are registered in every group version
    // but live in meta/v1.
    let message = Some(format!("{}.{kind}", package(&api_version)))
        .filter(|m| schema.contains_key(m))
        .or_else(|| {
            let meta = format!("apimachinery.pkg.apis.meta.v1.{kind}");
            schema.contains_key(&meta).then_some(meta)
        })
        .ok_or_else(|| DecodeError::UnknownKind {
            api_version: api_version.clone(),
            kind: kind.clone(),
        })?;
    let mut obj = Map::new();
    obj.insert("apiVersion".into(), Value::String(api_version));
    obj.insert("kind".into(), Value::String(kind));
    decode_message(schema, &message, raw, MAGIC.len(), &mut obj)?;
    Ok(Value::Object(obj))
}

/// Decodes one message into `out` (which an inline field shares with its
/// parent).
fn decode_message(
    schema: &Schema,
    message: &str,
    buf: &[u8],
    base: usize,
    out: &mut Map<String, Value>,
) -> Result<(), DecodeError> {
    let fields = schema.get(message).ok_or_else(|| DecodeError::Field {
        message: message.to_string(),
        field: "-".into(),
        reason: "message not in the schema".into(),
    })?;
    let mut r = Reader::new(buf, base);
    while let Some((tag, wire)) = r.key()? {
        let Some(f) = fields.get(&tag) else {
            // Like any protobuf reader: a field this schema does not know
            // (a newer client) is skipped.
            tracing::debug!(message, tag, "unknown protobuf field skipped");
            r.skip(wire)?;
            continue;
        };
        let err = |reason: String| DecodeError::Field {
            message: message.to_string(),
            field: f.json.clone(),
            reason,
        };
        match f.card {
            Card::Inline => {
                let at = r.pos();
                let b = r.bytes()?;
                decode_message(schema, &f.ty, b, at, out)?;
            }
            Card::One => {
                if let Some(v) =
                    value(schema, &f.ty, wire, &mut r).map_err(|e| err(e.to_string()))?
                {
                    out.insert(f.json.clone(), v);
                }
            }
            Card::Many => {
                let entry = out
                    .entry(f.json.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Value::Array(items) = entry else {
                    return Err(err("repeated and singular at once".into()));
                };
                if wire == Wire::Len && matches!(f.ty.as_str(), "int32" | "int64" | "bool") {
                    // A packed repeated scalar.
                    let at = r.pos();
                    let b = r.bytes()?;
                    let mut p = Reader::new(b, at);
                    while !p.done() {
                        let v = p.varint()?;
                        items.push(scalar_varint(&f.ty, v));
                    }
                } else {
                    let v = value(schema, &f.ty, wire, &mut r).map_err(|e| err(e.to_string()))?;
                    items.push(v.unwrap_or_else(|| empty(&f.ty)));
                }
            }
            Card::Map => {
                let at = r.pos();
                let b = r.bytes()?;
                let mut e = Reader::new(b, at);
                let mut key = String::new();
                let mut val = None;
                while let Some((t, w)) = e.key()? {
                    match t {
                        1 => key = e.string()?,
                        2 => {
                            val = value(schema, &f.ty, w, &mut e).map_err(|x| err(x.to_string()))?
                        }
                        _ => e.skip(w)?,
                    }
                }
                let entry = out
                    .entry(f.json.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = entry {
                    m.insert(key, val.unwrap_or_else(|| empty(&f.ty)));
                }
            }
        }
    }
    Ok(())
}

/// What a list element or map value that `value` left out stands for: an
/// empty string is still an element (`args: [""]`) or a value.
fn empty(ty: &str) -> Value {
    match ty {
        "string" | "bytes" => Value::String(String::new()),
        _ => Value::Null,
    }
}

fn scalar_varint(ty: &str, v: u64) -> Value {
    match ty {
        "bool" => Value::Bool(v != 0),
        // int32 negatives are sign-extended to 64 bits on the wire.
        "int32" => Value::Number(Number::from(v as i64 as i32)),
        _ => Value::Number(Number::from(v as i64)),
    }
}

/// One value of type `ty`; `None` for what JSON leaves out (an empty
/// string, Go's zero time).
fn value(
    schema: &Schema,
    ty: &str,
    wire: Wire,
    r: &mut Reader<'_>,
) -> Result<Option<Value>, DecodeError> {
    let expected = match ty {
        "int32" | "int64" | "bool" => Wire::Varint,
        "double" => Wire::Fixed64,
        _ => Wire::Len,
    };
    if wire != expected {
        return Err(DecodeError::WireType(wire, expected));
    }
    let v = match ty {
        "string" => {
            let s = r.string()?;
            if s.is_empty() {
                return Ok(None);
            }
            Value::String(s)
        }
        "bytes" => {
            let b = r.bytes()?;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }
        "int32" | "int64" | "bool" => scalar_varint(ty, r.varint()?),
        "double" => {
            let bits = r.fixed64()?;
            Number::from_f64(f64::from_bits(bits)).map_or(Value::Null, Value::Number)
        }
        _ => {
            let at = r.pos();
            let b = r.bytes()?;
            return special(ty, b, at).unwrap_or_else(|| {
                let mut m = Map::new();
                decode_message(schema, ty, b, at, &mut m)?;
                Ok(Some(Value::Object(m)))
            });
        }
    };
    Ok(Some(v))
}

/// The types whose JSON form is not an object of their fields.
fn special(ty: &str, b: &[u8], at: usize) -> Option<Result<Option<Value>, DecodeError>> {
    let name = ty.rsplit('.').next().unwrap_or(ty);
    let pkg = ty.strip_suffix(name).unwrap_or_default();
    let out = match (pkg, name) {
        ("apimachinery.pkg.apis.meta.v1.", "Time" | "MicroTime") => {
            timestamp(b, at, name == "MicroTime")
        }
        ("apimachinery.pkg.apis.meta.v1.", "Duration") => fields(b, at).map(|f| {
            let ns = f.get(&1).map_or(0, |v| v.as_int());
            Some(Value::String(go_duration(ns)))
        }),
        ("apimachinery.pkg.api.resource.", "Quantity") => {
            fields(b, at).map(|f| f.get(&1).map(|v| Value::String(v.as_string())))
        }
        ("apimachinery.pkg.util.intstr.", "IntOrString") => fields(b, at).map(|f| {
            let is_string = f.get(&1).is_some_and(|v| v.as_int() == 1);
            Some(if is_string {
                Value::String(f.get(&3).map(|v| v.as_string()).unwrap_or_default())
            } else {
                Value::Number(Number::from(f.get(&2).map_or(0, |v| v.as_int()) as i32))
            })
        }),
        ("apimachinery.pkg.runtime.", "RawExtension")
        | ("apimachinery.pkg.apis.meta.v1.", "FieldsV1") => {
            fields(b, at).and_then(|f| match f.get(&1) {
                None => Ok(None),
                Some(Raw::Bytes([])) => Ok(None),
                Some(Raw::Bytes(raw)) => {
                    serde_json::from_slice(raw)
                        .map(Some)
                        .map_err(|_| DecodeError::Field {
                            message: ty.to_string(),
                            field: "raw".into(),
                            reason: "embedded object is not JSON".into(),
                        })
                }
                Some(Raw::Int(_)) => Err(DecodeError::Malformed(at)),
            })
        }
        _ => return None,
    };
    Some(out)
}

fn timestamp(b: &[u8], at: usize, micro: bool) -> Result<Option<Value>, DecodeError> {
    let f = fields(b, at)?;
    // client-go writes an unset Time as an empty message (or, from older
    // encoders, as Go's zero time); both are null in JSON.
    let Some(secs) = f.get(&1).map(|v| v.as_int()) else {
        return Ok(None);
    };
    if secs <= GO_ZERO_TIME {
        return Ok(None);
    }
    let nanos = f.get(&2).map_or(0, |v| v.as_int());
    let ts = jiff::Timestamp::new(secs, if micro { nanos as i32 } else { 0 })
        .map_err(|_| DecodeError::Malformed(at))?;
    let s = if micro {
        ts.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
    } else {
        ts.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
    };
    Ok(Some(Value::String(s)))
}

/// Go's time.Duration.String(): "1h2m3.5s", "1m0s", "250ms", "0s".
fn go_duration(ns: i64) -> String {
    if ns == 0 {
        return "0s".into();
    }
    let neg = ns < 0;
    let u = ns.unsigned_abs();
    let sign = if neg { "-" } else { "" };
    let frac = |v: u64, unit: u64| {
        let whole = v / unit;
        let rest = v % unit;
        if rest == 0 {
            whole.to_string()
        } else {
            let width = unit.ilog10() as usize;
            let digits = format!("{rest:0width$}");
            format!("{whole}.{}", digits.trim_end_matches('0'))
        }
    };
    if u < 1_000 {
        return format!("{sign}{u}ns");
    }
    if u < 1_000_000 {
        return format!("{sign}{}µs", frac(u, 1_000));
    }
    if u < 1_000_000_000 {
        return format!("{sign}{}ms", frac(u, 1_000_000));
    }
    let secs_ns = u % 60_000_000_000;
    let mins = u / 60_000_000_000;
    let s = format!("{}s", frac(secs_ns, 1_000_000_000));
    if mins == 0 {
        return format!("{sign}{s}");
    }
    let (h, m) = (mins / 60, mins % 60);
    if h == 0 {
        format!("{sign}{m}m{s}")
    } else {
        format!("{sign}{h}h{m}m{s}")
    }
}

enum Raw<'a> {
    Int(u64),
    Bytes(&'a [u8]),
}

impl Raw<'_> {
    fn as_int(&self) -> i64 {
        match self {
            Raw::Int(v) => *v as i64,
            Raw::Bytes(_) => 0,
        }
    }
    fn as_string(&self) -> String {
        match self {
            Raw::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            Raw::Int(v) => v.to_string(),
        }
    }
}

/// The fields of a small message by number (the last value wins).
fn fields(b: &[u8], at: usize) -> Result<HashMap<u32, Raw<'_>>, DecodeError> {
    let mut r = Reader::new(b, at);
    let mut out = HashMap::new();
    while let Some((tag, wire)) = r.key()? {
        let v = match wire {
            Wire::Varint => Raw::Int(r.varint()?),
            Wire::Len => Raw::Bytes(r.bytes()?),
            Wire::Fixed64 => Raw::Int(r.fixed64()?),
            Wire::Fixed32 => Raw::Int(u64::from(r.fixed32()?)),
        };
        out.insert(tag, v);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Varint,
    Fixed64,
    Len,
    Fixed32,
}

/// A protobuf wire-format reader; `base` is where `buf` starts in the
/// whole body, for error offsets.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Reader { buf, at: 0, base }
    }

    fn pos(&self) -> usize {
        self.base + self.at
    }

    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }

    fn bad(&self) -> DecodeError {
        DecodeError::Malformed(self.pos())
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.at).ok_or_else(|| self.bad())?;
            self.at += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.bad())
    }

    fn key(&mut self) -> Result<Option<(u32, Wire)>, DecodeError> {
        if self.done() {
            return Ok(None);
        }
        let k = self.varint()?;
        let wire = match k & 7 {
            0 => Wire::Varint,
            1 => Wire::Fixed64,
            2 => Wire::Len,
            5 => Wire::Fixed32,
            _ => return Err(self.bad()),
        };
        let tag = u32::try_from(k >> 3).map_err(|_| self.bad())?;
        if tag == 0 {
            return Err(self.bad());
        }
        Ok(Some((tag, wire)))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or_else(|| self.bad())?;
        let out = self.buf.get(self.at..end).ok_or_else(|| self.bad())?;
        self.at = end;
        Ok(out)
    }

    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = usize::try_from(self.varint()?).map_err(|_| self.bad())?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let at = self.pos();
        let b = self.bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed(at))
    }

    fn fixed64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn fixed32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        Ok(u32::from_le_bytes(a))
    }

    fn skip(&mut self, wire: Wire) -> Result<(), DecodeError> {
        match wire {
            Wire::Varint => self.varint().map(drop),
            Wire::Fixed64 => self.take(8).map(drop),
            Wire::Len => self.bytes().map(drop),
            Wire::Fixed32 => self.take(4).map(drop),
        }
    }
}

#[cfg(test)]
mod tests;
