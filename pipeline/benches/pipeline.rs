//! Hot code of the pipeline: topic parsing, payload checks, message-id
//! hashing, envelope encoding, the content digest and COPY row encoding. Run with
//! `cargo bench -p argus-pipeline --bench pipeline`.

use std::hint::black_box;

use argus_pipeline::reading::{check, check_payload, parse_topic, Limits, Reading, Source};
use argus_pipeline::{envelope, message_id, sink};
use bytes::{Bytes, BytesMut};
use chrono::Utc;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use uuid::Uuid;

const DEVICE: Uuid = Uuid::from_u128(0x0d000000_0000_4000_8000_000000000001);
const TENANT: Uuid = Uuid::from_u128(0x0a000000_0000_4000_8000_000000000001);
/// A typical sensor reading, ~200 bytes.
const PAYLOAD: &[u8] = br#"{"timestamp":"2024-05-01T10:00:00.123Z","messageId":"m-000001","temperature":21.53,"humidity":48.2,"battery":3.71,"rssi":-67,"status":"ok","firmware":"1.4.2"}"#;

fn topic() -> String {
    format!("devices/{DEVICE}/telemetry")
}

fn reading() -> Reading {
    let topic = topic();
    let checked = check(&topic, PAYLOAD, &Limits::default()).expect("valid");
    Reading::from_checked(
        checked,
        TENANT,
        Bytes::from_static(PAYLOAD),
        Utc::now(),
        Source::Mqtt,
        Some(topic),
        Some("bridge-0-0".into()),
    )
}

fn benches(c: &mut Criterion) {
    let topic = topic();
    c.bench_function("parse_topic", |b| b.iter(|| parse_topic(black_box(&topic))));

    let mut g = c.benchmark_group("payload");
    g.throughput(Throughput::Bytes(PAYLOAD.len() as u64));
    g.bench_function("check_payload", |b| {
        b.iter(|| check_payload(black_box(PAYLOAD), &Limits::default()))
    });
    g.bench_function("check (topic + payload + id)", |b| {
        b.iter(|| check(black_box(&topic), black_box(PAYLOAD), &Limits::default()))
    });
    g.bench_function("message_id::derive (hash)", |b| {
        b.iter(|| message_id::derive(DEVICE, black_box(&topic), black_box(PAYLOAD), None))
    });
    g.bench_function("message_id::derive (supplied)", |b| {
        b.iter(|| message_id::derive(DEVICE, &topic, PAYLOAD, black_box(Some("m-000001"))))
    });
    g.finish();

    let r = reading();
    c.bench_function("envelope::encode", |b| {
        let mut out = Vec::with_capacity(1024);
        b.iter(|| {
            out.clear();
            envelope::encode_into(black_box(&r), &mut out);
        })
    });

    // Once per unique id of a batch, stored with the row (`telemetry_raw.content_sha256`).
    c.bench_function("Reading::content_sha256", |b| {
        b.iter(|| black_box(&r).content_sha256())
    });

    let batch: Vec<(Reading, [u8; 32])> = (0..500)
        .map(|_| {
            let r = reading();
            let digest = r.content_sha256();
            (r, digest)
        })
        .collect();
    let mut g = c.benchmark_group("copy");
    g.throughput(Throughput::Elements(batch.len() as u64));
    g.bench_function("encode 500 rows", |b| {
        b.iter_batched(
            || BytesMut::with_capacity(256 * 1024),
            |mut out| {
                sink::copy::header(&mut out);
                for (r, digest) in &batch {
                    sink::copy::row(&mut out, black_box(r), digest);
                }
                sink::copy::trailer(&mut out);
                out
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(pipeline, benches);
criterion_main!(pipeline);
