//! Fuzz targets (proptest): every parser of bytes lifeboat does not control — manifests, objects
//! snapshots and blob lists read from the repository, policy files, the Redis replication
//! framing, RDB payloads and a whole replica session against a scripted server — gets arbitrary
//! and mutated inputs and must answer with a value or an error, never a panic or a hang. CI runs each for its default number of cases (`PROPTEST_CASES` raises
//! it); failures found are kept as a corpus in `proptest-regressions/fuzz.txt` and replayed first.

use proptest::prelude::*;

use crate::policy::Secret;
use crate::repo::catalog::parse_manifest;
use crate::source::objects;

/// A replica session against a server that says `server`, then hangs up. On tokio's paused
/// clock a stall ends in the idle timeout at once instead of hanging the test.
fn session(server: &[u8]) -> crate::Result<Vec<u8>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let (client, mut far) = tokio::io::duplex(1 << 20);
        let script = server.to_vec();
        let talk = async move {
            use tokio::io::AsyncWriteExt;
            let _ = far.write_all(&script).await;
            let _ = far.shutdown().await;
            // Reads what the replica sends until it hangs up, so it never blocks writing.
            let _ = tokio::io::copy(&mut far, &mut tokio::io::sink()).await;
        };
        let (got, ()) = tokio::join!(crate::source::redis::replicate_over(client), talk);
        got
    })
}

#[test]
fn a_well_formed_session_yields_the_payload_in_either_framing() {
    assert_eq!(session(SESSION).unwrap(), RDB);
    let mut by_length = b"+OK\r\n+OK\r\n-ERR unknown option\r\n+FULLRESYNC x 0\r\n\n".to_vec();
    by_length.extend_from_slice(format!("${}\r\n", RDB.len()).as_bytes());
    by_length.extend_from_slice(RDB);
    assert_eq!(session(&by_length).unwrap(), RDB);
    // A server that stops half-way is an error, not a short payload.
    let cut = &SESSION[..SESSION.len() - 50];
    let e = session(cut).unwrap_err();
    assert!(
        e.message.contains("before the snapshot's end mark"),
        "{}",
        e.message
    );
}

/// A valid input with up to 8 edits: a byte set, removed, duplicated, or the rest cut off.
fn mutated(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), 0..4u8), 0..8).prop_map(move |edits| {
        let mut v = base.to_vec();
        for (at, byte, op) in edits {
            if v.is_empty() {
                break;
            }
            let i = at % v.len();
            match op {
                0 => v[i] = byte,
                1 => {
                    v.remove(i);
                }
                2 => v.insert(i, v[i]),
                _ => v.truncate(i),
            }
        }
        v
    })
}

