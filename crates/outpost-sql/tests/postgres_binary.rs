#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `pgbinary` against a real PostgreSQL 15: for every decoded type, edge values and many
//! generated ones, the JSON written from the binary result format is the JSON the stream
//! would give for the server's text of the same value (`pg_text_to_json`), in a session set
//! up as the capture's. And for types read as text, `write_text_json` equals
//! `pg_text_to_json` serialized.

use outpost_sql::event::pg_text_to_json;
use outpost_sql::pgbinary::{decodes_binary, write_binary_json, write_text_json, RawValue};
use outpost_testkit::{skip_postgres_tests, PgDatabase};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// The session settings of `connect` in postgres.rs, which the text forms depend on.
const SESSION: &str = "SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'; \
     SET extra_float_digits = 3; SET bytea_output = 'hex'; SET IntervalStyle = 'iso_8601'";

/// Column, SQL type, and edge values as SQL expressions (rows beyond a column's list are
/// NULL there).
const DECODED: &[(&str, &str, &[&str])] = &[
    ("b", "boolean", &["true", "false"]),
    (
        "by",
        "bytea",
        &[
            r"'\x'",
            r"'\x00'",
            r"'\xdeadbeef'",
            r"'\x00ff10'",
            "decode(repeat('00ff7f80fe', 700), 'hex')",
            "convert_to('Zoë 🦷', 'UTF8')",
        ],
    ),
    ("i2", "int2", &["0", "1", "-1", "32767", "-32768", "42"]),
    (
        "i4",
        "int4",
        &["0", "2147483647", "-2147483648", "-7", "100000"],
    ),
    (
        "i8",
        "int8",
        &[
            "0",
            "9223372036854775807",
            "-9223372036854775808",
            "-9007199254740993",
            "9007199254740993",
        ],
    ),
    ("o", "oid", &["0", "4294967295", "2147483648", "16384"]),
    (
        "t",
        "text",
        &[
            "''",
            "'plain'",
            "'Zoë Ångström 山田 Nguyễn'",
            r#"'O''Brien "quoted" ''single'''"#,
            r"E'back\\slash \\\\ two \\u00e9 \\n'",
            r"E'tab\there\nnew\rcr\b\f' || chr(1) || chr(27) || chr(31) || chr(127)",
            "'🦷😀👨‍👩‍👧 flags 🇳🇿'",
            r"E'\u2028\u2029\ufeff'",
            "'</script><!--'",
            "repeat('x\"\\', 5000)",
            "'   padded   '",
        ],
    ),
    (
        "f4",
        "float4",
        &[
            "0",
            "'-0'",
            "0.1",
            "1.5",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "3.4028235e38",
            "1.17549435e-38",
            "1e-45",
            "16777217",
            "123456.7",
            "1e30",
            "0.3",
            "-2.5e-10",
        ],
    ),
    (
        "f8",
        "float8",
        &[
            "0",
            "'-0'",
            "0.1",
            "1e300",
            "-1e-300",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1.7976931348623157e308",
            "5e-324",
            "2.2250738585072014e-308",
            "9007199254740993",
            "123456789.125",
            "1e21",
            "1e22",
            "1e-7",
            "0.3",
            "1e15",
            "1e16",
            "123456789012345678",
            "-1.5",
        ],
    ),
    (
        "bp",
        "char(8)",
        &["'a'", "''", "'Zoë'", "'abcdefgh'", "' lead'", "'山田'"],
    ),
    (
        "vc",
        "varchar(40)",
        &["''", r#"'vc "q" \ '"#, "'Ōkubo'", "'trailing  '"],
    ),
    (
        "nm",
        "name",
        &["'pg_class'", "'Zoë'", "''", "repeat('n', 63)"],
    ),
    (
        "d",
        "date",
        &[
            "'infinity'",
            "'-infinity'",
            "'0044-03-15 BC'",
            "'2000-01-01'",
            "'1999-12-31'",
            "'9999-12-31'",
            "'10000-01-01'",
            "'2024-02-29'",
            "'1900-03-01'",
            "'0001-01-01'",
            "'0001-12-31 BC'",
            "'4714-11-24 BC'",
            "'4713-11-24 BC'",
            "'5874897-12-31'",
            "'1582-10-10'",
            "'1970-01-01'",
        ],
    ),
    (
        "ts",
        "timestamp",
        &[
            "'infinity'",
            "'-infinity'",
            "'2000-01-01 00:00:00'",
            "'1999-12-31 23:59:59.999999'",
            "'2024-03-05 14:30:00.25'",
            "'2024-03-05 14:30:00.000001'",
            "'2024-03-05 14:30:00.5'",
            "'2024-03-05 14:30:00.12'",
            "'1969-07-20 20:17:40'",
            "'0044-03-15 12:00:00.5 BC'",
            "'0001-01-01 00:00:00'",
            "'0001-12-31 23:59:59.999999 BC'",
            "'4714-11-24 00:00:00 BC'",
            "'9999-12-31 23:59:59.999999'",
            "'10000-01-01 00:00:00'",
            "'294276-12-31 23:59:59.999999'",
            "'1900-01-01 00:00:00.1'",
        ],
    ),
    (
        "tz",
        "timestamptz",
        &[
            "'infinity'",
            "'-infinity'",
            "'2000-01-01 00:00:00+00'",
            "'1999-12-31 23:59:59.999999+00'",
            "'2024-03-05 14:30:00.25+00'",
            "'2024-03-05 14:30:00.5+05:30'",
            "'2024-03-05 14:30:00-08'",
            "'2024-03-05 14:30:00.000001+00'",
            "'0044-03-15 12:00:00.5+00 BC'",
            "'0001-01-01 00:00:00+00'",
            "'0001-01-01 00:00:00+01'",
            "'4714-11-24 00:00:00+00 BC'",
            "'9999-12-31 23:59:59.999999+00'",
            "'10000-01-01 00:00:00+00'",
            "'294276-12-31 23:59:59.999999+00'",
            "'1883-11-18 12:00:00 America/New_York'",
        ],
    ),
    (
        "n",
        "numeric",
        &[
            "0",
            "0.00",
            "'-0'",
            "'-0.00'",
            "12.50",
            "-0.01",
            "0.0001",
            "12345678901234567890.000001",
            "'NaN'",
            "'Infinity'",
            "'-Infinity'",
            "1e100",
            "-1e-100",
            "9999.9999",
            "10000",
            "100000000",
            "0.1",
            "1.0000",
            "-123.4500",
            "power(2::numeric, 200)",
            "1::numeric / 3",
            "'123456789.123456789123456789'",
            "'1e-16383'::numeric",
            "10::numeric ^ 1000",
            "-(10::numeric ^ 1000) - 0.5",
            "round(1::numeric / 7, 1000)",
            "0.00010000",
            "1000.0001",
        ],
    ),
    (
        "u",
        "uuid",
        &[
            "'00000000-0000-0000-0000-000000000000'",
            "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
            "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'",
            "gen_random_uuid()",
        ],
    ),
    (
        "j",
        "json",
        &[
            r#"'{"a": [1, 2.50, "x\"y"]}'"#,
            r#"'"ü"'"#,
            "'null'",
            r#"' { "spaces" : 1 } '"#,
        ],
    ),
    (
        "jb",
        "jsonb",
        &[
            r#"'{"b": 1, "a": [1, 2.50, "x\"y"]}'"#,
            r#"'"\u00fc"'"#,
            "'null'",
            r#"'{"nested": {"x": "tab\\t", "e": "🦷"}}'"#,
            "'[]'",
        ],
    ),
];

/// Generated rows, from a fixed seed: values all over each type's range.
const GENERATED: &str = "
SELECT setseed(0.4242);
INSERT INTO decoded (b, i2, i4, i8, o, n, d, ts, tz, u, t, by)
SELECT random() < 0.5,
       floor(random() * 65536 - 32768)::int2,
       floor(random() * 4294967296 - 2147483648)::int4,
       ((random() - 0.5) * 1.8e19)::int8,
       floor(random() * 4294967296)::int8::oid,
       round(((random() - 0.5) * 10 ^ (random() * 40 - 10))::numeric, floor(random() * 25)::int),
       date '2000-01-01' + floor((random() - 0.6) * 4000000)::int,
       timestamp '2000-01-01' + floor((random() - 0.6) * 4000000) * interval '1 day'
           + floor(random() * 86400000000) * interval '1 microsecond',
       timestamptz '2000-01-01 00:00:00+00' + floor((random() - 0.3) * 8000000) * interval '1 day'
           + floor(random() * 86400000000) * interval '1 microsecond',
       gen_random_uuid(),
       md5(random()::text) || chr(1 + floor(random() * 1000)::int),
       decode(md5(random()::text), 'hex')
FROM generate_series(1, 3000);
";

/// Columns of types read as text (`col::text` in the snapshot).
const TEXT_ONLY: &[(&str, &str, &[&str])] = &[
    (
        "iv",
        "interval",
        &["'1 year 2 months 3 days 04:05:06.5'", "'-1 day'", "'0'"],
    ),
    ("tm", "time", &["'14:30:00.25'", "'00:00:00'", "'24:00:00'"]),
    (
        "ttz",
        "timetz",
        &["'14:30:00+05:30'", "'14:30:00.000001-08'"],
    ),
    ("m", "money", &["12.5", "-0.01"]),
    ("ip", "inet", &["'192.168.0.1/24'", "'::1'"]),
    ("ia", "int4[]", &["'{1,2,NULL}'", "'{}'"]),
    ("ta", "text[]", &[r#"'{"a b","c\"d",e}'"#]),
    ("x", "xid", &["'751'", "'4294967295'"]),
    ("bt", "bit(4)", &["B'1010'"]),
    ("pt", "point", &["'(1.5,-2)'"]),
];

/// `CREATE TABLE name (id serial, cols...)` and one INSERT of the edge values.
fn table_sql(name: &str, columns: &[(&str, &str, &[&str])]) -> String {
    let definitions: Vec<String> = columns
        .iter()
        .map(|(column, ty, _)| format!("{column} {ty}"))
        .collect();
    let names: Vec<&str> = columns.iter().map(|(column, _, _)| *column).collect();
    let rows = columns
        .iter()
        .map(|(_, _, values)| values.len())
        .max()
        .unwrap();
    let tuples: Vec<String> = (0..rows)
        .map(|row| {
            let values: Vec<&str> = columns
                .iter()
                .map(|(_, _, values)| values.get(row).copied().unwrap_or("NULL"))
                .collect();
            format!("({})", values.join(", "))
        })
        .collect();
    format!(
        "CREATE TABLE {name} (id serial PRIMARY KEY, {});\nINSERT INTO {name} ({}) VALUES\n{};\n",
        definitions.join(", "),
        names.join(", "),
        tuples.join(",\n")
    )
}

/// A small xorshift, so the generated floats are the same on every run.
struct Bits(u64);

impl Bits {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Rows of random float bit patterns (finite ones; the edge rows hold the others), as
/// literals PostgreSQL reads back exactly: Rust prints the shortest round-trip digits.
fn generated_floats(rows: usize) -> String {
    let mut bits = Bits(0x9e37_79b9_7f4a_7c15);
    let tuples: Vec<String> = (0..rows)
        .map(|row| {
            let mut double = f64::from_bits(bits.next());
            while !double.is_finite() {
                double = f64::from_bits(bits.next());
            }
            let mut single = f32::from_bits(bits.next() as u32);
            while !single.is_finite() {
                single = f32::from_bits(bits.next() as u32);
            }
            // Every third row a value of everyday size, where most data is.
            if row % 3 == 0 {
                double = (bits.next() % 100_000_000) as f64 / 100.0;
                single = (bits.next() % 1_000_000) as f32 / 1000.0;
            }
            format!("('{double:e}'::float8, '{single:e}'::float4)")
        })
        .collect();
    format!(
        "INSERT INTO decoded (f8, f4) VALUES {};",
        tuples.join(",\n")
    )
}

async fn connect(db: &PgDatabase) -> Client {
    let (client, connection) = tokio_postgres::connect(&db.url(), NoTls).await.unwrap();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("connection ended: {err}");
        }
    });
    client.batch_execute(SESSION).await.unwrap();
    client
}

/// The rows of `SELECT columns FROM table ORDER BY id` in text form, as the type output
/// functions print them (the simple query protocol; pgoutput sends the same text).
async fn output_texts(client: &Client, table: &str, columns: &[&str]) -> Vec<Vec<Option<String>>> {
    let sql = format!("SELECT {} FROM {table} ORDER BY id", columns.join(", "));
    client
        .simple_query(&sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                (0..columns.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn json_of_text(type_oid: u32, text: &str) -> String {
    String::from_utf8(serde_json::to_vec(&pg_text_to_json(type_oid, text)).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_values_give_the_json_of_their_text() {
    if skip_postgres_tests("binary_values_give_the_json_of_their_text") {
        return;
    }
    let db = PgDatabase::create();
    let client = connect(&db).await;
    client
        .batch_execute(&table_sql("decoded", DECODED))
        .await
        .unwrap();
    client.batch_execute(GENERATED).await.unwrap();
    client.batch_execute(&generated_floats(4000)).await.unwrap();

    let columns: Vec<&str> = DECODED.iter().map(|(column, _, _)| *column).collect();
    // Each column in binary (tokio-postgres asks for binary results) and cast to text.
    let select: Vec<String> = columns
        .iter()
        .map(|column| format!("{column}, {column}::text"))
        .collect();
    let rows = client
        .query(
            &format!("SELECT {} FROM decoded ORDER BY id", select.join(", ")),
            &[],
        )
        .await
        .unwrap();
    let texts = output_texts(&client, "decoded", &columns).await;
    assert_eq!(rows.len(), texts.len());

    let mut checked = 0;
    let mut out = Vec::new();
    for (row, texts) in rows.iter().zip(&texts) {
        for (index, ((column, ty, _), text)) in DECODED.iter().zip(texts).enumerate() {
            let type_oid = row.columns()[2 * index].type_().oid();
            assert!(decodes_binary(type_oid), "{ty} (oid {type_oid}) is decoded");
            let raw: Option<RawValue> = row.get(2 * index);
            let cast: Option<&str> = row.get(2 * index + 1);
            let (Some(RawValue(raw)), Some(text)) = (raw, text) else {
                assert!(
                    raw.is_none() && text.is_none() && cast.is_none(),
                    "{column}: NULL"
                );
                continue;
            };
            let expected = json_of_text(type_oid, text);
            out.clear();
            write_binary_json(type_oid, raw, &mut out)
                .unwrap_or_else(|err| panic!("{ty} {text:?}: {err}"));
            assert_eq!(
                String::from_utf8(out.clone()).unwrap(),
                expected,
                "{ty} {text:?}: binary JSON differs from the text's"
            );
            out.clear();
            write_text_json(type_oid, text, &mut out);
            assert_eq!(
                String::from_utf8(out.clone()).unwrap(),
                expected,
                "{ty} {text:?}: write_text_json differs from pg_text_to_json"
            );
            let cast = cast.unwrap();
            if *ty == "char(8)" {
                // The cast to text drops char(n)'s padding; the output function (and so
                // pgoutput, and the binary form) keeps it.
                assert_eq!(cast, text.trim_end_matches(' '), "{ty} {text:?}");
            } else {
                assert_eq!(
                    json_of_text(type_oid, cast),
                    expected,
                    "{ty} {text:?}: ::text is {cast:?}"
                );
            }
            checked += 1;
        }
    }
    assert!(
        checked > 3000 * 12 + 4000 * 2,
        "only {checked} values were compared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn float_bit_patterns_give_the_json_of_their_text() {
    if skip_postgres_tests("float_bit_patterns_give_the_json_of_their_text") {
        return;
    }
    let db = PgDatabase::create();
    let client = connect(&db).await;
    // float4 over its whole bit range at a prime stride (both signs, subnormals, NaN
    // payloads), where PostgreSQL's Ryu differs from the shortest digits at midpoints.
    let singles: Vec<f32> = (0..=u32::MAX).step_by(9_973).map(f32::from_bits).collect();
    let mut bits = Bits(0x2545_f491_4f6c_dd1d);
    let doubles: Vec<f64> = (0..200_000).map(|_| f64::from_bits(bits.next())).collect();
    let mut checked = 0;
    let mut out = Vec::new();
    for (sql, type_oid) in [
        ("SELECT x, x::text FROM unnest($1::float4[]) x", 700),
        ("SELECT x, x::text FROM unnest($1::float8[]) x", 701),
    ] {
        let rows = if type_oid == 700 {
            client.query(sql, &[&singles]).await.unwrap()
        } else {
            client.query(sql, &[&doubles]).await.unwrap()
        };
        for row in &rows {
            let RawValue(raw) = row.get(0);
            let text: &str = row.get(1);
            out.clear();
            write_binary_json(type_oid, raw, &mut out).unwrap();
            assert_eq!(
                String::from_utf8(out.clone()).unwrap(),
                json_of_text(type_oid, text),
                "oid {type_oid} {text:?}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, singles.len() + doubles.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_values_of_other_types_give_the_json_of_pg_text_to_json() {
    if skip_postgres_tests("text_values_of_other_types_give_the_json_of_pg_text_to_json") {
        return;
    }
    let db = PgDatabase::create();
    let client = connect(&db).await;
    client
        .batch_execute(&table_sql("other", TEXT_ONLY))
        .await
        .unwrap();

    // The snapshot's query for these types: the column's type, and its text.
    let select: Vec<String> = TEXT_ONLY
        .iter()
        .map(|(column, _, _)| format!("pg_typeof({column})::oid, {column}::text"))
        .collect();
    let rows = client
        .query(
            &format!("SELECT {} FROM other ORDER BY id", select.join(", ")),
            &[],
        )
        .await
        .unwrap();
    let mut checked = 0;
    let mut out = Vec::new();
    for row in &rows {
        for (index, (_, ty, _)) in TEXT_ONLY.iter().enumerate() {
            let type_oid: u32 = row.get(2 * index);
            assert!(!decodes_binary(type_oid), "{ty} is read as text");
            let Some(text) = row.get::<_, Option<&str>>(2 * index + 1) else {
                continue;
            };
            out.clear();
            write_text_json(type_oid, text, &mut out);
            assert_eq!(
                String::from_utf8(out.clone()).unwrap(),
                json_of_text(type_oid, text),
                "{ty} {text:?}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 19, "only {checked} values were compared");
}
