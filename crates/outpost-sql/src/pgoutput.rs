//! A decoder for PostgreSQL's `pgoutput` logical replication messages (protocol version 1,
//! "Logical Replication Message Formats" in the PostgreSQL manual). Bytes in, owned
//! messages out; no IO.

use crate::SqlError;

/// One column of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// SQL NULL.
    Null,
    /// A TOASTed value the change did not touch; its value is not sent.
    UnchangedToast,
    /// The value's text form.
    Text(String),
    /// The value's binary form (only sent when asked for; kept for completeness).
    Binary(Vec<u8>),
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity.
    pub is_key: bool,
    /// The column name.
    pub name: String,
    /// The type OID.
    pub type_oid: u32,
    /// The type modifier.
    pub type_modifier: i32,
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A transaction starts.
    Begin {
        /// The LSN of the commit record.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// A transaction ends.
    Commit {
        /// The LSN of the commit record.
        commit_lsn: u64,
        /// The LSN just past the commit record.
        end_lsn: u64,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
    },
    /// Where the transaction came from (replication origin).
    Origin {
        /// The origin's commit LSN.
        commit_lsn: u64,
        /// The origin's name.
        name: String,
    },
    /// Describes a table before its first change in a stream.
    Relation {
        /// The table's OID.
        oid: u32,
        /// Its schema.
        namespace: String,
        /// Its name.
        name: String,
        /// `d` default, `n` nothing, `f` full, `i` index.
        replica_identity: u8,
        /// Its columns, in order.
        columns: Vec<Column>,
    },
    /// Describes a non-built-in type.
    Type {
        /// The type's OID.
        oid: u32,
        /// Its schema.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A new row.
    Insert {
        /// The table.
        oid: u32,
        /// The new row.
        new: Vec<Datum>,
    },
    /// A changed row.
    Update {
        /// The table.
        oid: u32,
        /// The old row: only the key columns (`K`, key changed) or all (`O`, identity full).
        old: Option<(OldKind, Vec<Datum>)>,
        /// The new row.
        new: Vec<Datum>,
    },
    /// A removed row.
    Delete {
        /// The table.
        oid: u32,
        /// The old row's key columns or, with identity full, all of it.
        old: (OldKind, Vec<Datum>),
    },
    /// Tables emptied.
    Truncate {
        /// `1` cascade, `2` restart identity.
        options: u8,
        /// The tables.
        oids: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`); not used.
    Other(u8),
}

/// What an old tuple holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// The replica identity's columns only (others are null).
    Key,
    /// The whole old row (`REPLICA IDENTITY FULL`).
    Full,
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SqlError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.buf.len());
        let Some(end) = end else {
            return Err(SqlError::Decode(format!(
                "message cut short: needed {n} bytes at offset {} of {}",
                self.at,
                self.buf.len()
            )));
        };
        let bytes = &self.buf[self.at..end];
        self.at = end;
        Ok(bytes)
    }
    fn u8(&mut self) -> Result<u8, SqlError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SqlError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SqlError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SqlError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn cstr(&mut self) -> Result<String, SqlError> {
        let rest = &self.buf[self.at..];
        let Some(len) = rest.iter().position(|b| *b == 0) else {
            return Err(SqlError::Decode(
                "string without its terminating zero".into(),
            ));
        };
        let text = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.at += len + 1;
        Ok(text)
    }
    fn tuple(&mut self) -> Result<Vec<Datum>, SqlError> {
        let n = self.u16()?;
        let mut datums = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let datum = match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    Datum::Text(String::from_utf8_lossy(self.take(len)?).into_owned())
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    Datum::Binary(self.take(len)?.to_vec())
                }
                other => {
                    return Err(SqlError::Decode(format!(
                        "unknown tuple column kind {:?}",
                        other as char
                    )))
                }
            };
            datums.push(datum);
        }
        Ok(datums)
    }
    fn old(&mut self, tag: u8) -> Result<(OldKind, Vec<Datum>), SqlError> {
        let kind = match tag {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            other => {
                return Err(SqlError::Decode(format!(
                    "expected an old tuple ('K' or 'O'), found {:?}",
                    other as char
                )))
            }
        };
        Ok((kind, self.tuple()?))
    }
}

/// Decodes one message.
pub fn decode(buf: &[u8]) -> Result<Message, SqlError> {
    let mut r = Reader { buf, at: 0 };
    let tag = r.u8()?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.u64()? as i64,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                commit_lsn: r.u64()?,
                end_lsn: r.u64()?,
                commit_time: r.u64()? as i64,
            }
        }
        b'O' => Message::Origin {
            commit_lsn: r.u64()?,
            name: r.cstr()?,
        },
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(Column {
                    is_key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.u32()? as i32,
                });
            }
            Message::Relation {
                oid,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let oid = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert {
                    oid,
                    new: r.tuple()?,
                },
                other => {
                    return Err(SqlError::Decode(format!(
                        "insert: expected 'N', found {:?}",
                        other as char
                    )))
                }
            }
        }
        b'U' => {
            let oid = r.u32()?;
            let mut tag = r.u8()?;
            let old = if tag == b'K' || tag == b'O' {
                let old = r.old(tag)?;
                tag = r.u8()?;
                Some(old)
            } else {
                None
            };
            if tag != b'N' {
                return Err(SqlError::Decode(format!(
                    "update: expected 'N', found {:?}",
                    tag as char
                )));
            }
            Message::Update {
                oid,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let oid = r.u32()?;
            let tag = r.u8()?;
            Message::Delete {
                oid,
                old: r.old(tag)?,
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            let mut oids = Vec::with_capacity(n.min(1024) as usize);
            for _ in 0..n {
                oids.push(r.u32()?);
            }
            Message::Truncate { options, oids }
        }
        other => Message::Other(other),
    };
    Ok(message)
}

/// `0/16B3748` → the number.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return None;
    }
    Some(hi << 32 | lo)
}

/// The number → `0/16B3748`.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn text_tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            match v {
                None => out.push(b'n'),
                Some(t) => {
                    out.push(b't');
                    out.extend_from_slice(&(t.len() as u32).to_be_bytes());
                    out.extend_from_slice(t.as_bytes());
                }
            }
        }
    }

    #[test]
    fn begin_and_commit() {
        let mut b = vec![b'B'];
        b.extend_from_slice(&0x0000_0001_0000_0010u64.to_be_bytes());
        b.extend_from_slice(&1_500_000i64.to_be_bytes());
        b.extend_from_slice(&751u32.to_be_bytes());
        assert_eq!(
            decode(&b).unwrap(),
            Message::Begin {
                final_lsn: 0x1_0000_0010,
                commit_time: 1_500_000,
                xid: 751
            }
        );
        let mut c = vec![b'C', 0];
        c.extend_from_slice(&16u64.to_be_bytes());
        c.extend_from_slice(&40u64.to_be_bytes());
        c.extend_from_slice(&7i64.to_be_bytes());
        assert_eq!(
            decode(&c).unwrap(),
            Message::Commit {
                commit_lsn: 16,
                end_lsn: 40,
                commit_time: 7
            }
        );
        assert!(
            decode(&c[..10]).is_err(),
            "a cut message is an error, not a panic"
        );
    }

    #[test]
    fn relation_insert_update_delete_truncate() {
        let mut r = vec![b'R'];
        r.extend_from_slice(&16384u32.to_be_bytes());
        cstr(&mut r, "public");
        cstr(&mut r, "patient");
        r.push(b'd');
        r.extend_from_slice(&2u16.to_be_bytes());
        r.push(1);
        cstr(&mut r, "patnum");
        r.extend_from_slice(&23u32.to_be_bytes());
        r.extend_from_slice(&(-1i32).to_be_bytes());
        r.push(0);
        cstr(&mut r, "lname");
        r.extend_from_slice(&25u32.to_be_bytes());
        r.extend_from_slice(&(-1i32).to_be_bytes());
        let Message::Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        } = decode(&r).unwrap()
        else {
            panic!("not a relation")
        };
        assert_eq!(
            (oid, namespace.as_str(), name.as_str(), replica_identity),
            (16384, "public", "patient", b'd')
        );
        assert_eq!(
            columns[0],
            Column {
                is_key: true,
                name: "patnum".into(),
                type_oid: 23,
                type_modifier: -1
            }
        );
        assert!(!columns[1].is_key);

        let mut i = vec![b'I'];
        i.extend_from_slice(&16384u32.to_be_bytes());
        i.push(b'N');
        text_tuple(&mut i, &[Some("7"), Some("Müller")]);
        assert_eq!(
            decode(&i).unwrap(),
            Message::Insert {
                oid: 16384,
                new: vec![Datum::Text("7".into()), Datum::Text("Müller".into())]
            }
        );

        let mut u = vec![b'U'];
        u.extend_from_slice(&16384u32.to_be_bytes());
        u.push(b'O');
        text_tuple(&mut u, &[Some("7"), None]);
        u.push(b'N');
        u.extend_from_slice(&2u16.to_be_bytes());
        u.extend_from_slice(b"t\0\0\0\x018u");
        assert_eq!(
            decode(&u).unwrap(),
            Message::Update {
                oid: 16384,
                old: Some((OldKind::Full, vec![Datum::Text("7".into()), Datum::Null])),
                new: vec![Datum::Text("8".into()), Datum::UnchangedToast],
            }
        );
        let mut u2 = vec![b'U'];
        u2.extend_from_slice(&1u32.to_be_bytes());
        u2.push(b'N');
        text_tuple(&mut u2, &[None]);
        assert_eq!(
            decode(&u2).unwrap(),
            Message::Update {
                oid: 1,
                old: None,
                new: vec![Datum::Null]
            }
        );

        let mut d = vec![b'D'];
        d.extend_from_slice(&16384u32.to_be_bytes());
        d.push(b'K');
        text_tuple(&mut d, &[Some("7"), None]);
        assert_eq!(
            decode(&d).unwrap(),
            Message::Delete {
                oid: 16384,
                old: (OldKind::Key, vec![Datum::Text("7".into()), Datum::Null])
            }
        );

        let mut t = vec![b'T'];
        t.extend_from_slice(&2u32.to_be_bytes());
        t.push(0);
        t.extend_from_slice(&1u32.to_be_bytes());
        t.extend_from_slice(&2u32.to_be_bytes());
        assert_eq!(
            decode(&t).unwrap(),
            Message::Truncate {
                options: 0,
                oids: vec![1, 2]
            }
        );

        let mut y = vec![b'Y'];
        y.extend_from_slice(&99u32.to_be_bytes());
        cstr(&mut y, "public");
        cstr(&mut y, "mood");
        assert_eq!(
            decode(&y).unwrap(),
            Message::Type {
                oid: 99,
                namespace: "public".into(),
                name: "mood".into()
            }
        );

        let mut o = vec![b'O'];
        o.extend_from_slice(&5u64.to_be_bytes());
        cstr(&mut o, "node1");
        assert_eq!(
            decode(&o).unwrap(),
            Message::Origin {
                commit_lsn: 5,
                name: "node1".into()
            }
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(decode(b"").is_err());
        assert!(decode(b"I\0\0\0\x01X").is_err());
        assert!(decode(b"I\0\0\0\x01N\0\x01t\0\0\0\x09ab").is_err());
        assert!(decode(b"R\0\0\0\x01public").is_err());
    }

    #[test]
    fn lsns_round_trip() {
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B3748));
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        assert_eq!(format_lsn(0x1_0016_B374), "1/16B374");
        assert_eq!(parse_lsn("x"), None);
    }
}
