//! Where a member sits in a kernel struct, read from the running kernel's
//! BTF (`/sys/kernel/btf/vmlinux`): what a hand-assembled program needs to
//! read a field whose offset depends on the kernel's configuration (aya
//! relocates only programs it loads from an object file).
//!
//! Only the parts of the format that lead to a struct's members are read:
//! the header, the string section, and each type's fixed part plus its
//! kind's trailing data (to step over it).

use std::borrow::Cow;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("read {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel BTF: {0}")]
    Malformed(&'static str),
    #[error("kernel BTF has no function {0}")]
    NoFunc(String),
    #[error("kernel BTF has no struct {0}")]
    NoStruct(String),
    #[error("kernel BTF: struct {0} has no member {1}")]
    NoMember(String, String),
}

type Result<T> = std::result::Result<T, BtfError>;

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type's fixed part, and where its trailing data starts.
#[derive(Clone, Copy)]
struct Type {
    name_off: u32,
    info: u32,
    size_or_type: u32,
    extra: usize,
}

impl Type {
    fn kind(&self) -> u32 {
        (self.info >> 24) & 0x1f
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    fn kind_flag(&self) -> bool {
        self.info >> 31 == 1
    }
}

/// A parsed BTF blob: types by id (id 0 is `void`, not stored).
pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    types: Vec<Type>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Self> {
        let data = std::fs::read(VMLINUX).map_err(|source| BtfError::Read {
            path: VMLINUX,
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self> {
        let u16_at = |d: &[u8], at: usize| {
            d.get(at..at + 2)
                .map(|b| u16::from_ne_bytes([b[0], b[1]]))
                .ok_or(BtfError::Malformed("short header"))
        };
        if u16_at(&data, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (or not native byte order)"));
        }
        let hdr_len = word(&data, 4)? as usize;
        let type_off = hdr_len + word(&data, 8)? as usize;
        let type_len = word(&data, 12)? as usize;
        let strings = hdr_len + word(&data, 16)? as usize;
        let strings_len = word(&data, 20)? as usize;
        let end = type_off
            .checked_add(type_len)
            .filter(|e| *e <= data.len())
            .ok_or(BtfError::Malformed("type section out of bounds"))?;
        if strings.saturating_add(strings_len) > data.len() {
            return Err(BtfError::Malformed("string section out of bounds"));
        }
        let mut types = Vec::new();
        let mut at = type_off;
        while at < end {
            let t = Type {
                name_off: word(&data, at)?,
                info: word(&data, at + 4)?,
                size_or_type: word(&data, at + 8)?,
                extra: at + 12,
            };
            let trailing = match t.kind() {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * t.vlen(),
                KIND_ENUM | KIND_FUNC_PROTO => 8 * t.vlen(),
                k if k <= KIND_ENUM64 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            types.push(t);
            at += 12 + trailing;
        }
        Ok(Self {
            data,
            strings,
            strings_len,
            types,
        })
    }

    fn name(&self, off: u32) -> Cow<'_, str> {
        let section = &self.data[self.strings..self.strings + self.strings_len];
        let Some(rest) = section.get(off as usize..) else {
            return Cow::Borrowed("");
        };
        let len = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        String::from_utf8_lossy(&rest[..len])
    }

    fn by_id(&self, id: u32) -> Option<&Type> {
        id.checked_sub(1).and_then(|i| self.types.get(i as usize))
    }

    /// The type `id` names once typedefs and qualifiers are seen through.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.by_id(id)?;
            match t.kind() {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// The id of the kernel function `name` (a kfunc, an iterator's target).
    pub fn func_id(&self, name: &str) -> Result<u32> {
        self.types
            .iter()
            .position(|t| t.kind() == KIND_FUNC && self.name(t.name_off) == name)
            .map(|i| i as u32 + 1)
            .ok_or_else(|| BtfError::NoFunc(name.to_string()))
    }

    /// Byte offset of `member` in the struct `name`, looking into anonymous
    /// unions and structs as C does.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32> {
        let s = self
            .types
            .iter()
            .find(|t| t.kind() == KIND_STRUCT && self.name(t.name_off) == name)
            .ok_or_else(|| BtfError::NoStruct(name.to_string()))?;
        self.find_member(s, member, 0, 0)
            .map(|bits| bits / 8)
            .ok_or_else(|| BtfError::NoMember(name.to_string(), member.to_string()))
    }

    fn find_member(&self, t: &Type, member: &str, base_bits: u32, depth: u32) -> Option<u32> {
        if depth > 8 || !matches!(t.kind(), KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for i in 0..t.vlen() {
            let at = t.extra + 12 * i;
            let name_off = word(&self.data, at).ok()?;
            let ty = word(&self.data, at + 4).ok()?;
            let raw = word(&self.data, at + 8).ok()?;
            // With kind_flag the top 8 bits are a bitfield's size.
            let bits = if t.kind_flag() {
                raw & 0x00ff_ffff
            } else {
                raw
            };
            if name_off == 0 {
                let inner = self.resolve(ty)?;
                if let Some(found) = self.find_member(inner, member, base_bits + bits, depth + 1) {
                    return Some(found);
                }
            } else if self.name(name_off) == member {
                return Some(base_bits + bits);
            }
        }
        None
    }
}

fn word(d: &[u8], at: usize) -> Result<u32> {
    d.get(at..at + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's struct sock_common, whose first members every
    /// kernel lays out the same way (the socket hash tables rely on it).
    #[test]
    fn finds_sock_common_members_through_its_anonymous_unions() {
        let btf = Btf::kernel().expect("kernel BTF");
        let off = |m| btf.member_offset("sock_common", m).expect(m);
        assert_eq!(off("skc_daddr"), 0);
        assert_eq!(off("skc_rcv_saddr"), 4);
        assert_eq!(off("skc_dport"), 12);
        assert_eq!(off("skc_family"), 16);
        assert_eq!(off("skc_state"), 18);
        let v6 = off("skc_v6_daddr");
        assert!(v6 > 18 && v6 % 4 == 0, "skc_v6_daddr at {v6}");
        assert!(matches!(
            btf.member_offset("sock_common", "no_such_member"),
            Err(BtfError::NoMember(..))
        ));
        assert!(btf.func_id("bpf_iter_tcp").is_ok_and(|id| id > 0));
        assert!(matches!(
            btf.func_id("no_such_func"),
            Err(BtfError::NoFunc(_))
        ));
        assert!(matches!(
            btf.member_offset("no_such_struct", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn a_truncated_or_foreign_blob_is_an_error() {
        assert!(Btf::parse(vec![0x9f, 0xeb]).is_err());
        assert!(Btf::parse(vec![0; 64]).is_err());
        let mut data = std::fs::read(VMLINUX).expect("kernel BTF");
        data.truncate(100);
        assert!(Btf::parse(data).is_err());
    }
}