/// Mutations of `base`, and bytes of no shape at all.
fn inputs(base: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => mutated(base),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

const MANIFEST: &[u8] = br#"{"format":1,"id":"20261127T101500Z-ab12","source":"db","kind":"postgres","started_at":"2026-11-27T10:15:00Z","finished_at":"2026-11-27T10:16:00Z","tool_version":"lifeboat 0.1.0","source_version":"PostgreSQL 15.4","dump_tool_version":"pg_dump 15.4","compression":{"algorithm":"zstd","level":3},"encryption":{"algorithm":"age-v1","recipients":["age1x"]},"size_plain":10,"size_stored":20,"parts":[{"name":"database.dump.zst.age","role":"database","format":"pg_dump-custom","size_plain":10,"sha256_plain":"aa","size_stored":20,"sha256_stored":"bb"}],"fingerprint":{"name":"fingerprint.json.age","size_stored":5,"sha256_stored":"cc"}}"#;

const SNAPSHOT: &[u8] = b"{\"path\":\"a/b.txt\",\"type\":\"file\",\"size\":3,\"mtime_ms\":1,\"mode\":420,\"etag\":null,\"sha256\":\"e3b0\",\"blob\":\"ab01\"}\n{\"path\":\"a\",\"type\":\"dir\",\"size\":0,\"mtime_ms\":null,\"mode\":493,\"etag\":null,\"sha256\":null,\"blob\":null}\n";

const POLICY: &[u8] = b"[repository]\nurl = \"s3://bucket/p\"\nendpoint = \"http://127.0.0.1:9000\"\n\n[encryption]\nrecipients = [\"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\"]\n\n[defaults]\nschedule = \"0 3 * * *\"\nretention = { keep_last = 3, keep_daily = 7 }\n\n[[sources]]\nname = \"db\"\nkind = \"postgres\"\nurl = \"postgres://u@h/db\"\n\n[[sources]]\nname = \"cache\"\nkind = \"redis\"\nurl = \"redis://u@h:6379\"\nmode = \"file\"\nrdb_path = \"/d/dump.rdb\"\n";

/// An RDB header, a string key with an expiry, a hash, the end marker and a CRC.
/// What a Redis 7 master says to a diskless replica: three REPLCONF answers, FULLRESYNC, two
/// keep-alive newlines, the EOF-framed payload.
const SESSION: &[u8] = b"+OK\r\n+OK\r\n+OK\r\n+FULLRESYNC 8de1787ba490483314a4d30f1c628bc5025eb761 0\r\n\n\n$EOF:0123456789012345678901234567890123456789\r\nREDIS0011\xfa\tredis-ver\x057.0.0\xfe\x00\xfb\x02\x01\xfc\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01k\x01v\x04\x01h\x01\x01f\x01v\xff\x00\x00\x00\x00\x00\x00\x00\x000123456789012345678901234567890123456789";
const RDB: &[u8] = b"REDIS0011\xfa\tredis-ver\x057.0.0\xfe\x00\xfb\x02\x01\xfc\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01k\x01v\x04\x01h\x01\x01f\x01v\xff\x00\x00\x00\x00\x00\x00\x00\x00";

proptest! {
    #[test]
    fn manifests(bytes in inputs(MANIFEST)) {
        if let Ok(m) = parse_manifest("backups/db/x/manifest.json", &bytes, "db", "20261127T101500Z-ab12") {
            // Whatever parses names nothing outside its backup.
            for (name, _, _) in m.objects() {
                prop_assert!(!name.contains('/') && name != ".." && !name.is_empty());
            }
        }
    }

    #[test]
    fn snapshots(bytes in inputs(SNAPSHOT)) {
        if let Ok(entries) = objects::decode_snapshot(&bytes) {
            for e in entries {
                prop_assert!(!e.path.starts_with('/') && !e.path.split('/').any(|c| c == ".."));
            }
        }
    }

    #[test]
    fn blob_lists(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        static SEALED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let key = Secret::new("k".repeat(40));
        prop_assert!(objects::parse_blob_list(&key, &bytes).is_err());
        // A sealed list with one edit either opens to the same ids or is refused.
        let mut sealed = SEALED
            .get_or_init(|| objects::seal(&key, format!("{}\n", "ab".repeat(32)).as_bytes()).unwrap())
            .clone();
        if !bytes.is_empty() {
            let i = bytes[0] as usize % sealed.len();
            sealed[i] ^= bytes.get(1).copied().unwrap_or(1).max(1);
            if let Ok(got) = objects::parse_blob_list(&key, &sealed) {
                prop_assert_eq!(got, vec!["ab".repeat(32)]);
            }
        }
    }

    #[test]
    fn policies(bytes in inputs(POLICY)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = crate::policy::parse(&text, "p.toml", &|_| None, crate::policy::LoadOptions::default());
    }

    #[test]
    fn replica_sessions(server in inputs(SESSION)) {
        match session(&server) {
            Ok(payload) => {
                prop_assert!(payload.len() <= server.len());
                if server == SESSION {
                    prop_assert_eq!(&payload[..], RDB);
                }
            }
            Err(e) => prop_assert!(!e.message.is_empty()),
        }
    }

    #[test]
    fn replication_framing_and_rdb_payloads(line in inputs(b"$EOF:0123456789012345678901234567890123456789"), rdb in inputs(RDB)) {
        let _ = crate::source::redis::framing(&line);
        let _ = crate::source::redis::rdb::parse(&rdb[..]);
        let mut crc = crate::source::redis::rdb::Crc64Tail::default();
        crc.update(&rdb);
        let _ = crc.finish();
        let _ = crate::source::redis::rdb::lzf_decompress(&rdb, line.len() * 8);
    }
}
