//! The initial snapshot, read as fast as the server sends it.
//!
//! A reader task runs the chunk queries inside the snapshot transaction and writes each
//! row straight into newline-delimited change events (no `serde_json::Value` per value),
//! while the caller is still making the previous chunk durable: reading, encoding and
//! queueing overlap. Values come in PostgreSQL's binary format where `pgbinary` decodes
//! the type (the server then skips its text conversion), and as text otherwise; both give
//! the same JSON as the stream's text values, so a row looks the same in a snapshot event
//! and in a later change event.
//!
//! Each table is one query in key order, its rows taken as they come (the connection's
//! flow control holds the server back while the caller is behind). The events go on in
//! items of `chunk_rows` events or `ITEM_BYTES`, whichever is reached first, each with the
//! position after its last row: a restarted snapshot resumes with a query that starts
//! after that key (a bound parameter, cast to the key's type).

use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::Client;

use super::PgTable;
use crate::ident::quote;
use crate::pgbinary::{
    decodes_binary, write_binary_json, write_json_string, write_text_json, RawValue,
};
use crate::{EncodedEvents, Op, SqlError};

/// Chunks read ahead of the caller: one being queued, one ready behind it.
const READ_AHEAD: usize = 2;

/// An item is cut once its events reach this many bytes, whatever `chunk_rows` says, so
/// wide rows do not make huge items (and memory stays at a few items).
const ITEM_BYTES: usize = 2 * 1024 * 1024;

/// What the reader hands over.
pub(super) enum Read {
    /// A chunk of events, and where a restart resumes after it.
    Chunk {
        encoded: EncodedEvents,
        /// The table to resume in (index into the tables).
        table: usize,
        /// The last key read in that table; `None` to start it from its first row.
        after: Option<Vec<String>>,
    },
    /// Every table has been read.
    Done,
}

/// The running reader; dropping it stops the task.
pub(super) struct Reader {
    chunks: mpsc::Receiver<Result<Read, SqlError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reader {
    /// Starts reading at `table`, after the key `after`, on `client`, whose snapshot
    /// transaction is already open. `at` is the WAL position the snapshot was taken at
    /// (each event's `position`).
    pub(super) fn start(
        client: Arc<Client>,
        source: &str,
        tables: &[PgTable],
        table: usize,
        after: Option<Vec<String>>,
        chunk_rows: u32,
        at: &str,
    ) -> Reader {
        let encoders: Vec<TableEncoder> = tables
            .iter()
            .map(|spec| TableEncoder::new(source, spec, at))
            .collect();
        let (sender, chunks) = mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            let result = read_all(&client, &encoders, table, after, chunk_rows, &sender).await;
            let last = match result {
                Ok(()) => Ok(Read::Done),
                Err(err) => Err(err),
            };
            // The receiver may be gone (the source was dropped): nothing to tell then.
            let _ = sender.send(last).await;
        });
        Reader { chunks, task }
    }

    /// The next chunk, or `Done`.
    pub(super) async fn next(&mut self) -> Result<Read, SqlError> {
        match self.chunks.recv().await {
            Some(read) => read,
            None => Err(SqlError::db(
                "read the snapshot",
                "the snapshot reader stopped unexpectedly",
            )),
        }
    }
}

async fn read_all(
    client: &Client,
    encoders: &[TableEncoder],
    mut table: usize,
    mut after: Option<Vec<String>>,
    chunk_rows: u32,
    sender: &mpsc::Sender<Result<Read, SqlError>>,
) -> Result<(), SqlError> {
    let mut item = Item::new(chunk_rows as usize);
    while let Some(encoder) = encoders.get(table) {
        if !encoder
            .read_table(client, table, after.as_deref(), &mut item, sender)
            .await?
        {
            // The source was dropped; the snapshot transaction goes with its connection.
            return Ok(());
        }
        // The table is done: what is left of it goes as one item, resuming at the next.
        if item.count > 0 {
            let rest = std::mem::replace(&mut item, Item::new(chunk_rows as usize));
            if !rest.hand_on(encoder, table + 1, None, sender).await {
                return Ok(());
            }
        }
        table += 1;
        after = None;
    }
    Ok(())
}

