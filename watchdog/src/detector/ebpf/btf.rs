//! A minimal reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find the
//! byte offset of a named member of a named struct, looking through anonymous structs and
//! unions. aya-obj parses BTF too, but does not expose struct members publicly.
//!
//! Format: `Documentation/bpf/btf.rst` in the kernel tree. Type ids start at 1 (0 is void).

use thiserror::Error;

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
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// What is wrong with a BTF blob or a lookup in it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    /// The data is not BTF (bad magic, truncated header or sections).
    #[error("not valid BTF: {0}")]
    Malformed(&'static str),
    /// No struct of that name in the BTF.
    #[error("struct {0} not found in the kernel's BTF")]
    NoStruct(String),
    /// The struct has no such member (at any depth of anonymous members).
    #[error("struct {strukt} has no member {member} in the kernel's BTF")]
    NoMember {
        /// The struct searched.
        strukt: String,
        /// The member asked for.
        member: String,
    },
    /// The member is a bit-field, which cannot be read with a byte offset.
    #[error("{strukt}.{member} is not byte-aligned in the kernel's BTF")]
    NotByteAligned {
        /// The struct searched.
        strukt: String,
        /// The member asked for.
        member: String,
    },
}

#[derive(Debug, Clone, Copy)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// For typedef/const/volatile/restrict/type_tag: the referenced type.
    referenced: u32,
    /// For struct and union: where its members start in [`Btf::members`].
    members: std::ops::Range<usize>,
}

/// Parsed BTF: the types and their members, plus the string section.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
    members: Vec<Member>,
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Parses little-endian BTF (the only byte order the watchdog runs on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data.get(0..2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if magic != Some(MAGIC) {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .ok_or(BtfError::Malformed("section outside the data"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        // Type id 0 is void; keep a placeholder so ids index the vector directly.
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            referenced: 0,
            members: 0..0,
        }];
        let mut members = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let name_off = u32_at(type_data, at)?;
            let info = u32_at(type_data, at + 4)?;
            let size_or_type = u32_at(type_data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let start = members.len();
            match kind {
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(type_data, m + 8)?;
                        members.push(Member {
                            name_off: u32_at(type_data, m)?,
                            type_id: u32_at(type_data, m + 4)?,
                            // With kind_flag the top 8 bits hold a bit-field size.
                            bit_offset: if kind_flag {
                                offset & 0x00ff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    at += vlen * 12;
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_ENUM | KIND_FUNC_PROTO => at += vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => at += vlen * 12,
                _ => {}
            }
            types.push(Type {
                name_off,
                kind,
                referenced: size_or_type,
                members: start..members.len(),
            });
        }
        Ok(Self {
            types,
            members,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and qualifiers to the underlying type id.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize).map(|t| t.kind) {
                Some(KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG) => {
                    id = self.types[id as usize].referenced;
                }
                _ => break,
            }
        }
        id
    }

    /// Bit offset of `member` inside type `id`, searching anonymous members recursively.
    fn find_member(&self, id: u32, member: &[u8], depth: u32) -> Option<u32> {
        let ty = self.types.get(id as usize)?;
        if depth > 8 || !matches!(ty.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in &self.members[ty.members.clone()] {
            if m.name_off != 0 && self.name(m.name_off) == member {
                return Some(m.bit_offset);
            }
        }
        self.members[ty.members.clone()]
            .iter()
            .filter(|m| m.name_off == 0)
            .find_map(|m| {
                self.find_member(self.resolve(m.type_id), member, depth + 1)
                    .map(|inner| m.bit_offset + inner)
            })
    }

    /// Byte offset of `strukt.member`, e.g. `("task_struct", "exit_code")`.
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u32, BtfError> {
        let id = self
            .types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == strukt.as_bytes())
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let bits = self
            .find_member(id as u32, member.as_bytes(), 0)
            .ok_or_else(|| BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })?;
        if bits % 8 != 0 {
            return Err(BtfError::NotByteAligned {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            });
        }
        Ok(bits / 8)
    }
}
