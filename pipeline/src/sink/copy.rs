//! Binary `COPY` encoding of `telemetry_raw` rows.
//!
//! Written by hand instead of through `BinaryCopyInWriter` so a whole batch is
//! encoded in one tight loop into one buffer (no per-field trait objects, no
//! per-row awaits), and so the encoding can be benchmarked on its own.
//! Format: <https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>.

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};

use crate::reading::Reading;

/// The columns, in encoding order. Identifiers are constants, never input.
pub const COLUMNS: &str = "id, tenant_id, device_id, payload, payload_size_bytes, correlation_id, \
     sequence_number, total_chunks, device_timestamp, received_at, ingestion_source, mqtt_topic, client_id, \
     content_sha256, mqtt_properties";

const FIELDS: i16 = 15;
const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// The `jsonb` binary format version byte.
const JSONB_VERSION: u8 = 1;

/// Encodes a complete binary COPY stream (header, rows, trailer) of readings with
/// their [`Reading::content_sha256`].
pub fn encode<'a>(rows: impl IntoIterator<Item = (&'a Reading, &'a [u8; 32])>) -> BytesMut {
    let mut out = BytesMut::with_capacity(8 * 1024);
    header(&mut out);
    for (r, digest) in rows {
        row(&mut out, r, digest);
    }
    trailer(&mut out);
    out
}

pub fn header(out: &mut BytesMut) {
    out.put_slice(SIGNATURE);
    out.put_i32(0); // flags: no OIDs
    out.put_i32(0); // header extension length
}

pub fn trailer(out: &mut BytesMut) {
    out.put_i16(-1);
}

/// Appends one row; `digest` is the reading's [`Reading::content_sha256`].
pub fn row(out: &mut BytesMut, r: &Reading, digest: &[u8; 32]) {
    out.reserve(r.payload.len() + 256);
    out.put_i16(FIELDS);
    bytes_field(out, r.message_id.as_bytes());
    bytes_field(out, r.tenant_id.as_bytes());
    bytes_field(out, r.device_id.as_bytes());
    // jsonb: version byte, then the JSON text (validated by reading::check_payload).
    jsonb(out, Some(&r.payload));
    int4(out, Some(r.payload_size_bytes));
    text(out, r.correlation_id.as_deref());
    int4(out, r.sequence_number);
    int4(out, r.total_chunks);
    timestamptz(out, r.device_timestamp);
    timestamptz(out, Some(r.received_at));
    text(out, Some(r.source.as_str()));
    text(out, r.mqtt_topic.as_deref());
    text(out, r.client_id.as_deref());
    bytes_field(out, digest);
    jsonb(out, r.properties.as_deref());
}

fn jsonb(out: &mut BytesMut, json: Option<&[u8]>) {
    match json {
        Some(j) => {
            len(out, j.len() + 1);
            out.put_u8(JSONB_VERSION);
            out.put_slice(j);
        }
        None => null(out),
    }
}

fn len(out: &mut BytesMut, n: usize) {
    // Field lengths are bounded by the payload limit (far below 2 GiB).
    out.put_i32(i32::try_from(n).unwrap_or(i32::MAX));
}

fn null(out: &mut BytesMut) {
    out.put_i32(-1);
}

fn bytes_field(out: &mut BytesMut, b: &[u8]) {
    len(out, b.len());
    out.put_slice(b);
}

fn text(out: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => bytes_field(out, s.as_bytes()),
        None => null(out),
    }
}

fn int4(out: &mut BytesMut, v: Option<i32>) {
    match v {
        Some(v) => {
            out.put_i32(4);
            out.put_i32(v);
        }
        None => null(out),
    }
}

fn timestamptz(out: &mut BytesMut, t: Option<DateTime<Utc>>) {
    match t {
        Some(t) => {
            out.put_i32(8);
            out.put_i64(t.timestamp_micros() - PG_EPOCH_OFFSET_MICROS);
        }
        None => null(out),
    }
}