/// The item being filled: events of one table, cut at `max_count` events (`chunk_rows`) or
/// [`ITEM_BYTES`], whichever comes first.
struct Item {
    ndjson: Vec<u8>,
    count: usize,
    max_count: usize,
}

impl Item {
    fn new(max_count: usize) -> Item {
        Item {
            ndjson: Vec::with_capacity(ITEM_BYTES + ITEM_BYTES / 8),
            count: 0,
            max_count,
        }
    }

    fn is_full(&self) -> bool {
        self.count >= self.max_count || self.ndjson.len() >= ITEM_BYTES
    }

    /// Sends the item, to resume at `table` after `after`; false when the source is gone.
    async fn hand_on(
        self,
        encoder: &TableEncoder,
        table: usize,
        after: Option<Vec<String>>,
        sender: &mpsc::Sender<Result<Read, SqlError>>,
    ) -> bool {
        let read = Read::Chunk {
            encoded: EncodedEvents {
                table: encoder.config_name.clone(),
                op: Op::Snapshot,
                count: self.count,
                ndjson: self.ndjson,
            },
            table,
            after,
        };
        sender.send(Ok(read)).await.is_ok()
    }
}

/// A captured column as the encoder writes it.
struct Column {
    /// `"name":` (with a leading comma unless first), ready to copy.
    label: Vec<u8>,
    /// Its place in the query's result.
    index: usize,
    type_oid: u32,
    binary: bool,
}

/// Everything about one table's events that does not change from row to row.
struct TableEncoder {
    config_name: String,
    /// `SELECT … ORDER BY key`, with or without the `WHERE key > $…` part.
    first_query: String,
    next_query: String,
    /// `{"source":…,"table":…,"op":"snapshot","key":{`
    head: Vec<u8>,
    /// Key columns, in the order the JSON object lists them (by name).
    key: Vec<Column>,
    /// `},"before":null,"after":{`
    middle: &'static [u8],
    /// Captured columns, by name.
    columns: Vec<Column>,
    /// `},"position":…,"tx":null,"commit_time":null}` and the newline.
    tail: Vec<u8>,
    /// Where the key's text forms (for the resume position) are in the result.
    key_text_from: usize,
    /// The key columns in the configured order (the order of those text forms).
    key_names: Vec<String>,
}

impl TableEncoder {
    fn new(source: &str, spec: &PgTable, at: &str) -> TableEncoder {
        let select: Vec<String> = spec
            .columns
            .iter()
            .map(|(name, oid, _)| {
                if decodes_binary(*oid) {
                    format!("t.{}", quote(name))
                } else {
                    format!("t.{}::text", quote(name))
                }
            })
            .chain(spec.key.iter().map(|k| format!("t.{}::text", quote(k))))
            .collect();
        // Qualified with the alias: a bare `ORDER BY "id"` would sort by an output column
        // of that name, which may be the `::text` form, and text order skips rows.
        let keys: Vec<String> = spec.key.iter().map(|k| format!("t.{}", quote(k))).collect();
        let casts: Vec<String> = spec
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let ty = spec
                    .columns
                    .iter()
                    .find(|(c, _, _)| c == k)
                    .map(|(_, _, ty)| ty.as_str())
                    .unwrap_or("text");
                format!("${}::text::{ty}", i + 1)
            })
            .collect();
        let base = format!("SELECT {} FROM {} AS t", select.join(", "), spec.quoted());
        let order = format!(" ORDER BY {}", keys.join(", "));
        let first_query = format!("{base}{order}");
        let next_query = format!(
            "{base} WHERE ({}) > ({}){order}",
            keys.join(", "),
            casts.join(", ")
        );

        let mut head = Vec::new();
        head.extend_from_slice(b"{\"source\":");
        write_json_string(source, &mut head);
        head.extend_from_slice(b",\"table\":");
        write_json_string(&spec.config_name, &mut head);
        head.extend_from_slice(b",\"op\":\"snapshot\",\"key\":{");

        let column = |name: &str, first: bool| -> Option<Column> {
            let index = spec.columns.iter().position(|(c, _, _)| c == name)?;
            let type_oid = spec.columns.get(index).map(|(_, oid, _)| *oid)?;
            let mut label = Vec::new();
            if !first {
                label.push(b',');
            }
            write_json_string(name, &mut label);
            label.push(b':');
            Some(Column {
                label,
                index,
                type_oid,
                binary: decodes_binary(type_oid),
            })
        };
        // Events built as values list object members by name (serde_json's map is
        // ordered by key); these match them byte for byte.
        let mut key_names: Vec<&String> = spec.key.iter().collect();
        key_names.sort();
        let key = key_names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| column(name, i == 0))
            .collect();
        let mut column_names: Vec<&String> = spec.columns.iter().map(|(c, _, _)| c).collect();
        column_names.sort();
        let columns = column_names
            .iter()
            .enumerate()
            .filter_map(|(i, name)| column(name, i == 0))
            .collect();

        let mut tail = Vec::new();
        tail.extend_from_slice(b"},\"position\":");
        write_json_string(at, &mut tail);
        tail.extend_from_slice(b",\"tx\":null,\"commit_time\":null}\n");

        TableEncoder {
            config_name: spec.config_name.clone(),
            first_query,
            next_query,
            head,
            key,
            middle: b"},\"before\":null,\"after\":{",
            columns,
            tail,
            key_text_from: spec.columns.len(),
            key_names: spec.key.clone(),
        }
    }

    /// Reads this table's rows after `after` into `item`, in one query whose rows are taken
    /// as they come, handing each full item on with the position after its last row
    /// (`table` is this table's index). Returns false when the source is gone.
    async fn read_table(
        &self,
        client: &Client,
        table: usize,
        after: Option<&[String]>,
        item: &mut Item,
        sender: &mpsc::Sender<Result<Read, SqlError>>,
    ) -> Result<bool, SqlError> {
        let failed = |err| SqlError::pg(format!("read table {}", self.config_name), err);
        let (query, params): (&str, &[String]) = match after {
            Some(after) => (&self.next_query, after),
            None => (&self.first_query, &[]),
        };
        let rows = client
            .query_raw(query, params.iter())
            .await
            .map_err(failed)?;
        let mut rows = std::pin::pin!(rows);
        while let Some(row) = rows.next().await {
            let row = row.map_err(failed)?;
            let out = &mut item.ndjson;
            out.extend_from_slice(&self.head);
            self.write_members(&row, &self.key, out)?;
            out.extend_from_slice(self.middle);
            self.write_members(&row, &self.columns, out)?;
            out.extend_from_slice(&self.tail);
            item.count += 1;
            if item.is_full() {
                let key = self.key_text(&row)?;
                let full = std::mem::replace(item, Item::new(item.max_count));
                if !full.hand_on(self, table, Some(key), sender).await {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The key's text forms in `row` (the resume point after it).
    fn key_text(&self, row: &tokio_postgres::Row) -> Result<Vec<String>, SqlError> {
        let mut key = Vec::with_capacity(row.len() - self.key_text_from);
        for (index, column) in (self.key_text_from..row.len()).zip(&self.key_names) {
            let text: Option<&str> = row
                .try_get(index)
                .map_err(|err| SqlError::pg(format!("read table {}", self.config_name), err))?;
            // Resuming after a made-up key would skip or repeat rows.
            let text = text.ok_or_else(|| SqlError::null_key(&self.config_name, column))?;
            key.push(text.to_owned());
        }
        Ok(key)
    }

    fn write_members(
        &self,
        row: &tokio_postgres::Row,
        columns: &[Column],
        out: &mut Vec<u8>,
    ) -> Result<(), SqlError> {
        for column in columns {
            out.extend_from_slice(&column.label);
            let value: Option<RawValue> = row
                .try_get(column.index)
                .map_err(|err| SqlError::pg(format!("read table {}", self.config_name), err))?;
            match value {
                None => out.extend_from_slice(b"null"),
                Some(RawValue(raw)) if column.binary => {
                    write_binary_json(column.type_oid, raw, out)?
                }
                Some(RawValue(raw)) => {
                    let text = std::str::from_utf8(raw).map_err(|_| {
                        SqlError::Decode(format!(
                            "table {}: a text value that is not UTF-8",
                            self.config_name
                        ))
                    })?;
                    write_text_json(column.type_oid, text, out);
                }
            }
        }
        Ok(())
    }
}
